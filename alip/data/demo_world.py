"""The demo world: Pillow-drawn scenes with a correct synthetic caption and a noisy "web" text.

A scene is one or two coloured shapes on a plain background. Each training scene carries

* a synthetic caption that describes it correctly (the role OFA captions play for ALIP), and
* a web text that is noisy the way alt-text is. Every training row gets exactly one noise kind:
  ``clean`` (a full description, in keyword/alt-text style), ``partial`` (correct but missing
  attributes), ``wrong`` (one colour or shape is wrong) or ``mismatched`` (about another scene,
  or about something else entirely); independently, filler words ("stock photo", "IMG_4821")
  are added to a share of them. The share of each kind is exact (counts are rounded from the
  rates and assigned by a seeded permutation), and each manifest row records its kind, so an
  analysis can check that ALIP's gates give mismatched pairs lower weight.

``generate(out_dir, ...)`` writes, under ``out_dir``::

    raw/images/*.jpg, raw/train.jsonl          training scenes + manifest (image, text, caption,
                                               key, noise, noise_detail, filler, scene, detailed,
                                               detailed77, detailed_late)
    shards/                                    the same rows as RecordIO shards (data2rec.py;
                                               fields raw, caption, detailed:256, detailed77:77)
    retrieval/dataset_demo.json, retrieval/images/*.jpg
                                               held-out scenes in COCO-Karpathy json layout, 5
                                               correct, differently phrased captions per image
    retrieval/dataset_demo_long.json           the same images, one detailed caption each
                                               (alip/data/demo_detailed.py: 83-134 tokens)
    classify/{train,val}/<colour>/*.png        single-object scenes, torchvision ImageFolder layout
    classify/classnames.txt, classify/templates.txt
    demo_world.json                            counts, rates, seed (what ``generate`` returns)

Everything is a pure function of the arguments: each scene is drawn from its own
``numpy.random.default_rng((seed, split, index))`` stream, so a seed gives byte-identical files.
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import demo_detailed

VERSION = 4  # 2: larger objects (RADIUS); 3: zero-shot classes are the object's colour;
# 4: detailed captions (field "detailed", 80-200 tokens) and the long-text retrieval split

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {  # name -> base RGB; each drawn object jitters every channel by up to +-JITTER
    "red": (215, 35, 35), "orange": (245, 140, 20), "yellow": (240, 220, 30),
    "green": (40, 170, 60), "blue": (40, 80, 220), "purple": (135, 50, 190),
    "pink": (245, 120, 185),
}
BACKGROUNDS = {"white": (235, 235, 235), "black": (25, 25, 25), "gray": (128, 128, 128)}
SIZES = ("small", "large")
POSITIONS = ("top", "middle", "bottom")  # single-object scenes; vertical only: the training
# augmentation mirrors images left-right, so "left"/"right" would be label noise we did not ask for
JITTER = 25
# Object radius as a share of the image side. At the demo models' 32 px a small object spans
# 8-10 px (1-2 patches of 8 px, 2-3 of 4 px), a large one 13-15 px: big enough that the shapes
# differ (at 0.09-0.12, version 1, a small star or cross was a 6-px blob). Two objects' centres
# are at least 0.48 apart, so even two large ones do not overlap.
RADIUS = {"small": (0.13, 0.16), "large": (0.20, 0.24)}
PIXEL_NOISE = 6.0

NOISE_KINDS = ("clean", "partial", "wrong", "mismatched")
DEFAULT_RATES = {"partial": 0.35, "wrong": 0.15, "mismatched": 0.25}  # clean = the rest (0.25)
DEFAULT_FILLER_RATE = 0.5

# Splits get separate random streams, so the retrieval and classification scenes are new draws.
# The detailed captions have streams of their own: adding them changed no image, web text or
# short caption (every other stream draws exactly what it drew in version 3).
_STREAM = {"train": 0, "test": 1, "classify_train": 2, "classify_val": 3,
           "train_detailed": 4, "test_detailed": 5}
DETAILED_FIELD, DETAILED_CONTEXT = "detailed", 256  # the shards' field and its stored width
# The same captions stored 77 wide (data2rec cuts them to SOT + their first 75 tokens + EOT), for
# a 77-token tower: `--caption-view truncate` of the 256-wide field gives the same rows, but a
# 77-position tower refuses shards whose caption field is 256 wide.
CUT_FIELD = "detailed77"


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple  # one or two Obj; for "vertical", objects[0] is the upper one
    layout: str     # "top" | "middle" | "bottom" (one object) | "vertical" | "horizontal"

    def to_json(self):
        return {"background": self.background, "layout": self.layout,
                "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size}
                            for o in self.objects]}


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def sample_scene(rng, num_objects=None):
    """A random scene; ``num_objects`` 1 or 2 (default: either, with equal chance)."""
    n = int(rng.integers(1, 3)) if num_objects is None else num_objects
    background = _pick(rng, tuple(BACKGROUNDS))
    colours = tuple(COLOURS)
    first = Obj(_pick(rng, SHAPES), _pick(rng, colours), _pick(rng, SIZES))
    if n == 1:
        return Scene(background, (first,), _pick(rng, POSITIONS))
    while True:  # two different-looking objects, so the texts can tell them apart
        second = Obj(_pick(rng, SHAPES), _pick(rng, colours), _pick(rng, SIZES))
        if (second.shape, second.colour) != (first.shape, first.colour):
            break
    return Scene(background, (first, second), _pick(rng, ("vertical", "horizontal")))


# ---------------------------------------------------------------------------------- drawing
def _shape_points(shape, cx, cy, r):
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + q * np.cos(a), cy - q * np.sin(a)) for q, a in zip(radii, angles)]
    if shape == "cross":
        t = 0.32 * r
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
                (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
                (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_object(draw, obj, cx, cy, r, rgb):
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif obj.shape == "square":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
    else:
        draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=rgb)


def _jitter(rng, rgb, amount):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def place(scene, rng):
    """[(cx, cy, r)] per object, as shares of the image side: centre and radius.

    Every shape lies inside the box of half-side r around its centre, the boxes stay inside the
    image, and two objects' boxes never overlap (their centres are >= 0.48 apart on one axis,
    at most the sum of two large radii).
    """
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    if len(scene.objects) == 1:
        cy = {"top": u(0.25, 0.32), "middle": u(0.44, 0.56), "bottom": u(0.68, 0.75)}[scene.layout]
        centres = [(u(0.3, 0.7), cy)]
    elif scene.layout == "vertical":
        centres = [(u(0.3, 0.7), u(0.24, 0.26)), (u(0.3, 0.7), u(0.74, 0.76))]
    else:  # horizontal: which object is on the left is random and never described
        left, right = (u(0.24, 0.26), u(0.35, 0.65)), (u(0.74, 0.76), u(0.35, 0.65))
        centres = [left, right] if rng.integers(2) else [right, left]
    return [(cx, cy, u(*RADIUS[obj.size])) for obj, (cx, cy) in zip(scene.objects, centres)]


def render(scene, rng, size=64):
    """The scene as an RGB ``PIL.Image`` of ``size`` x ``size`` pixels.

    Sizes, positions and colours are jittered and every pixel gets a little Gaussian noise, so
    no two renderings of the same description are alike.
    """
    img = Image.new("RGB", (size, size), _jitter(rng, BACKGROUNDS[scene.background], 10))
    draw = ImageDraw.Draw(img)
    for obj, (cx, cy, r) in zip(scene.objects, place(scene, rng)):
        _draw_object(draw, obj, cx * size, cy * size, r * size,
                     _jitter(rng, COLOURS[obj.colour], JITTER))
    pixels = np.asarray(img, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, PIXEL_NOISE, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------- captions
def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _full(o):
    return _a(f"{o.size} {o.colour} {o.shape}")


def _cs(o):
    return _a(f"{o.colour} {o.shape}")


_POSITION_PHRASES = {"top": ("at the top", "near the top", "in the upper part"),
                     "middle": ("in the middle", "in the center", "in the centre"),
                     "bottom": ("at the bottom", "near the bottom", "in the lower part")}

# Caption styles per layout: each a function (fields) -> str; all of them correct.
_SINGLE_STYLES = (
    lambda f: f"{f['O']} {f['pos']} on a {f['bg']} background",
    lambda f: f"a {f['bg']} background with {f['O']} {f['pos']}",
    lambda f: f"a picture of {f['O']} {f['pos']}",
    lambda f: f"{f['pos']} of the picture there is {f['O']}",
    lambda f: f"{_a(f['size'] + ' ' + f['shape'])} in {f['colour']} {f['pos']} on a {f['bg']} background",
    lambda f: f"{f['Ocs']} {f['pos']}",
    lambda f: f"{_a(f['size'] + ' ' + f['shape'])} coloured {f['colour']} sits {f['pos']} against a {f['bg']} background",
)
_VERTICAL_STYLES = (
    lambda f: f"{f['A']} above {f['B']} on a {f['bg']} background",
    lambda f: f"{f['B']} below {f['A']} on a {f['bg']} background",
    lambda f: f"a {f['bg']} background with {f['A']} at the top and {f['B']} at the bottom",
    lambda f: f"a picture of {f['A']} over {f['B']}",
    lambda f: f"there is {f['Acs']} and below it {f['Bcs']}",
    lambda f: f"{f['Bcs']} under {f['Acs']}",
    lambda f: f"{f['A']} sits above {f['B']} against a {f['bg']} background",
)
_HORIZONTAL_STYLES = (
    lambda f: f"{f['A']} next to {f['B']} on a {f['bg']} background",
    lambda f: f"a {f['bg']} background with {f['A']} and {f['B']} side by side",
    lambda f: f"a picture of {f['A']} beside {f['B']}",
    lambda f: f"there is {f['Acs']} and next to it {f['Bcs']}",
    lambda f: f"{f['Bcs']} next to {f['Acs']}",
    lambda f: f"two shapes side by side, {f['A']} and {f['B']}, against a {f['bg']} background",
    lambda f: f"{f['A']} and {f['B']} next to each other",
)


def _styles(scene):
    if len(scene.objects) == 1:
        return _SINGLE_STYLES
    return _VERTICAL_STYLES if scene.layout == "vertical" else _HORIZONTAL_STYLES


def _fields(scene, rng):
    f = {"bg": scene.background}
    if len(scene.objects) == 1:
        o = scene.objects[0]
        f.update(O=_full(o), Ocs=_cs(o), size=o.size, colour=o.colour, shape=o.shape,
                 pos=_pick(rng, _POSITION_PHRASES[scene.layout]))
    else:
        a, b = scene.objects
        if scene.layout == "horizontal" and rng.integers(2):
            a, b = b, a  # "next to" is symmetric: either may be named first
        f.update(A=_full(a), B=_full(b), Acs=_cs(a), Bcs=_cs(b))
    return f


def caption(scene, rng, style=None):
    """One correct description of ``scene`` (a random style unless ``style`` is given)."""
    styles = _styles(scene)
    i = int(rng.integers(len(styles))) if style is None else style
    return styles[i](_fields(scene, rng))


def captions(scene, rng, n=5):
    """``n`` correct descriptions of ``scene``, each in a different style."""
    styles = _styles(scene)
    if n > len(styles):
        raise ValueError(f"captions: at most {len(styles)} distinct styles, asked for {n}")
    return [styles[int(i)](_fields(scene, rng)) for i in rng.permutation(len(styles))[:n]]


# ---------------------------------------------------------------------------------- web text
_FILLERS = ("stock photo", "free download", "hd wallpaper", "clipart", "vector art", "image",
            "best quality", "new", "buy now", "#design", "#art", "royalty free",
            "high resolution", "click to enlarge", "via pinterest", "| shapes gallery",
            "- my blog", "IMG_{n}", "DSC{n}", "{year}")
_OFF_TOPIC = ("my holiday in {place}", "cheap {thing} for sale", "{name}'s birthday party",
              "recipe: {food} with garlic", "view from our hotel in {place}", "{thing} review",
              "untitled", "screenshot", "{name} and friends at the beach", "homemade {food}",
              "best {thing} of the year", "sunset over {place}")
_OFF_TOPIC_WORDS = {
    "place": ("paris", "rome", "tokyo", "lisbon", "cairo", "oslo", "lima", "denver"),
    "thing": ("laptops", "shoes", "bikes", "phones", "sofas", "watches", "tents", "cars"),
    "name": ("anna", "tom", "maria", "li", "omar", "kate", "juan", "sven"),
    "food": ("pasta", "curry", "pancakes", "soup", "tacos", "bread", "sushi", "pie"),
}


def _web_format(words, rng):
    """Alt-text-like rendering of a keyword list: plain, Title Case, a file name, or CSV."""
    k = int(rng.integers(4))
    if k == 0:
        return " ".join(words)
    if k == 1:
        return " ".join(w.capitalize() for w in " ".join(words).split())
    if k == 2:
        return "_".join(" ".join(words).split()) + _pick(rng, (".jpg", ".png", ".jpeg"))
    return ", ".join(words)


def _full_words(scene, rng):
    if len(scene.objects) == 1:
        o = scene.objects[0]
        return [o.size, o.colour, o.shape, scene.layout, scene.background, "background"]
    a, b = scene.objects
    if scene.layout == "vertical":
        rel = "above" if rng.integers(2) else "below"
        if rel == "below":
            a, b = b, a
    else:
        rel = "next to"
        if rng.integers(2):
            a, b = b, a
    return [a.size, a.colour, a.shape, rel, b.size, b.colour, b.shape,
            scene.background, "background"]


def _partial_words(scene, rng):
    """(words, kind): a correct but incomplete description."""
    if len(scene.objects) == 1:
        o = scene.objects[0]
        options = (("shape_only", [o.shape]), ("colour_shape", [o.colour, o.shape]),
                   ("colour_only", [o.colour, "shape"]), ("size_shape", [o.size, o.shape]),
                   ("no_background", [o.size, o.colour, o.shape, scene.layout]))
    else:
        a, b = scene.objects
        one = _pick(rng, (a, b))
        options = (("one_object", [one.colour, one.shape]),
                   ("one_object_full", [one.size, one.colour, one.shape]),
                   ("shapes_only", [a.shape, "and", b.shape]),
                   ("colours_only", [a.colour, "and", b.colour, "shapes"]))
    kind, words = options[int(rng.integers(len(options)))]
    return words, kind


def _wrong_scene(scene, rng):
    """(scene, attribute): ``scene`` with one object's colour or shape changed to another value."""
    objects = list(scene.objects)
    i = int(rng.integers(len(objects)))
    o = objects[i]
    attr = "colour" if rng.integers(2) else "shape"
    taken = {(p.shape, p.colour) for j, p in enumerate(objects) if j != i}
    if attr == "colour":
        choices = [c for c in COLOURS if c != o.colour and (o.shape, c) not in taken]
        objects[i] = Obj(o.shape, _pick(rng, choices), o.size)
    else:
        choices = [s for s in SHAPES if s != o.shape and (s, o.colour) not in taken]
        objects[i] = Obj(_pick(rng, choices), o.colour, o.size)
    return Scene(scene.background, tuple(objects), scene.layout), attr


def _off_topic(rng):
    template = _pick(rng, _OFF_TOPIC)
    return template.format(**{k: _pick(rng, v) for k, v in _OFF_TOPIC_WORDS.items()})


def _add_filler(text, rng):
    pieces = []
    for _ in range(int(rng.integers(1, 3))):
        p = _pick(rng, _FILLERS)
        pieces.append(p.format(n=int(rng.integers(1000, 10000)), year=int(rng.integers(2005, 2024))))
    if rng.integers(2):
        return " ".join(pieces + [text])
    return " ".join([text] + pieces)


def web_text(scene, noise, rng, filler=False):
    """(text, detail): web text of the given noise kind for ``scene``.

    ``detail`` says what exactly was done: for ``partial`` which attributes survived, for
    ``wrong`` which attribute was changed ("colour" or "shape"), for ``mismatched`` whether the
    text is about another scene ("other_scene") or off topic ("off_topic").
    """
    if noise == "clean":
        text, detail = _web_format(_full_words(scene, rng), rng), ""
    elif noise == "partial":
        words, detail = _partial_words(scene, rng)
        text = _web_format(words, rng)
    elif noise == "wrong":
        wrong, detail = _wrong_scene(scene, rng)
        text = _web_format(_full_words(wrong, rng), rng)
    elif noise == "mismatched":
        if rng.random() < 0.6:
            while True:
                other = sample_scene(rng)
                if {(o.shape, o.colour) for o in other.objects}.isdisjoint(
                        {(o.shape, o.colour) for o in scene.objects}):
                    break
            words = _full_words(other, rng) if rng.integers(2) else _partial_words(other, rng)[0]
            text, detail = _web_format(words, rng), "other_scene"
        else:
            text, detail = _off_topic(rng), "off_topic"
    else:
        raise ValueError(f"unknown noise kind {noise!r}; expected one of {NOISE_KINDS}")
    return (_add_filler(text, rng) if filler else text), detail


def _check_rates(rates, filler_rate):
    for name, r in list(rates.items()) + [("filler", filler_rate)]:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"demo world: --{name}-rate must be in [0, 1], got {r}")
    if sum(rates.values()) > 1.0 + 1e-9:
        raise ValueError(f"demo world: partial + wrong + mismatched rates must sum to <= 1, got "
                         f"{' + '.join(f'{v:g}' for v in rates.values())} = {sum(rates.values()):g}")


def assign_noise(num, rates, filler_rate, rng):
    """Per-row noise kind and filler flag: exact counts (rounded from the rates), seeded order."""
    counts = {k: int(round(rates[k] * num)) for k in ("partial", "wrong", "mismatched")}
    counts["clean"] = num - sum(counts.values())
    if counts["clean"] < 0:  # rounding pushed the total over: take the excess from the largest
        counts[max(rates, key=rates.get)] += counts["clean"]
        counts["clean"] = 0
    labels = np.array([k for k in NOISE_KINDS for _ in range(counts[k])], dtype=object)
    labels = labels[rng.permutation(num)]
    fill = np.zeros(num, dtype=bool)
    fill[: int(round(filler_rate * num))] = True
    return list(labels), list(fill[rng.permutation(num)])


# ---------------------------------------------------------------------------------- writers
def _save(img, path, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "JPEG":
        img.save(path, "JPEG", quality=95)
    else:
        img.save(path, "PNG", optimize=False)


def _rng(seed, split, index):
    return np.random.default_rng((seed, _STREAM[split], index))


def _write_train(root, num, seed, size, rates, filler_rate):
    noise, filler = assign_noise(num, rates, filler_rate, np.random.default_rng((seed, 99)))
    rows = []
    for i in range(num):
        rng = _rng(seed, "train", i)
        scene = sample_scene(rng)
        rel = f"images/{i:06d}.jpg"
        _save(render(scene, rng, size), root / rel, "JPEG")
        text, detail = web_text(scene, noise[i], rng, filler=bool(filler[i]))
        long, info = demo_detailed.detailed(scene, _rng(seed, "train_detailed", i))
        rows.append({"image": rel, "text": text, "caption": caption(scene, rng), "key": f"{i:06d}",
                     "noise": noise[i], "noise_detail": detail, "filler": bool(filler[i]),
                     "scene": scene.to_json(), DETAILED_FIELD: long, CUT_FIELD: long,
                     "detailed_late": info["late"]})
    with open(root / "train.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return rows


def _karpathy_image(i, name, texts, sentid):
    """One image entry of COCO-Karpathy layout (dataset_coco.json), split "test"."""
    sentences = [{"tokens": raw.replace(",", "").replace(".", "").split(), "raw": raw, "imgid": i,
                  "sentid": sentid + k} for k, raw in enumerate(texts)]
    return {"filepath": "images", "sentids": [s["sentid"] for s in sentences], "filename": name,
            "imgid": i, "split": "test", "sentences": sentences, "cocoid": i}


def _write_retrieval(root, num, seed, size):
    """The held-out scenes twice in COCO-Karpathy layout (same keys, same order): 5 short
    captions per image (dataset_demo.json) and ONE detailed caption per image
    (dataset_demo_long.json), as long-text retrieval sets have it (Urban1k, DCI): with five, an
    image would find one of its captions whose details happen to lie before the cut (a share
    1 - LATE_SHARE ** 5 of the images, 76%), and the cut would hardly cost image->text."""
    images, long_images = [], []
    for i in range(num):
        rng = _rng(seed, "test", i)
        scene = sample_scene(rng)
        name = f"demo_test_{i:06d}.jpg"
        _save(render(scene, rng, size), root / "images" / name, "JPEG")
        images.append(_karpathy_image(i, name, captions(scene, rng, 5), 5 * i))
        long, _ = demo_detailed.detailed(scene, _rng(seed, "test_detailed", i))
        long_images.append(_karpathy_image(i, name, [long], i))
    for file, entries in (("dataset_demo.json", images), ("dataset_demo_long.json", long_images)):
        with open(root / file, "w") as fh:
            json.dump({"images": entries, "dataset": "demo"}, fh)
    return images


# Zero-shot classes are the object's colour (7 classes). Version 2 asked for its shape: at the
# demo's budget (78 steps, 32 px) no method's image tower learns shape, not even as a linear
# probe (18-23% on 6 shapes), while a supervised 3-layer CNN reaches 96% on the same images: a
# from-scratch ViT picks up shape late, and in contrastive batches colour, background, position
# and size already tell most scenes apart. Prompt ensembling as CLIP does it: the class embedding
# is the mean over templates phrased like the captions, one per size and shape, so the nuisance
# attributes average out of it.
CLASSIFY_TEMPLATES = tuple(f"a picture of a {size} {{}} {shape}" for size in SIZES for shape in SHAPES)


def _write_classify(root, train_per_class, val_per_class, seed, size):
    """Single-object scenes, class = the object's colour, in torchvision ImageFolder layout."""
    classes = sorted(COLOURS)  # ImageFolder sorts class folders; classnames.txt follows it
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        stream = f"classify_{split}"
        for c, colour in enumerate(classes):
            for j in range(per_class):
                rng = _rng(seed, stream, c * 1_000_000 + j)
                scene = sample_scene(rng, num_objects=1)
                obj = scene.objects[0]
                scene = Scene(scene.background, (Obj(obj.shape, colour, obj.size),), scene.layout)
                _save(render(scene, rng, size), root / split / colour / f"{j:05d}.png", "PNG")
    (root / "classnames.txt").write_text("".join(c + "\n" for c in classes))
    (root / "templates.txt").write_text("".join(t + "\n" for t in CLASSIFY_TEMPLATES))
    return classes


def run_data2rec(argv):
    """data2rec.py's ``main(argv)``, from the library (no script imported through sys.path)."""
    from .cli import main
    return main(argv)


def _token_stats(texts):
    """{"min", "median", "max"} BPE tokens (open_clip's tokenizer, SOT and EOT not counted)."""
    n = np.array([demo_detailed.bpe_len(t) for t in texts])
    return {"min": int(n.min()), "median": float(np.median(n)), "max": int(n.max())}


OUTPUTS = ("raw", "shards", "retrieval", "classify", "demo_world.json")


def generate(out_dir, num_train=5000, num_test=500, seed=0, image_size=64,
             partial_rate=DEFAULT_RATES["partial"], wrong_rate=DEFAULT_RATES["wrong"],
             mismatch_rate=DEFAULT_RATES["mismatched"], filler_rate=DEFAULT_FILLER_RATE,
             classify_train_per_class=50, classify_val_per_class=50, shards=True,
             shard_size=1000, workers=1, overwrite=False, progress=True):
    """Write the demo world under ``out_dir`` (see the module docstring) and return its summary.

    Refuses a non-empty ``out_dir`` unless ``overwrite`` (which first removes the outputs of a
    previous run, so no stale file survives). ``shards=False`` skips the data2rec step. Record
    key k in the shards is line k of ``raw/train.jsonl`` (data2rec keys records by manifest row),
    which is how a record is traced back to its noise label.
    """
    out = Path(out_dir)
    rates = {"partial": partial_rate, "wrong": wrong_rate, "mismatched": mismatch_rate}
    _check_rates(rates, filler_rate)
    for name, v, lo in (("seed", seed, 0), ("num-train", num_train, 1), ("num-test", num_test, 1),
                        ("image-size", image_size, 16),
                        ("classify-train-per-class", classify_train_per_class, 0),
                        ("classify-val-per-class", classify_val_per_class, 1),
                        ("shard-size", shard_size, 1), ("workers", workers, 1)):
        if int(v) != v or v < lo:
            raise ValueError(f"demo world: --{name} must be an integer >= {lo}, got {v}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"demo world: --out {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"demo world: {out} is not empty; choose another --out or pass "
                                  "--overwrite (removes its raw/, shards/, retrieval/, classify/)")
        for name in OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    rows = _write_train(out / "raw", num_train, seed, image_size, rates, filler_rate)
    images = _write_retrieval(out / "retrieval", num_test, seed, image_size)
    classes = _write_classify(out / "classify", classify_train_per_class, classify_val_per_class,
                              seed, image_size)

    counts = {k: sum(r["noise"] == k for r in rows) for k in NOISE_KINDS}
    summary = {
        "version": VERSION, "seed": seed, "image_size": image_size,
        "num_train": num_train, "num_test": num_test,
        "noise_rates": {"clean": 1.0 - sum(rates.values()), **rates},
        "noise_counts": counts,
        "filler_rate": filler_rate, "filler_count": sum(r["filler"] for r in rows),
        "vocabulary": {"shapes": list(SHAPES), "colours": list(COLOURS),
                       "backgrounds": list(BACKGROUNDS), "sizes": list(SIZES)},
        "train": {"manifest": "raw/train.jsonl", "image_root": "raw", "shards": None},
        "retrieval": {"annotation": "retrieval/dataset_demo.json", "image_root": "retrieval",
                      "images": len(images), "captions": 5 * len(images),
                      "chance_r1_percent": 100.0 / len(images)},
        "retrieval_long": {"annotation": "retrieval/dataset_demo_long.json",
                           "image_root": "retrieval", "images": len(images),
                           "captions": len(images), "chance_r1_percent": 100.0 / len(images)},
        "detailed": {"field": DETAILED_FIELD, "context": DETAILED_CONTEXT, "cut_field": CUT_FIELD,
                     "tokens": _token_stats([r[DETAILED_FIELD] for r in rows]),
                     "late_share": demo_detailed.LATE_SHARE,
                     "late_count": sum(r["detailed_late"] for r in rows),
                     "cut": demo_detailed.CUT},
        "classify": {"root": "classify", "classes": classes,
                     "train_per_class": classify_train_per_class,
                     "val_per_class": classify_val_per_class,
                     "chance_top1_percent": 100.0 / len(classes)},
    }
    if shards:
        # Our JPEGs are RGB at quality 95 already: --copy-jpeg stores them byte for byte.
        argv = ["--manifest", str(out / "raw" / "train.jsonl"), "--image-root", str(out / "raw"),
                "--output-dir", str(out / "shards"), "--shard-size", str(shard_size),
                "--workers", str(workers), "--seed", str(seed), "--copy-jpeg",
                "--text-fields", f"raw,caption,{DETAILED_FIELD}:{DETAILED_CONTEXT},{CUT_FIELD}:77"]
        if not progress:
            argv.append("--no-progress")
        code = run_data2rec(argv)
        if code != 0:
            raise RuntimeError(f"demo world: data2rec exited with {code} (see "
                               f"{out / 'shards'}); command: data2rec.py {' '.join(argv)}")
        made = json.loads((out / "shards" / "manifest.json").read_text())
        if made["total_records"] != num_train or made["rejected"]:
            raise RuntimeError(f"demo world: data2rec wrote {made['total_records']} of {num_train} "
                               f"rows, rejected {made['rejected']} (see "
                               f"{out / 'shards' / 'rejects.jsonl'})")
        summary["train"]["shards"] = "shards"
        summary["train"]["num_shards"] = len(made["shards"])
    with open(out / "demo_world.json", "w") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    return summary
