"""Text views: named token transforms applied per sample on the CPU beside the readers.

A transform is ``fn(tokens_row: LongTensor[77], rng: random.Random, **options) -> LongTensor[77]``
(it must not modify its input). ``TRANSFORMS`` maps a ``TextView.transform`` name to it; methods
register theirs with ``register(name, fn)``. Each sample's generator comes from (seed, epoch,
record index, view name), so a text view is the same whatever the backend, worker count or
resume point.
"""
import random
import zlib

import torch

from .augment import _mix64
from .spec import DEFAULT_TEXT_FIELDS


def identity(tokens, rng):
    return tokens.clone()


TRANSFORMS = {"identity": identity}


def register(name, fn):
    """Make ``fn`` available as ``TextView(transform=name)``; re-registering a name is an error
    unless it is the same function (module reloads)."""
    if not callable(fn):
        raise TypeError(f"text transform {name!r}: {fn!r} is not callable")
    if TRANSFORMS.get(name, fn) is not fn:
        raise ValueError(f"text transform {name!r} is already registered ({TRANSFORMS[name]!r})")
    TRANSFORMS[name] = fn
    return fn


def text_rng(seed, epoch, index, name):
    """The generator of one sample's text view ``name``."""
    x = _mix64(_mix64(_mix64(_mix64(int(seed)) ^ int(epoch)) ^ int(index)) ^ zlib.crc32(name.encode()))
    return random.Random(x)


def check(text_views, fields=DEFAULT_TEXT_FIELDS):
    """Fail before any data is read if a view names an unknown transform or a source field not in
    ``fields`` (the fields the data has)."""
    for v in text_views:
        if v.transform not in TRANSFORMS:
            raise ValueError(f"text view {v.name!r}: unknown transform {v.transform!r}; "
                             f"registered: {sorted(TRANSFORMS)}")
        for f in v.sources:
            if f not in fields:
                raise ValueError(f"text view {v.name!r}: unknown source field {f!r}; "
                                 f"the data has {list(fields)}")


def pick_source(view, seed, epoch, index):
    """The field ``view`` reads for one sample: its source, or one of its several sources drawn
    from (seed, epoch, record index, the sources), so every view over the same sources reads the
    same field of a sample (a caption and its partial view stay one caption)."""
    sources = view.sources
    if len(sources) == 1:
        return sources[0]
    return sources[text_rng(seed, epoch, index, "pick:" + ",".join(sources)).randrange(len(sources))]


def apply(view, fields, seed, epoch, index):
    """One text view of one sample: its fields {name: LongTensor[77]} -> LongTensor[77]."""
    tokens = fields[pick_source(view, seed, epoch, index)]
    out = TRANSFORMS[view.transform](tokens, text_rng(seed, epoch, index, view.name), **dict(view.options))
    if not isinstance(out, torch.Tensor) or out.shape != tokens.shape:
        raise ValueError(f"text view {view.name!r}: transform {view.transform!r} returned "
                         f"{getattr(out, 'shape', type(out))}, expected a tensor of shape {tuple(tokens.shape)}")
    return out.to(torch.int64)


def apply_batch(text_views, fields, seed, epoch, indices):
    """Every text view of a batch: fields {name: int64 [B,77]} + record indices ->
    {view name: int64 [B,77]}."""
    return {v.name: torch.stack([apply(v, {f: fields[f][j] for f in v.sources}, seed, epoch, int(i))
                                 for j, i in enumerate(indices)]) if len(indices) else
            fields[v.sources[0]][:0].clone() for v in text_views}
