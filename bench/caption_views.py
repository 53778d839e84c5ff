"""Caption lengths each CLIPS token-reduction strategy produces on the demo world's synthetic
captions (alip.text_views), against the full captions: what --caption-view/--caption-tokens feed
the text tower.

    .venv/bin/python bench/caption_views.py [--world demo_output/world] [--k 4 8 16]

Prints, per strategy and K, the mean / median / max caption tokens (between SOT and EOT) and the
share of captions the view shortened. Generates a small world in a temp dir when none is given.
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alip.text_views import STRATEGIES, reduce_tokens  # noqa: E402


def lengths(tokens):
    return ((tokens == 49407).int().argmax(dim=1) - 1).tolist()  # tokens between SOT and EOT


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", default=None)
    p.add_argument("--k", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--rows", type=int, default=2000)
    args = p.parse_args(argv)
    world = args.world
    if world is None:
        from alip.data import demo_world
        world = tempfile.mkdtemp()
        demo_world.generate(world, num_train=args.rows, num_test=1, classify_train_per_class=0,
                            classify_val_per_class=1, shards=False, progress=False, overwrite=True)
    rows = [json.loads(x) for x in (Path(world) / "raw" / "train.jsonl").read_text().splitlines()]
    caps = open_clip.tokenize([r["caption"] for r in rows[:args.rows]])
    full = lengths(caps)
    print(f"{len(full)} demo-world captions: full length mean {statistics.mean(full):.1f}, "
          f"median {statistics.median(full)}, max {max(full)} tokens")
    print(f"{'strategy':<12}{'K':>4}{'mean':>7}{'median':>8}{'max':>5}{'shortened':>11}")
    for k in args.k:
        for s in STRATEGIES:
            out = lengths(reduce_tokens(caps, s, k, list(range(len(caps)))))
            cut = sum(a < b for a, b in zip(out, full)) / len(full)
            print(f"{s:<12}{k:>4}{statistics.mean(out):>7.1f}{statistics.median(out):>8}"
                  f"{max(out):>5}{100 * cut:>10.0f}%")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
