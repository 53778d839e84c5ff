"""Caption mixing with probabilities: --raw-field-probs / --caption-field-probs draw a text slot's
field per sample and epoch from (seed, epoch, record index) with the given probabilities: the
draw rule against an independent replica, uniform draws unchanged without the flag, bad values
refused naming the flag, the realised fractions over 10,000 records through both readers and a
mid-epoch resume, and the per-epoch field_fractions record of train.py (resumed or not)."""
import json
import random
import zlib

import numpy as np
import pytest
import torch

from alip.data import text_views
from alip.data.augment import _mix64
from alip.data.loader import build_train_loader
from alip.data.recordio import RecordWriter
from alip.data.spec import DataSpec, TextView, with_sources
from alip.methods import get_method
from alip.methods.base import CAPTION_VIEW
from alip.training.params import parse_args
from data_fixtures import cache_dir, image, jpeg_bytes  # noqa: F401
from test_train_helpers import read_results, run_single, tiny_argv

SOT, EOT, MARK = 49406, 49407, 500


def replica_rng(seed, epoch, index, name):
    """text_rng written out again: _mix64 chained over seed, epoch, index, crc32(name)."""
    x = _mix64(int(seed))
    for part in (epoch, index, zlib.crc32(name.encode())):
        x = _mix64(x ^ int(part))
    return random.Random(x)


def replica_pick(sources, probs, seed, epoch, index):
    """The documented rule: u = random() of the sample's "pick:<sources>" generator; the first
    field whose cumulative probability exceeds u."""
    u = replica_rng(seed, epoch, index, "pick:" + ",".join(sources)).random()
    return int(np.searchsorted(np.cumsum(probs), u, side="right"))


def spec_for(method, *flags):
    return get_method(method).loader_spec(parse_args(["--method", method, *flags]))


def test_the_draw_follows_the_probabilities_and_the_uniform_draw_is_unchanged():
    mixed = TextView("raw", ("raw", "caption"), probs=(0.2, 0.8))
    got = [text_views.source_index(mixed, 7, 3, i) for i in range(10_000)]
    assert got == [replica_pick(("raw", "caption"), (0.2, 0.8), 7, 3, i) for i in range(10_000)]
    assert abs(got.count(0) / 10_000 - 0.2) < 0.015  # binomial sd 0.4 pp
    uniform = TextView("raw", ("raw", "caption"))
    assert [text_views.source_index(uniform, 7, 3, i) for i in range(2000)] == [
        replica_rng(7, 3, i, "pick:raw,caption").randrange(2) for i in range(2000)]
    three = TextView("c", ("a", "b", "c"), probs=(0.5, 0.0, 0.5))
    assert 1 not in {text_views.source_index(three, 0, 0, i) for i in range(3000)}  # p = 0: never


def test_flags_build_the_mixed_spec_for_any_slot():
    spec = spec_for("clip", "--raw-fields", "raw,caption", "--raw-field-probs", "0.2,0.8")
    assert spec.text_views == (TextView("raw", ("raw", "caption"), probs=(0.2, 0.8)),)
    spec = spec_for("clips", "--caption-fields", "caption,generated", "--caption-field-probs",
                    "0.3,0.7")
    views = {v.name: v for v in spec.text_views}
    assert views["caption"].probs == views[CAPTION_VIEW].probs == (0.3, 0.7)  # one draw, one caption
    assert list(text_views.drawn_views(spec.text_views)) == ["caption@field"]
    # without the flag: today's uniform views, bit for bit
    assert spec_for("clip", "--raw-fields", "raw,caption").text_views == (
        TextView("raw", ("raw", "caption")),)
    assert with_sources(DataSpec(text_fields=("raw",)), {"raw": ("raw", "caption")},
                        {"raw": None}).text_views[0].probs is None


@pytest.mark.parametrize("flags, why", [
    (["--raw-fields", "raw,caption", "--raw-field-probs", "0.3,0.8"],
     r"--raw-field-probs '0.3,0.8': they sum to 1.1, not 1 \(--raw-fields raw,caption\)"),
    (["--raw-fields", "raw,caption", "--raw-field-probs", "0.2,0.3,0.5"],
     "--raw-field-probs '0.2,0.3,0.5': 3 probabilities for 2 fields"),
    (["--raw-fields", "raw,caption", "--raw-field-probs=-0.2,1.2"],
     "--raw-field-probs '-0.2,1.2': -0.2 is not a probability"),
    (["--raw-fields", "raw,caption", "--raw-field-probs", "nan,1"],
     "--raw-field-probs 'nan,1': nan is not a probability"),
    (["--raw-fields", "raw,caption", "--raw-field-probs", "a,b"],
     "--raw-field-probs 'a,b': expected numbers separated by commas"),
    (["--caption-field-probs", "1"],
     r"--caption-field-probs '1': probabilities need two or more fields to draw from "
     r"\(--caption-fields caption\)"),
])
def test_bad_probabilities_are_refused_naming_the_flag(flags, why):
    with pytest.raises(SystemExit, match="^train.py: error: " + why):
        parse_args(["--method", "clip", *flags])


def test_config_keys_set_the_probabilities(tmp_path):
    for value in ("0.2,0.8", "[0.2, 0.8]"):
        (tmp_path / "c.yaml").write_text(f"method: clip\nraw-fields: raw,caption\n"
                                         f"raw-field-probs: {value}\n")
        args = parse_args(["--config", str(tmp_path / "c.yaml")])
        assert args.raw_field_probs == "0.2,0.8"
    (tmp_path / "c.yaml").write_text("method: clip\nraw-fields: raw,caption\nraw_field_probs: 0.5,0.6\n")
    with pytest.raises(SystemExit, match="--raw-field-probs '0.5,0.6': they sum to 1.1"):
        parse_args(["--config", str(tmp_path / "c.yaml")])
    with pytest.raises(Exception, match="^--method clip reads no 'caption' text: --caption-fields "
                                        "caption,x --caption-field-probs 0.5,0.5 would be ignored$"):
        get_method("clip").check_args(parse_args(["--method", "clip", "--caption-fields", "caption,x",
                                                  "--caption-field-probs", "0.5,0.5"]))


N_BIG, BATCH = 10_000, 500


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """10,000 two-field records of one tiny JPEG; record i's raw text is [SOT, i+1, EOT] and
    its caption [SOT, i+1, MARK, EOT], so a batch row says which record and field it holds."""
    out = tmp_path_factory.mktemp("big")
    jpeg = jpeg_bytes(image(0, size=(8, 8)))
    for s in range(2):
        with RecordWriter(str(out / f"train-{s:05d}.rec"), str(out / f"train-{s:05d}.idx")) as w:
            for i in range(s * N_BIG // 2, (s + 1) * N_BIG // 2):
                raw, cap = np.zeros(77, np.float32), np.zeros(77, np.float32)
                raw[:3], cap[:4] = (SOT, i + 1, EOT), (SOT, i + 1, MARK, EOT)
                w.write(i, raw, cap, jpeg)
    return str(out)


def draws_of(batches):
    """{record index: field index read} over the batches, checked against the tokens read."""
    out = {}
    for b in batches:
        for row, k in zip(b["raw"], b["raw@field"]):
            i, field = int(row[1]) - 1, int(row[2] == MARK)
            assert field == int(k) and i not in out
            out[i] = field
    return out


def test_ten_thousand_draws_match_the_probabilities_in_both_readers_and_after_a_resume(big):
    spec = spec_for("clip", "--raw-fields", "raw,caption", "--raw-field-probs", "0.2,0.8")
    got = {}
    for backend in ("torch", "dali"):
        loader = build_train_loader(big, backend=backend, batch_size=BATCH, image_size=8, workers=1,
                                    drop_last=False, augment=False, spec=spec, seed=5,
                                    verify_shards=False)
        loader.set_epoch(2)
        got[backend] = draws_of(loader)
        loader.set_epoch(2, start_batch=7)  # a mid-epoch resume (DALI: from the batch, replayed)
        rest = draws_of(loader)
        assert len(rest) == N_BIG - 7 * BATCH and rest == {i: got[backend][i] for i in rest}
    assert got["torch"] == got["dali"] and len(got["torch"]) == N_BIG
    assert got["torch"] == {i: replica_pick(("raw", "caption"), (0.2, 0.8), 5, 2, i)
                            for i in range(N_BIG)}
    fraction = sum(got["torch"].values()) / N_BIG
    assert abs(fraction - 0.8) <= 0.015, fraction


def test_dali_resumed_from_its_pipeline_checkpoint_draws_the_same_fields(big):
    spec = spec_for("clip", "--raw-fields", "raw,caption", "--raw-field-probs", "0.2,0.8")
    loader = build_train_loader(big, backend="dali", batch_size=BATCH, image_size=8, workers=1,
                                drop_last=False, augment=False, spec=spec, seed=5, verify_shards=False)
    loader.set_epoch(2)
    it = iter(loader)
    first = draws_of(next(it) for _ in range(7))
    state = loader.state_dict()
    del it
    loader.load_state_dict(state)
    rest = draws_of(loader)
    assert len(first) == 7 * BATCH and len(rest) == N_BIG - 7 * BATCH
    assert {**first, **rest} == {i: replica_pick(("raw", "caption"), (0.2, 0.8), 5, 2, i)
                                 for i in range(N_BIG)}


def test_train_py_logs_the_epoch_fractions_and_keeps_them_over_a_resume(tmp_path):
    argv = lambda name, *x: tiny_argv(tmp_path, name, "--method", "clip", "--raw-fields",  # noqa: E731
                                      "raw,caption", "--raw-field-probs", "0.25,0.75", *x,
                                      samples=64, batch=8, epochs=2)
    run_single(argv("full"))
    full = read_results(tmp_path / "full", kind="epoch")
    assert [r["epoch"] for r in full] == [1, 2]
    for e, r in enumerate(full):  # synthetic record i of epoch e: the replica's draw
        n_caption = sum(replica_pick(("raw", "caption"), (0.25, 0.75), 0, e, i) for i in range(64))
        assert r["field_counts"] == {"raw": {"raw": 64 - n_caption, "caption": n_caption}}
        assert r["field_fractions"] == {"raw": {"raw": (64 - n_caption) / 64,
                                                "caption": n_caption / 64}}
    run_single(argv("cut", "--max-steps", "11"))  # stops (and saves) 3 steps into epoch 2
    run_single(argv("cut", "--resume", "latest"))
    assert read_results(tmp_path / "cut", kind="epoch") == full
    lines = [json.loads(x) for x in (tmp_path / "cut" / "results.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "epoch" for r in lines) == 2


@pytest.mark.parametrize("recipe, views", [
    ("yfcc15m_vit_b32_clip_recap.yaml", (TextView("raw", ("raw", "caption"), probs=(0.2, 0.8)),)),
    ("yfcc15m_vit_b32_veclip.yaml", (TextView("raw", ("raw", "vecap"), probs=(0.5, 0.5)),)),
    ("yfcc15m_vit_b32_laclip.yaml", (TextView("raw", ("raw", "rw1", "rw2", "rw3", "rw4")),)),
    ("demo_clip_mix.yaml", (TextView("raw", ("raw", "caption"), probs=(0.2, 0.8)),)),
])
def test_the_mixing_recipes_build_their_text_slot(recipe, views):
    from pathlib import Path
    args = parse_args(["--config", str(Path(__file__).resolve().parents[1] / "configs" / recipe)])
    spec = get_method(args.method).loader_spec(args)
    assert spec.text_fields == () and spec.text_views == views


@pytest.mark.slow
def test_two_ranks_log_the_counts_of_every_record(tmp_path):
    """Under DDP (2 gloo ranks, 32 records each) the epoch line sums both ranks' counts: the
    replica's draws over all 64 records."""
    import torch.multiprocessing as mp

    from test_train_helpers import free_port, gloo_worker
    argv = tiny_argv(tmp_path, "ddp", "--method", "clip", "--raw-fields", "raw,caption",
                     "--raw-field-probs", "0.25,0.75", samples=64, batch=4, epochs=1)
    mp.spawn(gloo_worker, nprocs=2, join=True, args=(2, free_port(), argv))
    n_caption = sum(replica_pick(("raw", "caption"), (0.25, 0.75), 0, 0, i) for i in range(64))
    [record] = read_results(tmp_path / "ddp", kind="epoch")
    assert record["field_counts"] == {"raw": {"raw": 64 - n_caption, "caption": n_caption}}


def test_a_resume_on_another_number_of_ranks_keeps_the_epochs_counts():
    """A resharded (FSDP W -> W') resume: rank 0 takes the saved ranks' sum, the others zero, so
    the epoch record (a sum over ranks) still covers the steps before the resume."""
    from types import SimpleNamespace

    from alip.training.resume import _field_counts
    saved = [{"raw@field": [3, 5]}, {"raw@field": [4, 4]}]  # two ranks' counts so far
    assert _field_counts(saved, SimpleNamespace(rank=1, world_size=2)) == {"raw@field": [4, 4]}
    assert _field_counts(saved, SimpleNamespace(rank=0, world_size=1)) == {"raw@field": [7, 9]}
    assert _field_counts(saved, SimpleNamespace(rank=0, world_size=4)) == {"raw@field": [7, 9]}
    assert _field_counts(saved, SimpleNamespace(rank=3, world_size=4)) is None
    assert _field_counts([], SimpleNamespace(rank=0, world_size=4)) is None
