"""ALIP's adaptive contrastive loss with the Language and Description Consistency Gates.

The defaults reproduce deepglint/ALIP (train.py:106-156, open_alip/loss.py:84-121) exactly:

* the gates run under ``no_grad`` over the all-gathered global batch (the local slot holds the
  local tensor), so every rank computes identical weights;
* each EMA is updated *before* it weights the batch: ``H <- m*H + (1-m)*mean_N(s)``, from 1.0;
* LCG: ``w_s = min(1, exp(gamma*(s_tc - H_tc)))``;
* DCG: where ``exp(gamma*(s_tc - H_tc)) < 1``: ``w_t = exp(gamma*(s_it - H_it))`` and
  ``w_c = exp(gamma*(s_ic - H_ic))``, else 1. DCG is *not* capped at 1;
* per path p: ``L_p = mean_N(w_s * w_pair_p * CE_sym_p)``; ``L = L_raw + L_caption``.

``objective="sigmoid"`` (``--objective sigmoid``, docs/methods.md §11) replaces each path's
symmetric InfoNCE by SigLIP's pairwise sigmoid loss with the same per-sample weights
``w = w_s * w_pair_p``: sample i's weight on the image-i row and sample j's on the text-j
column, ``L_p = -1/N sum_ij (w_i + w_j)/2 log sigmoid(z_ij (t <x_i, y_j> + b))``
(``weighted_sigmoid_loss``); with every weight 1 it is SigLIP's loss.

Deviations from the reference, each a constructor argument or stated here:

* the three EMAs are registered buffers, so they live in ``state_dict`` and survive a resume
  (the reference keeps them in Python variables and loses them on restart);
* the features are all-gathered once per step and reused by the gates and both paths (the
  reference gathers four times);
* ``local_loss=True`` works (the reference crashes: a per-sample loss of length B against
  weights of length W*B); the weights are sliced to the local rows;
* in ``eval()`` mode the EMAs are read but not updated (the reference has no eval mode).
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

GATE_NAMES = ("tc", "it", "ic")
DDP_GRADIENTS = ("global", "reference")
OBJECTIVES = ("softmax", "sigmoid")  # --objective


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x, scale):
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward."""
    return x if scale == 1 else _ScaleGrad.apply(x, scale)


def local_grad_scale(world_size, gather_with_grad, ddp_gradients="global"):
    """The factor on the local features' gradient that makes DDP-averaged gradients exact.

    Without ``gather_with_grad`` each rank differentiates the global-batch loss through its local
    rows only, so its local-feature gradient equals the matching rows of the single-process
    gradient, and DDP's averaging divides every tower parameter's gradient by W, while
    ``logit_scale`` (which every rank differentiates in full) keeps its full gradient. Scaling
    the local features' gradient by W makes every parameter's averaged gradient equal the
    single-process gradient of the global loss (``ddp_gradients="global"``). With
    ``gather_with_grad`` the gather's backward already sums the ranks' contributions, so no
    scale is needed. ``ddp_gradients="reference"`` keeps open_clip's / the reference's
    gradients (towers 1/W, logit_scale full).
    """
    if ddp_gradients not in DDP_GRADIENTS:
        raise ValueError(f"ddp_gradients must be one of {DDP_GRADIENTS}, got {ddp_gradients!r}")
    if ddp_gradients == "reference" or gather_with_grad:
        return 1.0
    return float(world_size)


def gather_features(features, rank, world_size, gather_with_grad=False):
    """All-gather a [B, ...] tensor into [world_size*B, ...] in rank order.

    Without ``gather_with_grad`` only the local slot carries gradient (open_clip ``ClipLoss``
    semantics); with it, ``torch.distributed.nn.all_gather`` carries gradient to every rank.
    """
    if world_size == 1:
        return features
    if gather_with_grad:
        from torch.distributed.nn.functional import all_gather
        return torch.cat(all_gather(features), dim=0)
    pieces = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(pieces, features.detach().contiguous())
    pieces[rank] = features
    return torch.cat(pieces, dim=0)


def _check_inputs(image_features, raw_features, caption_features, logit_scale,
                  logit_bias=None, objective="softmax"):
    """Shapes, every call; values (``_check_values``) are checked on a module's first call
    only, so that a training step never waits for them."""
    named = {"image_features": image_features, "raw_features": raw_features,
             "caption_features": caption_features}
    shapes = {k: tuple(v.shape) for k, v in named.items()}
    for name, f in named.items():
        if f.dim() != 2:
            raise ValueError(f"ALIPLoss: {name} must be [B, D], got shape {tuple(f.shape)}")
    if len(set(shapes.values())) != 1:
        raise ValueError(f"ALIPLoss: features must share one [B, D] shape, got {shapes}")
    if not torch.is_tensor(logit_scale) or logit_scale.numel() != 1:
        shape = tuple(logit_scale.shape) if torch.is_tensor(logit_scale) else type(logit_scale)
        raise ValueError(f"ALIPLoss: logit_scale must be a scalar tensor, got {shape}")
    if objective == "sigmoid" and (not torch.is_tensor(logit_bias) or logit_bias.numel() != 1):
        raise ValueError("ALIPLoss: objective 'sigmoid' needs a scalar logit_bias tensor (a model "
                         "created with init_logit_bias), got "
                         f"{tuple(logit_bias.shape) if torch.is_tensor(logit_bias) else logit_bias}")
    return named


def _check_values(named, logit_scale):
    """logit_scale finite; every finite feature row L2-normalised (non-finite rows are the
    training step's business: it skips such a step). Reads values back to the host."""
    if not torch.isfinite(logit_scale).all():
        raise ValueError(f"ALIPLoss: logit_scale must be finite, got {logit_scale.item()}")
    with torch.no_grad():
        for name, f in named.items():
            tol = 1e-3 if f.dtype in (torch.float32, torch.float64) else 2e-2
            norms = f.float().norm(dim=-1)
            norms = norms[torch.isfinite(norms)]
            if len(norms) and not (norms - 1).abs().max() <= tol:
                raise ValueError(
                    f"ALIPLoss: {name} must be L2-normalised along the last dim; row norms range "
                    f"{norms.min().item():.4g}..{norms.max().item():.4g} (tolerance {tol})")


def check_objective(objective):
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return objective


def weighted_sigmoid_loss(img, txt, logit_scale, logit_bias, w_row, w_col, offset=0):
    """SigLIP's pairwise sigmoid loss with per-sample weights, over R image rows and N texts::

        -1/R sum_{i<R, j<N} (w_row_i + w_col_j)/2 log sigmoid(z_ij (t <x_i, y_j> + b))

    ``z_ij = 1`` where row i's sample is text j (row i is global sample ``offset + i``), else
    -1; ``t = logit_scale`` (already exp'd), ``b = logit_bias``. Rows are the image side (the
    global batch, or one rank's rows with ``offset = rank * R``), columns every text. With all
    weights 1 and R = N it is open_clip's ``SigLipLoss`` over one batch."""
    # at least float32 (fp16 autocast's matmul: a sum of N^2 terms of ~10 overflows fp16)
    dtype = torch.promote_types(torch.promote_types(img.dtype, txt.dtype), torch.float32)
    logits = logit_scale.to(dtype) * (img @ txt.T).to(dtype) + logit_bias.to(dtype)
    rows, cols = logits.shape
    z = _signs(rows, cols, offset, logits)
    weights = 0.5 * (w_row[:, None] + w_col[None, :]).to(dtype)
    return -(weights * F.logsigmoid(z * logits)).sum() / rows


def _signs(rows, cols, offset, like):
    """[rows, cols] of -1 with +1 at (i, offset + i)."""
    z = -torch.ones(rows, cols, dtype=like.dtype, device=like.device)
    i = torch.arange(rows, device=like.device)
    z[i, offset + i] = 1
    return z


class ALIPLoss(nn.Module):
    def __init__(self, gamma=2.0, momentum=0.99, ema_init=1.0, rank=0, world_size=1,
                 local_loss=False, gather_with_grad=False, grad_scale=1.0, objective="softmax"):
        super().__init__()
        self.objective = check_objective(objective)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"ALIPLoss: momentum must be in [0, 1], got {momentum}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ALIPLoss: need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.gamma = float(gamma)
        self.momentum = float(momentum)
        self.rank = rank
        self.world_size = world_size
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.grad_scale = float(grad_scale)  # see local_grad_scale()
        for name in GATE_NAMES:
            self.register_buffer(f"ema_{name}", torch.tensor(float(ema_init)))
        self._values_checked = False

    @torch.no_grad()
    def gates(self, img, raw, cap):
        """Similarities, EMA update and the three weights over the global batch (float32, or
        float64 for float64 features)."""
        dtype = torch.promote_types(img.dtype, torch.float32)
        img, raw, cap = img.to(dtype), raw.to(dtype), cap.to(dtype)
        sims = {"tc": (raw * cap).sum(-1), "it": (img * raw).sum(-1), "ic": (img * cap).sum(-1)}
        emas = {}
        for name, s in sims.items():
            ema = getattr(self, f"ema_{name}")
            if self.training:
                ema.mul_(self.momentum).add_((1.0 - self.momentum) * s.mean())
            emas[name] = ema
        w_hat = torch.exp(self.gamma * (sims["tc"] - emas["tc"]))
        flagged = w_hat < 1
        one = torch.ones_like(w_hat)
        w_sample = torch.where(flagged, w_hat, one)
        w_text = torch.where(flagged, torch.exp(self.gamma * (sims["it"] - emas["it"])), one)
        w_caption = torch.where(flagged, torch.exp(self.gamma * (sims["ic"] - emas["ic"])), one)
        return sims, w_sample, w_text, w_caption

    def _path_loss(self, img_local, txt_local, all_img, all_txt, logit_scale, weights,
                   logit_bias=None):
        """One (image, text) path weighted per sample by ``weights`` (the global batch's):
        mean(weights * symmetric per-sample InfoNCE), or the weighted sigmoid loss."""
        if self.objective == "sigmoid":
            return self._sigmoid_path_loss(img_local, all_img, all_txt, logit_scale, logit_bias,
                                           weights)
        if self.local_loss:
            b = img_local.shape[0]
            weights = weights[self.rank * b:(self.rank + 1) * b]
            logits_per_image = logit_scale * img_local @ all_txt.T
            logits_per_text = logit_scale * txt_local @ all_img.T
            labels = torch.arange(b, device=img_local.device) + self.rank * b
        else:
            logits_per_image = logit_scale * all_img @ all_txt.T
            logits_per_text = logits_per_image.T
            labels = torch.arange(all_img.shape[0], device=all_img.device)
        ce = 0.5 * (F.cross_entropy(logits_per_image, labels, reduction="none")
                    + F.cross_entropy(logits_per_text, labels, reduction="none"))
        return (weights.to(ce.dtype) * ce).mean()

    def _sigmoid_path_loss(self, img_local, all_img, all_txt, logit_scale, logit_bias, weights):
        """``weighted_sigmoid_loss`` over the global batch's images (every rank the same loss;
        the local rows' gradient scaled by ``grad_scale``), or with ``local_loss`` over this
        rank's image rows against every text (the mean over ranks is the global loss; the other
        ranks' texts take their gradient through the gather's backward)."""
        if self.local_loss:
            b = img_local.shape[0]
            return weighted_sigmoid_loss(img_local, all_txt, logit_scale, logit_bias,
                                         weights[self.rank * b:(self.rank + 1) * b], weights,
                                         offset=self.rank * b)
        return weighted_sigmoid_loss(all_img, all_txt, logit_scale, logit_bias, weights, weights)

    def forward(self, image_features, raw_features, caption_features, logit_scale,
                logit_bias=None):
        named = _check_inputs(image_features, raw_features, caption_features, logit_scale,
                              logit_bias, self.objective)
        if not self._values_checked:
            _check_values(named, logit_scale)
            self._values_checked = True
        b, d = image_features.shape
        # One collective for all three feature sets, reused by the gates and both paths.
        joint = scale_grad(torch.cat([image_features, raw_features, caption_features], dim=1),
                           self.grad_scale)
        all_joint = gather_features(joint, self.rank, self.world_size, self.gather_with_grad)
        all_img, all_raw, all_cap = all_joint.split(d, dim=1)

        sims, w_sample, w_text, w_caption = self.gates(all_img, all_raw, all_cap)
        loss_raw = self._path_loss(image_features, raw_features, all_img, all_raw, logit_scale,
                                   w_sample * w_text, logit_bias)
        loss_caption = self._path_loss(image_features, caption_features, all_img, all_cap,
                                       logit_scale, w_sample * w_caption, logit_bias)
        out = {"loss": loss_raw + loss_caption, "loss_raw": loss_raw, "loss_caption": loss_caption,
               "w_sample": w_sample, "w_text": w_text, "w_caption": w_caption}
        for name in GATE_NAMES:
            out[f"s_{name}"] = sims[name].mean()
            out[f"ema_{name}"] = getattr(self, f"ema_{name}").detach().clone()
        return out



class GlobalGradClipLoss(ClipLoss):
    """open_clip's ``ClipLoss`` with the local features' gradient scaled by ``grad_scale``
    (``local_grad_scale``), so DDP-averaged gradients equal the single-process ones."""

    def __init__(self, grad_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.grad_scale = float(grad_scale)

    def forward(self, image_features, text_features, logit_scale, **kwargs):
        return super().forward(scale_grad(image_features, self.grad_scale),
                               scale_grad(text_features, self.grad_scale), logit_scale, **kwargs)


class PairLoss(nn.Module):
    """One CLIP-style term on (image, text) under ``objective`` (``--objective``): softmax is
    ``GlobalGradClipLoss`` (open_clip's ``ClipLoss``, the arguments as there), sigmoid is
    open_clip's ``SigLipLoss`` with its neighbour exchange (``dist_impl``). ``forward(image,
    text, feats)`` reads ``feats["logit_scale"]`` (and ``feats["logit_bias"]`` for sigmoid).

    The sigmoid term needs no gradient scale and ignores ``local_loss`` / ``gather_with_grad``:
    each rank scores its images against every rank's texts, the exchange's backward returning
    the other ranks' text gradients, so DDP's mean of the ranks' gradients is the gradient of
    one process over the global batch (open_clip's and the global gradients coincide)."""

    def __init__(self, objective="softmax", grad_scale=1.0, local_loss=False,
                 gather_with_grad=False, cache_labels=True, rank=0, world_size=1,
                 dist_impl="bidir"):
        super().__init__()
        self.objective = check_objective(objective)
        if objective == "softmax":
            self.term = GlobalGradClipLoss(
                grad_scale=grad_scale, local_loss=local_loss, gather_with_grad=gather_with_grad,
                cache_labels=cache_labels, rank=rank, world_size=world_size)
        else:
            self.term = SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl)

    def forward(self, image_features, text_features, feats):
        if self.objective == "softmax":
            return self.term(image_features, text_features, feats["logit_scale"])
        if feats.get("logit_bias") is None:
            raise ValueError("objective 'sigmoid' needs the features' logit_bias (a model created "
                             "with init_logit_bias)")
        return self.term(image_features, text_features, feats["logit_scale"], feats["logit_bias"])
