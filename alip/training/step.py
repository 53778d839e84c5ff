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

A step whose features or loss are not finite on ANY rank (all ranks agree through a tiny
all_reduce) is skipped on every rank: gradients dropped, the ALIP gate EMAs restored to their
value before the step, no optimizer update. The caller counts these.
"""
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from .distributed import DistInfo, all_true, mean_over_ranks
from .optim import clamp_logit_scale

GATE_LOG_KEYS = ("loss_raw", "loss_caption", "s_tc", "s_it", "s_ic", "ema_tc", "ema_it", "ema_ic")


@dataclass
class StepContext:
    model: nn.Module            # what forward runs: DDP(TripletEncoder) or the TripletEncoder
    clip_model: nn.Module       # the bare open_clip model (logit_scale, parameters)
    loss_fn: nn.Module          # ALIPLoss or open_clip ClipLoss
    optimizer: torch.optim.Optimizer
    info: DistInfo
    method: str = "alip"
    accum_mode: str = "batch"
    grad_clip_norm: float = 1.0
    scaler: Optional[torch.amp.GradScaler] = None
    autocast: Callable = nullcontext

    @property
    def ddp(self):
        return isinstance(self.model, nn.parallel.DistributedDataParallel)


def _forward(ctx, images, raw, cap):
    if ctx.method == "alip":
        return ctx.model(images, raw, cap)
    return ctx.model(images, raw)


def _loss(ctx, feats):
    if ctx.method == "alip":
        return ctx.loss_fn(*feats)
    return {"loss": ctx.loss_fn(*feats)}


def _finite(tensors):
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _backward(ctx, loss):
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
    else:
        loss.backward()


def _sync_context(ctx, last):
    return ctx.model.no_sync() if ctx.ddp and not last else nullcontext()


def _summary(ctx, out):
    """Detached scalars to log: losses, gate means/EMAs and mean weights."""
    vals = {"loss": out["loss"]}
    if ctx.method == "alip":
        vals.update({k: out[k] for k in GATE_LOG_KEYS})
        vals.update({f"{k}_mean": out[k].mean() for k in ("w_sample", "w_text", "w_caption")})
    keys = list(vals)
    numbers = torch.stack([vals[k].detach().double().reshape(()) for k in keys]).tolist()
    return dict(zip(keys, numbers))


def _accumulate_micro(ctx, micro_batches):
    n, summaries = len(micro_batches), []
    for j, batch in enumerate(micro_batches):
        with _sync_context(ctx, last=j == n - 1):
            with ctx.autocast():
                feats = _forward(ctx, *batch)
            if not all_true(_finite(feats), ctx.info):
                return None
            with ctx.autocast():
                out = _loss(ctx, feats)
            if not all_true(_finite([out["loss"]]), ctx.info):
                return None
            _backward(ctx, out["loss"] / n)
        summaries.append(_summary(ctx, out))
    return {k: sum(s[k] for s in summaries) / n for k in summaries[0]}


def _accumulate_batch(ctx, micro_batches):
    n = len(micro_batches)
    with torch.no_grad(), ctx.autocast():
        cached = [_forward(ctx, *batch) for batch in micro_batches]
    if not all_true(all(_finite(c) for c in cached), ctx.info):
        return None
    first = None
    try:
        for j, batch in enumerate(micro_batches):
            with _sync_context(ctx, last=j == n - 1):
                with ctx.autocast():
                    feats = _forward(ctx, *batch)
                    whole = [torch.cat([c[k] for c in cached[:j]] + [feats[k]]
                                       + [c[k] for c in cached[j + 1:]])
                             for k in range(len(feats) - 1)]
                    scale = feats[-1] if j == 0 else feats[-1].detach()
                    ctx.loss_fn.train(j == 0)  # gates: EMA update once per optimizer step
                    out = _loss(ctx, whole + [scale])
                if j == 0:
                    if not all_true(_finite([out["loss"]]), ctx.info):
                        return None
                    first = _summary(ctx, out)
                _backward(ctx, out["loss"])
    finally:
        ctx.loss_fn.train(True)
    return first


def train_step(ctx, micro_batches):
    """One optimizer step over ``micro_batches`` [(images, raw, caption), ...].

    Returns the step's metrics (floats), or None when the step was skipped as non-finite.
    """
    snapshot = {k: v.clone() for k, v in ctx.loss_fn.state_dict().items()}
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.accum_mode == "batch" and len(micro_batches) > 1:
        metrics = _accumulate_batch(ctx, micro_batches)
    else:
        metrics = _accumulate_micro(ctx, micro_batches)
    if metrics is None:
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.loss_fn.load_state_dict(snapshot)
        return None
    # with local_loss each rank's loss covers its own rows; the mean over ranks is the global loss
    metrics = mean_over_ranks(metrics, ctx.info)
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)
    if ctx.grad_clip_norm:
        params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, ctx.grad_clip_norm))
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    clamp_logit_scale(ctx.clip_model)
    return metrics
