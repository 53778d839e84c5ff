"""SigLIP: the pairwise sigmoid loss on (image, raw web text) with a learnable temperature and
bias (Zhai et al. 2023, arXiv 2303.15343), the other baseline synthetic-caption papers report.

Loss over a batch of n pairs (big_vision ``sigmoid_loss``; open_clip ``open_clip/loss.py``
``SigLipLoss``, used here as it is)::

    L = -1/n sum_i sum_j log sigmoid(z_ij (t <x_i, y_j> + b)),  z_ij = 1 if i == j else -1

with ``t = exp(logit_scale)`` starting at 10 and ``b`` at -10 (the paper's init; the model is
created with ``init_logit_scale=log 10, init_logit_bias=-10``, which the method asks for through
``model_kwargs``). Over several processes each rank scores its images against every rank's
texts, passed around the ring by neighbour exchange (``--siglip-dist-impl bidir``, open_clip's
default; ``shift``, ``reduce`` or ``gather`` as there) instead of one all-gather. DDP's mean of
the ranks' gradients is then the gradient of one process over the global batch (each rank's
loss is its rows over B = n / world; the exchange's backward returns the other rows' text
gradients), which is what ``--ddp-gradients global`` asks of every method.
"""

import torch.nn as nn
from open_clip.loss import SigLipLoss

from ..data.spec import CLIP_DATA
from ..model import encode_text
from .base import SIGMOID_MODEL_KWARGS, ContrastiveEncoder, Method, MethodConfigError

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class SigLIPEncoder(ContrastiveEncoder):
    def forward(self, batch):
        return {"image": self.model.encode_image(batch["image"], normalize=True),
                "raw": encode_text(self.model, batch["raw"]),
                "logit_scale": self.model.logit_scale.exp(),
                "logit_bias": self.model.logit_bias.reshape(())}


class SigLIPCriterion(nn.Module):
    def __init__(self, rank=0, world_size=1, dist_impl="bidir"):
        super().__init__()
        self.loss = SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl)

    def forward(self, f):
        return {"loss": self.loss(f["image"], f["raw"], f["logit_scale"], f["logit_bias"])}


class SigLIP(Method):
    name = "siglip"
    data = CLIP_DATA
    objectives = ("sigmoid",)  # it is the sigmoid objective: --objective softmax is refused
    sigmoid_exchange = True  # open_clip's SigLipLoss: --local-loss / --gather-with-grad refused

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("siglip (--method siglip)")
        g.add_argument("--siglip-dist-impl", choices=DIST_IMPLS, default="bidir",
                       help="How each rank meets the other ranks' texts: bidir / shift "
                            "(neighbour exchange around the ring), reduce, gather (open_clip's "
                            "SigLipLoss implementations; the loss and gradients are the same).")

    @classmethod
    def resolved_flags(cls, args):
        """SigLIP's objective is sigmoid: recorded so in config.yaml and the checkpoints."""
        return {"objective": "sigmoid"}

    def model_kwargs(self):
        return {**super().model_kwargs(), **SIGMOID_MODEL_KWARGS}

    def build(self, model):
        if not hasattr(model, "logit_bias"):
            raise MethodConfigError(f"--model {self.args.model} was built without a logit bias")
        self.encoder = SigLIPEncoder(model)
        self.criterion = SigLIPCriterion(self.rank, self.world_size, self.args.siglip_dist_impl)
