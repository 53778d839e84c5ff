"""ALIP models are plain open_clip models; this module adds what ALIP needs on top of them.

* our model configs (``alip/model_configs/*.json``) are registered with
  ``open_clip.add_model_config`` when ``alip`` is imported, so ``open_clip.create_model``
  knows ``ALIP-ViT-B-32`` & co;
* ``encode_text`` computes (almost) none of the padding (the rec format pads every text to 77
  tokens; with the causal mask and end-of-text pooling the padding tail changes nothing, so
  skipping it gives the same features): on CUDA all texts go packed through ``varlen_attn``
  with per-sequence causal attention; elsewhere the batch is sorted into a few length groups,
  each run trimmed to its own longest text, and the features are put back in batch order.
  Both plan from the lengths on the HOST: from the token tensor's host copy when the loader
  moved it with ``to_device_keeping_host_tokens`` (the training loop does), so the GPU never
  waits for the plan; otherwise one read-back of the lengths;
* ``encode_text_pair`` runs the raw web text and the synthetic caption through the ONE shared
  text tower (ALIP's encoder, ``alip.methods.alip.ALIPEncoder``, the module DDP wraps).
"""
import functools
import inspect
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

CONFIG_DIR = Path(__file__).parent / "model_configs"
TEXT_MODES = ("auto", "joint", "separate")


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


# ---- host copies of token tensors -----------------------------------------------------------

_HOST_TOKENS = WeakIdKeyDictionary()  # device token tensor -> the CPU tensor it was copied from


def to_device_keeping_host_tokens(tokens, device):
    """``tokens.to(device)`` that remembers the CPU tensor it came from (as long as the device
    tensor lives): ``encode_text`` plans its length groups / packing from it without reading
    anything back from the device. Token tensors are not modified in place (a new tensor,
    such as DeCLIP's masked text, has no host copy and gets one read-back)."""
    moved = tokens.to(device, non_blocking=True)
    if moved is not tokens:
        _HOST_TOKENS[moved] = tokens
    return moved


def host_tokens(text):
    """``text`` if it is on the CPU, else its remembered host copy, else None."""
    return text if text.device.type == "cpu" else _HOST_TOKENS.get(text)


def _widen(t, width):
    """Rows right-padded with 0 to ``width`` (after EOT: the features do not change)."""
    return t if t.shape[1] == width else F.pad(t, (0, width - t.shape[1]))


def _cat_tokens(a, b):
    """``torch.cat([a, b])`` carrying the host copies along; rows of different widths (raw
    text at 77, captions at 256) are padded to the wider first."""
    width = max(a.shape[1], b.shape[1])
    both = torch.cat([_widen(a, width), _widen(b, width)])
    ha, hb = host_tokens(a), host_tokens(b)
    if both.device.type != "cpu" and ha is not None and hb is not None:
        _HOST_TOKENS[both] = torch.cat([_widen(ha, width), _widen(hb, width)])
    return both


def _host_lengths(text, model):
    """Per-row lengths as a CPU tensor: from the host copy, else read back (the one wait)."""
    host = host_tokens(text)
    return text_lengths(host if host is not None else text, model).cpu()


# ---- length groups --------------------------------------------------------------------------

def length_groups(lengths, max_groups=4, pass_tokens=0):
    """Split a batch into <= ``max_groups`` runs of similar length, each to be run trimmed.

    Rows are sorted by length and cut into contiguous runs; a run costs (rows x its longest
    length) tokens plus ``pass_tokens`` for the pass itself (launch and per-op overhead, in
    tokens). The cuts minimise the total cost (a DP over the distinct lengths, <= the context).
    Returns a list of ``(row_indices, length)``, shortest first; together the rows are a
    permutation of ``range(len(lengths))``.
    """
    lengths = torch.as_tensor(lengths).cpu()
    order = torch.argsort(lengths, stable=True)
    values, counts = torch.unique_consecutive(lengths[order], return_counts=True)
    cum = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).double()  # rows <= value j-1
    m = len(values)
    # cost[i, j]: one pass over the rows of distinct lengths i..j-1, trimmed to values[j-1]
    val = torch.cat([torch.zeros(1, dtype=torch.long), values]).double()
    cost = pass_tokens + (cum[None, :] - cum[:, None]) * val[None, :]
    cost = cost.masked_fill(~torch.ones(m + 1, m + 1, dtype=torch.bool).triu(1), float("inf"))
    # dp[g][j]: cheapest cover of the first j distinct lengths by exactly g + 1 passes
    dp, arg = [cost[0]], [torch.zeros(m + 1, dtype=torch.long)]
    for _ in range(1, min(max_groups, m)):
        best, i = (dp[-1][:, None] + cost).min(dim=0)  # last pass covers i..j-1
        dp.append(best)
        arg.append(i)
    g = min(range(len(dp)), key=lambda g: (float(dp[g][m]), g))  # ties: fewer passes
    cuts, j = [m], m
    for g in range(g, -1, -1):
        j = int(arg[g][j])
        cuts.append(j)
    cuts = cuts[::-1]
    return [(order[int(cum[a]):int(cum[b])], int(values[b - 1])) for a, b in zip(cuts, cuts[1:])]


# ---- the text tower, three ways -------------------------------------------------------------

def _project(tower, x, normalize):
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


def _encode_trimmed(tower, text, lengths, length):
    """Pooled (pre-projection) features of rows all shorter than ``length``, run to ``length``."""
    text = text[:, :length]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(text).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    return x[torch.arange(x.shape[0], device=x.device), lengths - 1]


def _to(t, device):
    return t.to(device, non_blocking=True)


def _encode_grouped(tower, text, lengths, max_groups, pass_tokens=0):
    """One trimmed pass per length group; features put back in the batch order. ``lengths``
    (CPU) plan the groups; only index tensors go to the device."""
    dev = text.device
    groups = length_groups(lengths, max_groups, pass_tokens)
    if len(groups) == 1:
        return _encode_trimmed(tower, text, _to(lengths, dev), groups[0][1])
    feats = torch.cat([_encode_trimmed(tower, text[_to(rows, dev)], _to(lengths[rows], dev), n)
                       for rows, n in groups])
    order = torch.cat([rows for rows, _ in groups])
    return feats[_to(torch.argsort(order), dev)]


def _packed_block(blk, x, cu_seq, max_len, attn_fn):
    """open_clip's ResidualAttentionBlock over packed tokens [T, width], per-sequence causal."""
    attn = blk.attn
    tokens, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(tokens, 3, heads, width // heads).unbind(1)
    o = attn_fn(q, k, v, cu_seq, cu_seq, max_len, max_len, window_size=(-1, 0))
    x = x + blk.ls_1(attn.out_proj(o.reshape(tokens, width)))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def _encode_packed(tower, text, lengths, attn_fn):
    """All rows packed into one [sum(lengths), width] sequence: no padding is computed.
    ``lengths`` (CPU) give the packing; only index tensors go to the device."""
    dev, width = text.device, text.shape[1]
    flat = (torch.arange(width) < lengths[:, None]).flatten().nonzero().squeeze(1)
    ends = lengths.cumsum(0)
    cu_seq = _to(F.pad(ends, (1, 0)).to(torch.int32), dev)
    max_len = int(lengths.max())
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(text.flatten()[_to(flat, dev)]).to(cast_dtype)
    x = x + tower.positional_embedding[_to(flat % width, dev)].to(cast_dtype)
    for blk in tower.transformer.resblocks:
        if tower.transformer.grad_checkpointing:
            x = checkpoint(_packed_block, blk, x, cu_seq, max_len, attn_fn, use_reentrant=False)
        else:
            x = _packed_block(blk, x, cu_seq, max_len, attn_fn)
    return tower.ln_final(x)[_to(ends - 1, dev)]  # the end-of-text token closes each sequence


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *,
                          window_size=(-1, -1), scale=None):
    """``varlen_attn``'s contract as a loop of SDPA calls, one per sequence (any device/dtype).

    [T, heads, head_dim] packed q/k/v with ``cu_seq_q == cu_seq_k``; ``window_size=(-1, 0)``
    is causal. For tests and CPU smoke runs of the packed path; slow.
    """
    causal = tuple(window_size) == (-1, 0)
    bounds = cu_seq_q.tolist()
    out = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (query, key, value)),
                                          is_causal=causal, scale=scale).transpose(0, 1)
           for a, b in zip(bounds, bounds[1:])]
    return torch.cat(out)


@functools.lru_cache(maxsize=None)
def _varlen_attn_fn():
    """``varlen_attn`` called with ``window_size=(-1, 0)`` for causal attention. torch 2.9 named
    that ``is_causal=True`` (and had no ``window_size``); such a torch gets a thin adapter."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "window_size" in inspect.signature(varlen_attn).parameters:
        return varlen_attn

    def causal_only(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), scale=None):
        if tuple(window_size) not in ((-1, -1), (-1, 0)):
            raise ValueError(f"this torch's varlen_attn has no sliding window: {window_size}")
        if scale is not None:
            raise ValueError("this torch's varlen_attn takes no scale")
        return varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k,
                           is_causal=tuple(window_size) == (-1, 0))
    return causal_only


def sharded_blocks(tower):
    """Whether the tower's blocks are FSDP units (``train.py --fsdp``): each block call then
    all-gathers its parameters, so every rank must run the same passes through the tower -- one
    (``"trim"``) -- whatever its texts' lengths (length groups differ between ranks), and call
    each block as a module (the packed path runs a block's layers one by one)."""
    return any(isinstance(b, FSDPModule) for b in tower.transformer.resblocks)


def packed_supported(tower, text):
    """The packed path needs open_clip's plain blocks, and for varlen_attn (FlashAttention /
    cuDNN): a CUDA tensor of compute capability >= 8.0 computing in fp16/bf16."""
    blocks = tower.transformer.resblocks
    if sharded_blocks(tower):
        return False
    if not all(isinstance(b, ResidualAttentionBlock) and not hasattr(b, "ln_1_kv")
               and b.attn._qkv_same_embed_dim and b.attn.bias_k is None
               and not (b.attn.dropout and b.training) for b in blocks):
        return False
    if not text.is_cuda or _varlen_attn_fn() is None:
        return False
    if torch.cuda.get_device_capability(text.device) < (8, 0):
        return False
    dtype = (torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda")
             else tower.transformer.get_cast_dtype())
    return dtype in (torch.float16, torch.bfloat16)


def context_length(model):
    """The text tower's context (token positions), or None when the model does not say."""
    n = getattr(model, "context_length", None)
    return int(n) if n is not None else None


def check_text_width(model, text):
    """Token rows may be narrower than the tower's context (positions start at 0: a [B, 77]
    batch in a 256-position tower is exact), never wider."""
    n = context_length(model)
    if n is not None and text.shape[-1] > n:
        raise ValueError(f"--text-context {n}: the model's text tower has {n} positions but a "
                         f"text batch is {text.shape[-1]} tokens wide; give --text-context >= "
                         f"{text.shape[-1]} (or tokenize at {n})")


def pad_to_context(model, text, pad_id=0):
    """``text`` right-padded with ``pad_id`` (open_clip's tokenizer pads with 0) to the model's
    context: open_clip's full pass (``model.encode_text``) adds the whole positional embedding,
    so it takes only rows as wide as the context. A [B, 77] row padded to 256 is the row the
    tokenizer gives at 256."""
    n = context_length(model)
    if n is None or text.shape[-1] >= n:
        return text
    return F.pad(text, (0, n - text.shape[-1]), value=pad_id)


TEXT_PATHS = ("auto", "packed", "grouped", "trim")


def encode_text(model, text, normalize=True, trim=True, *, path="auto", max_groups=4,
                pass_tokens=0, attn_fn=None):
    """``model.encode_text`` that computes (almost) no padding; same features.

    ``trim=False`` (or a tower where skipping padding is not exact) runs open_clip's full
    pass over the whole context (rows narrower than the context are padded to it first:
    ``pad_to_context``). Rows wider than the context are refused (``check_text_width``); rows
    narrower are fine on every path (positions start at 0). Otherwise ``path``:
      ``"packed"``   all texts as one packed sequence with per-sequence causal attention
                     (``attn_fn``, default ``torch.nn.attention.varlen.varlen_attn``): no padding;
      ``"grouped"``  rows sorted by length into <= ``max_groups`` passes, each trimmed to its own
                     longest text (``length_groups``), features put back in the batch order;
      ``"trim"``     one pass trimmed to the batch's longest text;
      ``"auto"``     packed where varlen_attn runs (CUDA, sm80+, fp16/bf16), else grouped.
    """
    if path not in TEXT_PATHS:
        raise ValueError(f"path must be one of {TEXT_PATHS}, got {path!r}")
    check_text_width(model, text)
    tower = _text_tower(model) if trim else None
    if tower is None:
        return model.encode_text(pad_to_context(model, text), normalize=normalize)
    lengths = _host_lengths(text, model)
    if path == "auto":
        path = ("packed" if packed_supported(tower, text) else
                "trim" if sharded_blocks(tower) else "grouped")
    if path == "packed":
        attn_fn = attn_fn or _varlen_attn_fn()
        if attn_fn is None:
            raise RuntimeError("path='packed' needs torch.nn.attention.varlen or an attn_fn")
        x = _encode_packed(tower, text, lengths, attn_fn)
    elif path == "grouped":
        x = _encode_grouped(tower, text, lengths, max_groups, pass_tokens)
    else:
        x = _encode_trimmed(tower, text, _to(lengths, text.device), int(lengths.max()))
    return _project(tower, x, normalize)


def encode_text_pair(model, raw, caption, text_mode="auto", trim=True):
    """Raw text and caption through the one text tower -> (raw features, caption features).

    ``"separate"``: two passes, each with its own length groups (a batch of short captions is
    not held back by long web text). ``"joint"``: one 2B pass (rows of different widths, e.g.
    raw text at 77 and captions at 256 in a 256-position tower, padded to the wider). ``"auto"``: joint where the
    packed varlen path runs (the packed call computes the same tokens either way, and one call
    launches half the kernels: on an H200 at batch 256 the ALIP step went from 1.27x to 1.05x
    open_clip's CLIP step, bench/loss_step.py), separate elsewhere.
    """
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
    if text_mode == "auto":
        tower = _text_tower(model) if trim else None
        text_mode = "joint" if tower is not None and packed_supported(tower, raw) else "separate"
    if text_mode == "joint":
        both = encode_text(model, _cat_tokens(raw, caption), trim=trim)
        return both.split([len(raw), len(caption)])
    return encode_text(model, raw, trim=trim), encode_text(model, caption, trim=trim)
