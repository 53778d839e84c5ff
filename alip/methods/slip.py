"""SLIP's image self-supervision as pure building blocks: the SimCLR loss, the SSL head, and the
pre-projection pooled ViT feature the head reads.

Reference code: facebookresearch/SLIP @ c6faf5d0 (``losses.py``, ``models.py``, ``utils.py``) and
its re-implementation in Sense-GVT/DeCLIP @ 5d99a855 (``prototype/model/slip.py``,
``prototype/loss_functions/nt_xent.py``), which produced the ViT-B/32 YFCC15M number.

The CLIP term of SLIP is a plain InfoNCE: ``alip.methods.declip.clip_info_nce`` or open_clip's
``ClipLoss``. (Official SLIP gathers its CLIP columns without gradient; at one process the
columns are the inputs themselves, at W > 1 detached copies, so its gradient depends on W.)
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from alip.loss import gather_features

from ..data.spec import DataSpec, ImageView
from ..model import encode_text
from .base import (LOGIT_SCALE_MAX, ContrastiveEncoder, Method, MethodConfigError,
                   clamp_logit_scale, logit_params, objective)
from .clip import CLIPCriterion, pair_kwargs, require_logit_bias


def simclr_loss(q_a, q_b, temperature=0.1, rank=0, world_size=1):
    """NT-Xent over two views, negatives from the all-gathered 2x global batch.

    With ``q = normalize(q)``, ``k = all_gather_with_grad(q)`` (N = world_size * B rows),
    labels ``y = rank*B + arange(B)`` and ``M = 1e9 * one_hot(y, N)``::

        aa = q_a k_a^T / t - M     bb = q_b k_b^T / t - M
        ab = q_a k_b^T / t         ba = q_b k_a^T / t
        L  = (CE([ab | aa], y) + CE([ba | bb], y)) / 2

    Reproduces facebookresearch/SLIP losses.py:73-101 (SIMCLRLoss.forward) with
    utils.py:149-187 (GatherLayer: gradient summed over ranks in backward). At one process it
    equals DeCLIP's NT_Xent_gather (nt_xent.py:62-97: the sum over the 2B rows / 2B; that
    class ignores its ``temperature`` argument and always uses 0.1).

    Gradients: each rank's gradient on its local rows is ``world_size`` times the matching rows
    of the single-process gradient of the global loss, so DDP's average gives the
    single-process parameter gradient.
    """
    if q_a.shape != q_b.shape or q_a.dim() != 2:
        raise ValueError(f"simclr_loss: q_a and q_b must be [B, D] of one shape, got "
                         f"{tuple(q_a.shape)} and {tuple(q_b.shape)}")
    q_a = F.normalize(q_a, dim=-1, p=2)
    q_b = F.normalize(q_b, dim=-1, p=2)
    k_a = gather_features(q_a, rank, world_size, gather_with_grad=True)
    k_b = gather_features(q_b, rank, world_size, gather_with_grad=True)
    b = q_a.shape[0]
    labels = rank * b + torch.arange(b, device=q_a.device)
    self_mask = F.one_hot(labels, k_a.shape[0]).to(q_a.dtype) * 1e9
    logits_aa = q_a @ k_a.T / temperature - self_mask
    logits_bb = q_b @ k_b.T / temperature - self_mask
    logits_ab = q_a @ k_b.T / temperature
    logits_ba = q_b @ k_a.T / temperature
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), labels)
    return (loss_a + loss_b) / 2


class SLIPHead(nn.Sequential):
    """SLIP's ``image_mlp``: Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear (no output BN).

    facebookresearch/SLIP models.py:213-222 (``_build_mlp``; same layer names, so its
    ``image_mlp`` weights load), DeCLIP slip.py:50-109 with ``out_bn=False``. Both use synced BN;
    here it is ``nn.BatchNorm1d`` and the training setup converts it
    (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``) under DDP. One head serves both views.
    """

    def __init__(self, in_dim, mlp_dim=4096, out_dim=256):
        super().__init__(OrderedDict([
            ("layer1", nn.Linear(in_dim, mlp_dim)),
            ("bn1", nn.BatchNorm1d(mlp_dim)),
            ("relu1", nn.ReLU(inplace=True)),
            ("layer2", nn.Linear(mlp_dim, mlp_dim)),
            ("bn2", nn.BatchNorm1d(mlp_dim)),
            ("relu2", nn.ReLU(inplace=True)),
            ("layer3", nn.Linear(mlp_dim, out_dim)),
        ]))


def vit_pooled_features(visual, images):
    """The pooled feature of an open_clip ``VisionTransformer`` after ``ln_post``, before ``proj``.

    Width-d (768 for ViT-B): the input of SLIP's head (official SLIP: timm ViT with
    ``num_classes=0``; DeCLIP slip.py:227-235: CLS after ln_post, before proj). It runs exactly
    the steps of ``VisionTransformer.forward`` without the final ``@ proj`` (embedding, blocks,
    open_clip's own pooling, whatever its pool type), so
    ``vit_pooled_features(visual, x) @ visual.proj == visual(x)``.
    """
    needed = ("_embeds", "transformer", "_pool", "proj")
    if not all(hasattr(visual, a) for a in needed):
        raise TypeError(f"vit_pooled_features: needs an open_clip VisionTransformer, got "
                        f"{type(visual).__name__}")
    x = visual._embeds(images)
    x = visual.transformer(x)
    pooled, _ = visual._pool(x)
    return pooled


# ------------------------------------------------------------------------------ the method

SLIP_VIEWS = {  # --slip-views: the base (CLIP) view's recipe and the two SSL views' recipe
    "declip": ("slip_base", "mocov2"),    # as the DeCLIP benchmark ran it (docs/methods.md §3.2)
    "official": ("slip_base", "simclr"),  # facebookresearch/SLIP (docs/methods.md §3.1)
}


class SLIPEncoder(ContrastiveEncoder):
    """CLIP features of the base view and raw text, and the SSL head's outputs for the two
    augmented views (the pooled ViT feature before ``proj`` through ``SLIPHead``)."""

    def __init__(self, model, mlp_dim=4096, out_dim=256):
        super().__init__(model)
        width = vit_pooled_features_width(model.visual)
        self.head = SLIPHead(width, mlp_dim, out_dim)

    def forward(self, batch):
        q = [self.head(vit_pooled_features(self.model.visual, batch[v]))
             for v in ("image_aug1", "image_aug2")]
        return {"image": self.model.encode_image(batch["image"], normalize=True),
                "raw": encode_text(self.model, batch["raw"]),
                "ssl_a": q[0], "ssl_b": q[1], **logit_params(self.model)}


def vit_pooled_features_width(visual):
    if not hasattr(visual, "proj") or visual.proj is None:
        raise MethodConfigError("--method slip needs an open_clip ViT image tower with a "
                                "projection (the SSL head reads the feature before it)")
    return visual.proj.shape[0]


class SLIPCriterion(nn.Module):
    """``L = clip + ssl_scale * simclr`` (SLIP losses.py:104-131; DeCLIP slip.py:268-285)."""

    def __init__(self, ssl_scale=1.0, ssl_temp=0.1, rank=0, world_size=1, clip_kwargs=None):
        super().__init__()
        self.ssl_scale, self.ssl_temp = float(ssl_scale), float(ssl_temp)
        self.rank, self.world_size = rank, world_size
        self.clip = CLIPCriterion(**(clip_kwargs or {}))

    def forward(self, feats):
        clip = self.clip(feats)["loss"]
        ssl = simclr_loss(feats["ssl_a"], feats["ssl_b"], self.ssl_temp, self.rank,
                          self.world_size)
        return {"loss": clip + self.ssl_scale * ssl, "loss_clip": clip, "loss_ssl": ssl}


class SLIP(Method):
    """SLIP (facebookresearch/SLIP; the DeCLIP benchmark's ViT-B/32 YFCC15M row, IN-1K 34.3):
    CLIP on a base view + ``ssl_scale`` x SimCLR on two augmented views through a 3-layer MLP.

    The SSL head has BatchNorm: gradient accumulation runs micro-batch by micro-batch
    (``--accum-mode micro``), since a whole-batch re-encode would normalise per micro-batch and
    update the running statistics twice. Under DDP on CUDA its BatchNorm is synced
    (``SyncBatchNorm``); with gloo on CPU it stays per-process BatchNorm.
    """

    name = "slip"
    accum_modes = ("micro",)
    objectives = ("softmax", "sigmoid")  # its CLIP term (SimCLR stays softmax)
    sigmoid_exchange = True
    batchnorm_heads = True  # the SSL head's BatchNorm1d
    flag_ranges = {"slip_ssl_scale": "[0, inf)", "slip_ssl_temp": "(0, inf)",
                   "slip_mlp_dim": "[1, inf)", "slip_emb_dim": "[1, inf)"}

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("slip (--method slip)")
        g.add_argument("--slip-views", choices=tuple(SLIP_VIEWS), default="declip",
                       help="declip: base RRC 0.5-1 + two MoCo-v2 views (the DeCLIP benchmark's "
                            "SLIP, the 34.3 row); official: SimCLR views (RRC 0.08-1)")
        g.add_argument("--slip-ssl-scale", type=float, default=1.0, help="Weight of SimCLR.")
        g.add_argument("--slip-ssl-temp", type=float, default=0.1, help="SimCLR temperature.")
        g.add_argument("--slip-mlp-dim", type=int, default=4096, help="SSL head hidden width.")
        g.add_argument("--slip-emb-dim", type=int, default=256, help="SSL head output width.")

    @classmethod
    def reference_vit(cls, args):  # the toolbox's SLIP ran its ViT; official SLIP timm's, as built
        return "toolbox" if args.slip_views == "declip" else "open_clip"

    @classmethod
    def data_spec(cls, args):
        base, ssl = SLIP_VIEWS[args.slip_views]
        return DataSpec(image_views=(ImageView("image", base), ImageView("image_aug1", ssl),
                                     ImageView("image_aug2", ssl)), text_fields=("raw",))

    def build(self, model):
        args, rank, world_size = self.args, self.rank, self.world_size
        require_logit_bias(model, args)
        self.encoder = SLIPEncoder(model, args.slip_mlp_dim, args.slip_emb_dim)
        if world_size > 1 and next(model.parameters()).is_cuda:
            self.encoder.head = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder.head)
        self.criterion = SLIPCriterion(args.slip_ssl_scale, args.slip_ssl_temp, rank, world_size,
                                       clip_kwargs=pair_kwargs(args, rank, world_size))
        # the DeCLIP benchmark clamps the logit parameter to [3, 6]; official SLIP to [0, ln 100].
        # --objective sigmoid: [0, ln 100] (open_clip's clamp), which holds SigLIP's init log 10
        # (the toolbox's [3, 6] would lift it to 3, t = 20, at the first step)
        toolbox = args.slip_views == "declip" and objective(args) == "softmax"
        self.logit_range = (3.0, 6.0) if toolbox else (0.0, LOGIT_SCALE_MAX)

    def after_step(self):
        clamp_logit_scale(self.model, *self.logit_range)
