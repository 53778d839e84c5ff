"""The reference (ALIP ``dali.py``) training augmentation, for the PyTorch reader.

random-area [0.7, 1.0] x aspect [0.8, 1.25] crop (100 attempts, then the centre crop torchvision
falls back to), squash resize to size x size (bilinear, antialiased), mirror with p 0.5, CLIP
mean/std, CHW float32. The randomness of a sample comes from its own generator, seeded by
(seed, epoch, record index), so a batch is the same whatever the worker count or resume point.
"""
import math
import random

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
