"""Token batches with the length mixes the benches use (SOT, random BPE ids, EOT, zero padding).

``yfcc``: YFCC-like raw web text, lognormal lengths with median 15 tokens and sigma 0.69,
cut at 77 like the tokenizer (about 0.9% of texts hit 77). ``caption``: synthetic captions,
uniform 10-25 tokens. ``full``: every text 77 tokens. ``long``: long captions for a 256-token
tower, lognormal with median 100 tokens and sigma 0.35, cut to 60-200 (rows ``width`` wide).
"""
import math

import torch

SOT, EOT, CONTEXT = 49406, 49407, 77


def lengths(kind, n, gen):
    if kind == "full":
        return torch.full((n,), CONTEXT, dtype=torch.long)
    if kind == "caption":
        return torch.randint(10, 26, (n,), generator=gen)
    if kind == "long":
        z = torch.randn(n, generator=gen, dtype=torch.float64)
        return (math.log(100) + 0.35 * z).exp().round().long().clamp(60, 200)
    if kind == "yfcc":
        z = torch.randn(n, generator=gen, dtype=torch.float64)
        return (math.log(15) + 0.69 * z).exp().round().long().clamp(3, CONTEXT)
    raise ValueError(f"unknown text length mix {kind!r}")


def tokens(lens, gen, width=CONTEXT):
    rows = torch.zeros(len(lens), width, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        rows[i, 0], rows[i, n - 1] = SOT, EOT
        rows[i, 1:n - 1] = torch.randint(1, 49000, (n - 2,), generator=gen)
    return rows


def batch(kind, n, gen, width=CONTEXT):
    return tokens(lengths(kind, n, gen), gen, width)


def cut(rows, width=CONTEXT):
    """``rows`` cut to ``width`` tokens as open_clip's tokenizer cuts a text too long for its
    context (``tokenize``: the first ``width`` ids, the last one replaced by EOT)."""
    out = rows[:, :width].clone()
    long = (rows[:, width:] != 0).any(dim=1) if rows.shape[1] > width else torch.zeros(len(rows), dtype=torch.bool)
    out[long, width - 1] = EOT
    return out
