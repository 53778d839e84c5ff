"""Cost of multi-view batches (DataSpec) per core, and the DALI text-view pool's overlap.

    .venv/bin/python bench/views.py                      # 512 images of 500x375, 224 px views

1. Image views: one epoch per reader on ONE core (torch workers=0, DALI CPU 1 thread), 1 view
   (slip_base) vs 3 views (SLIP: slip_base + 2 simclr) from the same shards, interleaved in
   rounds; records per CPU-second and the 3-view / 1-view CPU-time ratio.
2. Text views beside DALI: a dummy transform that sleeps --text-ms per sample (GIL released,
   like a C tokenizer) on a 1-view DALI CPU loader, with a consumer that "trains" --step-ms per
   batch. Wall time per batch without the text view, with it, and the serial cost B * text-ms:
   with the pool running one batch ahead the text view adds little to the batch time.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alip.data import text_views  # noqa: E402
from alip.data.loader import build_train_loader  # noqa: E402
from alip.data.spec import DataSpec, ImageView, TextView  # noqa: E402
from bench.reader import make_data, time_data2rec  # noqa: E402

ONE = DataSpec(image_views=(ImageView("image", "slip_base"),), text_fields=("raw",))
SLIP = DataSpec(image_views=(ImageView("image", "slip_base"), ImageView("aug1", "simclr"),
                             ImageView("aug2", "simclr")), text_fields=("raw",))


def cpu_epoch(loader, epoch):
    loader.set_epoch(epoch)
    n, c = 0, time.process_time()
    for batch in loader:
        n += len(batch["raw"])
    return n, time.process_time() - c


def wall_per_batch(loader, epoch, step_s, serial_views=()):
    """Wall time per batch with a consumer step; serial_views: text views made in the consumer's
    thread after each batch (what the pool saves)."""
    loader.set_epoch(epoch)
    t, n = time.perf_counter(), 0
    for batch in loader:
        if serial_views:
            text_views.apply_batch(serial_views, batch, 0, epoch, range(len(batch["raw"])))
        time.sleep(step_s)  # the consumer's training step
        n += 1
    return (time.perf_counter() - t) / n


def image_views(rec, args, kw):
    loaders = {(b, v): build_train_loader(rec, backend=b, workers=0 if b == "torch" else 1,
                                          spec=spec, **kw)
               for b in ("torch", "dali") for v, spec in ((1, ONE), (3, SLIP))}
    for loader in loaders.values():
        cpu_epoch(loader, 0)  # warm-up
    cpu = {k: [] for k in loaders}
    for r in range(args.rounds):
        for k, loader in loaders.items():
            n, c = cpu_epoch(loader, r + 1)
            assert n == args.images
            cpu[k].append(c)
    print(f"image views, {args.images} records {args.src_size[0]}x{args.src_size[1]} -> {args.size}px, "
          f"batch {args.batch_size}, one core, median of {args.rounds}:")
    for b in ("torch", "dali"):
        one, three = statistics.median(cpu[(b, 1)]), statistics.median(cpu[(b, 3)])
        print(f"  {b:6s} 1 view {args.images / one:6.0f} rec/s/core ({1000 * one / args.images * args.batch_size:6.0f} ms/batch)"
              f" | 3 views {args.images / three:6.0f} rec/s/core ({1000 * three / args.images * args.batch_size:6.0f} ms/batch)"
              f" | 3/1 = {three / one:.2f}")


def text_view_overlap(rec, args, kw):
    def slow(tokens, rng):
        time.sleep(args.text_ms / 1000)
        return tokens.clone()

    text_views.register("bench_sleep", slow)
    slow_view = (TextView("t", "raw", "bench_sleep"),)
    specs = {"no text view": ONE, "serial in loop": ONE}
    for name, fn in (("identity view", "identity"), ("slow view (pool)", "bench_sleep")):
        specs[name] = DataSpec(image_views=ONE.image_views, text_fields=("raw",),
                               text_views=(TextView("t", "raw", fn),))
    dali = {name: build_train_loader(rec, backend="dali", workers=1, spec=spec, **kw)
            for name, spec in specs.items()}
    for loader in dali.values():
        loader.text_threads = args.text_threads
        wall_per_batch(loader, 0, 0)
    walls = {k: [] for k in dali}
    for r in range(args.rounds):
        for k, loader in dali.items():
            walls[k].append(wall_per_batch(loader, r + 1, args.step_ms / 1000,
                                           slow_view if k == "serial in loop" else ()))
    print(f"DALI CPU + text view sleeping {args.text_ms} ms/sample ({args.batch_size * args.text_ms:.0f} ms/batch "
          f"serial), {args.text_threads} pool threads, consumer step {args.step_ms} ms:")
    for k, w in walls.items():
        print(f"  {k:22s} {1000 * statistics.median(w):7.1f} ms/batch wall")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--src-size", type=int, nargs=2, default=(500, 375))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--text-ms", type=float, default=1.0)
    p.add_argument("--step-ms", type=float, default=150.0)
    p.add_argument("--text-threads", type=int, default=4)
    p.add_argument("--skip-images", action="store_true", help="only the text-view measurement")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        make_data(root, args.images, tuple(args.src_size))
        rec, _, _ = time_data2rec(root, 1)
        kw = dict(batch_size=args.batch_size, image_size=args.size, drop_last=False)
        if not args.skip_images:
            image_views(rec, args, kw)
        text_view_overlap(rec, args, kw)


if __name__ == "__main__":
    main()
