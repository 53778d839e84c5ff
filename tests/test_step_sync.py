"""A training step never waits for the device.

Every read-back of a device value (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``, a
boolean mask) stalls a GPU step until the device catches up. The step runs here on the meta
device, where any such read raises: a step that completes read nothing back. The token
tensors come from the CPU as the training loop moves them (``as_batch_dicts``), so the length
plans are made from their host copies.
"""
import pytest
import torch

from alip.model import encode_text, encode_text_pair, to_device_keeping_host_tokens
from alip.training.distributed import DistInfo
from alip.training.loop import as_batch_dicts
from alip.training.step import StepContext, train_step
from test_methods import batch_for, build

META = torch.device("meta")


class FusedLikeOptimizer(torch.optim.Optimizer):
    """A fused optimizer's step protocol (``found_inf``), recording what it was given."""
    _step_supports_amp_scaling = True

    def __init__(self, params):
        super().__init__(params, {})
        self.calls = []

    def step(self, closure=None):
        self.calls.append(getattr(self, "found_inf", None))


def _meta_step(name):
    method, _ = build(name)
    encoder, criterion = method.encoder.to(META), method.criterion.to(META)
    if hasattr(criterion, "_values_checked"):
        criterion._values_checked = True  # ALIPLoss checks its input values on its first call
    opt = FusedLikeOptimizer(encoder.parameters())
    ctx = StepContext(model=encoder, criterion=criterion, optimizer=opt,
                      info=DistInfo(0, 0, 1, False, META), after_step=method.after_step)
    batch = next(as_batch_dicts([batch_for(method.data)], method.data, META))
    return ctx, batch


@pytest.mark.parametrize("name", ["clip", "alip", "slip", "declip", "filip", "defilip", "clips"])
def test_a_training_step_reads_nothing_back_from_the_device(name):
    ctx, batch = _meta_step(name)
    result = train_step(ctx, [batch])
    # the skip verdict went to the optimizer as a device tensor, not through the host
    assert len(ctx.optimizer.calls) == 1 and ctx.optimizer.calls[0].is_meta
    assert result.applied.is_meta and result.values.is_meta
    with pytest.raises((RuntimeError, NotImplementedError)):
        result.metrics()  # reading the metrics is what waits (the loop does it when it logs)


@pytest.mark.parametrize("path", ["grouped", "packed", "trim"])
def test_text_plans_come_from_the_host_copy(path):
    method, _ = build("alip")
    model = method.model.to(META)
    tokens = batch_for(method.data)["raw"]
    text = to_device_keeping_host_tokens(tokens, META)
    attn = (lambda q, k, v, *a, **kw: q) if path == "packed" else None  # shape-only stand-in
    out = encode_text(model, text, path=path, attn_fn=attn)
    assert out.is_meta and out.shape == (len(tokens), model.text_projection.shape[1])
    # the joint pass of raw text and caption carries both host copies along
    raw_f, cap_f = encode_text_pair(model, text, to_device_keeping_host_tokens(tokens, META),
                                    text_mode="joint")
    assert raw_f.shape == cap_f.shape == out.shape
    # without a host copy the plan needs the lengths from the device: that read is refused here
    with pytest.raises((RuntimeError, NotImplementedError)):
        encode_text(model, tokens.to(META), path=path, attn_fn=attn)
