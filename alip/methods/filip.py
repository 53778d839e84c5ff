"""FILIP's token-wise late interaction (the DeCLIP implementation behind FILIP's YFCC15M 39.5),
as pure building blocks: dense tokens from an unforked open_clip model, the dense heads, token
selection, chunked late-interaction logits and the distributed dense InfoNCE loss.

Reference: Sense-GVT/DeCLIP prototype/model/filip.py:71-142 and solver/filip_solver.py
(docs/methods.md §5, §6).

* tokens: image = the ViT's patch tokens (class token dropped) *before* ``ln_post``; text =
  ``ln_final`` outputs at every position; each through ``Linear(width -> 256)`` and L2-normalised
  (no epsilon in the reference; ``F.normalize``'s 1e-12 here);
* selection: per local pair ``C = X Y^T``; the k image tokens with the largest row sums and the k
  text tokens with the largest column sums (default 16/16) are what the all-gather moves;
* logits: ``s_i2t(i, l) = tau * mean_{j in tokens of image i} max_{m in selected tokens of text l}
  <x_ij, y_lm>`` and ``s_t2i(i, l) = tau * mean_{j in tokens of text i} max_{m in selected tokens
  of image l} <y_ij, x_lm>``: local rows (all tokens) against gathered columns (selected tokens);
  ``tau = exp(logit_scale_dense)``, init ln(1/0.07), the parameter clamped to [3, 6] around every
  optimizer step (``FILIPHead.clamp_logit_scale_``);
* padding: by default (the FILIP paper) padding text tokens never win a max, are never selected
  and are left out of the means and the row sums. ``mask_padding=False`` is the reference, which
  uses all 77 positions, padding included (DeCLIP#31);
* loss: symmetric InfoNCE, labels ``rank * B + arange(B)``, weight 1; the zero-weight global CLIP
  loss of the reference is not computed at all (docs/methods.md §5.3: its NaN would poison
  the total).
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from alip.loss import gather_features
from alip.model import pad_to_context, text_lengths

from ..data.spec import RECIPES, DataSpec, ImageView
from .base import Method, MethodConfigError, clamp_logit_scale

DENSE_DIM = 256
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MIN, LOGIT_SCALE_MAX = 3.0, 6.0
CHUNK_ELEMENTS = 2 ** 27  # similarity elements per chunk (512 MiB in fp32) when chunk_size is None


class DenseTokens(NamedTuple):
    image_tokens: torch.Tensor  # [B, P, vision width]: patch tokens (pre-ln_post unless asked)
    text_tokens: torch.Tensor  # [B, L, text width]: ln_final outputs at every position
    text_mask: torch.Tensor  # [B, L] bool: True up to and including EOT
    image_features: torch.Tensor  # [B, E] normalised global features, same pass
    text_features: torch.Tensor  # [B, E]


def require_token_towers(model, method, model_name):
    """Raise MethodConfigError unless ``model`` has the ViT image tower and transformer text
    tower whose token features the method reads."""
    visual = getattr(model, "visual", None)
    if not hasattr(getattr(visual, "transformer", None), "width") or \
            not hasattr(getattr(model, "transformer", None), "width"):
        raise MethodConfigError(
            f"--method {method} reads patch and text token features: it needs a ViT image tower "
            f"and open_clip's text transformer; --model {model_name} has a "
            f"{type(visual).__name__} image tower")


def dense_tokens(model, images, text, image_ln_post=False):
    """One forward per tower through open_clip's ``forward_intermediates`` (no fork, no hooks).

    ``image_indices=1`` returns the last block's output, the very tensor ``ln_post`` + pooling +
    ``proj`` then turn into the global feature; its class token is split off by open_clip.
    ``normalize_intermediates=True`` applies ``ln_final`` to the text tower's last block output,
    exactly what its pooling reads. ``image_ln_post=True`` returns the patch tokens after
    ``ln_post`` instead (what CLIPS' decoder reads). Works for open_clip ``CLIP`` and
    ``CustomTextCLIP`` ViT models; call it inside a module's ``forward`` when DDP wraps it.
    """
    image_tokens, image_features = dense_image_tokens(model, images, image_ln_post)
    text_tokens, text_mask, text_features = dense_text_tokens(model, text)
    return DenseTokens(image_tokens, text_tokens, text_mask, image_features, text_features)


def dense_image_tokens(model, images, ln_post=False):
    """-> (patch tokens [B, P, width], normalised global image features [B, E])."""
    out = model.forward_intermediates(image=images, image_indices=1, image_output_fmt="NLC",
                                      normalize=True, normalize_intermediates=ln_post)
    return out["image_intermediates"][0], out["image_features"]


def dense_text_tokens(model, text):
    """-> (ln_final tokens [B, L, width], mask [B, L] True up to EOT, normalised features [B, E]).
    Rows narrower than the tower's context (``--text-context``) are padded to it for open_clip's
    pass and the tokens cut back to their L (causal: the same values)."""
    out = model.forward_intermediates(text=pad_to_context(model, text), text_indices=1,
                                      normalize=True, normalize_intermediates=True)
    positions = torch.arange(text.shape[1], device=text.device)
    mask = positions[None, :] < text_lengths(text, model)[:, None]
    return out["text_intermediates"][0][:, :text.shape[1]], mask, out["text_features"]


class FILIPHead(nn.Module):
    """The dense projections and the dense temperature (``logit_scale_dense``)."""

    def __init__(self, image_width, text_width, dense_dim=DENSE_DIM, init_logit_scale=LOGIT_SCALE_INIT):
        super().__init__()
        self.image_proj = nn.Linear(image_width, dense_dim)
        self.text_proj = nn.Linear(text_width, dense_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def forward(self, image_tokens, text_tokens):
        """-> (image [B, P, dense_dim], text [B, L, dense_dim]), each token L2-normalised."""
        return (F.normalize(self.image_proj(image_tokens), dim=-1),
                F.normalize(self.text_proj(text_tokens), dim=-1))

    @torch.no_grad()
    def clamp_logit_scale_(self, low=LOGIT_SCALE_MIN, high=LOGIT_SCALE_MAX):
        """The reference clamps the parameter to [3, 6] before and after every optimizer step,
        so only the very first forward sees the init ln(1/0.07) = 2.66 (tau 14.3)."""
        self.logit_scale.clamp_(low, high)


def select_tokens(image_tokens, text_tokens, text_mask=None, k_image=16, k_text=16):
    """The reference's token selection on local pairs (no gradient through the choice).

    ``C_i = X_i Y_i^T`` ([P, L] per pair); keep the ``k_image`` image tokens with the largest row
    sums of C_i and the ``k_text`` text tokens with the largest column sums. With ``text_mask``,
    padding columns are left out of the row sums and padding tokens are never chosen before a real
    one (a text with fewer than ``k_text`` real tokens keeps some padding, marked False in the
    returned mask). -> (image [B, k_i, D], text [B, k_t, D], selected text mask [B, k_t]).
    """
    b, p, _ = image_tokens.shape
    length = text_tokens.shape[1]
    mask = torch.ones(b, length, dtype=torch.bool, device=text_tokens.device) if text_mask is None else text_mask
    with torch.no_grad():
        sim = torch.einsum("bpd,bld->bpl", image_tokens, text_tokens).float()
        row_sums = (sim * mask[:, None, :]).sum(2)
        col_sums = sim.sum(1).masked_fill(~mask, float("-inf"))
        img_idx = row_sums.topk(min(k_image, p), dim=1).indices
        txt_idx = col_sums.topk(min(k_text, length), dim=1).indices
    take = lambda x, idx: x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    return take(image_tokens, img_idx), take(text_tokens, txt_idx), mask.gather(1, txt_idx)


def late_interaction(queries, keys, query_mask=None, key_mask=None, chunk_size=None, key_chunk_size=None):
    """``s[i, l] = mean_{j: query_mask[i, j]} max_{m: key_mask[l, m]} <queries[i, j], keys[l, m]>``.

    queries [Nq, Lq, D], keys [Nk, Lk, D] -> [Nq, Nk] in the inputs' dtype. Computed over blocks
    of ``chunk_size`` query rows x ``key_chunk_size`` key rows (default: as many keys, then rows,
    as keep a block's [rows, Lq, keys, Lk] similarities under 2**27 elements: 512 MiB in fp32), so
    the memory held for backward is max's argmax indices ([Nq, Lq, Nk] int64), never the
    similarity tensor. A key row with no unmasked token scores -inf (its max is over nothing);
    the masks FILIP builds never have one (every text keeps SOT..EOT), and the values are not
    checked, which would read them back from the device.
    """
    nq, lq, d = queries.shape
    nk, lk, _ = keys.shape
    key_chunk = key_chunk_size or min(nk, max(1, CHUNK_ELEMENTS // (lq * lk)))
    row_chunk = chunk_size or max(1, CHUNK_ELEMENTS // (lq * key_chunk * lk))
    rows = []
    for r0 in range(0, nq, row_chunk):
        q = queries[r0:r0 + row_chunk]
        qm = None if query_mask is None else query_mask[r0:r0 + row_chunk].to(q.dtype)
        cols = []
        for c0 in range(0, nk, key_chunk):
            k = keys[c0:c0 + key_chunk]
            sim = (q.reshape(-1, d) @ k.reshape(-1, d).T).view(q.shape[0], lq, k.shape[0], lk)
            if key_mask is not None:
                sim = sim.masked_fill(~key_mask[c0:c0 + key_chunk][None, None], float("-inf"))
            best = sim.max(dim=-1).values  # [rows, Lq, keys]
            if qm is None:
                cols.append(best.mean(dim=1))
            else:
                cols.append((best * qm[:, :, None]).sum(1) / qm.sum(1, keepdim=True))
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)


def filip_logits(image_tokens, text_tokens, text_mask, image_selected, text_selected,
                 text_selected_mask, logit_scale, chunk_size=None):
    """Local rows against (gathered) selected columns -> (logits_i2t, logits_t2i), [B, N] each."""
    i2t = late_interaction(image_tokens, text_selected, None, text_selected_mask, chunk_size)
    t2i = late_interaction(text_tokens, image_selected, text_mask, None, chunk_size)
    return logit_scale * i2t, logit_scale * t2i


def _gather_mask(mask, rank, world_size):
    return gather_features(mask.to(torch.uint8), rank, world_size).bool()


def filip_loss(image_tokens, text_tokens, text_mask, logit_scale, k_image=16, k_text=16,
               mask_padding=True, rank=0, world_size=1, gather_with_grad=True, chunk_size=None):
    """FILIP's dense InfoNCE on normalised dense tokens (``FILIPHead`` outputs).

    image_tokens [B, P, D], text_tokens [B, L, D], text_mask [B, L] (``DenseTokens.text_mask``),
    logit_scale = ``exp(head.logit_scale)``. Selected tokens are all-gathered (``gather_with_grad``
    True, as the reference: each rank's loss reaches every rank's selected tokens; DDP-averaged
    parameter gradients then equal the single-process ones). -> {"loss", "loss_i2t", "loss_t2i"}.
    """
    _check(image_tokens, text_tokens, text_mask, logit_scale)
    mask = text_mask if mask_padding else torch.ones_like(text_mask)
    img_sel, txt_sel, txt_sel_mask = select_tokens(image_tokens, text_tokens, mask, k_image, k_text)
    all_img = gather_features(img_sel, rank, world_size, gather_with_grad)
    all_txt = gather_features(txt_sel, rank, world_size, gather_with_grad)
    all_txt_mask = _gather_mask(txt_sel_mask, rank, world_size)
    i2t, t2i = filip_logits(image_tokens, text_tokens, mask, all_img, all_txt, all_txt_mask,
                            logit_scale, chunk_size)
    b = image_tokens.shape[0]
    labels = torch.arange(b, device=i2t.device) + rank * b
    loss_i2t, loss_t2i = F.cross_entropy(i2t, labels), F.cross_entropy(t2i, labels)
    return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


def _check(image_tokens, text_tokens, text_mask, logit_scale):
    if image_tokens.dim() != 3 or text_tokens.dim() != 3:
        raise ValueError(f"filip_loss: tokens must be [B, N, D], got image {tuple(image_tokens.shape)} "
                         f"and text {tuple(text_tokens.shape)}")
    if image_tokens.shape[0] != text_tokens.shape[0] or image_tokens.shape[2] != text_tokens.shape[2]:
        raise ValueError(f"filip_loss: image {tuple(image_tokens.shape)} and text {tuple(text_tokens.shape)} "
                         "tokens must share batch size and width")
    if text_mask.shape != text_tokens.shape[:2] or text_mask.dtype != torch.bool:
        raise ValueError(f"filip_loss: text_mask must be bool {tuple(text_tokens.shape[:2])}, got "
                         f"{text_mask.dtype} {tuple(text_mask.shape)}")
    if not torch.is_tensor(logit_scale) or logit_scale.numel() != 1:
        raise ValueError("filip_loss: logit_scale must be a one-element tensor (exp of the parameter)")


def mask_input_tokens(tokens, mask_id, vocab_size, generator=None, prob=0.15,
                      special_ids=(49406, 49407), eot_id=49407):
    """The reference's stray input masking (``text_mask_type: MLM`` left on, no MLM loss); off
    unless a method turns it on. BERT corruption of each row's tokens up to its first EOT, special
    ids excluded: each chosen with ``prob``; of those 80% -> ``mask_id``, 10% -> a random id, 10%
    unchanged. Random ids are drawn from the vocabulary without the special ids and ``mask_id``
    (the reference draws from all of it: a random EOT would move argmax pooling). Needs a
    vocabulary with a mask token (DeCLIP's: 49409 ids, mask 49408); open_clip's has none.
    """
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_input_tokens: mask_id {mask_id} is not in the vocabulary of size {vocab_size}")
    special = torch.tensor(sorted(set(special_ids) | {mask_id}), device=tokens.device)
    length = (tokens == eot_id).int().argmax(dim=-1, keepdim=True)
    unpadded = torch.arange(tokens.shape[1], device=tokens.device)[None] < length
    eligible = unpadded & ~torch.isin(tokens, special)
    draw = lambda: torch.rand(tokens.shape, generator=generator, device=tokens.device)  # noqa: E731
    chosen = eligible & (draw() < prob)
    to_mask = chosen & (draw() < 0.8)
    to_random = chosen & ~to_mask & (draw() < 0.5)
    ids = torch.arange(vocab_size, device=tokens.device)
    allowed = ids[~torch.isin(ids, special)]
    random_ids = allowed[torch.randint(len(allowed), tokens.shape, generator=generator, device=tokens.device)]
    return torch.where(to_random, random_ids, tokens.masked_fill(to_mask, mask_id))


# ------------------------------------------------------------------------------ the method

class FILIPEncoder(nn.Module):
    """Dense tokens of the image and the raw text (one pass per tower) through ``FILIPHead``."""

    def __init__(self, model, dense_dim=DENSE_DIM, input_mask=False, seed=0, rank=0):
        super().__init__()
        self.model = model
        self.head = FILIPHead(model.visual.transformer.width, model.transformer.width, dense_dim)
        self.input_mask, self.seed, self.rank = input_mask, seed, rank
        self.register_buffer("mask_draws", torch.zeros((), dtype=torch.long))

    def _maybe_mask(self, text):
        if not self.input_mask:
            return text
        gen = torch.Generator(device=text.device).manual_seed(
            self.seed * 1_000_003 + self.rank * 7919 + int(self.mask_draws) * 104_729)
        if self.training:
            self.mask_draws += 1
        vocab = self.model.token_embedding.num_embeddings
        return mask_input_tokens(text, vocab - 1, vocab, generator=gen)

    def forward(self, batch):
        d = dense_tokens(self.model, batch["image"], self._maybe_mask(batch["raw"]))
        image_tokens, text_tokens = self.head(d.image_tokens, d.text_tokens)
        return {"image_tokens": image_tokens, "text_tokens": text_tokens, "text_mask": d.text_mask,
                "logit_scale_dense": self.head.logit_scale.exp()}


class FILIPCriterion(nn.Module):
    def __init__(self, k_image=16, k_text=16, mask_padding=True, rank=0, world_size=1,
                 chunk_size=None):
        super().__init__()
        self.kw = dict(k_image=k_image, k_text=k_text, mask_padding=mask_padding, rank=rank,
                       world_size=world_size, gather_with_grad=True, chunk_size=chunk_size)

    def forward(self, f):
        return filip_loss(f["image_tokens"], f["text_tokens"], f["text_mask"],
                          f["logit_scale_dense"], **self.kw)


def add_filip_args(g, prefix="filip"):
    g.add_argument(f"--{prefix}-k-image", type=int, default=16,
                   help="Image tokens selected per sample before the gather.")
    g.add_argument(f"--{prefix}-k-text", type=int, default=16,
                   help="Text tokens selected per sample before the gather.")
    g.add_argument(f"--{prefix}-padding", choices=("paper", "reference"), default="paper",
                   help="paper: padding text tokens are masked out of the maxima, means and "
                        "selection (FILIP paper); reference: all 77 positions count (DeCLIP#31).")
    g.add_argument(f"--{prefix}-chunk-size", type=int, default=None,
                   help="Rows per chunk of the dense logits (default: by memory, 2^27 products).")


def check_k(args, dims, prefix):
    """``--PREFIX-k-image`` / ``--PREFIX-k-text`` select among the tokens ``--model`` has:
    more would be cut to all of them silently (``select_tokens``; the reference's topk fails),
    so a k above the ViT's patch tokens or the context length is refused (an unknown size,
    as of an hf-hub: model, is not checked)."""
    for side, tokens, what in (("image", dims.image_tokens, "patch tokens"),
                               ("text", dims.context_length, "text positions")):
        k = getattr(args, f"{prefix}_k_{side}")
        if tokens is not None and k > tokens:
            raise MethodConfigError(
                f"--{prefix}-k-{side} {k}: --model {args.model} has {tokens} {what} per sample; "
                f"give at most {tokens} (all of them)")


class FILIP(Method):
    """FILIP as the DeCLIP toolbox implements it (YFCC15M ViT-B/32 IN-1K 39.5): token-wise late
    interaction between the ViT's patch tokens and the text tower's ln_final tokens, each through
    a Linear to 256-d; symmetric InfoNCE on the dense logits with weight 1 (the reference's
    zero-weight global CLIP loss is not computed)."""

    name = "filip"
    find_unused_parameters = True  # ln_post / proj / text_projection: outside the dense loss
    flag_ranges = {"filip_k_image": "[1, inf)", "filip_k_text": "[1, inf)",
                   "filip_chunk_size": "[1, inf)"}

    @classmethod
    def reference_vit(cls, args):  # the toolbox's FILIP: its ViT (base.toolbox_vit)
        return "toolbox"

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("filip (--method filip only; DeFILIP has its own "
                                      "--defilip-* copies of the first four)")
        add_filip_args(g)
        g.add_argument("--filip-input-mask", action="store_true", default=False,
                       help="The reference's stray 15%% input masking of the text (an unused MLM "
                            "setting; needs a vocabulary with a mask token: DeCLIP-* models).")
        g.add_argument("--filip-augment", choices=RECIPES, default="mocov2",
                       help="The image view's augmentation: mocov2 (the DeCLIP toolbox's FILIP, "
                            "which made the 39.5 row: its MOCOV2 transform, view 1), reference "
                            "(ALIP's and CLIP's here), slip_base, simclr.")

    @classmethod
    def data_spec(cls, args):
        return DataSpec(image_views=(ImageView("image", args.filip_augment),), text_fields=("raw",))

    @classmethod
    def check_shapes(cls, args, dims):
        super().check_shapes(args, dims)
        check_k(args, dims, "filip")

    def build(self, model):
        args, rank, world_size = self.args, self.rank, self.world_size
        require_token_towers(model, self.name, args.model)
        if args.filip_input_mask and model.token_embedding.num_embeddings < 49409:
            raise MethodConfigError("--filip-input-mask needs a vocabulary with a mask token "
                                    f"(DeCLIP-* models); --model {args.model} has none")
        self.encoder = FILIPEncoder(model, input_mask=args.filip_input_mask, seed=args.seed,
                                    rank=rank)
        self.criterion = FILIPCriterion(args.filip_k_image, args.filip_k_text,
                                        args.filip_padding == "paper", rank, world_size,
                                        args.filip_chunk_size)

    def dense_head(self):
        return self.encoder.head

    def after_step(self):
        self.encoder.head.clamp_logit_scale_()  # [3, 6], as the reference (docs/methods.md §5.3)
        clamp_logit_scale(self.model)
