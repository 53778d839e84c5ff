"""Detailed, multi-sentence captions of demo-world scenes (the demo's long synthetic captions).

Long captions as ShareGPT4V- or DreamLIP-style captioners write them: a generic opening, the
main object and more words about it (its shape, colour and size put another way), then framing
that fits any picture (style, lighting, what is absent), and only then the secondary details:
where the object is, the second object and how it relates to the first, the background. A model
that reads a caption cut at 77 tokens sees the main object and the framing; the details that
tell two scenes with the same main object apart lie past the cut.

The layout is exact, in BPE tokens of open_clip's tokenizer (``[SOT, BPE..., EOT]``; a 77-token
row holds SOT, the first ``CUT`` = 75 BPE tokens and EOT):

* ``late`` captions (a share ``LATE_SHARE`` of them, drawn per caption): opening, main object
  and the words about it, then framing sentences until the prefix holds at least ``CUT``
  tokens, then the details (in a random order), then a closing remark until the caption holds
  at least ``MIN_TOKENS``. Every detail token is past the cut.
* ``early`` captions (the rest): opening, main object and every detail within the first ``CUT``
  tokens (the opening left out where they would not fit), then the words about the main
  object and framing until at least ``MIN_TOKENS``. A cut model sees all of them.

Every caption holds ``MIN_TOKENS``..``MAX_TOKENS`` BPE tokens (80-200 allowed; 83-134 drawn,
the cheaper end: the framing stops as soon as the layout holds). ``detailed(scene, rng)``
returns ``(text, info)``, ``info`` = {"late": bool, "detail_start": index of the first detail
token, "detail_end": one past the last, "tokens": the caption's BPE count}; the randomness is
``rng``'s alone.
"""
from functools import lru_cache

CUT = 75           # BPE tokens a 77-token row holds (SOT + 75 + EOT)
MIN_TOKENS = 80
MAX_TOKENS = 200
LATE_SHARE = 0.75  # captions whose details all lie past the cut

_OPENINGS = (
    "This image shows a simple scene.",
    "The picture is a plain, synthetic composition.",
    "Here is a detailed description of the image.",
    "The image presents a small digital drawing.",
    "This is a minimalist graphic made of flat shapes.",
    "The photo, if one can call it that, is a tiny computer-made picture.",
)
_FRAMING = (  # true of every demo scene: nothing here tells two scenes apart
    "It looks like a diagram or a page from a children's book about shapes, drawn without any shading.",
    "There are no people, animals, words, logos or watermarks anywhere in the picture.",
    "The picture is small and slightly grainy, with a faint speckle of noise over every part of it.",
    "The edges are a little soft, as happens when a tiny image is compressed and scaled up.",
    "The style is clean and geometric, and nothing in the frame suggests a real photograph.",
    "The lighting is completely even, with no shadows, highlights, reflections or gradients.",
    "At first glance the composition feels calm, orderly and deliberately uncluttered.",
    "Images like this are often used to test how well a system understands colours and forms.",
    "Every element is drawn as a solid block of colour with no outline, texture or pattern.",
    "The view is straight on and perfectly level, with no perspective or depth.",
    "Nothing is moving, blurred or partly hidden, and every element is fully inside the frame.",
    "The colours are bright and saturated, though each one varies a little from pixel to pixel.",
)
# What a captioner says about the main object before it moves on: its shape, colour and size in
# other words (the same facts the main sentence gives: visible to a 77-token tower, and not
# the details that tell two scenes with the same main object apart).
_SHAPE_WORDS = {
    "circle": "The circle is perfectly round, with a smooth curved edge and no corners at all.",
    "square": "The square has four straight sides of equal length and four sharp right-angled corners.",
    "triangle": "The triangle has three straight sides and three corners, with one point facing upwards.",
    "star": "The star has five pointed arms radiating out from its centre, like a classic drawn star.",
    "cross": "The cross is made of two thick bars of equal length that meet at right angles, like a plus sign.",
    "diamond": "The diamond is a square turned on one corner, with four points and four slanted sides.",
}
_COLOUR_WORDS = {
    "red": "a strong, warm red, like a ripe tomato", "orange": "a bright orange, like the peel of an orange",
    "yellow": "a sunny yellow, like a lemon", "green": "a fresh green, like spring leaves",
    "blue": "a deep blue, like a clear evening sky", "purple": "a rich purple, like a violet",
    "pink": "a soft pink, like candy floss",
}
_SIZE_WORDS = {"small": "is fairly small, covering only a modest part of the picture.",
               "large": "is large, spanning almost half the width of the picture."}
_CLOSINGS = (
    "Overall, the image is simple, clear and easy to describe.",
    "In short, it is a tidy, schematic picture with nothing else going on.",
    "The whole scene could be redrawn from this description alone.",
    "All in all, a calm and orderly little picture.",
)
_MAIN = (
    lambda o: f"The main element is {_full(o)}.",
    lambda o: f"The first thing one notices is {_full(o)}.",
    lambda o: f"It shows {_full(o)}, filled with solid {o.colour}.",
    lambda o: f"{_cap(_full(o))} stands out clearly.",
    lambda o: f"At its heart is {_full(o)}, drawn in {o.colour}.",
)
_COUNT = {1: ("There is exactly one shape in it.", "A single object is visible."),
          2: ("There are two shapes in it.", "Two separate objects are visible.")}
_BACKGROUND = (
    lambda bg: f"The background is a plain {bg} that fills the whole frame.",
    lambda bg: f"Behind everything the background is a flat, uniform {bg}.",
    lambda bg: f"All of this is set against a solid {bg} background.",
)
_POSITION = {
    "top": ("The shape is placed near the top of the image, with empty space below it.",
            "It sits in the upper part of the frame."),
    "middle": ("The shape sits right in the middle of the image, with empty space all around it.",
               "It is centred in the frame."),
    "bottom": ("The shape is placed near the bottom of the image, with empty space above it.",
               "It sits in the lower part of the frame."),
}


def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _full(o):
    return _a(f"{o.size} {o.colour} {o.shape}")


def _cap(s):
    return s[0].upper() + s[1:]


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


@lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer()


@lru_cache(maxsize=4096)
def bpe_len(text):
    """BPE tokens of ``text`` (open_clip's tokenizer, SOT and EOT not counted)."""
    return len(_tokenizer().encode(text))


def _second(a, b, layout, rng):
    """The sentence that places the second object relative to the first (a is described first)."""
    if layout == "vertical":  # a is objects[0] (upper) or objects[1] (lower): see detailed()
        where = _pick(rng, ("Below it, in the lower half of the image, there is",
                            "Underneath it there is")) if a.upper else \
            _pick(rng, ("Above it, in the upper half of the image, there is", "Over it there is"))
        rel = f"{where} {_full(b.obj)}"
    else:
        rel = _pick(rng, (f"Beside it, on the other side of the image, there is {_full(b.obj)}",
                          f"Next to it, at about the same height, there is {_full(b.obj)}"))
    if a.obj.size == b.obj.size:
        size = "and both shapes are about the same size"
    else:
        size = f"so the {b.obj.shape} is {'smaller' if b.obj.size == 'small' else 'larger'} than the {a.obj.shape}"
    return f"{rel}, {size}."


class _Placed:
    def __init__(self, obj, upper):
        self.obj, self.upper = obj, upper


def _details(scene, rng):
    """The sentences past the main object: position or second object, and background."""
    if len(scene.objects) == 1:
        first = _Placed(scene.objects[0], None)
        parts = [_pick(rng, _POSITION[scene.layout])]
    else:
        order = [0, 1] if rng.integers(2) else [1, 0]
        first, second = (_Placed(scene.objects[i], i == 0) for i in order)
        parts = [_second(first, second, scene.layout, rng)]
    parts.append(_pick(rng, _BACKGROUND)(scene.background))
    return first.obj, [parts[i] for i in rng.permutation(len(parts))]


def _fill(sentences, pool, rng, need):
    """Append sentences of ``pool`` (random order, no repeats) until ``need`` tokens are held."""
    for i in rng.permutation(len(pool)):
        if sum(map(bpe_len, sentences)) >= need:
            break
        sentences.append(pool[i])
    return sentences


def _about(o, rng):
    """The main object's shape, colour and size in other words, in a random order."""
    parts = [_SHAPE_WORDS[o.shape], f"The {o.shape}'s colour is {_COLOUR_WORDS[o.colour]}.",
             f"The {o.shape} {_SIZE_WORDS[o.size]}"]
    return [parts[i] for i in rng.permutation(len(parts))]


def detailed(scene, rng):
    """One detailed caption of ``scene`` -> (text, info); see the module docstring."""
    late = bool(rng.random() < LATE_SHARE)
    main, details = _details(scene, rng)
    head = [_pick(rng, _OPENINGS), _pick(rng, _COUNT[len(scene.objects)]),
            _pick(rng, _MAIN)(main)]
    about = _about(main, rng)
    if late:
        head = _fill(head + about, _FRAMING, rng, CUT)
    elif sum(map(bpe_len, head + details)) > CUT:  # an early caption's details must fit the cut
        head = head[1:]
    start = sum(map(bpe_len, head))
    end = start + sum(map(bpe_len, details))
    tail = [] if late else about
    tail = _fill(tail, _FRAMING if not late else _CLOSINGS, rng,
                 MIN_TOKENS - end) if end + sum(map(bpe_len, tail)) < MIN_TOKENS else tail
    text = " ".join(head + details + tail)
    info = {"late": late, "detail_start": start, "detail_end": end, "tokens": bpe_len(text)}
    return text, info
