"""Length bucketing across batches (--length-bucketing N): text tokens per batch with and without.

    .venv/bin/python bench/length_bucketing.py               # B=256, ~2 min on 2 shared cores
    .venv/bin/python bench/length_bucketing.py --batch-size 1024 --pools 0 8 32

Records get YFCC-like raw-text lengths (lognormal, median 15 tokens, 0.9% at 77) and caption
lengths of 10-25 tokens (bench/_texts.py). One epoch of --batches batches is formed as the torch
reader forms it (one seeded permutation; with N > 0 the reader's own ``bucketed_batches`` over
pools of N batches, sorted by ``sort_key``: raw length, then caption length). Per batch, the
tokens the text tower processes for raw text + caption, summed over both passes, under each of
alip.model.encode_text's paths:
  padded   every row 77 tokens (open_clip's encode_text)
  trim     B x the batch's longest text (one trimmed pass)
  grouped  length_groups(max_groups=4): rows x group length, the CPU/fp32 path
  packed   the sum of the lengths (the CUDA path; bucketing cannot change it)
Printed as the mean per batch and relative to the same path without bucketing. Then the length
index's cost: label reads of --index-records records in shards on local disk (uncached, then
from the cache), records/s.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _texts  # noqa: E402
from alip.data.bucketing import bucketed_batches, sort_key  # noqa: E402
from alip.data.lengths import length_index  # noqa: E402
from alip.data.recordio import RecordReader, RecordWriter, pack_fields  # noqa: E402
from alip.model import length_groups  # noqa: E402


def epoch_batches(key, batch_size, pool_batches, seed=0):
    idx = np.random.default_rng([seed, 0]).permutation(len(key))
    if not pool_batches:
        return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return bucketed_batches(idx, key, batch_size, pool_batches, seed, 0)


def tokens(lengths, path):
    if path == "padded":
        return len(lengths) * _texts.CONTEXT
    if path == "trim":
        return len(lengths) * int(lengths.max())
    if path == "grouped":
        return sum(len(rows) * length for rows, length in length_groups(torch.as_tensor(lengths), 4))
    return int(lengths.sum())


def index_rate(n, per_shard=5000):
    """(uncached, cached) records/s of length_index over n records of 2 fields, tiny JPEGs."""
    with tempfile.TemporaryDirectory() as root:
        os.environ["ALIP_CACHE_DIR"] = os.path.join(root, "cache")
        rng, jpeg = np.random.default_rng(0), bytes(2000)
        readers = []
        for s in range(0, n, per_shard):
            stem = os.path.join(root, f"train-{s // per_shard:05d}")
            with RecordWriter(stem + ".rec", stem + ".idx") as w:
                for i in range(s, min(n, s + per_shard)):
                    w.write_payload(i, pack_fields(i, rng.integers(0, 49408, (2, 77)), jpeg))
            readers.append(RecordReader(stem + ".rec"))
        rates = []
        for _ in range(2):
            t0 = time.perf_counter()
            length_index(readers, 2)
            rates.append(n / (time.perf_counter() - t0))
        return rates


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=1024, help="batches in the epoch")
    p.add_argument("--pools", type=int, nargs="+", default=[0, 2, 4, 8, 16, 32, 64],
                   help="--length-bucketing values (0: off)")
    p.add_argument("--index-records", type=int, default=50000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    B, n = args.batch_size, args.batch_size * args.batches
    gen = torch.Generator().manual_seed(args.seed)
    raw = _texts.lengths("yfcc", n, gen).numpy()
    cap = _texts.lengths("caption", n, gen).numpy()
    key = sort_key(np.stack([raw, cap], 1))
    paths = ("padded", "trim", "grouped", "packed")
    print(f"B={B}, {args.batches} batches, YFCC-like raw + 10-25 token captions: "
          f"text tokens per batch (raw + caption), mean; (x) = relative to off")
    print(f"{'N':>5} " + " ".join(f"{p:>16}" for p in paths) + "   raw spread")
    base = None
    for N in args.pools:
        batches = epoch_batches(key, B, N, args.seed)
        mean = {p: np.mean([tokens(raw[b], p) + tokens(cap[b], p) for b in batches]) for p in paths}
        spread = np.mean([raw[b].max() - raw[b].min() for b in batches])
        base = base or mean
        print(f"{N or 'off':>5} " + " ".join(f"{mean[p]:>8.0f} ({mean[p] / base[p]:.2f})" for p in paths)
              + f"   {spread:6.1f}")
        print(f"  N={N}", file=sys.stderr, flush=True)
    if args.index_records:
        cold, warm = index_rate(args.index_records)
        print(f"length index over {args.index_records} records: {cold:,.0f} records/s from the "
              f"shards (page cache warm), {warm:,.0f} records/s from the cache")


if __name__ == "__main__":
    main()
