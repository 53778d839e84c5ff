"""Gradient accumulation: --accum-freq 2 at batch B == batch 2B (accum-mode batch), and the
per-micro-batch semantics of accum-mode micro, checked on gradients and end to end."""
import copy

import open_clip
import pytest
import torch

import alip  # noqa: F401
from alip.methods import get_method
from alip.methods.alip import ALIPEncoder
from alip.training.distributed import DistInfo
from alip.training.params import parse_args
from alip.training.step import StepContext, train_step
from alip.training.synthetic import synthetic_sample
from test_train_helpers import assert_weights_close, final_state, read_results, run_single, tiny_argv


def _batch(start, n):
    samples = [synthetic_sample(0, i, 32) for i in range(start, start + n)]
    return dict(zip(("image", "raw", "caption"), (torch.stack(x) for x in zip(*samples))))


def _split(batch, *slices):
    return [{k: v[s] for k, v in batch.items()} for s in slices]


def _ctx(method="alip", accum_mode="batch"):
    torch.manual_seed(0)
    model = open_clip.create_model("ALIP-tiny")
    args = parse_args(["--method", method])
    m = get_method(method)(args).attach(model)
    # lr 0: the step leaves the accumulated gradients in .grad for inspection
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    info = DistInfo(0, 0, 1, False, torch.device("cpu"))
    ctx = StepContext(model=m.encoder, criterion=m.criterion, optimizer=opt, info=info,
                      accum_mode=accum_mode, grad_clip_norm=0)
    ctx.clip_model = model
    return ctx


def _grads(ctx):
    return {n: p.grad.clone() for n, p in ctx.clip_model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["alip", "clip"])
def test_batch_mode_gradients_equal_one_big_batch(method, float64):
    big, acc = _ctx(method), _ctx(method, "batch")
    b = _batch(0, 16)
    m_big = train_step(big, [b]).metrics()
    m_acc = train_step(acc, _split(b, slice(0, 8), slice(8, 16))).metrics()
    assert m_acc["loss"] == pytest.approx(m_big["loss"], rel=1e-12)
    g_big, g_acc = _grads(big), _grads(acc)
    assert g_big.keys() == g_acc.keys()
    for k in g_big:  # logit_scale included: its gradient is taken once, not accum_freq times
        torch.testing.assert_close(g_acc[k], g_big[k], rtol=1e-9, atol=1e-12, msg=k)
    if method == "alip":  # the EMAs moved once, with the mean over all 16 samples
        for k, v in big.criterion.state_dict().items():
            torch.testing.assert_close(acc.criterion.state_dict()[k], v, rtol=0, atol=1e-14)
        assert acc.criterion.training


def test_micro_mode_averages_micro_batch_gradients_and_gates_see_each(float64):
    ctx = _ctx("alip", "micro")
    b1, b2 = _batch(0, 8), _batch(8, 8)
    ref_model, ref_loss = copy.deepcopy(ctx.clip_model), copy.deepcopy(ctx.criterion)
    train_step(ctx, [b1, b2])
    enc = ALIPEncoder(ref_model, text_mode="separate")
    for b in (b1, b2):  # by hand: each micro-batch its own loss, EMA moving each time
        (ref_loss(enc(b))["loss"] / 2).backward()
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(dict(ctx.clip_model.named_parameters())[n].grad, p.grad,
                                   rtol=1e-9, atol=1e-12, msg=n)
    # two EMA updates: 1 -> m + (1-m) s1 -> ..., not one update with the mean of 16
    assert torch.equal(ctx.criterion.ema_tc, ref_loss.ema_tc)
    once = _ctx("alip")
    train_step(once, [{k: torch.cat([b1[k], b2[k]]) for k in b1}])
    assert not torch.allclose(once.criterion.ema_tc, ctx.criterion.ema_tc, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["alip", "clip"])
def test_accum_run_equals_big_batch_run(tmp_path, method):
    """End to end with the reference recipe (clip 1.0, OneCycle): same losses, gate EMAs and
    lr/beta1 per optimizer step (scheduler once per step), same final weights.

    The two runs sum in different orders. In fp32 that is ~1e-7 relative per step, and Adam
    (which divides by sqrt(v)) amplifies it to ~1e-4 within a few steps, by an amount that
    depends on the CPU's kernels; so the runs are compared in float64, where the same
    amplification leaves them within ~1e-10 on any CPU, and the tolerance (1e-8) is far from
    both that and any real difference (a wrong accumulation changes losses at 1e-3 or more).
    """
    common = ["--method", method, "--lr", "5e-3"]
    run_single(tiny_argv(tmp_path, "acc", *common, "--accum-freq", "2", batch=8, epochs=2),
               dtype=torch.float64)
    run_single(tiny_argv(tmp_path, "big", *common, batch=16, epochs=2), dtype=torch.float64)
    acc, big = read_results(tmp_path / "acc"), read_results(tmp_path / "big")
    assert [r["step"] for r in acc] == [r["step"] for r in big] == list(range(1, 9))
    keys = ["loss", "grad_norm"] + (["ema_tc", "ema_it", "ema_ic", "w_sample_mean"]
                                    if method == "alip" else [])
    assert all(r["grad_norm"] > 1.0 for r in big[:2])  # the clip at 1.0 is active
    for a, b in zip(acc, big):
        assert a["lr"] == b["lr"] and a["beta1"] == b["beta1"]
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-8, abs=1e-12), (a["step"], k)
    sd_acc = final_state(tmp_path / "acc", "epoch_2")
    sd_big = final_state(tmp_path / "big", "epoch_2")
    assert_weights_close(sd_acc, sd_big, rtol=1e-8, atol=1e-10, max_outliers=0)


OPTIMIZERS = {  # how the skip reaches the optimizer
    "sgd (host reads the verdict)": lambda ps: (torch.optim.SGD(ps, lr=0.1), None),
    "fused adamw (found_inf on the device)": lambda ps: (build_optimizer_for(ps), None),
    "fused adamw + GradScaler": lambda ps: (build_optimizer_for(ps),
                                            torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)),
}


def build_optimizer_for(params):
    opt = torch.optim.AdamW(params, lr=0.1, fused=True)
    assert opt._step_supports_amp_scaling
    return opt


def _state(ctx):
    return ({k: v.clone() for k, v in ctx.clip_model.state_dict().items()},
            {k: v.clone() for k, v in ctx.criterion.state_dict().items()},
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in ctx.optimizer.state.items()})


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], dict):
                _assert_same([x[k]], [y[k]])
            else:
                assert torch.equal(x[k], y[k]), k


class WithNaNExtra(torch.nn.Module):
    """The encoder's features plus a NaN entry that the loss does not read."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, batch):
        return {**self.encoder(batch), "extra": torch.full((2,), float("nan"))}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("fault", ["inf gradient, finite loss", "nan features",
                                   "nan feature outside the loss"])
def test_non_finite_step_is_skipped(opt, fault):
    """A step whose gradient (with a finite loss: an inf hook on one weight's gradient) or whose
    features are not finite (even one the loss does not read, whose gradient is finite) is
    skipped: weights, optimizer state and gate EMAs unchanged,
    ``metrics()`` None; with a GradScaler the scale backs off as for an fp16 overflow. Then
    the next step trains."""
    ctx = _ctx("alip", "micro")
    ctx.grad_clip_norm = 1.0
    ctx.optimizer, ctx.scaler = OPTIMIZERS[opt](ctx.clip_model.parameters())
    assert train_step(ctx, [_batch(0, 8)]).metrics() is not None  # optimizer state exists
    before = _state(ctx)
    batch = _batch(8, 8)
    if fault == "nan features":
        batch["image"][3] = float("nan")
    elif fault == "nan feature outside the loss":
        ctx.model = WithNaNExtra(ctx.model)
    else:
        handle = ctx.clip_model.visual.conv1.weight.register_hook(
            lambda g: torch.full_like(g, float("inf")))
    assert train_step(ctx, [batch]).metrics() is None
    if fault == "inf gradient, finite loss":
        handle.remove()
    ctx.model = getattr(ctx.model, "encoder", ctx.model)
    _assert_same(_state(ctx), before)
    if ctx.scaler is not None:
        assert ctx.scaler.get_scale() == 2.0 ** 7
    assert train_step(ctx, [_batch(0, 8)]).metrics() is not None  # and the next step trains
    assert not torch.equal(ctx.clip_model.visual.conv1.weight, before[0]["visual.conv1.weight"])


def test_the_optimizer_is_fused_where_torch_has_the_kernel():
    from alip.training.optim import build_optimizer
    opt = build_optimizer(torch.nn.Linear(2, 2), 1e-3, 0.1)
    assert opt.param_groups[0]["fused"] and opt._step_supports_amp_scaling
