"""Text views: named token transforms applied per sample on the CPU beside the readers.

A transform is ``fn(tokens_row: LongTensor[W], rng: random.Random, **options) -> LongTensor[W']``
(it must not modify its input): it gets the source field's full row, whatever its width W (a
200-token caption stored 256 wide reaches it whole), and returns a row of the view's width W'
(``TextView.width`` capped at W, passed to it as ``width=``; a view without one: W' = W). A view over several sources of
different widths gets its row zero-padded to the widest of them, so its batch stacks. ``TextView.transform`` names it: a built-in of ``TRANSFORMS``
(``identity``) or an import path ``"package.module:function"`` (CLIPS' ``alip.text_views:reduce_row``,
DeCLIP's ``alip.text_aug:eda_tokens``), imported where it is first used, so a method names its
transform without registering anything into this module, and a spawned reader worker finds it
without the method having been imported there. Each sample's generator comes from (seed, epoch,
record index, view name), so a text view is the same whatever the backend, worker count or
resume point.
"""
import importlib
import random
import zlib

import torch

from .augment import _mix64
from .spec import DEFAULT_TEXT_FIELDS


def identity(tokens, rng):
    return tokens.clone()


TRANSFORMS = {"identity": identity}


def transform_fn(name):
    """The function a ``TextView.transform`` names: a built-in, or ``module:function`` imported
    (once; Python caches modules). Raises ValueError naming what is wrong."""
    if name in TRANSFORMS:
        return TRANSFORMS[name]
    module, _, attr = str(name).partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr) if module and attr else None
    except (ImportError, AttributeError):
        fn = None
    if not callable(fn):
        raise ValueError(f"unknown transform {name!r}: expected one of {sorted(TRANSFORMS)} or an "
                         f"import path 'package.module:function'")
    return fn


def text_rng(seed, epoch, index, name):
    """The generator of one sample's text view ``name``."""
    x = _mix64(_mix64(_mix64(_mix64(int(seed)) ^ int(epoch)) ^ int(index)) ^ zlib.crc32(name.encode()))
    return random.Random(x)


def check(text_views, fields=DEFAULT_TEXT_FIELDS):
    """Fail before any data is read if a view names an unknown transform or a source field not in
    ``fields`` (the fields the data has)."""
    for v in text_views:
        try:
            transform_fn(v.transform)
        except ValueError as e:
            raise ValueError(f"text view {v.name!r}: {e}") from None
        for f in v.sources:
            if f not in fields:
                raise ValueError(f"text view {v.name!r}: unknown source field {f!r}; "
                                 f"the data has {list(fields)}")


DRAWN = "@field"  # batch key suffix of the drawn fields' indices (a name no field can have)


def source_index(view, seed, epoch, index):
    """Which of ``view``'s sources one sample reads (0 for a single source): drawn from
    (seed, epoch, record index, the sources) by ``text_rng``: without ``view.probs``
    ``randrange(n)`` (uniform), with them the first field k whose cumulative probability
    p_0 + ... + p_k exceeds ``random()`` (the last field of nonzero probability if rounding
    leaves none). So every view over the same sources reads the same field of a sample (a
    caption and its partial view stay one caption)."""
    sources = view.sources
    if len(sources) == 1:
        return 0
    rng = text_rng(seed, epoch, index, "pick:" + ",".join(sources))
    if view.probs is None:
        return rng.randrange(len(sources))
    u, total = rng.random(), 0.0
    for k, p in enumerate(view.probs):
        total += p
        if u < total:
            return k
    return max(k for k, p in enumerate(view.probs) if p > 0)


def pick_source(view, seed, epoch, index):
    """The field ``view`` reads for one sample (``source_index``)."""
    return view.sources[source_index(view, seed, epoch, index)]


def drawn_views(text_views):
    """{batch key: view} of the draws a loader reports: one per distinct (sources, probs) of
    several sources, keyed ``<first such view's name>@field``; its value in a batch is an int64
    [B] tensor of the index (in ``view.sources``) of the field each sample read."""
    out, seen = {}, set()
    for v in text_views:
        if len(v.sources) > 1 and (v.sources, v.probs) not in seen:
            seen.add((v.sources, v.probs))
            out[v.name + DRAWN] = v
    return out


def draws(text_views, seed, epoch, index):
    """One sample's entries of the ``drawn_views`` keys: {key: int64 0-dim tensor}."""
    return {k: torch.tensor(source_index(v, seed, epoch, index), dtype=torch.int64)
            for k, v in drawn_views(text_views).items()}


def source_width(view, widths):
    """The width of the rows ``view``'s transform gets: the widest of its sources'."""
    return max(widths[f] for f in view.sources)


def view_width(view, wide):
    """The width of ``view``'s rows over sources ``wide`` tokens wide: its declared width, at
    most ``wide`` (CLIPS' 77-wide view of a 64-wide SigLIP caption is 64 wide); else ``wide``."""
    return min(view.width, wide) if view.width else wide


def apply(view, fields, seed, epoch, index):
    """One text view of one sample: its fields {name: LongTensor[W_name]} -> LongTensor[W_view]
    (``view_width``)."""
    tokens = fields[pick_source(view, seed, epoch, index)]
    wide = source_width(view, {f: fields[f].shape[-1] for f in view.sources})
    if tokens.shape[-1] < wide:
        tokens = torch.nn.functional.pad(tokens, (0, wide - tokens.shape[-1]))
    width = view_width(view, wide)
    options = dict(view.options, **({"width": width} if view.width else {}))
    out = transform_fn(view.transform)(tokens, text_rng(seed, epoch, index, view.name), **options)
    want = (width,)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        raise ValueError(f"text view {view.name!r}: transform {view.transform!r} returned "
                         f"{getattr(out, 'shape', type(out))}, expected a tensor of shape {want}")
    return out.to(torch.int64)


def apply_batch(text_views, fields, seed, epoch, indices):
    """Every text view of a batch: fields {name: int64 [B, W_name]} + record indices ->
    {view name: int64 [B, W_view]}, and the ``drawn_views`` keys: {key: int64 [B]}."""
    out = {v.name: torch.stack([apply(v, {f: fields[f][j] for f in v.sources}, seed, epoch, int(i))
                                for j, i in enumerate(indices)]) if len(indices) else
           torch.zeros((0, view_width(v, source_width(v, {f: fields[f].shape[-1] for f in v.sources}))),
                       dtype=torch.int64) for v in text_views}
    out.update((k, torch.tensor([source_index(v, seed, epoch, int(i)) for i in indices],
                                dtype=torch.int64))
               for k, v in drawn_views(text_views).items())
    return out


def batch_widths(spec, layout, widths):
    """{batch key: token width} of a loader's text entries: each text field as wide as the
    shards store it (``layout``/``widths``: the shards' field names and widths), each text view
    its ``view_width`` (what the model's text tower must hold)."""
    wide = dict(zip(layout, widths))
    out = {f: wide[f] for f in spec.text_fields}
    out.update((v.name, view_width(v, source_width(v, wide))) for v in spec.text_views)
    return out

