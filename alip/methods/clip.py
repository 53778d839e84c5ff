"""CLIP: open_clip's ``ClipLoss`` on (image, raw web text), the baseline on the same stack.

Loss: ``(CE(s * I T^T) + CE(s * T I^T)) / 2`` over the global batch, open_clip
``open_clip/loss.py:ClipLoss`` (local_loss / gather_with_grad as there), with the local features'
gradient scaled so DDP-averaged gradients equal the single-process ones (``alip.loss``).
``--objective sigmoid``: SigLIP's pairwise sigmoid loss instead (open_clip ``SigLipLoss``;
docs/methods.md §11).
"""
import torch.nn as nn

from ..data.spec import CLIP_DATA
from ..loss import PairLoss, local_grad_scale
from ..model import encode_text
from .base import ContrastiveEncoder, Method, MethodConfigError, logit_params, objective


class CLIPEncoder(ContrastiveEncoder):
    def forward(self, batch):
        return {"image": self.model.encode_image(batch["image"], normalize=True),
                "raw": encode_text(self.model, batch["raw"]),
                **logit_params(self.model)}


class CLIPCriterion(nn.Module):
    """The (image, raw) term: ``alip.loss.PairLoss`` (kwargs: its arguments)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.pair = PairLoss(**kwargs)

    def forward(self, feats):
        return {"loss": self.pair(feats["image"], feats["raw"], feats)}


def pair_kwargs(args, rank, world_size):
    """``PairLoss`` arguments from the flags: --objective, the softmax term's gradient scale
    (``local_grad_scale``), --local-loss, --gather-with-grad."""
    return dict(objective=objective(args),
                grad_scale=local_grad_scale(world_size, args.gather_with_grad, args.ddp_gradients),
                local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                cache_labels=True, rank=rank, world_size=world_size)


def require_logit_bias(model, args):
    """``--objective sigmoid`` needs the model's logit bias (``model_kwargs``' init_logit_bias)."""
    if objective(args) == "sigmoid" and getattr(model, "logit_bias", None) is None:
        raise MethodConfigError(f"--objective sigmoid: --model {args.model} was built without "
                                f"a logit bias")


class CLIP(Method):
    name = "clip"
    data = CLIP_DATA
    objectives = ("softmax", "sigmoid")
    sigmoid_exchange = True

    def build(self, model):
        require_logit_bias(model, self.args)
        self.encoder = CLIPEncoder(model)
        self.criterion = CLIPCriterion(**pair_kwargs(self.args, self.rank, self.world_size))
