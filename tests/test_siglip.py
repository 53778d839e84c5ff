"""SigLIP (``--method siglip``): the sigmoid loss against an independent replica of big_vision's
``sigmoid_loss`` (written here from the paper's formula, not open_clip's code), its model
arguments (temperature 10, bias -10), and its checkpoint loading back with its bias. Its 2-rank
neighbour exchange is checked against one process over the global batch in
tests/test_train_accum_ddp.py (losses and weights, float64)."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import alip  # noqa: F401
from alip.methods import get_method
from alip.training.params import parse_args


def big_vision_sigmoid_loss(zimg, ztxt, t, b):
    """big_vision/trainers/proj/image_text/siglip.py: logits = zimg @ ztxt.T * t + b; labels
    2 I - 1; l = mean over images of -sum over texts of log_sigmoid(labels * logits)."""
    logits = zimg @ ztxt.T * t + b
    labels = 2 * torch.eye(len(zimg), dtype=logits.dtype) - 1
    return (-F.logsigmoid(labels * logits).sum(dim=-1)).mean()


def method(*flags):
    args = parse_args(["--method", "siglip", "--model", "ALIP-tiny", *flags])
    m = get_method("siglip")(args)
    torch.manual_seed(0)
    return m.attach(open_clip.create_model("ALIP-tiny", **m.model_kwargs()))


def test_sigmoid_loss_and_gradients_equal_the_reference_formula():
    gen = torch.Generator().manual_seed(0)
    feats = {"image": F.normalize(torch.randn(6, 16, generator=gen, dtype=torch.float64), dim=-1),
             "raw": F.normalize(torch.randn(6, 16, generator=gen, dtype=torch.float64), dim=-1),
             "logit_scale": torch.tensor(10.0, dtype=torch.float64),
             "logit_bias": torch.tensor(-10.0, dtype=torch.float64)}
    ours = {k: v.clone().requires_grad_() for k, v in feats.items()}
    ref = {k: v.clone().requires_grad_() for k, v in feats.items()}
    loss = method().criterion(ours)["loss"]
    expected = big_vision_sigmoid_loss(ref["image"], ref["raw"], ref["logit_scale"], ref["logit_bias"])
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    expected.backward()
    for k in feats:
        torch.testing.assert_close(ours[k].grad, ref[k].grad, rtol=1e-12, atol=1e-15, msg=k)
    # and by hand for one pair of one-element batches: -log s(t x y + b), x = y = 1
    one = {"image": torch.ones(1, 1), "raw": torch.ones(1, 1), "logit_scale": torch.tensor(10.0),
           "logit_bias": torch.tensor(-10.0)}
    # float32: log 2 to its rounding (one ulp of 0.69 is 6e-8)
    assert method().criterion(one)["loss"].item() == pytest.approx(math.log(2), rel=2e-7)


def test_the_model_starts_at_temperature_10_and_bias_minus_10():
    m = method()
    assert m.model_kwargs() == {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}
    # the float32 parameters hold log 10 and -10 as float32 rounds them
    assert m.model.logit_scale.item() == torch.tensor(math.log(10)).item()
    assert m.model.logit_bias.item() == -10.0
    feats = m.encoder({"image": torch.randn(2, 3, 32, 32), "raw": torch.randint(1, 100, (2, 77))})
    assert feats["logit_bias"].dim() == 0
    assert feats["logit_scale"].item() == pytest.approx(10.0, rel=1e-6)  # exp of a rounded log


def test_a_siglip_checkpoint_loads_for_evaluation_with_its_bias(tmp_path):
    from alip.eval.load import load_model
    from test_train_helpers import run_single, tiny_argv
    run_single(tiny_argv(tmp_path, "s", "--method", "siglip", "--lr", "5e-3", samples=32, batch=8))
    path = tmp_path / "s" / "checkpoints" / "epoch_1.pt"
    saved = torch.load(path, weights_only=True)
    assert saved["model_kwargs"] == {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}
    model, _, _ = load_model(checkpoint=str(path))
    assert torch.equal(model.logit_bias, saved["state_dict"]["logit_bias"])
    # plain open_clip loads it with the arguments the file records
    plain = open_clip.create_model("ALIP-tiny", pretrained=str(path), **saved["model_kwargs"])
    assert torch.equal(plain.logit_bias, saved["state_dict"]["logit_bias"])


@pytest.mark.parametrize("flag", ["--local-loss", "--gather-with-grad"])
def test_clip_loss_gather_flags_are_refused_not_ignored(flag):
    from alip.methods.base import MethodConfigError
    with pytest.raises(MethodConfigError, match=rf"^{flag} has no effect with --objective sigmoid "
                                                r"on --method siglip: each rank scores"):
        get_method("siglip")(parse_args(["--method", "siglip", "--model", "ALIP-tiny", flag]))

