"""What a rank pays before and during an epoch for the shards' index and the sample order, at scale.

    .venv/bin/python bench/reader_startup.py                       # 10M records (10 shards x 1M), 8 ranks
    .venv/bin/python bench/reader_startup.py --shards 50 --per-shard 2000000 --world-size 64

Writes sparse synthetic shards (each .idx a real text index, each .rec a sparse file whose last
record is real, so nothing but the index costs disk), then runs every side in a fresh process,
sides ABBA-interleaved over the repeats:
  index-lines      the .idx parsed a line at a time in Python (the torch reader's start-up did this
                   three times per rank before the index cache; still the error path)
  index-fast       read_index: numpy's C parser and the checks (what a cold cache costs once)
  index-cached     RecordReader over every shard with the index cache warm (every later start)
  order-permutation  numpy's permutation of all n records, this rank's W-th share of it (the
                   order up to 2**24 records; what every rank paid each epoch before)
  order-feistel    this rank's whole epoch of batches from the per-position order (alip.data.order)
Prints per side the median seconds, the peak RSS above the process's baseline, the private
(anonymous) memory it still holds at the end (what each rank and loader worker pays; a
memory-mapped index is shared page cache instead), and median [min-max] of the per-repeat time
ratios to each peer. One stderr line per repeat.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

SIDES = ("index-lines", "index-fast", "index-cached", "order-permutation", "order-feistel")
PEERS = {"index-fast": "index-lines", "index-cached": "index-lines", "order-feistel": "order-permutation"}
STRIDE = 110_000  # bytes between records: a ~100 KB JPEG each


def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def write_shards(out, shards, per_shard):
    from alip.data.recordio import frame, pack
    keys = np.arange(per_shard, dtype=np.int64)
    for s in range(shards):
        stem = os.path.join(out, f"train-{s:05d}")
        offsets = keys * STRIDE
        with open(stem + ".idx", "w") as f:
            for lo in range(0, per_shard, 1 << 20):
                rows = np.column_stack([keys[lo:lo + (1 << 20)] + s * per_shard, offsets[lo:lo + (1 << 20)]])
                f.write(("%d\t%d\n" * len(rows)) % tuple(rows.ravel().tolist()))
        last = frame(pack(int(keys[-1]) + s * per_shard, np.zeros(77), np.zeros(77), b"JPEG"))
        with open(stem + ".rec", "wb") as f:
            f.truncate(int(offsets[-1]))
            f.seek(int(offsets[-1]))
            f.write(last)
    return sorted(os.path.join(out, n) for n in os.listdir(out) if n.endswith(".rec"))


def child(side, recs, n, world_size, batch_size):
    """Run one side in this (fresh) process; print {seconds, peak_mb, held_mb} as JSON."""
    from alip.data import order as order_mod
    from alip.data.recordio import RecordReader, _read_index_lines, read_index
    from alip.data.torch_reader import rank_batches
    base, base_anon = status_kb("VmRSS"), status_kb("RssAnon")
    t0 = time.perf_counter()
    if side == "index-lines":
        held = [_read_index_lines(r[:-4] + ".idx", os.path.getsize(r)) for r in recs]
    elif side == "index-fast":
        held = [read_index(r[:-4] + ".idx", os.path.getsize(r)) for r in recs]
    elif side == "index-cached":
        held = [RecordReader(r) for r in recs]
    elif side == "order-permutation":
        held = np.random.default_rng([0, 0]).permutation(n)[0::world_size]
    else:
        order_mod.MATERIALISE_MAX = 0
        held = sum(len(b) for b in rank_batches(n, 0, 0, 0, world_size, batch_size, True))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_mb": (status_kb("VmHWM") - base) / 1024,
                      "held_mb": (status_kb("RssAnon") - base_anon) / 1024}))
    del held


def run_side(side, args, recs, env):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--world-size", str(args.world_size),
           "--batch-size", str(args.batch_size), "--n", str(args.shards * args.per_shard), *recs]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{side} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--per-shard", type=int, default=1_000_000)
    p.add_argument("--world-size", type=int, default=8, help="ranks sharing the epoch (order sides)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="where to write the synthetic shards (default: a temporary dir)")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("recs", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.recs, args.n, args.world_size, args.batch_size)

    n = args.shards * args.per_shard
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        shard_dir = os.path.join(tmp, "shards")
        os.makedirs(shard_dir)
        t0 = time.perf_counter()
        recs = write_shards(shard_dir, args.shards, args.per_shard)
        print(f"wrote {args.shards} sparse shards of {args.per_shard} records ({n / 1e6:g}M) in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        env = dict(os.environ, ALIP_CACHE_DIR=os.path.join(tmp, "cache"), OMP_NUM_THREADS="1")
        run_side("index-cached", args, recs, env)  # builds the cache the cached side then reads
        results = {s: [] for s in SIDES}
        for r in range(args.repeats):
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            for side in order:
                results[side].append(run_side(side, args, recs, env))
            print(f"repeat {r + 1}/{args.repeats}: " + "  ".join(
                f"{s} {results[s][-1]['seconds']:.2f}s" for s in SIDES), file=sys.stderr, flush=True)

    print(f"{n / 1e6:g}M records in {args.shards} shards; order sides: rank 0 of {args.world_size}, "
          f"batch {args.batch_size}; {args.repeats} repeats, each side in a fresh process")
    print(f"{'side':<18} {'s (median)':>10} {'peak MB':>9} {'held MB':>9}   time / peer")
    for side in SIDES:
        rows = results[side]
        med = statistics.median(x["seconds"] for x in rows)
        peak = statistics.median(x["peak_mb"] for x in rows)
        held = statistics.median(x["held_mb"] for x in rows)
        peer = PEERS.get(side)
        vs = ""
        if peer:
            ratios = [a["seconds"] / b["seconds"] for a, b in zip(rows, results[peer])]
            vs = f"{_timing.fmt(_timing.stats(ratios))} x {peer}"
        print(f"{side:<18} {med:>10.3f} {peak:>9.0f} {held:>9.0f}   {vs}")


if __name__ == "__main__":
    main()
