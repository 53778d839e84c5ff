"""Generate the demo world (alip/data/demo_world.py): train shards, retrieval and classify splits.

    python make_demo_data.py --out demo_output/world [--num-train 5000] [--num-test 500] [--seed 0]
"""
import argparse
import json
import sys
import time

from alip.data import demo_world as dw


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (must be empty or new)")
    p.add_argument("--num-train", type=int, default=5000, help="training scenes (default 5000)")
    p.add_argument("--num-test", type=int, default=500,
                   help="held-out retrieval images, 5 captions each (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="drawn image side in pixels")
    p.add_argument("--partial-rate", type=float, default=dw.DEFAULT_RATES["partial"],
                   help="share of web texts that are correct but incomplete")
    p.add_argument("--wrong-rate", type=float, default=dw.DEFAULT_RATES["wrong"],
                   help="share of web texts with one wrong colour or shape")
    p.add_argument("--mismatch-rate", type=float, default=dw.DEFAULT_RATES["mismatched"],
                   help="share of web texts about another scene or off topic")
    p.add_argument("--filler-rate", type=float, default=dw.DEFAULT_FILLER_RATE,
                   help="share of web texts with filler words added (independent of the above)")
    p.add_argument("--classify-train-per-class", type=int, default=50)
    p.add_argument("--classify-val-per-class", type=int, default=50)
    p.add_argument("--shard-size", type=int, default=1000, help="records per shard (data2rec)")
    p.add_argument("--workers", type=int, default=1, help="data2rec worker processes")
    p.add_argument("--no-shards", action="store_true", help="skip the data2rec step")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in --out")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    t0 = time.perf_counter()
    try:
        summary = dw.generate(
            a.out, num_train=a.num_train, num_test=a.num_test, seed=a.seed,
            image_size=a.image_size, partial_rate=a.partial_rate, wrong_rate=a.wrong_rate,
            mismatch_rate=a.mismatch_rate, filler_rate=a.filler_rate,
            classify_train_per_class=a.classify_train_per_class,
            classify_val_per_class=a.classify_val_per_class, shards=not a.no_shards,
            shard_size=a.shard_size, workers=a.workers, overwrite=a.overwrite)
    except (ValueError, RuntimeError) as e:
        print(f"make_demo_data.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a non-empty --out (FileExistsError), a file in its path, no permission, ...
        print(f"make_demo_data.py: error: {f'{e.filename}: {e.strerror}' if e.filename else e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("num_train", "num_test", "noise_counts",
                                              "filler_count", "train")}))
    print(f"demo world written to {a.out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
