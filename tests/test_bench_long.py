"""The long-caption benches (issue #26): bench/text_encoding.py --parts long run as
micro-batches computes the whole batch's gradient and the whole batch's grouped plan;
bench/alip_long_step.py cuts captions as the tokenizer does and runs train.py's ALIP step at
both contexts. No timing is asserted (docs/benchmarks.md has the measured figures)."""
import contextlib
import sys
from pathlib import Path

import open_clip
import pytest
import torch

import alip  # noqa: F401
from alip.model import length_groups, reference_varlen_attn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _steps  # noqa: E402
import _texts  # noqa: E402
import alip_long_step  # noqa: E402
import text_encoding  # noqa: E402

LENGTHS = torch.tensor([60, 200, 97, 143, 100, 61, 188, 99, 120, 75, 160, 101, 64])  # 13 rows


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    return open_clip.create_model("ALIP-tiny", force_context_length=256).double()


@pytest.mark.parametrize("path", ["padded", "grouped", "packed"])
@pytest.mark.parametrize("micro", [None, 4, 1])
def test_micro_batches_give_the_whole_batch_gradient(tower, path, micro):
    """One padded 256-token pass over the 13 rows vs the passes of the bench's side, forward +
    backward each, gradients accumulated (packed: with the reference varlen attention, the
    CUDA kernel's math, as the CPU stands in for it). float64: the two differ only in summation order
    (chunks, trimmed rows), ~1e-16 relative per operation over sums of a few thousand terms,
    so 1e-10 of the gradient's scale is far above rounding and far below any missing row
    (one row is ~1/13 of the sum)."""
    text = _texts.tokens(LENGTHS, torch.Generator().manual_seed(0), 256)
    tower.zero_grad(set_to_none=True)
    tower.encode_text(text, normalize=True).sum().backward()
    want = grads(tower)
    tower.zero_grad(set_to_none=True)
    passes = text_encoding.long_passes(LENGTHS, path, micro, 4, 256)
    text_encoding.long_side(tower, text, passes, path, contextlib.nullcontext,
                            attn_fn=reference_varlen_attn)()
    got = grads(tower)
    assert got.keys() == want.keys()
    for k in want:
        scale = want[k].abs().max().item()
        assert (got[k] - want[k]).abs().max().item() <= 1e-10 * scale, k


@pytest.mark.parametrize("micro", [None, 5, 2, 1])
def test_micro_batches_keep_the_batch_plan(micro):
    """Every row once; no pass wider than ``micro``; the grouped passes run the tokens of the
    whole batch's <= 4-group plan (not a plan per micro-batch, which would group finer)."""
    plan = length_groups(LENGTHS, 4)
    for path, want in (("grouped", sum(len(r) * n for r, n in plan)), ("padded", 13 * 256)):
        passes = text_encoding.long_passes(LENGTHS, path, micro, 4, 256)
        assert sorted(torch.cat([r for r, _ in passes]).tolist()) == list(range(13))
        assert max(len(r) for r, _ in passes) <= (micro or 13)
        assert sum(len(r) * n for r, n in passes) == want
        for rows, n in passes:
            assert int(LENGTHS[rows].max()) <= n
    packed = text_encoding.long_passes(LENGTHS, "packed", micro, 4, 256)
    assert [n for _, n in packed] == [None] * len(packed)  # each chunk packed: its own lengths
    assert sorted(torch.cat([r for r, _ in packed]).tolist()) == list(range(13))


def test_cut_is_the_tokenizers_cut():
    """Captions tokenized at 256 and cut at 77 == the same captions tokenized at 77, for texts
    of 200, 78 and 77 ids and a short one."""
    texts = ["a " * 198, "c " * 76, "b " * 75, "a photo of a cat"]
    at_256 = open_clip.get_tokenizer("ViT-B-32", context_length=256)(texts)
    assert (at_256[:, 77:] != 0).sum(1).tolist() == [123, 1, 0, 0]  # lengths 200, 78, 77, 7
    assert torch.equal(_texts.cut(at_256), open_clip.get_tokenizer("ViT-B-32")(texts))


def test_method_step_is_train_pys_alip_at_256():
    """The bench's step: train.py's method object and model (the tower at --text-context),
    its optimizer moving the weights."""
    ctx, method, model = _steps.method_step(
        ["--method", "alip", "--model", "ALIP-tiny", "--batch-size", "4", "--text-context", "256"],
        "cpu")
    assert type(method).__name__ == "ALIP" and ctx.model is method.encoder
    assert model.positional_embedding.shape[0] == 256 and model.context_length == 256
    gen = torch.Generator().manual_seed(0)
    batch = alip_long_step.host_batches(4, 32, 256, gen)["long"]
    before = model.text_projection.detach().clone()
    result = _steps.step_fn(ctx, method.data, batch, gen, "cpu")()
    assert {"loss", "grad_norm"} <= set(result.metrics())
    assert not torch.equal(before, model.text_projection.detach())


def test_alip_long_step_runs(capsys):
    alip_long_step.main(["--model", "ALIP-tiny", "--batch", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "step long / cut77:" in out and "batch 4" in out


def test_text_encoding_long_part_runs(capsys):
    text_encoding.main(["--parts", "long", "--model", "ALIP-tiny", "--long-batch", "8",
                        "--long-micro-batch", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "micro-batches of <= 3 rows" in out and "time grouped/padded" in out


@pytest.mark.parametrize("argv, flag", [(["--batch", "1"], "--batch 1"),
                                        (["--text-context", "77"], "--text-context 77")])
def test_alip_long_step_bad_flags(argv, flag, capsys):
    with pytest.raises(SystemExit):
        alip_long_step.main(["--model", "ALIP-tiny", *argv])
    assert flag in capsys.readouterr().err
