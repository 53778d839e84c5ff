"""Reader throughput per core: ALIP RecordIO shards (DALI CPU, PyTorch) vs loose JPEGs (ImageFolder).

    .venv/bin/python bench/reader.py                     # 1024 images of 500x375, 224 px output
    .venv/bin/python bench/reader.py --images 2000 --src-size 640 480 --rounds 5

Builds one synthetic image set (Pillow-drawn shapes + grain, JPEG q95), stores it twice: as an
ImageFolder tree of loose files and, through data2rec (timed: records/s per core), as RecordIO
shards. Then, interleaved in rounds in this one process, each reader runs one epoch with the
reference augmentation (random-area 0.7-1 / aspect 0.8-1.25 crop, squash to --size, flip, CLIP
normalisation) on ONE core:
  imagefolder  torchvision ImageFolder + v2 RandomResizedCrop/flip/normalise, workers=0
  torch-rec    build_train_loader(backend="torch", workers=0)
  dali-rec     build_train_loader(backend="dali", device="cpu", workers=1 thread)
Per-core rate = records / CPU seconds of this process (all its threads), so a reader's helper
threads are charged to it. Rounds alternate the reader order (ABBA); prints the median rates
and median [min-max] of the per-round ratio to imagefolder; one stderr line per round.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
import data2rec  # noqa: E402
from alip.data.augment import AREA, ASPECT, CLIP_MEAN, CLIP_STD  # noqa: E402
from alip.data.loader import build_train_loader  # noqa: E402


def draw(i, size, rng):
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    w, h = size
    for _ in range(12):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = (int(x0), int(y0), int(x0 + rng.integers(10, w // 2)), int(y0 + rng.integers(10, h // 2)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
    arr = np.asarray(img, np.int16) + rng.integers(-12, 13, (h, w, 3))  # grain, like a photo's
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_data(root, n, size):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "folder", "all"))
    with open(os.path.join(root, "manifest.jsonl"), "w") as f:
        for i in range(n):
            name = f"folder/all/{i:06d}.jpg"
            draw(i, size, rng).save(os.path.join(root, name), quality=95)
            f.write(f'{{"image": "{name}", "text": "web text {i}", "caption": "a caption of image {i}"}}\n')


def time_data2rec(root, workers, max_size=0):
    out = os.path.join(root, f"rec-w{workers}")
    t0 = os.times()
    rc = data2rec.main(["--manifest", os.path.join(root, "manifest.jsonl"), "--image-root", root,
                        "--output-dir", out, "--shard-size", "256", "--workers", str(workers),
                        "--no-progress"] + (["--max-size", str(max_size)] if max_size else []))
    assert rc == 0
    t1 = os.times()
    cpu = sum(t1[:4]) - sum(t0[:4])  # this process + its (joined) worker processes
    return out, cpu, t1.elapsed - t0.elapsed


def imagefolder_loader(root, size, batch_size):
    import torchvision
    from torchvision.transforms import v2
    tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, scale=AREA, ratio=ASPECT, antialias=True),
                     v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(CLIP_MEAN, CLIP_STD)])
    ds = torchvision.datasets.ImageFolder(os.path.join(root, "folder"), transform=tf)
    return AsDicts(torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0,
                                               drop_last=False))


class AsDicts:
    """torchvision's (images, labels) batches as {"image", "label"} dicts, the readers' form."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return ({"image": images, "label": labels} for images, labels in self.loader)


def run_epoch(loader, epoch):
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    n = 0
    c, t = time.process_time(), time.perf_counter()
    for batch in loader:
        n += len(batch["image"])
    return n, time.process_time() - c, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--src-size", type=int, nargs=2, default=(500, 375))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="data2rec workers for the second timing")
    p.add_argument("--max-size", type=int, default=0, help="data2rec --max-size")
    args = p.parse_args()
    _timing.setup(1)
    with tempfile.TemporaryDirectory() as root:
        make_data(root, args.images, tuple(args.src_size))
        for w in (1, args.workers):
            rec, cpu, wall = time_data2rec(root, w, args.max_size)
            print(f"data2rec --workers {w} (re-encode q95{f', --max-size {args.max_size}' if args.max_size else ''}): "
                  f"{args.images / cpu:.0f} rec/s per core (CPU time, all processes), {args.images / wall:.0f} rec/s wall")
        loaders = {
            "imagefolder": imagefolder_loader(root, args.size, args.batch_size),
            "torch-rec": build_train_loader(rec, backend="torch", batch_size=args.batch_size,
                                            image_size=args.size, workers=0, drop_last=False),
            "dali-rec": build_train_loader(rec, backend="dali", batch_size=args.batch_size,
                                           image_size=args.size, workers=1, device="cpu", drop_last=False),
        }
        for name, loader in loaders.items():  # warm-up: imports, first pipeline build, page cache
            run_epoch(loader, 0)
        per_core = {k: [] for k in loaders}
        wall = {k: [] for k in loaders}
        names = list(loaders)
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                n, cpu, w = run_epoch(loaders[name], r + 1)
                assert n == args.images, (name, n)
                per_core[name].append(n / cpu)
                wall[name].append(n / w)
            print(f"[readers] round {r + 1}/{args.rounds}: " + "  ".join(
                f"{k} {per_core[k][-1]:.0f} rec/s/core" for k in names), file=sys.stderr, flush=True)
        # ratio of rates = inverse ratio of CPU seconds per record, per round
        cost = {k: [1 / x for x in v] for k, v in per_core.items()}
        print(f"readers, {args.images} records -> {args.size}px, batch {args.batch_size}, "
              f"{args.rounds} ABBA-interleaved epochs (median [min-max]):")
        print(f"  {'reader':12s} {'rec/s/core':>10s} {'rec/s wall':>10s}   x imagefolder")
        for name in names:
            print(f"  {name:12s} {_timing.stats(per_core[name])[0]:10.0f} "
                  f"{_timing.stats(wall[name])[0]:10.0f}   {_timing.fmt(_timing.ratio(cost, 'imagefolder', name))}")

if __name__ == "__main__":
    main()
