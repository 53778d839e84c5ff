"""CLIP: open_clip's ``ClipLoss`` on (image, raw web text), the baseline on the same stack.

Loss: ``(CE(s * I T^T) + CE(s * T I^T)) / 2`` over the global batch, open_clip
``open_clip/loss.py:ClipLoss`` (local_loss / gather_with_grad as there), with the local features'
gradient scaled so DDP-averaged gradients equal the single-process ones (``alip.loss``).
"""
from ..data.spec import CLIP_DATA
from ..loss import GlobalGradClipLoss, local_grad_scale
from ..model import encode_text
from .base import ContrastiveEncoder, Method


class CLIPEncoder(ContrastiveEncoder):
    def forward(self, batch):
        return {"image": self.model.encode_image(batch["image"], normalize=True),
                "raw": encode_text(self.model, batch["raw"]),
                "logit_scale": self.model.logit_scale.exp()}


class CLIPCriterion(GlobalGradClipLoss):
    def forward(self, feats):
        return {"loss": super().forward(feats["image"], feats["raw"], feats["logit_scale"])}


class CLIP(Method):
    name = "clip"
    data = CLIP_DATA

    def build(self, model):
        args, rank, world_size = self.args, self.rank, self.world_size
        self.encoder = CLIPEncoder(model)
        self.criterion = CLIPCriterion(
            grad_scale=local_grad_scale(world_size, args.gather_with_grad, args.ddp_gradients),
            local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
            rank=rank, world_size=world_size)
