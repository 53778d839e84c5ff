"""One optimizer step: accumulation, AMP, non-finite skip, clip, update, logit_scale clamp.

Gradient accumulation (``accum_freq`` micro-batches per optimizer step), two semantics:

* ``accum_mode="batch"`` (default; open_clip's method): every micro-batch is first encoded
  without gradient, then each is re-encoded with gradient and the loss is computed over the
  WHOLE accumulated batch (the cached features with that micro-batch's slot replaced). The
  contrastive loss therefore sees ``accum_freq x batch_size`` samples per process and the ALIP
  gates weigh the accumulated batch ONCE, updating their EMAs once per optimizer step, so
  ``accum_freq=2, batch B`` gives the same losses, gate EMAs and gradients as ``batch 2B``
  (at the price of one extra no-grad forward). logit_scale takes its gradient in the first
  micro-step only, so it is not counted ``accum_freq`` times (open_clip counts it every time);
  in the other micro-steps it stays in the graph with a zero gradient (``_zero_gradient``), so
  every micro-step's backward reaches every parameter the forward used: under DDP the last,
  synchronised micro-step must reduce logit_scale's gradient too (detached, it was left out
  and DDP stopped at the next step: "Expected to have finished reduction"). Per-sample
  features are ``[B, ...]``, joined along dim 0; a packed row ``[1, N, ...]`` whose N differs
  between micro-batches (CLIPS' caption positions) is joined along N (``_join``).
* ``accum_mode="micro"``: each micro-batch is its own contrastive batch: the gates see each
  micro-batch as it comes (EMAs move once per micro-batch) and ``loss / accum_freq`` is
  back-propagated, i.e. the average of the micro-batch gradients. Cheaper, but it is not a
  larger batch: its negatives and gate statistics come from B samples.

Under ``--fsdp`` (``alip.training.fsdp``) the same step runs on the sharded encoder: FSDP's
``set_requires_gradient_sync(False)`` stands for ``no_sync``, the 0-dim parameters FSDP leaves
whole are averaged over the ranks by hand, and the gradient norm is the DTensor norm over every
rank's shards (the same value on every rank, so the ranks agree on a skip).

Both: DDP's ``no_sync`` on all but the last micro-step, one optimizer step, one scheduler
step and one logit_scale clamp per optimizer step (the reference runs the scheduler and the
clamp every micro-step and never divides the loss). DDP averages the ranks' gradients once, in
the last micro-step, over all that each rank accumulated; without ``find_unused_parameters``
it reduces only what that micro-step's backward reaches, so every parameter with a gradient
from any micro-step must be in the last one's graph (with it, DDP records what the no_sync
micro-steps used). Both modes give that: each micro-step runs the same forward, and batch mode
keeps the 0-dim features in every micro-step's graph. So where W ranks train as one process
(clip, alip, filip; not the per-rank BatchNorm, MLM draws or caption means of slip, declip,
defilip, clips), W ranks x batch B x accum k train as one process with batch W*k*B in batch
mode, and with batch W*B and accum k in micro mode (tests/test_train_accum_ddp.py).

A step whose features, loss or gradient norm are not finite on ANY rank is skipped on every
rank: no optimizer update, and the buffers of the method's encoder and criterion (gate EMAs,
memory banks, BatchNorm statistics) restored to their value before the step. The step decides
this ON THE DEVICE and never waits for it: the ranks AND their forward flags with an
all_reduce, a non-finite forward turns one gradient entry into NaN (so the gradient norm, and
a GradScaler, see it as they see any overflow), and a fused optimizer gets the verdict as
``found_inf`` (the GradScaler protocol: it skips its update in the kernel). Other optimizers
read the flag on the host, the one sync left. Nothing else reads a value back: the step
returns a ``StepResult`` whose ``metrics()`` waits for the device, so the loop reads steps when
it logs, not every step (open_clip_train syncs only when it logs too).

The step knows no method: it runs ``ctx.model(batch) -> features`` (the method's encoder,
DDP-wrapped when distributed) and ``ctx.criterion(features) -> {"loss", terms}`` (see
``alip.methods.base``); batches are dicts of tensors.
"""
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from alip.methods.base import scalar

from .distributed import DistInfo, all_ranks_true, mean_over_ranks
from .fsdp import average_scalar_grads, full, is_fsdp, local


@dataclass
class StepContext:
    model: nn.Module            # what forward runs: DDP(method.encoder) or the encoder
    criterion: nn.Module        # the method's loss terms (no parameters)
    optimizer: torch.optim.Optimizer
    info: DistInfo
    accum_mode: str = "batch"
    grad_clip_norm: float = 1.0
    scaler: Optional[torch.amp.GradScaler] = None
    autocast: Callable = nullcontext
    after_step: Callable = lambda: None  # the method's post-update hook (logit_scale clamp)

    @property
    def ddp(self):
        return isinstance(self.model, nn.parallel.DistributedDataParallel)

    @property
    def fsdp(self):
        return is_fsdp(self.model)

    @property
    def encoder(self):
        return self.model.module if self.ddp else self.model


@dataclass
class StepResult:
    """One optimizer step's outcome, still on the device."""
    applied: torch.Tensor   # 0-dim bool: False when the step was skipped as non-finite
    keys: list
    values: torch.Tensor    # float64 [len(keys)], averaged over ranks

    def metrics(self):
        """The step's metrics as floats, or None when it was skipped; waits for the device."""
        applied, *values = torch.cat([self.applied.double().reshape(1), self.values]).tolist()
        return dict(zip(self.keys, values)) if applied else None


def _finite(tensors):
    """0-dim bool tensor: every entry of every tensor is finite (no host sync). Read off each
    tensor's min and max (a NaN anywhere makes both NaN, an inf is one of them): one pass over
    the tensor, where ``isfinite(t).all()`` writes and reads a mask as large; on CLIPS' decoder
    logits ([1700, 49408] in the demo) 0.016 s against 0.46 s at one idle CPU thread."""
    ends = [torch.stack(torch.aminmax(t.detach())) for t in tensors if t.numel()]
    if not ends:  # nothing to check, on the tensors' device (the step stacks the verdicts)
        return torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else None)
    return torch.stack([torch.isfinite(e).all() for e in ends]).all()


def _finite_features(feats):
    return _finite([v for v in feats.values() if torch.is_tensor(v) and v.is_floating_point()])


def _backward(ctx, loss):
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
    else:
        loss.backward()


def _sync_context(ctx, last):
    """DDP: no_sync but in the last micro-step. FSDP: gradients kept unsharded and unreduced
    but in the last micro-step, whose backward reduce-scatters them all."""
    if ctx.fsdp:
        ctx.model.set_requires_gradient_sync(last)
        ctx.model.set_is_last_backward(last)
    return ctx.model.no_sync() if ctx.ddp and not last else nullcontext()


def _summary(out):
    """Detached scalars to log, as (keys, float64 tensor): 0-dim entries as they are, the mean
    of the others."""
    vals = {}
    for k, v in out.items():
        if scalar(v):
            vals[k] = v
        elif torch.is_tensor(v) and v.is_floating_point():
            vals[f"{k}_mean"] = v.mean()
    keys = list(vals)
    return keys, torch.stack([vals[k].detach().double().reshape(()) for k in keys])


def _accumulate_micro(ctx, micro_batches):
    n, finite, summaries = len(micro_batches), [], []
    for j, batch in enumerate(micro_batches):
        with _sync_context(ctx, last=j == n - 1):
            with ctx.autocast():
                feats = ctx.model(batch)
                out = ctx.criterion(feats)
            finite += [_finite_features(feats), _finite([out["loss"]])]
            _backward(ctx, out["loss"] / n)
        summaries.append(_summary(out))
    keys = summaries[0][0]
    return torch.stack(finite).all(), keys, torch.stack([v for _, v in summaries]).mean(0)


class _ZeroGradient(torch.autograd.Function):
    """The input's value, and a zero gradient to it: the input's parameters stay in the
    backward graph without taking any gradient from this use."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


def _zero_gradient(x):
    return _ZeroGradient.apply(x)


def _join(parts):
    """One feature's entries of the micro-batches, in order, as the whole batch's: per-sample
    ``[B, ...]`` features along dim 0; a packed row ``[1, N, ...]`` of the micro-batch (CLIPS'
    caption logits and targets: the decoder positions that have a target, sample by sample)
    along N when the N differ, which is the row the whole batch's forward packs (when they agree,
    dim 0 gives the same rows in the same order to a loss that flattens them)."""
    if any(p.shape[1:] != parts[0].shape[1:] for p in parts) and all(
            p.dim() >= 2 and p.shape[0] == 1 and p.shape[2:] == parts[0].shape[2:] for p in parts):
        return torch.cat(parts, dim=1)
    return torch.cat(parts)


def _whole_batch(cached, j, feats):
    """Micro-batch j's features (with gradient) in its slot of the cached no-grad features of the
    whole accumulated batch. 0-dim entries (logit_scale) count in the first slot only and keep
    a zero gradient in the others, so each micro-step's backward reaches their parameters (the
    synchronised one under DDP is the last)."""
    whole = {}
    for k, v in feats.items():
        if scalar(v):
            whole[k] = v if j == 0 else _zero_gradient(v)
        else:
            whole[k] = _join([c[k] for c in cached[:j]] + [v] + [c[k] for c in cached[j + 1:]])
    return whole


def _accumulate_batch(ctx, micro_batches):
    n = len(micro_batches)
    with torch.no_grad(), ctx.autocast():
        cached = [ctx.model(batch) for batch in micro_batches]
    finite = [_finite_features(c) for c in cached]
    try:
        for j, batch in enumerate(micro_batches):
            with _sync_context(ctx, last=j == n - 1):
                with ctx.autocast():
                    feats = ctx.model(batch)
                    ctx.criterion.train(j == 0)  # criterion state moves once per optimizer step
                    out = ctx.criterion(_whole_batch(cached, j, feats))
                if j == 0:
                    finite.append(_finite([out["loss"]]))
                    keys, values = _summary(out)
                _backward(ctx, out["loss"])
    finally:
        ctx.criterion.train(True)
    return torch.stack(finite).all(), keys, values


def _buffers(ctx):
    return [b for m in (ctx.encoder, ctx.criterion) for b in m.buffers()]


def _poison_unless(params, finite):
    """NaN into the smallest gradient (logit_scale's) unless ``finite``: the norm and a
    GradScaler then see a non-finite forward as they see any non-finite gradient."""
    grad = min((p.grad for p in params if p.grad is not None), key=torch.Tensor.numel)
    grad = local(grad)  # FSDP: the rank holding the entry poisons it (all ranks agree on finite)
    grad.mul_(torch.where(finite, 1.0, float("nan")).to(grad.dtype))


def _optimizer_step_if(ctx, applied):
    if ctx.scaler is not None:  # skips when the (unscaled) gradients are not finite
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    elif getattr(ctx.optimizer, "_step_supports_amp_scaling", False):
        # fused optimizers skip in the kernel when found_inf is set: GradScaler's protocol
        ctx.optimizer.found_inf = (~applied).float()
        ctx.optimizer.grad_scale = None
        try:
            ctx.optimizer.step()
        finally:
            del ctx.optimizer.found_inf, ctx.optimizer.grad_scale
    elif applied:  # other optimizers: the flag is read on the host
        ctx.optimizer.step()


def _restore_unless(buffers, snapshot, applied):
    """Buffers back to their value before the step (gate EMAs, banks, BN stats) if skipped."""
    with torch.no_grad():
        for b, saved in zip(buffers, snapshot):
            b.copy_(torch.where(applied, b, saved))


def train_step(ctx, micro_batches):
    """One optimizer step over ``micro_batches`` (a list of batch dicts) -> ``StepResult``."""
    buffers = _buffers(ctx)
    snapshot = [b.detach().clone() for b in buffers]
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.accum_mode == "batch" and len(micro_batches) > 1:
        finite, keys, values = _accumulate_batch(ctx, micro_batches)
    else:
        finite, keys, values = _accumulate_micro(ctx, micro_batches)
    # with local_loss each rank's loss covers its own rows; the mean over ranks is the global loss
    values = mean_over_ranks(values, ctx.info)
    if ctx.fsdp:
        average_scalar_grads(ctx.model, ctx.info.world_size)
    params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
    _poison_unless(params, all_ranks_true(finite, ctx.info))
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)
    if ctx.grad_clip_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, ctx.grad_clip_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    norm = full(norm)  # FSDP: the norm over every rank's shards, the same on every rank
    # DDP-averaged gradients (and the AND over ranks before) give every rank the same verdict
    applied = torch.isfinite(norm)
    _optimizer_step_if(ctx, applied)
    ctx.after_step()  # the logit-scale clamps: idempotent on an unchanged parameter
    _restore_unless(buffers, snapshot, applied)
    return StepResult(applied, keys + ["grad_norm"],
                      torch.cat([values, norm.detach().double().reshape(1)]))
