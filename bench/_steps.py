"""Shared bench helpers: a method's real training step, built and run as train.py does.

``method_step`` builds the method object from train.py's own flags (``alip.training.params``)
and the open_clip model through ``alip.training.loop.build_model`` (the method's
``model_kwargs()``: --text-context, SigLIP's init; the training seed; ``method.attach``);
``step_context`` gives its encoder and criterion train.py's optimizer (fused AdamW,
``alip.training.optim``) and step context (grad clip, scaler, autocast, after-step hook);
``step_fn`` runs ``alip.training.step.train_step`` on one batch moved as train.py's loop moves
batches (``as_batch_dicts``: token tensors keep their host copy).
"""
import logging

import torch
from open_clip_train.precision import get_autocast

import alip  # noqa: F401
from alip.training.distributed import DistInfo
from alip.training.loop import as_batch_dicts, build_method, build_model
from alip.training.optim import build_optimizer
from alip.training.params import parse_args
from alip.training.step import StepContext, train_step


def local_info(device):
    """One process on ``device`` (rank 0 of 1, not distributed)."""
    return DistInfo(0, 0, 1, False, torch.device(device))


def step_context(method, info, autocast, scaler=None, lr=1e-6, wd=0.2):
    """train.py's step context for an attached ``method``: its encoder and criterion on the
    device, in train mode, train.py's optimizer over the encoder, grad clip 1.0."""
    encoder = method.encoder.to(info.device)
    criterion = method.criterion.to(info.device)
    encoder.train()
    criterion.train()
    return StepContext(model=encoder, criterion=criterion, optimizer=build_optimizer(encoder, lr, wd),
                       info=info, grad_clip_norm=1.0, scaler=scaler, autocast=autocast,
                       after_step=method.after_step)


def method_step(flags, device, precision="fp32", threads=1):
    """(context, method, model) of ``train.py --method ... FLAGS`` on ``device``: the method and
    model built by train.py's own functions, the step context as ``step_context``."""
    cfg = parse_args(list(flags) + ["--precision", precision])
    cfg.cpu_threads = threads  # what train.py resolves from --cpu-threads
    info = local_info(device)
    method = build_method(cfg, info)
    model, _ = build_model(cfg, method, info, logging.getLogger("bench"))
    scaler = torch.amp.GradScaler("cuda") if precision == "amp" and info.device.type == "cuda" else None
    ctx = step_context(method, info, get_autocast(precision, device_type=info.device.type), scaler)
    return ctx, method, model


def method_batch(spec, batch, gen):
    """The batch dict a method's DataSpec asks for: its first image view is the batch's images,
    further views fresh random images of the same shape; text views copy their source field
    (their transforms run in the reader, not in the step)."""
    images, raw, cap = batch
    out = {spec.image_views[0].name: images}
    for view in spec.image_views[1:]:
        out[view.name] = torch.randn(images.shape, generator=gen).to(images.device)
    fields = {"raw": raw, "caption": cap}
    out.update({f: fields[f] for f in spec.text_fields})
    out.update({v.name: fields[v.sources[0]].clone() for v in spec.text_views})
    return out


def step_fn(ctx, spec, host_batch, gen, device):
    """A callable running one optimizer step (``train_step``) of ``ctx`` on ``host_batch``
    ((images, raw, caption) CPU tensors), moved to ``device`` once, as the loop moves it."""
    views = next(as_batch_dicts([method_batch(spec, host_batch, gen)], spec, device))
    return lambda: train_step(ctx, [views])
