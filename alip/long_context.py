"""Text towers with another context than their config's 77 (``train.py --text-context N``).

* From scratch: open_clip builds the tower at ``N`` (``create_model(...,
  force_context_length=N)``): positional embedding [N, width], causal mask [N, N], the same
  end-of-text (argmax) pooling. That argument is what the method's ``model_kwargs()`` returns
  and what the checkpoints record, so ``alip.eval.load`` and plain open_clip rebuild the model
  at ``N`` (docs/models.md).
* From weights of a shorter tower (``--pretrained``, ``hf-hub:``, ``local-dir:``): the model is
  built with its weights at their own context, then its positional embedding is stretched to
  ``N`` by Long-CLIP's knowledge-preserving interpolation (``stretch_positions``) and loaded
  into a model open_clip built at ``N``. (open_clip's own ``load_checkpoint`` would resize it by
  plain linear interpolation over all positions, moving the well-trained first ones.)
"""
import math
import os

import open_clip
import torch

LONG_CLIP_KEEP = 20  # positions Long-CLIP keeps as they are
CONTEXT_KEY = "force_context_length"  # open_clip.create_model's argument


class ContextError(ValueError):
    """A text context that cannot be built (the message names the flag)."""


def stretch_positions(pos, context, keep=LONG_CLIP_KEEP):
    """Long-CLIP's knowledge-preserving stretch of a positional embedding [L, D] to [context, D].

    Zhang et al. 2024 (arXiv 2403.15378), beichenzbc/Long-CLIP @ 3966af9a model/longclip.py:
    230-250 (``load_from_clip``): rows 0..keep-1 are kept; the rest are stretched by ``r = 4``
    to ``4L - 3*keep`` = 248 rows: new[keep + 4i + j] = (4-j)/4 old[keep+i] + j/4 old[keep+i+1]
    (written ``(4-j)*old/4 + j*old/4``) for i < L-1-keep, and the last four continue the last
    segment: new[4L-3keep-4+j] = old[L-1] + j*(old[L-1] - old[L-2])/4.

    Generalised to any ``context > keep``: the factor is ``r = (context - keep) / (L - keep)``
    (4 for 77 -> 248, so that case is their table bit for bit); row ``p >= keep`` sits at source
    position ``s = keep + (p - keep) / r``, held as the exact fraction ``a + n/d`` (d =
    (context-keep) / gcd(L-keep, context-keep)). For ``s < L - 1``: ``(d-n)*old[a]/d +
    n*old[a+1]/d``; for ``s >= L - 1`` (the last ``ceil(r) - 1`` or so rows): ``old[L-1] +
    m*(old[L-1] - old[L-2])/d`` with ``s = L - 1 + m/d``. Computed in the tensor's dtype as
    their code does."""
    length = pos.shape[0]
    if length < keep + 2:
        raise ContextError(f"--text-context {context}: a {length}-position tower has too few "
                           f"positions to keep {keep} and stretch the rest (needs >= {keep + 2})")
    if context <= length:
        raise ContextError(f"--text-context {context}: stretching a {length}-position tower to "
                           f"{context} positions is not a stretch; give more than {length}")
    src, dst = length - keep, context - keep
    g = math.gcd(src, dst)
    den = dst // g
    rows = [pos[:keep]]
    for p in range(keep, context):
        whole, part = divmod((p - keep) * (src // g), den)  # s - keep = whole + part/den
        a = keep + whole
        if a < length - 1:
            rows.append(((den - part) * pos[a] / den + part * pos[a + 1] / den)[None])
        else:  # past the last position: continue the last segment
            m = (a - (length - 1)) * den + part
            rows.append((pos[length - 1] + m * (pos[length - 1] - pos[length - 2]) / den)[None])
    return torch.cat(rows)


def check_context(context, flag="--text-context"):
    """``context`` None (the model's own) or an int >= 2 (SOT + EOT); else a ContextError."""
    if context is None:
        return None
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise ContextError(f"{flag} {context}: a text context is a number of token positions "
                           f">= 2 (SOT and EOT)")
    return context


def context_kwargs(context):
    """The ``open_clip.create_model`` argument for ``context`` ({} for None: the config's)."""
    return {} if check_context(context) is None else {CONTEXT_KEY: context}


def context_of(model):
    """The text context the model was built with (open_clip's ``model.context_length``)."""
    return int(model.context_length)


def text_positions(model):
    """(state_dict key, positional embedding) of open_clip's own text tower; ContextError for
    another kind (an HF text tower has its own positions open_clip does not resize)."""
    for key, owner in (("positional_embedding", model), ("text.positional_embedding",
                                                         getattr(model, "text", None))):
        pos = getattr(owner, "positional_embedding", None)
        if isinstance(pos, torch.nn.Parameter) and hasattr(owner, "attn_mask"):
            return key, pos
    raise ContextError(f"--text-context: the text tower {type(getattr(model, 'text', model)).__name__}"
                       " is not open_clip's own transformer (no positional embedding to size)")


def file_context(path):
    """Rows of the text positional embedding a weights file holds, or None (not a torch file
    this can read, or no such tensor): a train.py model file, an open_clip state_dict."""
    if not path or not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # safetensors, legacy pickles, ...: open_clip reads those itself
        return None
    sd = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(sd, dict):
        return None
    for key in ("positional_embedding", "text.positional_embedding",
                "module.positional_embedding", "module.text.positional_embedding"):
        if torch.is_tensor(sd.get(key)) and sd[key].ndim == 2:
            return int(sd[key].shape[0])
    return None


def has_weights(model_name, pretrained):
    return bool(pretrained) or str(model_name).startswith(("hf-hub:", "local-dir:"))


def create_model_and_transforms(model_name, pretrained=None, **kwargs):
    """``open_clip.create_model_and_transforms`` at the context ``kwargs`` may give
    (``force_context_length``), stretching loaded weights of a shorter tower
    (``stretch_positions``) rather than letting open_clip interpolate them. -> (model,
    preprocess_train, preprocess_val). A context below the weights' is refused."""
    target = check_context(kwargs.pop(CONTEXT_KEY, None))
    if target is None:
        return open_clip.create_model_and_transforms(model_name, pretrained=pretrained, **kwargs)
    if not has_weights(model_name, pretrained):
        built = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, **{**kwargs, CONTEXT_KEY: target})
        text_positions(built[0])  # an HF text tower is refused, not silently left at its own
        return built
    source = file_context(pretrained)  # a weights file at another context is built at its own
    src_kw = kwargs if source is None else {**kwargs, CONTEXT_KEY: source}
    model, train_tf, val_tf = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, **src_kw)
    have = context_of(model)
    if have == target:
        return model, train_tf, val_tf
    key, pos = text_positions(model)
    if target < have:
        raise ContextError(f"--text-context {target}: the weights of {pretrained or model_name} "
                           f"have a {have}-position text tower; shrinking it is not supported "
                           f"(give --text-context >= {have}, or none for {have})")
    state = model.state_dict()
    state[key] = stretch_positions(pos.detach(), target)
    del model
    stretched = open_clip.create_model(model_name, pretrained=None, load_weights=False,
                                       **{**kwargs, CONTEXT_KEY: target})
    stretched.load_state_dict(state)
    return stretched, train_tf, val_tf


def check_field_widths(widths, context, flag="--text-context", sources=None):
    """The data's text fields fit the tower: ``widths`` {batch key: tokens wide} (None: not
    known), each <= ``context``; else a ContextError naming the flag and the widest field.
    ``sources`` {batch key: shard fields it reads} (the method's text views): a key read from
    other fields (``--raw-fields caption``) is named by them, not by its batch key."""
    if not widths or context is None:
        return
    key, width = max(widths.items(), key=lambda kv: kv[1])
    if width > context:
        fields = tuple((sources or {}).get(key, (key,)))
        what = (f"{key!r} field" if fields == (key,) else f"{fields[0]!r} field (read as {key!r})"
                if len(fields) == 1 else f"{key!r} text (drawn from fields "
                f"{', '.join(map(repr, fields))})")
        raise ContextError(f"{flag} {context}: the data's {what} is {width} tokens wide; "
                           f"give {flag} >= {width}")
