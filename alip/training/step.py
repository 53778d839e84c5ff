"""One optimizer step: accumulation, AMP, non-finite skip, clip, update, logit_scale clamp.

Gradient accumulation (``accum_freq`` micro-batches per optimizer step), two semantics:

* ``accum_mode="batch"`` (default; open_clip's method): every micro-batch is first encoded
  without gradient, then each is re-encoded with gradient and the loss is computed over the
  WHOLE accumulated batch (the cached features with that micro-batch's slot replaced). The
  contrastive loss therefore sees ``accum_freq x batch_size`` samples per process and the ALIP
  gates weigh the accumulated batch ONCE, updating their EMAs once per optimizer step, so
  ``accum_freq=2, batch B`` gives the same losses, gate EMAs and gradients as ``batch 2B``
  (at the price of one extra no-grad forward). logit_scale takes its gradient in the first
  micro-step only, so it is not counted ``accum_freq`` times (open_clip counts it every time).
* ``accum_mode="micro"``: each micro-batch is its own contrastive batch: the gates see each
  micro-batch as it comes (EMAs move once per micro-batch) and ``loss / accum_freq`` is
  back-propagated, i.e. the average of the micro-batch gradients. Cheaper, but it is not a
  larger batch: its negatives and gate statistics come from B samples.

Both: DDP's ``no_sync`` on all but the last micro-step, one optimizer step, one scheduler
step and one logit_scale clamp per optimizer step (the reference runs the scheduler and the
clamp every micro-step and never divides the loss).

A step whose features, loss or (without a GradScaler) gradient norm are not finite on ANY rank
(all ranks agree through a tiny all_reduce, or DDP's averaged gradients) is skipped on every rank: gradients dropped, the buffers of the method's encoder and
criterion (gate EMAs, memory banks, BatchNorm statistics) restored to their value before the
step, no optimizer update. The caller counts these.

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

from .distributed import DistInfo, all_true, mean_over_ranks


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
    def encoder(self):
        return self.model.module if self.ddp else self.model


def _finite(tensors):
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _finite_features(feats):
    return _finite([v for v in feats.values() if v.is_floating_point()])


def _backward(ctx, loss):
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
    else:
        loss.backward()


def _sync_context(ctx, last):
    return ctx.model.no_sync() if ctx.ddp and not last else nullcontext()


def _summary(out):
    """Detached scalars to log: 0-dim entries as they are, the mean of the others."""
    vals = {}
    for k, v in out.items():
        if scalar(v):
            vals[k] = v
        elif torch.is_tensor(v) and v.is_floating_point():
            vals[f"{k}_mean"] = v.mean()
    keys = list(vals)
    numbers = torch.stack([vals[k].detach().double().reshape(()) for k in keys]).tolist()
    return dict(zip(keys, numbers))


def _accumulate_micro(ctx, micro_batches):
    n, summaries = len(micro_batches), []
    for j, batch in enumerate(micro_batches):
        with _sync_context(ctx, last=j == n - 1):
            with ctx.autocast():
                feats = ctx.model(batch)
            if not all_true(_finite_features(feats), ctx.info):
                return None
            with ctx.autocast():
                out = ctx.criterion(feats)
            if not all_true(_finite([out["loss"]]), ctx.info):
                return None
            _backward(ctx, out["loss"] / n)
        summaries.append(_summary(out))
    return {k: sum(s[k] for s in summaries) / n for k in summaries[0]}


def _whole_batch(cached, j, feats):
    """Micro-batch j's features (with gradient) in its slot of the cached no-grad features of the
    whole accumulated batch; 0-dim entries (logit_scale) carry gradient in the first slot only."""
    whole = {}
    for k, v in feats.items():
        if scalar(v):
            whole[k] = v if j == 0 else v.detach()
        else:
            whole[k] = torch.cat([c[k] for c in cached[:j]] + [v] + [c[k] for c in cached[j + 1:]])
    return whole


def _accumulate_batch(ctx, micro_batches):
    n = len(micro_batches)
    with torch.no_grad(), ctx.autocast():
        cached = [ctx.model(batch) for batch in micro_batches]
    if not all_true(all(_finite_features(c) for c in cached), ctx.info):
        return None
    first = None
    try:
        for j, batch in enumerate(micro_batches):
            with _sync_context(ctx, last=j == n - 1):
                with ctx.autocast():
                    feats = ctx.model(batch)
                    ctx.criterion.train(j == 0)  # criterion state moves once per optimizer step
                    out = ctx.criterion(_whole_batch(cached, j, feats))
                if j == 0:
                    if not all_true(_finite([out["loss"]]), ctx.info):
                        return None
                    first = _summary(out)
                _backward(ctx, out["loss"])
    finally:
        ctx.criterion.train(True)
    return first


def _buffers(ctx):
    return [b for m in (ctx.encoder, ctx.criterion) for b in m.buffers()]


def _skip(ctx, snapshot):
    """Drop the gradients and restore the buffers (gate EMAs, memory banks, BN statistics)."""
    ctx.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for b, saved in zip(_buffers(ctx), snapshot):
            b.copy_(saved)
    return None


def train_step(ctx, micro_batches):
    """One optimizer step over ``micro_batches`` (a list of batch dicts).

    Returns the step's metrics (floats, averaged over ranks), or None when the step was skipped
    as non-finite.
    """
    snapshot = [b.detach().clone() for b in _buffers(ctx)]
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.accum_mode == "batch" and len(micro_batches) > 1:
        metrics = _accumulate_batch(ctx, micro_batches)
    else:
        metrics = _accumulate_micro(ctx, micro_batches)
    if metrics is None:
        return _skip(ctx, snapshot)
    # with local_loss each rank's loss covers its own rows; the mean over ranks is the global loss
    metrics = mean_over_ranks(metrics, ctx.info)
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)
    params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
    if ctx.grad_clip_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, ctx.grad_clip_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    metrics["grad_norm"] = float(norm)
    if ctx.scaler is None and not torch.isfinite(norm):
        # finite loss, non-finite gradient (DDP-averaged, so every rank agrees): skip the step
        # (with a GradScaler, fp16 overflow is the scaler's business: it skips and rescales)
        return _skip(ctx, snapshot)
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    ctx.after_step()
    return metrics
