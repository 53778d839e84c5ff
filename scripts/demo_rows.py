"""Train and evaluate the demo's rows in ONE Python process (scripts/demo.sh's loop).

Per row R (``configs/demo_R.yaml``) it runs what these three commands run, through the same
``main`` functions, and appends ``R<TAB>train seconds<TAB>eval seconds`` to OUT/timings.tsv:

    train.py --config configs/demo_R.yaml --train-data WORLD/shards --logs OUT/runs --name demo-R
    eval_retrieval.py --checkpoint LAST_EPOCH.pt --annotation ... --output OUT/retrieval_R.json
    eval_retrieval.py ... --annotation WORLD/retrieval/dataset_demo_long.json \
        --output OUT/retrieval_long_R.json      (when the world has the long-text split)
    eval_zeroshot.py --checkpoint LAST_EPOCH.pt --dataset imagefolder ... --output OUT/zeroshot_R.json

One process instead of three per row: each interpreter start imports torch, torchvision,
open_clip and, through open_clip's CoCa, transformers and scikit-learn (about 6 s of CPU here),
which was 3-4 minutes of the demo's 20 over eleven rows. Every run seeds itself from its config,
so a row's numbers are those of its own process (the demo report's table, digit for digit).

    python scripts/demo_rows.py --out demo_output --world demo_output/world alip clip ...
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the top-level CLIs (train.py, eval_*.py) are modules here

import eval_retrieval  # noqa: E402
import eval_zeroshot  # noqa: E402
from alip.eval.cli import run_cli  # noqa: E402
from alip.training.loop import main as train  # noqa: E402


def last_epoch_model(run_dir):
    """The run's newest epoch model file (``epoch_N.pt``, not a ``.state.pt``)."""
    found = [p for p in (run_dir / "checkpoints").glob("epoch_*.pt") if not p.name.endswith(".state.pt")]
    if not found:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no epoch_N.pt")
    return max(found, key=lambda p: int(p.stem.split("_")[1]))


def run_row(row, out, world):
    """Train and evaluate one row; -> (train seconds, eval seconds), or an exit code on failure."""
    run = out / "runs" / f"demo-{row}"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time (train.py --resume latest continues one)
    print(f"== training demo row {row} ({run})", flush=True)
    t0 = time.time()
    rc = train(["--config", str(REPO / "configs" / f"demo_{row}.yaml"), "--train-data",
                str(world / "shards"), "--logs", str(out / "runs"), "--name", f"demo-{row}"])
    if rc:
        return rc
    ckpt = last_epoch_model(run)
    t1 = time.time()
    print(f"== evaluating {ckpt}", flush=True)
    # the usual split, then (a world of version 4 on) the long-text one: the same images with
    # detailed captions, 83-134 tokens, which a 77-token model reads cut (its JSON says how much)
    splits = [("dataset_demo.json", "", "held-out"), ("dataset_demo_long.json", "long_", "long-text")]
    rc = 0
    for ann, tag, what in splits:
        if tag and not (world / "retrieval" / ann).is_file():
            continue  # a world written before the long-text split
        rc = rc or run_cli(eval_retrieval.main, "eval_retrieval.py", [
            "--checkpoint", str(ckpt), "--annotation", str(world / "retrieval" / ann),
            "--image-root", str(world / "retrieval"), "--name", f"demo {what} ({row})",
            "--workers", "0", "--output", str(out / f"retrieval_{tag}{row}.json")])
    rc = rc or run_cli(eval_zeroshot.main, "eval_zeroshot.py", [
        "--checkpoint", str(ckpt), "--dataset", "imagefolder", "--root", str(world / "classify"),
        "--classnames", str(world / "classify" / "classnames.txt"),
        "--templates", str(world / "classify" / "templates.txt"), "--workers", "0",
        "--output", str(out / f"zeroshot_{row}.json")])
    return rc or (t1 - t0, time.time() - t1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--world", required=True, type=Path)
    p.add_argument("rows", nargs="+", help="demo rows: R for configs/demo_R.yaml")
    a = p.parse_args(argv)
    missing = [r for r in a.rows if not (REPO / "configs" / f"demo_{r}.yaml").is_file()]
    if missing:  # a typo fails here, not after the rows before it have trained
        p.error(f"no configs/demo_{missing[0]}.yaml for demo row {missing[0]!r}")
    out, world = a.out.resolve(), a.world.resolve()
    timings = out / "timings.tsv"
    timings.write_text("")
    for row in a.rows:
        got = run_row(row, out, world)
        if not isinstance(got, tuple):
            return got
        with open(timings, "a") as f:
            f.write(f"{row}\t{got[0]:.0f}\t{got[1]:.0f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
