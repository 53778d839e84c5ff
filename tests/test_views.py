"""build_train_loader(spec=DataSpec): named image views with their recipes, text fields and text
views, through both readers (DALI on CPU) and the synthetic loader; exactly once, drop_last,
resume, determinism, recipe statistics."""
import os
import random
import threading

import numpy as np
import pytest
import torch

from alip.data import text_views
from alip.data.augment import CLIP_MEAN, CLIP_STD, RECIPE_PARAMS, view_params, view_rngs
from alip.data.loader import build_train_loader
from alip.data.recordio import RecordReader, RecordWriter
from alip.data.spec import ALIP_DATA, CLIP_DATA, DataSpec, ImageView, TextView
from data_fixtures import image, jpeg_bytes, make_rec_shards, tokenize

N = 23
SIZE = 16


def swap_two(tokens, rng):
    """A random but deterministic text transform: swap two tokens between SOT and EOT."""
    out = tokens.clone()
    n = int((tokens != 0).sum())
    if n > 3:
        i, j = rng.sample(range(1, n - 1), 2)
        out[i], out[j] = tokens[j], tokens[i]
    return out


SWAP = f"{__name__}:swap_two"  # a transform by import path: nothing to register
SLIP = DataSpec(image_views=(ImageView("image", "slip_base"), ImageView("aug1", "simclr"),
                             ImageView("aug2", "simclr")),
                text_fields=("raw", "caption"), text_views=(TextView("raw_swap", "raw", SWAP),))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_rec_shards(tmp_path_factory, N)


@pytest.fixture(scope="module")
def key_of(shards):
    """raw tokens -> record key (raw texts are unique)."""
    table = {tuple(r.raw_tokens): r.key for name in sorted(os.listdir(shards)) if name.endswith(".rec")
             for r in RecordReader(os.path.join(shards, name))}
    assert len(table) == N
    return table


def keys(batches, key_of):
    return [key_of[tuple(r.tolist())] for b in batches for r in b["raw"]]


def epoch(loader, e=0, start_batch=0):
    loader.set_epoch(e, start_batch)
    return list(loader)


def denorm(x):
    return x * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_spec_is_alip_data_and_its_image_is_the_reference_transform(shards):
    """No spec: ALIP_DATA's dicts; its one ``reference`` view is, bit for bit, the single-view
    transform of (seed, epoch, record index) (``train_transform`` with ``sample_rng``, an
    independent replica), so one reference view reproduces the reference augmentation."""
    from io import BytesIO

    from PIL import Image

    from alip.data.augment import sample_rng, train_transform
    from alip.data.loader import rec_paths
    kw = dict(backend="torch", batch_size=4, image_size=SIZE, seed=3, workers=0)
    default = epoch(build_train_loader(shards, **kw), 1)
    dicts = epoch(build_train_loader(shards, spec=ALIP_DATA, **kw), 1)
    assert len(default) == len(dicts) == 5
    records = [r for p in rec_paths(shards) for r in RecordReader(p)]  # the loader's record indices
    index_of = {tuple(r.raw_tokens): i for i, r in enumerate(records)}
    for t, d in zip(default, dicts):
        assert list(t) == list(d) == ALIP_DATA.keys == ["image", "raw", "caption"]
        assert same(t, d)
        for x, raw in zip(t["image"], t["raw"]):
            i = index_of[tuple(raw.tolist())]
            want = train_transform(Image.open(BytesIO(records[i].jpeg)), SIZE, sample_rng(3, 1, i))
            assert torch.equal(x, want)  # bit-identical


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_views_ranks_read_every_record_exactly_once(shards, key_of, backend, drop_last):
    got, counts = [], []
    for r in (0, 1):
        loader = build_train_loader(shards, backend=backend, batch_size=4, image_size=SIZE, rank=r,
                                    world_size=2, workers=0, drop_last=drop_last, spec=SLIP)
        batches = epoch(loader, 1)
        for b in batches:
            assert list(b) == SLIP.keys
            assert {tuple(b[k].shape) for k in ("image", "aug1", "aug2")} == {(len(b["raw"]), 3, SIZE, SIZE)}
            assert all(b[k].dtype == torch.float32 for k in ("image", "aug1", "aug2"))
            assert b["raw_swap"].dtype == torch.int64 and b["raw_swap"].shape == b["raw"].shape
            # the text view is its record's raw text with two tokens swapped
            assert torch.equal(b["raw_swap"].sort(1).values, b["raw"].sort(1).values)
            assert (b["raw_swap"] != b["raw"]).any(1).all()
        got += keys(batches, key_of)
        counts.append([len(b["raw"]) for b in batches])
    if drop_last:  # 23 records, W=2, B=4: 2 full batches per rank, 7 dropped
        assert counts == [[4, 4], [4, 4]] and loader.dropped_per_epoch == 7
        assert len(got) == len(set(got)) == 16
    else:
        assert sorted(got) == list(range(N))


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_views_resume_bit_identical(shards, backend):
    kw = dict(backend=backend, batch_size=3, image_size=SIZE, seed=5, workers=1, spec=SLIP)
    full = epoch(build_train_loader(shards, **kw), 2)
    assert len(full) == 7
    first = build_train_loader(shards, **kw)
    first.set_epoch(2)
    for b, batch in enumerate(first):
        assert same(batch, full[b])
        if b == 2:
            break
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batch"] == 3
    resumed = build_train_loader(shards, **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 4 and all(same(a, b) for a, b in zip(full[3:], rest))
    if backend == "dali":
        assert state["dali_checkpoint"] and resumed.replayed_batches == 0  # restored, not replayed
    replayed = epoch(build_train_loader(shards, **kw), 2, start_batch=5)
    assert len(replayed) == 2 and all(same(a, b) for a, b in zip(full[5:], replayed))


def test_torch_views_deterministic_whatever_the_workers(shards):
    runs = [epoch(build_train_loader(shards, backend="torch", batch_size=4, image_size=SIZE, seed=2,
                                     workers=w, spec=SLIP), 1) for w in (0, 2)]
    assert all(same(a, b) for a, b in zip(*runs))
    other = epoch(build_train_loader(shards, backend="torch", batch_size=4, image_size=SIZE, seed=2,
                                     workers=0, spec=SLIP), 2)
    assert not torch.equal(runs[0][0]["raw_swap"], other[0]["raw_swap"])


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_views_of_a_sample_differ_and_text_views_agree_across_backends(shards, key_of, backend):
    loader = build_train_loader(shards, backend=backend, batch_size=5, image_size=SIZE, seed=1,
                                workers=1, drop_last=False, spec=SLIP)
    batches = epoch(loader, 3)
    views = {k: torch.cat([b[k] for b in batches]) for k in ("image", "aug1", "aug2")}
    for a, b in (("image", "aug1"), ("image", "aug2"), ("aug1", "aug2")):
        diff = (views[a] - views[b]).flatten(1).abs().mean(1)
        assert (diff > 0.05).float().mean() > 0.8, (a, b, diff)  # crops of a sample differ
    # a record's text view depends on (seed, epoch, record, view) only: the same in both readers
    swapped = {key_of[tuple(r.tolist())]: s for b in batches for r, s in zip(b["raw"], b["raw_swap"])}
    for k, rec in enumerate(r for name in sorted(os.listdir(shards)) if name.endswith(".rec")
                            for r in RecordReader(os.path.join(shards, name))):
        want = swap_two(torch.from_numpy(rec.raw_tokens), text_views.text_rng(1, 3, k, "raw_swap"))
        assert torch.equal(swapped[rec.key], want), rec.key


def test_recipe_draws_follow_their_probabilities():
    n = 4000
    for recipe, want in [("mocov2", dict(flip=0.5, jitter=0.8, gray=0.2, blur=0.5, area=(0.2, 1))),
                         ("simclr", dict(flip=0.5, jitter=0.8, gray=0.2, blur=0.5, area=(0.08, 1))),
                         ("slip_base", dict(flip=0, jitter=0, gray=0, blur=0, area=(0.5, 1))),
                         ("reference", dict(flip=0.5, jitter=0, gray=0, blur=0, area=(0.7, 1)))]:
        ps = [view_params(random.Random(i), recipe, 400, 300) for i in range(n)]
        freq = dict(flip=np.mean([p.flip for p in ps]), jitter=np.mean([bool(p.jitter) for p in ps]),
                    gray=np.mean([p.gray for p in ps]), blur=np.mean([p.blur_sigma > 0 for p in ps]))
        for k, f in freq.items():  # 5 binomial standard deviations (at most 0.04 for n = 4000)
            assert abs(f - want[k]) <= 5 * np.sqrt(want[k] * (1 - want[k]) / n) + 1e-12, (recipe, k, f)
        areas = np.array([p.crop[2] * p.crop[3] / (400 * 300) for p in ps])
        lo, hi = want["area"]  # rounding the crop to whole pixels moves the area by < 1%
        assert areas.min() >= lo * 0.99 and areas.max() <= hi and areas.min() < lo + 0.05
        sigmas = [p.blur_sigma for p in ps if p.blur_sigma]
        assert not sigmas or 0.1 <= min(sigmas) and max(sigmas) <= 2.0
        for p in ps:
            if p.jitter:
                f = dict(p.jitter)
                assert all(0.6 <= f[k] <= 1.4 for k in ("brightness", "contrast", "saturation"))
                assert -0.1 <= f["hue"] <= 0.1
        orders = {tuple(op for op, _ in p.jitter) for p in ps if p.jitter}
        assert len(orders) == (24 if want["jitter"] else 0)  # torchvision's: a random order per sample


def test_torch_gray_views_have_equal_channels_exactly_when_the_coin_says(shards, key_of):
    spec = DataSpec(image_views=(ImageView("image", "slip_base"), ImageView("aug", "mocov2")),
                    text_fields=("raw",))
    batches = epoch(build_train_loader(shards, backend="torch", batch_size=5, image_size=SIZE, seed=4,
                                       workers=0, drop_last=False, spec=spec), 0)
    # record index = key order in the shards, as the torch reader numbers them
    index = {r.key: i for i, r in enumerate(r for name in sorted(os.listdir(shards)) if name.endswith(".rec")
                                            for r in RecordReader(os.path.join(shards, name)))}
    grays = 0
    for b in batches:
        for raw, x in zip(b["raw"], denorm(b["aug"])):
            k = key_of[tuple(raw.tolist())]
            p = view_params(view_rngs(4, 0, index[k], 2)[1], "mocov2", 40, 32)  # fixture images are 40x32
            spread = (x - x.mean(0)).abs().max()
            if p.gray:
                grays += 1
                assert spread < 1e-5, (k, spread)  # one uint8 value per pixel, float32 round trip
            else:
                assert spread > 0.02, (k, spread)  # the fixture images are coloured
    assert 0 < grays < N  # seed 4 gives both kinds


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_recipe_stages_gray_and_blur(shards, monkeypatch, backend):
    """Each stage at probability 1 vs 0 on the same data: gray makes the channels equal (DALI: to
    its uint8 rounding), blur lowers the pixel-to-pixel variation."""
    base = RECIPE_PARAMS["mocov2"]

    def run(**change):
        monkeypatch.setitem(RECIPE_PARAMS, "mocov2", base.__class__(**{**base.__dict__, **change}))
        spec = DataSpec(image_views=(ImageView("v", "mocov2"),), text_fields=("raw",))
        loader = build_train_loader(shards, backend=backend, batch_size=5, image_size=SIZE, seed=0,
                                    workers=1, drop_last=False, spec=spec)
        return denorm(torch.cat([b["v"] for b in epoch(loader)]))

    plain = dict(jitter_p=0.0, blur_p=0.0, flip=0.0, area=(1.0, 1.0), aspect=(1.25, 1.25))
    colour, gray = run(gray_p=0.0, **plain), run(gray_p=1.0, **plain)
    assert (colour - colour.mean(1, keepdim=True)).abs().amax((1, 2, 3)).min() > 0.02
    assert (gray - gray.mean(1, keepdim=True)).abs().max() <= 1.01 / 255
    assert (gray.mean(1) - (colour * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(1)).abs().max() < 3 / 255

    sharp = colour
    blurred = run(gray_p=0.0, **{**plain, "blur_p": 1.0, "blur_sigma": (1.5, 1.5)})
    tv = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))  # noqa: E731
    assert (tv(blurred) < 0.8 * tv(sharp)).all()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_raw_only_spec_reads_shards_whose_captions_are_padding(tmp_path, backend):
    raws = tokenize([f"raw text {i}" for i in range(7)])
    empty = np.zeros(77, np.int64)
    with RecordWriter(tmp_path / "train-00000.rec", tmp_path / "train-00000.idx") as w:
        for i in range(7):
            w.write(i, raws[i], empty, jpeg_bytes(image(i)))
    loader = build_train_loader(str(tmp_path), backend=backend, batch_size=3, image_size=SIZE, workers=1,
                                drop_last=False, spec=CLIP_DATA)
    batches = epoch(loader)
    assert [list(b) for b in batches] == [["image", "raw"]] * 3
    got = torch.cat([b["raw"] for b in batches]).numpy()
    assert sorted(map(tuple, got)) == sorted(map(tuple, raws))


def short_row(tokens, rng, n=5):
    return tokens[:n]


def record_row(tokens, rng):
    return RECORD(tokens, rng)


def test_text_view_transforms_and_errors(shards):
    assert text_views.transform_fn("identity")(torch.arange(77), random.Random(0)).equal(torch.arange(77))
    assert text_views.transform_fn(SWAP) is swap_two
    assert text_views.transform_fn("alip.text_aug:eda_tokens").__name__ == "eda_tokens"
    for name in ("no_such_transform", "alip.text_aug:no_such_function", "no_such_module:f",
                 "alip.text_aug:STOPWORDS"):  # the last one names something not callable
        bad = DataSpec(text_views=(TextView("eda", "raw", name),))
        for backend in ("torch", "dali"):
            with pytest.raises(ValueError, match=f"text view 'eda': unknown transform '{name}'"):
                build_train_loader(shards, backend=backend, batch_size=4, image_size=SIZE, spec=bad)
    short = DataSpec(text_fields=("raw",), text_views=(TextView("s", "caption", f"{__name__}:short_row", (("n", 9),)),))
    with pytest.raises(Exception, match=r"text view 's': transform '.*short_row' returned torch.Size\(\[9\]\)"):
        next(iter(build_train_loader(shards, batch_size=4, image_size=SIZE, workers=0, spec=short)))


def test_dali_text_views_run_one_batch_ahead_in_the_pool(shards, key_of):
    """When batch b comes out, batch b+1's text views are already being made on pool threads."""
    seen, lock, both = [], threading.Lock(), threading.Event()

    def record(tokens, rng):
        with lock:
            seen.append((threading.current_thread().name, tuple(tokens.tolist())))
            if len(seen) >= 8:
                both.set()
        return tokens.clone()

    global RECORD
    RECORD = record
    spec = DataSpec(text_fields=("raw",), text_views=(TextView("r", "raw", f"{__name__}:record_row"),))
    loader = build_train_loader(shards, backend="dali", batch_size=4, image_size=SIZE, workers=1, spec=spec)
    it = iter(loader)
    first = next(it)
    assert both.wait(timeout=60)  # 8 rows = batches 0 and 1, with only batch 0 asked for
    assert all(name.startswith("alip-text") for name, _ in seen)
    assert {key_of[t] for _, t in seen[:4]} == {key_of[tuple(r.tolist())] for r in first["raw"]}
    assert torch.equal(first["r"], first["raw"])
    rest = list(it)
    assert len(rest) == loader.batches_per_epoch - 1 and len(seen) == 4 * loader.batches_per_epoch


def test_synthetic_loader_spec(tmp_path):
    from alip.training.synthetic import SyntheticLoader
    spec = DataSpec(image_views=(ImageView("image"), ImageView("aug", "mocov2")), text_fields=("raw",),
                    text_views=(TextView("swap", "caption", SWAP),))
    plain = list(SyntheticLoader(24, 4, 8, seed=1))
    views = list(SyntheticLoader(24, 4, 8, seed=1, spec=spec))
    assert len(views) == len(plain) == 6
    for p, d in zip(plain, views):
        assert list(p) == ALIP_DATA.keys and list(d) == spec.keys
        img, raw, cap = p["image"], p["raw"], p["caption"]
        assert torch.equal(d["image"], img) and torch.equal(d["raw"], raw)
        assert not torch.equal(d["aug"], img) and d["aug"].shape == img.shape
        assert torch.equal(d["swap"].sort(1).values, cap.sort(1).values) and not torch.equal(d["swap"], cap)
    # W processes x B see the batches of 1 x W*B, views included
    big = list(SyntheticLoader(24, 4, 8, seed=1, spec=spec, world_size=1))
    ranks = [list(SyntheticLoader(24, 2, 8, seed=1, spec=spec, rank=r, world_size=2)) for r in (0, 1)]
    for b, d in enumerate(big):
        for k in spec.keys:
            assert torch.equal(d[k], torch.cat([ranks[0][b][k], ranks[1][b][k]]))


@pytest.mark.parametrize("spec", [ALIP_DATA, SLIP], ids=["alip", "views"])
def test_dali_checkpoint_restores_after_other_pipelines_were_built(shards, spec):
    """A resume builds its pipeline after however many others the process built (other epochs,
    other loaders): DALI checkpoints name the ops whose state they hold, so every random op has
    an explicit name (auto-generated names count the process's pipelines and would not match)."""
    kw = dict(backend="dali", batch_size=3, image_size=SIZE, seed=5, workers=1, spec=spec)
    first = build_train_loader(shards, **kw)
    first.set_epoch(1)
    it = iter(first)
    for _ in range(2):
        next(it)
    state = first.state_dict()
    rest_ref = list(it)
    for e in range(3):  # more pipelines built in this process before the restore
        other = build_train_loader(shards, **kw)
        other.set_epoch(e)
        next(iter(other))
    resumed = build_train_loader(shards, **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(rest_ref) > 0 and all(same(a, b) for a, b in zip(rest_ref, rest))


def test_synthetic_data_asked_for_a_field_it_lacks_is_a_one_line_error():
    from alip.training.synthetic import SyntheticLoader
    spec = DataSpec(text_fields=("raw", "generated"))
    with pytest.raises(ValueError, match=r"synthetic has the text fields raw, caption; .* reads generated"):
        SyntheticLoader(24, 4, 8, spec=spec)
    eda = DataSpec(text_fields=("raw",), text_views=(TextView("t2", source="summary"),))
    with pytest.raises(ValueError, match="unknown source field .summary."):
        SyntheticLoader(24, 4, 8, spec=eda)
