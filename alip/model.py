"""ALIP models are plain open_clip models; this module adds what ALIP needs on top of them.

* our model configs (``alip/model_configs/*.json``) are registered with
  ``open_clip.add_model_config`` when ``alip`` is imported, so ``open_clip.create_model``
  knows ``ALIP-ViT-B-32`` & co;
* ``encode_text`` runs a text batch only up to its longest sequence (the rec format pads every
  text to 77 tokens; with the causal mask and end-of-text pooling the padding tail changes
  nothing, so dropping it gives the same features for a fraction of the compute);
* ``TripletEncoder`` is the module a training step calls (and DDP wraps): one image tower and
  ONE shared text tower for both the raw web text and the synthetic caption.
"""
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIG_DIR = Path(__file__).parent / "model_configs"
TEXT_MODES = ("joint", "separate")


def register_model_configs():
    open_clip.add_model_config(CONFIG_DIR)


def _text_tower(model):
    """The attributes of the text tower if it can be trimmed safely, else None.

    Trimming is exact only for a causal mask with no padding mask, no appended class token, and
    pooling at the end-of-text token (argmax / eos). Anything else falls back to the full pass.
    """
    tower = model.text if hasattr(model, "text") else model
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if not all(hasattr(tower, a) for a in needed) or tower.attn_mask is None:
        return None
    if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
        return None
    pool_type = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", None)
    if pool_type not in ("argmax", "eos"):
        return None
    return tower


def text_lengths(text, model=None):
    """Per-row length up to and including the end-of-text token."""
    tower = _text_tower(model) if model is not None else None
    pool_type = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
    if pool_type == "eos":
        eos = getattr(tower, "text_eos_id", None) or getattr(tower, "eos_id")
        return (text == eos).int().argmax(dim=-1) + 1
    return text.argmax(dim=-1) + 1


def encode_text(model, text, normalize=True, trim=True):
    """``model.encode_text`` that only runs the positions up to the batch's longest text."""
    tower = _text_tower(model) if trim else None
    if tower is None:
        return model.encode_text(text, normalize=normalize)
    length = int(text_lengths(text, model).max())
    text = text[:, :length]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(text).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), text_lengths(text, model) - 1]
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


class TripletEncoder(nn.Module):
    """Wraps an open_clip model for training; DDP wraps this module.

    ``forward(images, raw_text, caption_text=None)`` returns normalised image, raw-text and (if
    given) caption features and ``logit_scale.exp()``. Both texts go through the one text tower:
    ``text_mode="joint"`` as one 2B batch trimmed to the longest of both, ``"separate"`` as two
    passes each trimmed to its own longest text. The open_clip model is ``self.model``, and its
    ``state_dict()`` is what checkpoints store, so ``open_clip.create_model(pretrained=...)``
    loads them.
    """

    def __init__(self, model, text_mode="separate", trim_text=True):
        super().__init__()
        if text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
        self.model = model
        self.text_mode = text_mode
        self.trim_text = trim_text

    def forward(self, images, raw_text, caption_text=None):
        image_features = self.model.encode_image(images, normalize=True)
        scale = self.model.logit_scale.exp()
        if caption_text is None:
            return image_features, encode_text(self.model, raw_text, trim=self.trim_text), scale
        if self.text_mode == "joint":
            both = encode_text(self.model, torch.cat([raw_text, caption_text]), trim=self.trim_text)
            raw_features, caption_features = both.chunk(2)
        else:
            raw_features = encode_text(self.model, raw_text, trim=self.trim_text)
            caption_features = encode_text(self.model, caption_text, trim=self.trim_text)
        return image_features, raw_features, caption_features, scale
