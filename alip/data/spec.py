"""What a training method asks of the data: image views (each with an augmentation recipe) and
text fields / text views, named by the keys of the batch dict the loaders yield.

A loader built for a ``DataSpec`` yields dicts: one float32 ``[B, 3, S, S]`` tensor per image
view (``spec.image_views[i].name``), one int64 ``[B, W]`` token tensor per text field (W: the
field's width in the shards, 77 unless data2rec stored it wider; any name
the shards carry: ``"raw"``, ``"caption"``, RWKV-CLIP's ``"generated"``, ...; the loaders check
them against the shards at construction) and per text view (derived from a field by a named transform, e.g. an EDA copy of
the raw text). The first image view is the one the contrastive loss and evaluation see.
"""
from dataclasses import dataclass, field

RECIPES = ("reference", "slip_base", "mocov2", "simclr")
DEFAULT_TEXT_FIELDS = ("raw", "caption")  # ALIP's; the set of field names is open


def check_field_name(name, what="text field"):
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{what} {name!r}: expected a name like 'raw', 'caption' or 'generated'")


@dataclass(frozen=True)
class ImageView:
    """One augmented view of each image. Recipes (alip.data.augment):

    * ``reference`` -- ALIP's DALI pipeline: random area 0.7-1, aspect 0.8-1.25, squash resize,
      mirror p 0.5;
    * ``slip_base`` -- SLIP's CLIP view: RandomResizedCrop scale 0.5-1, no flip;
    * ``mocov2`` -- RandomResizedCrop 0.2-1, ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale
      p 0.2, Gaussian blur sigma 0.1-2 p 0.5, flip p 0.5 (DeCLIP's views, SLIP-in-DeCLIP's SSL views);
    * ``simclr`` -- as mocov2 with RandomResizedCrop 0.08-1 (official SLIP's SSL views).
    All normalise with CLIP's mean/std, as open_clip's evaluation transform does.
    """
    name: str = "image"
    recipe: str = "reference"

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"image view {self.name!r}: unknown recipe {self.recipe!r}; "
                             f"known: {RECIPES}")


@dataclass(frozen=True)
class TextView:
    """A token view derived from a text field on the CPU beside the reader (``transform``: a
    built-in name or a ``module:function`` path, ``alip.data.text_views.transform_fn``), seeded
    per sample. ``source``: a
    field name, or a tuple of them: each sample then reads one of them, drawn per sample and
    epoch (the same draw for every view over the same fields; ``text_views.pick_source``):
    uniformly, or with ``probs`` (one probability per source, summing to 1) when given.
    ``width``: the token width of the view's rows, at most the source's, passed to the transform
    as ``width=`` (CLIPS' reduced caption: 77 for a caption stored 77 or 256 wide, 64 for a
    64-wide one); 0: the source's width (sources of different widths: the widest, the narrower
    rows zero-padded to it)."""
    name: str
    source: object = "raw"  # str or tuple of str
    transform: str = "identity"
    options: tuple = ()  # (key, value) pairs for the transform
    probs: object = None  # None (uniform) or a tuple of floats, one per source
    width: int = 0

    def __post_init__(self):
        if self.probs is not None:
            object.__setattr__(self, "probs", tuple(float(p) for p in self.probs))
            why = probs_error(self.probs, len(self.sources))
            if why:
                raise ValueError(f"text view {self.name!r}: probabilities {self.probs}: {why}")

    @property
    def sources(self):
        return (self.source,) if isinstance(self.source, str) else tuple(self.source)


PROBS_TOLERANCE = 1e-6


def probs_error(probs, n):
    """Why ``probs`` (floats) are not the draw probabilities of ``n`` fields, or None."""
    if n < 2:
        return "probabilities need two or more fields to draw from"
    if len(probs) != n:
        return f"{len(probs)} probabilities for {n} fields"
    bad = [p for p in probs if not (p >= 0 and p != float("inf"))]  # NaN fails p >= 0
    if bad:
        return f"{bad[0]} is not a probability (a number >= 0)"
    if abs(sum(probs) - 1) > PROBS_TOLERANCE:
        return f"they sum to {sum(probs):.9g}, not 1"
    return None


@dataclass(frozen=True)
class DataSpec:
    image_views: tuple = (ImageView(),)
    text_fields: tuple = DEFAULT_TEXT_FIELDS
    text_views: tuple = field(default=())

    def __post_init__(self):
        if not self.image_views:
            raise ValueError("a DataSpec needs at least one image view")
        for f in self.text_fields:
            check_field_name(f)
        for v in self.text_views:
            if not v.sources:
                raise ValueError(f"text view {v.name!r}: no source field")
            for f in v.sources:
                check_field_name(f, f"text view {v.name!r}: source field")
            if isinstance(v.width, bool) or not isinstance(v.width, int) or v.width < 0:
                raise ValueError(f"text view {v.name!r}: width {v.width!r} is not a number of tokens "
                                 "(0: the source's width)")
        names = [v.name for v in self.image_views] + list(self.text_fields) + [
            v.name for v in self.text_views]
        if len(set(names)) != len(names):
            raise ValueError(f"batch keys must be unique, got {names}")

    @property
    def fields_read(self):
        """The text fields the loader reads: the asked-for fields and the text views' sources."""
        return tuple(dict.fromkeys(list(self.text_fields) + [f for v in self.text_views for f in v.sources]))

    @property
    def keys(self):
        return ([v.name for v in self.image_views] + list(self.text_fields)
                + [v.name for v in self.text_views])


def with_sources(spec, sources, probs=None):
    """``spec`` with batch key K read from the shard fields ``sources[K]`` (a tuple; several:
    one per sample, ``TextView.source``, drawn with the probabilities ``probs[K]`` if given,
    else uniformly) instead of the field K: a text field K becomes an identity view of them,
    and every view derived from K derives from them (drawing the same field per sample). A key
    the spec does not read is a ValueError."""
    probs = probs or {}
    for key, fields in sources.items():
        fields, p = tuple(fields), probs.get(key)
        if fields == (key,) and p is None:
            continue
        if key not in spec.fields_read:
            raise ValueError(f"reads no {key!r} text")
        views = tuple(TextView(v.name, fields if v.sources == (key,) else v.source, v.transform,
                               v.options, p if v.sources == (key,) else v.probs, v.width)
                      for v in spec.text_views)
        if key in spec.text_fields:
            views = (TextView(key, fields if len(fields) > 1 else fields[0], probs=p),) + views
        spec = DataSpec(spec.image_views, tuple(f for f in spec.text_fields if f != key), views)
    return spec


ALIP_DATA = DataSpec()          # keys image, raw, caption: the loaders' default
CLIP_DATA = DataSpec(text_fields=("raw",))
