"""Every registered method trains end to end on captions stored 256 tokens wide (issue #26:
"every method, every view"): train.py's main, the torch reader, RecordIO shards data2rec wrote
with ``--text-fields raw,caption:256`` holding captions of 100-220 tokens, ``--text-context 256``.

Three worlds, the same images and raw texts, built by data2rec:

* ``long``: the captions, field 256 wide;
* ``tail``: the same captions with one word changed past token 77 (row positions 90-110: the
  first 77 positions of every row are identical, and every row keeps its length);
* ``pad``: the same captions as ``long`` stored 224 wide, and past each row's EOT not zeros
  but other tokens (written into the shards' labels after data2rec): only what lies past EOT
  differs.

Per method (parametrized over the registry, and ``--objective sigmoid`` for each method with
both objectives): the run trains with finite losses and its checkpoint records context 256 and
loads in plain open_clip; the ``tail`` world's first step differs from ``long``'s (the method
reads past token 77 where it reads a caption: its caption, or the caption read as its raw text,
``--raw-fields caption``, for the methods that read raw text only); the ``pad`` world's run is
bit-identical to ``long``'s (padding does not matter). Each run is 2 steps of batch 8.
"""
import functools
import os

import open_clip
import pytest
import torch
import torch.multiprocessing as mp

import alip  # noqa: F401
from alip.data.recordio import RecordReader
from alip.methods import METHODS, get_method
from alip.training.loop import main, run
from alip.training.params import parse_args
from data_fixtures import make_manifest_dataset, run_data2rec, text_of, write_manifest
from test_methods import MODELS, small_flags
from test_train_helpers import (assert_weights_close, final_state, free_port, read_results,
                                run_single, tiny_argv)

N, WIDE, NARROW, CONTEXT = 16, 256, 224, 256
WORLDS = {"long": ("purple", WIDE), "tail": ("orange", WIDE), "pad": ("purple", NARROW)}


def caption(i, colour):
    """100-220 BPE tokens: five sentences (~90 tokens), then the one with ``colour`` (past
    token 77), then i % 8 more."""
    s = [f"sentence {j} of picture {i} shows a red dog running on green grass near a tall tree."
         for j in range(5)]
    s.append(f"then a {colour} zebra sleeps under the moon.")
    s += [f"more detail {j} about picture {i}: a small stone bridge crosses the river."
          for j in range(i % 8)]
    return " ".join(s)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("long-worlds"))
    make_manifest_dataset(root, N)
    out = {}
    for name, (colour, width) in WORLDS.items():
        rows = [{"image": f"images/{i:04d}.jpg", "text": text_of(i), "caption": caption(i, colour)}
                for i in range(N)]
        manifest = write_manifest(root, rows, "jsonl", name=name)
        out[name] = os.path.join(root, name)
        assert run_data2rec("--manifest", manifest, "--image-root", root, "--output-dir", out[name],
                            "--shard-size", "8", "--text-fields", f"raw,caption:{width}") == 0
    fill_past_eot(out["pad"], 77, NARROW)
    return out


JUNK = (320.0, 1000.0)  # 'a</w>' and another word: neither SOT nor EOT, no RecordIO magic bytes


def fill_past_eot(world, raw_width, width):
    """Overwrite the zeros past each caption row's EOT in the shards' labels with JUNK (the
    records keep their sizes, so the .idx offsets stay)."""
    import struct

    import numpy as np

    from alip.data.recordio import IR_FORMAT
    for name in sorted(os.listdir(world)):
        if not name.endswith(".rec"):
            continue
        rec = os.path.join(world, name)
        offsets = [int(line.split()[1]) for line in open(rec[:-4] + ".idx")]
        data = bytearray(open(rec, "rb").read())
        for off in offsets:
            start = off + 8 + struct.calcsize(IR_FORMAT) + 4 * raw_width  # the caption's floats
            row = np.frombuffer(data, np.float32, count=width, offset=start).copy()
            eot = int(row.argmax())
            row[eot + 1:] = np.resize(np.array(JUNK, np.float32), width - eot - 1)
            data[start:start + 4 * width] = row.tobytes()
        open(rec, "wb").write(bytes(data))


def captions_of(world, width):
    """{key: caption row} of a world's shards."""
    rows = {}
    for name in sorted(os.listdir(world)):
        if name.endswith(".rec"):
            for x in RecordReader(os.path.join(world, name), widths=(77, width)):
                rows[int(x.key)] = torch.from_numpy(x.tokens[1].astype("int64"))
    return rows


def test_the_worlds_differ_only_where_they_should(worlds):
    long, tail, pad = (captions_of(worlds[w], WORLDS[w][1]) for w in ("long", "tail", "pad"))
    assert sorted(long) == sorted(tail) == sorted(pad) == list(range(N))
    lengths = {i: int(r.argmax()) + 1 for i, r in long.items()}  # SOT .. EOT
    assert 100 <= min(lengths.values()) and max(lengths.values()) <= 220
    for i in range(N):
        diff = (long[i] != tail[i]).nonzero().flatten().tolist()
        assert len(diff) == 1 and 90 <= diff[0] <= 110, diff  # one word, past token 77
        assert int(tail[i].argmax()) + 1 == lengths[i]
        n = lengths[i]
        assert pad[i].shape == (NARROW,) and torch.equal(long[i][:n], pad[i][:n])
        assert not long[i][n:].any() and set(pad[i][n:].tolist()) == {320, 1000}


def method_of(case):
    return case.split("+")[0]


def reads_caption(method):
    spec = get_method(method).data_spec(parse_args(["--method", method, "--model", MODELS[method]]))
    return "caption" in spec.fields_read


# the registry, and each method with both objectives under --objective sigmoid; ALIP's two
# and CLIP's (on the caption as its raw text) run in CI, the rest are slow (~70 s together)
FAST = ("alip", "alip+sigmoid", "clip")
CASES = [pytest.param(c, marks=() if c in FAST else pytest.mark.slow) for c in
         sorted(METHODS) + [f"{m}+sigmoid" for m in sorted(METHODS)
                            if {"softmax", "sigmoid"} <= set(get_method(m).objectives)]]
# FILIP's token-wise means and row sums run over the row's positions: the padding is masked
# (exact zeros), but the sum's association follows the row width, so a 224- and a 256-wide
# batch give step-1 gradients equal to float32 rounding (~1e-7 relative), not bit for bit
WIDTH_SUMMED = ("filip", "defilip")


def case_flags(case):
    method, _, objective = case.partition("+")
    flags = ["--method", method, "--model", MODELS[method], *small_flags(method), "--lr", "5e-3"]
    flags += ["--objective", objective] if objective else []
    return flags + ([] if reads_caption(method) else ["--raw-fields", "caption"])


def rec_argv(logs, name, world, *flags, batch=8, context=CONTEXT):
    ctx = ["--text-context", str(context)] if context else []
    return tiny_argv(logs, name, "--dataset-type", "rec", "--train-data", world, "--data-backend",
                     "torch", *ctx, *flags, batch=batch)


@pytest.fixture(scope="module")
def trained(worlds, tmp_path_factory):
    """trained(case, world, *extra) -> the run directory of that case's 2-step run (run once)."""
    logs = tmp_path_factory.mktemp("long-runs")

    @functools.lru_cache(maxsize=None)
    def train(flags, world):
        name = f"run{train.cache_info().currsize}-{world}"
        run_single(rec_argv(logs, name, worlds[world], *flags))
        return logs / name
    return lambda case, world, *extra: train((*case_flags(case), *extra), world)


def logged(run_dir):
    """Each step's losses and gradient norm, as logged (timings left out)."""
    return [{k: v for k, v in r.items() if k == "grad_norm" or k.startswith(("loss", "w_", "ema_"))}
            for r in read_results(run_dir)]


@pytest.mark.parametrize("case", CASES)
def test_every_method_trains_on_256_wide_captions(trained, case):
    run_dir = trained(case, "long")
    rows = read_results(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e4 and not r["skipped"] for r in rows)
    path = run_dir / "checkpoints" / "epoch_1.pt"
    saved = torch.load(path, weights_only=True)
    kwargs = saved["model_kwargs"]
    assert kwargs["force_context_length"] == CONTEXT
    assert saved["state_dict"]["positional_embedding"].shape[0] == CONTEXT
    # plain open_clip, as docs/models.md says (and SigLIP's logit bias where the run had one)
    plain = open_clip.create_model(MODELS[method_of(case)], pretrained=str(path), **kwargs)
    assert plain.context_length == CONTEXT and plain.attn_mask.shape == (CONTEXT, CONTEXT)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, saved["state_dict"][k]), k


@pytest.mark.parametrize("case", CASES)
def test_the_caption_tail_past_token_77_changes_the_first_step(trained, case):
    long, tail = logged(trained(case, "long")), logged(trained(case, "tail"))
    assert long[0]["loss"] != tail[0]["loss"]
    assert long[0]["grad_norm"] != tail[0]["grad_norm"]


@pytest.mark.parametrize("case", CASES)
def test_padding_past_the_eot_does_not_change_the_run(trained, case):
    """The captions 224 wide instead of 256, other tokens than zeros past EOT: every logged
    number and the final weights bit-identical."""
    long_dir, pad_dir = trained(case, "long"), trained(case, "pad")
    long, pad = logged(long_dir), logged(pad_dir)
    a, b = final_state(long_dir, "epoch_1"), final_state(pad_dir, "epoch_1")
    assert long[0] == pad[0]  # the same weights see the same texts: step 1's numbers are equal
    if method_of(case) not in WIDTH_SUMMED:
        assert long == pad
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    else:  # fp32 rounding of one step, through Adam (test_train_helpers.assert_weights_close)
        for x, y in zip(long, pad):
            assert x == pytest.approx(y, rel=1e-5, abs=1e-6)
        assert_weights_close(a, b)


RAW_ONLY = [pytest.param(m, marks=() if m in ("clip", "siglip") else pytest.mark.slow)
            for m in sorted(METHODS) if not reads_caption(m)]


@pytest.mark.parametrize("method", RAW_ONLY)
def test_raw_text_methods_ignore_a_wide_caption_field_they_do_not_read(worlds, tmp_path, method):
    """Default fields: the 256-wide caption field is not read, so the 77-position tower (no
    --text-context) trains on the shards' raw text."""
    run_single(rec_argv(tmp_path, "raw", worlds["long"], "--method", method, "--model",
                        MODELS[method], *small_flags(method), context=None))
    rows = read_results(tmp_path / "raw")
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    saved = torch.load(tmp_path / "raw/checkpoints/epoch_1.pt", weights_only=True)
    assert "force_context_length" not in saved["model_kwargs"]
    assert saved["state_dict"]["positional_embedding"].shape[0] == 77


@pytest.mark.parametrize("method", ["clip", "siglip"])
def test_caption_mixing_into_the_raw_slot_reads_the_long_rows(trained, method):
    """--raw-fields raw,caption: a sample's raw slot holds its 77-wide raw text or its 256-wide
    caption (one per sample and epoch); the captions' tails reach the loss, their padding not."""
    runs = {w: trained(method, w, "--raw-fields", "raw,caption") for w in WORLDS}
    counts = read_results(runs["long"], kind="epoch")[0]["field_counts"]["raw"]
    assert counts["raw"] + counts["caption"] == N and counts["caption"] >= 4
    long, tail, pad = (logged(runs[w]) for w in ("long", "tail", "pad"))
    assert long[0]["loss"] != tail[0]["loss"]
    assert long == pad


# ---------------------------------------------------------------- CLIPS' decoder reads the tail

def test_clips_decoder_predicts_past_token_77_at_context_256(trained):
    """Only the caption loss (--clips-w-con 0): the decoder's targets are the caption's
    tokens; with 75 queries (before: the default, and the flag's maximum at any context) the
    tail world's first step was bit-identical to the long world's."""
    small = ("--clips-w-con", "0", "--clips-decoder-layers", "1", "--max-steps", "1")
    long, tail = (logged(trained("clips", w, *small)) for w in ("long", "tail"))
    assert long[0]["loss_contrastive"] == tail[0]["loss_contrastive"] == 0
    assert long[0]["loss_caption"] != tail[0]["loss_caption"]


@pytest.mark.parametrize("context, queries", [(None, 75), (256, 128), (100, 98)])
def test_clips_default_queries_are_the_references_within_the_context(context, queries):
    from alip.methods.clips import CLIPS
    ctx = ["--text-context", str(context)] if context else []
    args = parse_args(["--method", "clips", "--model", "ALIP-tiny", *ctx])
    method = CLIPS(args)
    torch.manual_seed(0)
    method.attach(open_clip.create_model("ALIP-tiny", **method.model_kwargs()))
    assert method.encoder.decoder.num_queries == queries


def test_clips_queries_up_to_the_context_are_accepted():
    from alip.methods import MethodConfigError
    from alip.methods.clips import CLIPS
    ok = parse_args(["--method", "clips", "--model", "ALIP-tiny", "--text-context", "256",
                     "--clips-queries", "254"])
    CLIPS(ok)
    bad = parse_args(["--method", "clips", "--model", "ALIP-tiny", "--text-context", "256",
                      "--clips-queries", "255"])
    with pytest.raises(MethodConfigError, match=r"^--clips-queries 255: --model ALIP-tiny's "
                                                r"captions hold at most 254 tokens \(context "
                                                r"length 256\); give at most 254$"):
        CLIPS(bad)


# ------------------------------------------------------------------ DeCLIP's EDA view at 256

def test_eda_view_keeps_the_rows_width():
    """DeCLIP/DeFILIP's EDA view re-tokenises at the row's width: a caption read as raw text
    (--raw-fields caption) stays 256 wide (it came back 77 wide, and the loader refused it)."""
    import random

    from alip.text_aug import eda_tokens
    tok = open_clip.get_tokenizer("ALIP-tiny")
    for width in (77, 256):
        row = tok([caption(3, "purple")], context_length=width)[0]
        out = eda_tokens(row, random.Random(0))
        assert out.shape == (width,) and out[0] == 49406 and (out == 49407).sum() == 1
        n = int(out.argmax()) + 1
        assert not out[n:].any()
        if width == 256:
            assert n > 77  # the EDA'd caption keeps its tail


# ------------------------------------------------------------- a tower shorter than the field

def refusal(tmp_path, world, *flags):
    """train.py's main on ``flags``: its one-line error (nothing trained, nothing saved)."""
    argv = rec_argv(tmp_path, "refused", world, *flags, context=None)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert not (tmp_path / "refused" / "results.jsonl").exists() or \
        not read_results(tmp_path / "refused")
    assert not list((tmp_path / "refused").glob("checkpoints/*.pt"))
    return str(e.value)


@pytest.mark.parametrize("flags, field", [
    (("--method", "alip"), "'caption' field"),
    (("--method", "alip", "--text-context", "255"), "'caption' field"),
    (("--method", "clip", "--raw-fields", "caption"), "'caption' field (read as 'raw')"),
    (("--method", "clip", "--raw-fields", "raw,caption"),
     "'raw' text (drawn from fields 'raw', 'caption')"),
])
def test_a_tower_shorter_than_the_longest_field_is_refused_naming_it(worlds, tmp_path, flags, field):
    """The tower's context and the field's width in one line, before any step. (A field read
    as another batch key is named as the shard calls it: it used to say "the data's 'raw'
    field is 256 tokens wide" of shards whose raw field is 77 wide.)"""
    context = flags[flags.index("--text-context") + 1] if "--text-context" in flags else "77"
    err = refusal(tmp_path, worlds["long"], *flags)
    assert err == (f"train.py: error: --text-context {context}: the data's {field} is 256 tokens "
                   f"wide; give --text-context >= 256")


# ------------------------------------------------- 2 gloo ranks with accumulation == 1 process

class Cast:
    """A loader whose image batches come in the default dtype (float64 in these runs: the
    torch reader yields float32 images; the cast is exact)."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        dtype = torch.get_default_dtype()
        for batch in self.loader:
            yield {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def cast_loader(cfg, info, image_size, spec):
    from alip.training.loop import default_make_loader
    return Cast(default_make_loader(cfg, info, image_size, spec))


def run_float64(argv):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return run(parse_args(argv), make_loader=cast_loader)
    finally:
        torch.set_default_dtype(previous)


def ddp_worker(rank, world_size, ports, argvs):
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    for argv, port in zip(argvs, ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        run_float64(argv)


def accum_argv(logs, name, world, mode, batch, accum):
    return rec_argv(logs, name, world, "--method", "alip", "--lr", "5e-3", "--accum-freq",
                    str(accum), "--accum-mode", mode, batch=batch)


ALIP_KEYS = ["loss", "grad_norm", "loss_raw", "loss_caption", "ema_tc", "ema_it", "ema_ic",
             "w_sample_mean", "w_text_mean", "w_caption_mean"]


@pytest.mark.slow  # ~40 s: 4 runs, a spawn of 2 ranks
def test_alip_on_two_ranks_with_accumulation_equals_one_process(worlds, tmp_path):
    """2 gloo ranks x batch 2 x accum 2 on the 256-wide captions == 1 process x batch 8 (batch
    mode) and 1 process x batch 4 x accum 2 (micro mode), as tests/test_train_accum_ddp.py
    says for synthetic data: rank r reads records r, r+2, ... of the epoch's order, so a step's
    ranks and micro-batches hold the one-process step's records. float64 and its tolerances
    (that file's docstring): the runs sum in different orders, ~1e-14, which Adam amplifies to
    ~1e-10 on near-zero gradients; the two modes differ at 1e-3 and more (checked)."""
    world = worlds["long"]
    ddp = [accum_argv(tmp_path, f"ddp-{m}", world, m, batch=2, accum=2) for m in ("batch", "micro")]
    mp.spawn(ddp_worker, nprocs=2, join=True, args=(2, free_port(len(ddp)), ddp))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(k, None)
    run_float64(accum_argv(tmp_path, "one-batch", world, "batch", batch=8, accum=1))
    run_float64(accum_argv(tmp_path, "one-micro", world, "micro", batch=4, accum=2))
    for mode in ("batch", "micro"):
        a, b = read_results(tmp_path / f"ddp-{mode}"), read_results(tmp_path / f"one-{mode}")
        assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
        assert not any(r["skipped"] for r in a + b)
        for x, y in zip(a, b):
            for k in ALIP_KEYS:
                assert x[k] == pytest.approx(y[k], rel=1e-8, abs=1e-12), (mode, x["step"], k)
        assert_weights_close(final_state(tmp_path / f"ddp-{mode}", "epoch_1"),
                             final_state(tmp_path / f"one-{mode}", "epoch_1"),
                             rtol=1e-8, atol=1e-10, max_outliers=0)
    a, b = final_state(tmp_path / "one-batch", "epoch_1"), final_state(tmp_path / "one-micro", "epoch_1")
    assert any(not torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-8) for k in a)
    saved = torch.load(tmp_path / "ddp-batch/checkpoints/epoch_1.pt", weights_only=True)
    assert saved["model_kwargs"]["force_context_length"] == CONTEXT


@pytest.fixture(scope="module")
def cut_world(worlds, tmp_path_factory):
    """The ``long`` world's captions stored 77 wide (data2rec cuts them: SOT, the first 75
    tokens, EOT)."""
    root = str(tmp_path_factory.mktemp("cut-world"))
    make_manifest_dataset(root, N)
    rows = [{"image": f"images/{i:04d}.jpg", "text": text_of(i), "caption": caption(i, "purple")}
            for i in range(N)]
    manifest = write_manifest(root, rows, "jsonl", name="cut")
    assert run_data2rec("--manifest", manifest, "--image-root", root, "--output-dir",
                        os.path.join(root, "cut"), "--shard-size", "8",
                        "--text-fields", "raw,caption") == 0
    return os.path.join(root, "cut")


@pytest.mark.parametrize("method", ["alip", "clips"])
def test_a_77_tower_reads_256_wide_captions_through_the_truncate_view(tmp_path, worlds, cut_world,
                                                                      method):
    """--caption-view truncate --caption-tokens 75 on captions stored 256 wide, the tower at 77:
    the tower encodes only the 77-wide view, so the width check lets it train (it refused the
    full caption's 256 beside it), and ALIP's run equals the run on the captions data2rec cut
    at 77, step for step, bit for bit."""
    flags = ["--method", method, "--model", MODELS[method], *small_flags(method), "--lr", "5e-3"]
    view = ["--caption-view", "truncate", "--caption-tokens", "75"]
    run_single(rec_argv(tmp_path, "view", worlds["long"], *flags, *view, context=None))
    if method == "alip":  # (CLIPS always reads a view; its decoder reads the full caption)
        run_single(rec_argv(tmp_path, "cut", cut_world, *flags, context=None))
        assert logged(tmp_path / "view") == logged(tmp_path / "cut")
        # without the view the tower would encode the 256-wide caption: refused, naming it
        assert refusal(tmp_path, worlds["long"], *flags).endswith(
            "the data's 'caption' field is 256 tokens wide; give --text-context >= 256")
