"""build_train_loader over data2rec shards: both backends (DALI on CPU), exactly once, ranks,
determinism, mid-epoch resume, bad shards."""
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from alip.data.augment import CLIP_MEAN, CLIP_STD
from alip.data.loader import build_train_loader
from alip.data.recordio import MAGIC_BYTES, RecordIOError, RecordReader, RecordWriter
from data_fixtures import image, jpeg_bytes, make_rec_shards, tokenize

N = 23
SIZE = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_rec_shards(tmp_path_factory, N)


@pytest.fixture(scope="module")
def key_of(shards):
    """(raw tokens, caption tokens) -> record key, straight from the shards."""
    table = {}
    for name in sorted(os.listdir(shards)):
        if name.endswith(".rec"):
            for r in RecordReader(os.path.join(shards, name)):
                table[tuple(r.raw_tokens) + tuple(r.caption_tokens)] = r.key
    assert len(table) == N
    return table


def keys(batches, key_of):
    return [key_of[tuple(r.tolist()) + tuple(c.tolist())] for b in batches
            for r, c in zip(b["raw"], b["caption"])]


def epoch(loader, e=0, start_batch=0):
    loader.set_epoch(e, start_batch)
    return list(loader)


def same(a, b):
    """Two batch dicts with the same keys and bit-identical tensors."""
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def denorm(x):
    return x * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_round_trip_every_record_once_tokens_and_pixels(shards, key_of, backend):
    loader = build_train_loader(shards, backend=backend, batch_size=4, image_size=SIZE, workers=1,
                                drop_last=False, augment=False)
    assert (loader.num_samples, loader.batches_per_epoch, loader.dropped_per_epoch) == (N, 6, 0)
    batches = epoch(loader)
    assert len(batches) == 6 and [len(b["image"]) for b in batches] == [4, 4, 4, 4, 4, 3]
    got = keys(batches, key_of)
    assert sorted(got) == list(range(N))
    from data_fixtures import caption_of, text_of
    tok = tokenize([text_of(k) for k in got] + [caption_of(k) for k in got])
    raw = torch.cat([b["raw"] for b in batches])
    cap = torch.cat([b["caption"] for b in batches])
    assert raw.dtype == cap.dtype == torch.int64 and raw.shape == (N, 77)
    assert (raw.numpy() == tok[:N]).all() and (cap.numpy() == tok[N:]).all()
    images = torch.cat([b["image"] for b in batches])
    assert images.dtype == torch.float32 and images.shape == (N, 3, SIZE, SIZE)
    for k, x in zip(got, images):
        want = torch.from_numpy(np.asarray(image(k), np.float32) / 255).permute(2, 0, 1)
        want = TF.interpolate(want[None], size=(SIZE, SIZE), mode="bilinear", antialias=True)[0]
        err = (denorm(x) - want).abs()
        assert err.mean() < 0.03 and err.max() < 0.3, (k, err.mean(), err.max())


def test_dali_and_torch_yield_the_same_records(shards, key_of):
    sets = {}
    for backend in ("torch", "dali"):
        loader = build_train_loader(shards, backend=backend, batch_size=5, image_size=SIZE, workers=1,
                                    drop_last=False)
        sets[backend] = sorted(keys(epoch(loader, 1), key_of))
    assert sets["torch"] == sets["dali"] == list(range(N))


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("world_size,batch_size", [(2, 4), (4, 5)])  # DALI ranges of 23 / 4: 5, 6, 6, 6
def test_ranks_read_every_record_exactly_once(shards, key_of, backend, world_size, batch_size):
    for e in (0, 1):
        parts = [keys(epoch(build_train_loader(shards, backend=backend, batch_size=batch_size, image_size=SIZE,
                                               rank=r, world_size=world_size, workers=0, drop_last=False), e),
                      key_of)
                 for r in range(world_size)]
        assert sorted(sum(parts, [])) == list(range(N)), (e, parts)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_drop_last_full_equal_batches_and_counted_drops(shards, key_of, backend):
    per_epoch = []
    for e in (0, 1, 2):
        got = []
        for r in (0, 1):
            loader = build_train_loader(shards, backend=backend, batch_size=3, image_size=SIZE, rank=r,
                                        world_size=2, workers=0, drop_last=True)
            # N=23, W=2, B=3: 3 full batches per rank (torch: 23 // 6; dali: (23 // 2) // 3)
            assert loader.batches_per_epoch == 3 and loader.dropped_per_epoch == 23 - 18
            batches = epoch(loader, e)
            assert [len(b["image"]) for b in batches] == [3, 3, 3]
            got += keys(batches, key_of)
        assert len(got) == len(set(got)) == 18
        per_epoch.append(frozenset(range(N)) - set(got))
    assert len(set(per_epoch)) > 1  # a new order each epoch drops different records


def test_torch_deterministic_whatever_the_workers(shards):
    runs = [epoch(build_train_loader(shards, backend="torch", batch_size=4, image_size=SIZE, seed=3, workers=w), 2)
            for w in (0, 2, 0)]
    for other in runs[1:]:
        assert len(other) == len(runs[0]) == 5
        assert all(same(a, b) for a, b in zip(runs[0], other))
    other_seed = epoch(build_train_loader(shards, backend="torch", batch_size=4, image_size=SIZE, seed=4, workers=0), 2)
    assert not torch.equal(runs[0][0]["raw"], other_seed[0]["raw"])
    other_epoch = epoch(build_train_loader(shards, backend="torch", batch_size=4, image_size=SIZE, seed=3, workers=0), 3)
    assert not torch.equal(runs[0][0]["raw"], other_epoch[0]["raw"])


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_mid_epoch_resume_yields_the_rest_of_the_epoch(shards, backend):
    kw = dict(backend=backend, batch_size=3, image_size=SIZE, seed=7, workers=2 if backend == "torch" else 1)
    full = epoch(build_train_loader(shards, **kw), 1)
    assert len(full) == 7
    resumed_loader = build_train_loader(shards, **kw)
    resumed = epoch(resumed_loader, 1, start_batch=4)
    assert len(resumed_loader) == 3 and len(resumed) == 3
    assert all(same(a, b) for a, b in zip(full[4:], resumed))  # bit-identical images and tokens


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_resume_from_state_dict(shards, backend):
    kw = dict(backend=backend, batch_size=3, image_size=SIZE, seed=5, workers=1)
    full = epoch(build_train_loader(shards, **kw), 2)
    first = build_train_loader(shards, **kw)
    first.set_epoch(2)
    for b, batch in enumerate(first):
        if b == 2:
            break
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batch"] == 3
    if backend == "dali":
        assert isinstance(state["dali_checkpoint"], (str, bytes)) and state["dali_checkpoint"]  # DALI's own
    resumed = build_train_loader(shards, **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 3 == 4
    assert all(same(a, b) for a, b in zip(full[3:], rest))
    if backend == "dali":
        assert resumed.replayed_batches == 0  # restored, not replayed
        resumed.set_epoch(2, start_batch=3)
        assert len(list(resumed)) == 4 and resumed.replayed_batches == 3


def test_bad_shards_are_errors_naming_file_and_record(shards, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(shards, bad)
    rec = os.path.join(bad, "train-00002.rec")
    data = open(rec, "rb").read()
    open(rec, "wb").write(data[:-50])
    key = int(RecordReader(rec, check=False).keys[-1])
    for backend in ("torch", "dali"):
        with pytest.raises(RecordIOError, match=rf"train-00002\.rec: record key {key}: truncated"):
            build_train_loader(bad, backend=backend, batch_size=4, image_size=SIZE)
    open(rec, "wb").write(data)
    with open(os.path.join(bad, "train-00001.idx"), "a") as f:
        f.write(f"99\t{os.path.getsize(os.path.join(bad, 'train-00001.rec')) + 100}\n")
    for backend in ("torch", "dali"):
        with pytest.raises(RecordIOError, match=r"train-00001\.idx:11: record key 99 .* past the end"):
            build_train_loader(bad, backend=backend, batch_size=4, image_size=SIZE)
    with pytest.raises(FileNotFoundError, match="no train-"):
        build_train_loader(str(tmp_path), batch_size=4)
    with pytest.raises(ValueError, match="23 records do not fill one batch of 12 on each of 2 ranks"):
        build_train_loader(shards, batch_size=12, world_size=2, rank=1)


def test_merged_single_file_shard_like_the_reference(shards, key_of, tmp_path):
    """cat train-*.rec + the combined .idx = one datarec.rec/.idx, the reference's layout."""
    from alip.data.dali_reader import combined_index
    from alip.data.loader import rec_paths
    recs, idx, n = combined_index(rec_paths(shards))
    with open(tmp_path / "datarec.rec", "wb") as out:
        for r in recs:
            out.write(open(r, "rb").read())
    shutil.copy(idx, tmp_path / "datarec.idx")
    merged = RecordReader(tmp_path / "datarec.rec")
    parts = [r for p in recs for r in RecordReader(p)]
    assert n == len(merged) == N and [r.key for r in merged] == [r.key for r in parts]
    assert all(a.jpeg == b.jpeg and (a.raw_tokens == b.raw_tokens).all() for a, b in zip(merged, parts))
    for backend in ("torch", "dali"):
        loader = build_train_loader([str(tmp_path / "datarec.rec")], backend=backend, batch_size=5,
                                    image_size=SIZE, workers=0, drop_last=False)
        assert sorted(keys(epoch(loader), key_of)) == list(range(N))


def test_dali_reads_a_multipart_record(tmp_path):
    """A payload with the magic word at an aligned position is split in parts; DALI must rejoin it."""
    jpeg = jpeg_bytes(image(3))
    tail = b"\0" * (-len(jpeg) % 4) + MAGIC_BYTES + b"trailing bytes after EOI"  # ignored by decoders
    raw, cap = tokenize(["raw", "cap"])
    with RecordWriter(tmp_path / "train-00000.rec", tmp_path / "train-00000.idx") as w:
        w.write(0, raw, cap, jpeg)
        w.write(1, cap, raw, jpeg + tail)
        w.write(2, raw, raw, jpeg)
    assert RecordReader(tmp_path / "train-00000.rec")[1].jpeg == jpeg + tail
    for backend in ("torch", "dali"):
        loader = build_train_loader(str(tmp_path), backend=backend, batch_size=3, image_size=SIZE, workers=1,
                                    drop_last=False, augment=False)
        (batch,) = epoch(loader)
        images, r, c = batch["image"], batch["raw"], batch["caption"]
        order = [1 if (x == torch.from_numpy(cap)).all() else 0 for x in r]
        assert sorted(order) == [0, 0, 1]
        i = order.index(1)
        assert (c[i].numpy() == raw).all()
        j = order.index(0)
        assert (images[i] - images[j]).abs().max() < 1e-5  # same pixels: the tail after EOI is ignored
