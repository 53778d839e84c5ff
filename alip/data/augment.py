"""The reference (ALIP ``dali.py``) training augmentation, for the PyTorch reader.

random-area [0.7, 1.0] x aspect [0.8, 1.25] crop (100 attempts, then the centre crop torchvision
falls back to), squash resize to size x size (bilinear, antialiased), mirror with p 0.5, CLIP
mean/std, CHW float32. The randomness of a sample comes from its own generator, seeded by
(seed, epoch, record index), so a batch is the same whatever the worker count or resume point.
"""
import math
import random
from dataclasses import dataclass, replace

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AREA = (0.7, 1.0)
ASPECT = (0.8, 1.25)


def _mix64(x):
    """splitmix64's finaliser: a well-spread 64-bit value from an integer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def sample_rng(seed, epoch, index):
    """The generator of one sample's augmentation: a function of (seed, epoch, index) only."""
    return random.Random(_mix64(_mix64(_mix64(int(seed)) ^ int(epoch)) ^ int(index)))


def view_rngs(seed, epoch, index, n):
    """One generator per image view of a sample: view 0 draws from ``sample_rng`` itself (so a
    single reference view reproduces ``train_transform`` bit for bit), view k > 0 from its own
    stream derived from (seed, epoch, index, k)."""
    base = _mix64(_mix64(_mix64(int(seed)) ^ int(epoch)) ^ int(index))
    return [random.Random(base) if k == 0 else random.Random(_mix64(base ^ _mix64(k + 0x5EED)))
            for k in range(n)]


def crop_params(rng, width, height, area=AREA, aspect=ASPECT, attempts=100):
    """(top, left, h, w) of a random-area/aspect crop, torchvision RandomResizedCrop's algorithm."""
    total = width * height
    log_ratio = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(attempts):
        target = total * rng.uniform(*area)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < aspect[0]:
        w, h = width, int(round(width / aspect[0]))
    elif in_ratio > aspect[1]:
        h, w = height, int(round(height * aspect[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _normalize(t):
    return F.normalize(F.to_dtype(t, torch.float32, scale=True), CLIP_MEAN, CLIP_STD)


def train_transform(img: Image.Image, size: int, rng) -> torch.Tensor:
    """A PIL image (not yet loaded is best: JPEGs are then decoded at reduced size when the crop
    allows it) -> float32 [3, size, size]."""
    width, height = img.size
    top, left, h, w = crop_params(rng, width, height)
    flip = rng.random() < 0.5
    if img.format == "JPEG" and min(h, w) >= 2 * size:
        # DCT-domain downscale by 1/2..1/8 keeping the crop >= size pixels: same output size,
        # a fraction of the decode time for large images.
        img.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
        sx, sy = img.size[0] / width, img.size[1] / height
        top, left = int(top * sy), int(left * sx)
        h, w = max(1, min(int(round(h * sy)), img.size[1] - top)), max(1, min(int(round(w * sx)), img.size[0] - left))
    t = F.pil_to_tensor(img if img.mode == "RGB" else img.convert("RGB"))
    t = F.resized_crop(t, top, left, h, w, [size, size], antialias=True)
    if flip:
        t = F.horizontal_flip(t)
    return _normalize(t)


def eval_transform(img: Image.Image, size: int) -> torch.Tensor:
    """No randomness: the whole image squashed to size x size (what the round-trip tests read)."""
    t = F.pil_to_tensor(img if img.mode == "RGB" else img.convert("RGB"))
    return _normalize(F.resize(t, [size, size], antialias=True))


# ---- multi-view recipes (alip.data.spec.RECIPES) --------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """One augmentation recipe: RandomResizedCrop(area, aspect), then with probability jitter_p
    ColorJitter(*jitter) (factors in a random order, as torchvision), grayscale with gray_p,
    Gaussian blur sigma ~ U(blur_sigma) in output pixels with blur_p, mirror with flip."""
    area: tuple
    aspect: tuple = (3 / 4, 4 / 3)
    attempts: int = 10
    flip: float = 0.0
    jitter: tuple = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue (torchvision's)
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)


_MOCOV2 = Recipe(area=(0.2, 1.0), flip=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2,
                 blur_p=0.5)
RECIPE_PARAMS = {
    "reference": Recipe(area=AREA, aspect=ASPECT, attempts=100, flip=0.5),
    "slip_base": Recipe(area=(0.5, 1.0)),
    "mocov2": _MOCOV2,
    "simclr": replace(_MOCOV2, area=(0.08, 1.0)),
}


@dataclass(frozen=True)
class ViewParams:
    """Every random choice of one view of one sample (what ``apply_view`` does, replayable)."""
    crop: tuple            # (top, left, h, w) in the full-resolution image
    flip: bool
    jitter: tuple = ()     # ((op name, factor), ...) in the order applied; () = no jitter
    gray: bool = False
    blur_sigma: float = 0.0  # 0 = no blur


def view_params(rng, recipe, width, height):
    """Draw one view's choices from its generator, in a fixed order (crop, flip, jitter, gray,
    blur); for ``reference`` the draws are exactly ``train_transform``'s."""
    r = RECIPE_PARAMS[recipe]
    crop = crop_params(rng, width, height, r.area, r.aspect, r.attempts)
    flip = rng.random() < r.flip
    jitter = ()
    if r.jitter_p and rng.random() < r.jitter_p:
        b, c, s, h = r.jitter
        ops = [("brightness", rng.uniform(1 - b, 1 + b)), ("contrast", rng.uniform(1 - c, 1 + c)),
               ("saturation", rng.uniform(1 - s, 1 + s)), ("hue", rng.uniform(-h, h))]
        rng.shuffle(ops)
        jitter = tuple(ops)
    gray = bool(r.gray_p) and rng.random() < r.gray_p
    sigma = rng.uniform(*r.blur_sigma) if r.blur_p and rng.random() < r.blur_p else 0.0
    return ViewParams(crop, flip, jitter, gray, sigma)


def decode_for_crops(img: Image.Image, size: int, crops):
    """Decode a PIL image ONCE for several crops -> (uint8 [3,H,W], crops in its pixels). A JPEG
    whose every crop is >= 2x the output is decoded at a reduced DCT scale (``draft``) that still
    gives each crop >= size pixels; with one crop this is exactly ``train_transform``'s decode."""
    width, height = img.size
    if img.format == "JPEG" and min(min(h, w) for _, _, h, w in crops) >= 2 * size:
        img.draft("RGB", (max(math.ceil(width * size / w) for _, _, _, w in crops),
                          max(math.ceil(height * size / h) for _, _, h, _ in crops)))
        sx, sy = img.size[0] / width, img.size[1] / height
        scaled = []
        for top, left, h, w in crops:
            top, left = int(top * sy), int(left * sx)
            scaled.append((top, left, max(1, min(int(round(h * sy)), img.size[1] - top)),
                           max(1, min(int(round(w * sx)), img.size[0] - left))))
        crops = scaled
    return F.pil_to_tensor(img if img.mode == "RGB" else img.convert("RGB")), list(crops)


_ADJUST = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast,
           "saturation": F.adjust_saturation, "hue": F.adjust_hue}


def blur_kernel(sigma, size):
    """DALI's gaussian_blur window for sigma (2*ceil(3 sigma)+1), capped so reflect padding fits."""
    return min(2 * math.ceil(3 * sigma) + 1, 2 * size - 1)


def apply_view(t: torch.Tensor, crop, size: int, p: ViewParams) -> torch.Tensor:
    """uint8 [3,H,W] + one view's choices -> float32 [3, size, size], CLIP-normalised."""
    top, left, h, w = crop
    t = F.resized_crop(t, top, left, h, w, [size, size], antialias=True)
    for op, factor in p.jitter:
        t = _ADJUST[op](t, factor)
    if p.gray:
        t = F.rgb_to_grayscale(t, num_output_channels=3)
    if p.blur_sigma:
        k = blur_kernel(p.blur_sigma, size)
        t = F.gaussian_blur(t, [k, k], [p.blur_sigma, p.blur_sigma])
    if p.flip:
        t = F.horizontal_flip(t)
    return _normalize(t)


def image_views(img: Image.Image, size: int, recipes, rngs):
    """All views of one sample from one decode: a list of float32 [3, size, size], one per recipe;
    ``rngs=None`` squashes the whole image for every view (``eval_transform``, for checks)."""
    if rngs is None:
        x = eval_transform(img, size)
        return [x] * len(recipes)
    params = [view_params(rng, r, *img.size) for r, rng in zip(recipes, rngs)]
    t, crops = decode_for_crops(img, size, [p.crop for p in params])
    return [apply_view(t, c, size, p) for c, p in zip(crops, params)]
