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
