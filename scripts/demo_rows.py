"""Train and evaluate the demo's rows, a few Python processes side by side (scripts/demo.sh's loop).

Per row R (``configs/demo_R.yaml``) it runs what these three commands run, through the same
``main`` functions, and writes ``R<TAB>train seconds<TAB>eval seconds`` to OUT/timings.tsv:

    train.py --config configs/demo_R.yaml --train-data WORLD/shards --logs OUT/runs --name demo-R
    eval_retrieval.py --checkpoint LAST_EPOCH.pt --annotation ... --output OUT/retrieval_R.json
    eval_retrieval.py ... --annotation WORLD/retrieval/dataset_demo_long.json \
        --output OUT/retrieval_long_R.json      (when the world has the long-text split)
    eval_zeroshot.py --checkpoint LAST_EPOCH.pt --dataset imagefolder ... --output OUT/zeroshot_R.json

Rows run ``--jobs`` at a time (default: one per CPU this process may use, as memory allows),
each in a worker process with ONE intra-op thread that takes the next row when it is free. One
thread per row is what makes the demo both fast and steady: a row's step on a 2-core machine is
mostly small ops, so a second thread buys about 1.2-1.4x while two rows side by side buy about
1.9x; one thread never waits at a barrier for a descheduled sibling, so a machine other jobs
load costs the demo its share of the CPU and no more (docs/benchmarks.md, bench/cpu_share.py);
and a row's numbers are the same however many cores the machine has (intra-op threads change
float sums). Every run seeds itself from its config, so a row's numbers do not depend on which
rows ran before it in the same worker (the report's table, digit for digit). A worker imports
torch, open_clip and, through open_clip's CoCa, transformers and scikit-learn once (about 6 s
of CPU), not once per row.

With more than one job each row's output goes to OUT/logs/R.log and this script prints a line
per row started and finished; ``--jobs 1`` runs the rows one after another in this process,
their output on the console.

    python scripts/demo_rows.py --out demo_output --world demo_output/world alip clip ...
"""
import argparse
import importlib
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LANE_MEMORY_GIB = 4  # a row's worker at its peak: CLIPS' 49,408-way logits, 3.2 GB RSS measured


def last_epoch_model(run_dir):
    """The run's newest epoch model file (``epoch_N.pt``, not a ``.state.pt``)."""
    found = [p for p in (run_dir / "checkpoints").glob("epoch_*.pt") if not p.name.endswith(".state.pt")]
    if not found:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no epoch_N.pt")
    return max(found, key=lambda p: int(p.stem.split("_")[1]))


# torch and the rest are imported where a row runs (the worker processes), not in the parent
def train(argv):
    """train.py's main."""
    from alip.training.loop import main
    return main(argv)


def run_cli(main, prog, argv):
    """An evaluator's main as its CLI runs it (one-line errors, exit codes)."""
    from alip.eval.cli import run_cli as run
    return run(main, prog, argv)


def evaluator(name):
    """The top-level CLI module ``name`` (eval_retrieval, eval_zeroshot)'s main."""
    if str(REPO) not in sys.path:  # the top-level CLIs are modules here
        sys.path.insert(0, str(REPO))
    return importlib.import_module(name).main


def run_row(row, out, world, configs=REPO / "configs"):
    """Train and evaluate one row; -> (train seconds, eval seconds), or an exit code on failure."""
    run = out / "runs" / f"demo-{row}"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time (train.py --resume latest continues one)
    print(f"== training demo row {row} ({run})", flush=True)
    t0 = time.time()
    rc = train(["--config", str(Path(configs) / f"demo_{row}.yaml"), "--train-data",
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
        rc = rc or run_cli(evaluator("eval_retrieval"), "eval_retrieval.py", [
            "--checkpoint", str(ckpt), "--annotation", str(world / "retrieval" / ann),
            "--image-root", str(world / "retrieval"), "--name", f"demo {what} ({row})",
            "--workers", "0", "--output", str(out / f"retrieval_{tag}{row}.json")])
    rc = rc or run_cli(evaluator("eval_zeroshot"), "eval_zeroshot.py", [
        "--checkpoint", str(ckpt), "--dataset", "imagefolder", "--root", str(world / "classify"),
        "--classnames", str(world / "classify" / "classnames.txt"),
        "--templates", str(world / "classify" / "templates.txt"), "--workers", "0",
        "--output", str(out / f"zeroshot_{row}.json")])
    return rc or (t1 - t0, time.time() - t1)


@contextmanager
def output_to(path):
    """This process's stdout and stderr (Python's and the C libraries') appended to ``path``."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def run_logged_row(row, out, world, configs):
    """``run_row`` in a worker process, its output in OUT/logs/R.log; an exception becomes a
    line in that log and exit code 1."""
    log = out / "logs" / f"{row}.log"
    log.write_text("")
    with output_to(log):
        try:
            return run_row(row, out, world, configs)
        except SystemExit as e:  # a CLI's one-line error (a str) or its exit code
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            return e.code if isinstance(e.code, int) and e.code else 1
        except Exception:  # the worker stays up for the rows still running; the traceback is in the log
            import traceback
            traceback.print_exc()
            return 1


def usable_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_gib():
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        return int(info["MemAvailable"].split()[0]) / 2 ** 20
    except (OSError, KeyError, ValueError):
        return float("inf")


def default_jobs(rows):
    """One row per usable CPU, at most one per row and per LANE_MEMORY_GIB of available memory."""
    return max(1, min(len(rows), usable_cpus(), int(available_gib() // LANE_MEMORY_GIB)))


def write_timings(path, rows, done):
    """OUT/timings.tsv in the rows' order (the report's), the rows finished so far."""
    path.write_text("".join(f"{r}\t{done[r][0]:.0f}\t{done[r][1]:.0f}\n" for r in rows if r in done))


def tail(path, n=20):
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(lines[-n:])


def run_in_this_process(rows, out, world, configs):
    done = {}
    for row in rows:
        got = run_row(row, out, world, configs)
        if not isinstance(got, tuple):
            return got
        done[row] = got
        write_timings(out / "timings.tsv", rows, done)
    return 0


def run_side_by_side(rows, out, world, configs, jobs):
    """Rows ``jobs`` at a time, in the given order as workers free up; the first failure stops
    the rows not yet started (those running finish), and its log's tail is printed."""
    (out / "logs").mkdir(exist_ok=True)
    print(f"== {len(rows)} rows, {jobs} at a time (one thread each; each row's output in "
          f"{out / 'logs'}/ROW.log)", flush=True)
    done, failed, start = {}, None, time.time()
    queue, pending = list(rows), {}
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        while queue or pending:
            while queue and len(pending) < jobs:  # a row starts only when a worker is free
                row = queue.pop(0)
                pending[pool.submit(run_logged_row, row, out, world, configs)] = row
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                row = pending.pop(future)
                try:
                    got = future.result()
                except Exception as e:  # BrokenProcessPool: the worker was killed (memory?)
                    got = f"its worker process died ({type(e).__name__}: {e})"
                if isinstance(got, tuple):
                    done[row] = got
                    write_timings(out / "timings.tsv", rows, done)
                    print(f"== {row}: trained in {got[0]:.0f} s, evaluated in {got[1]:.0f} s "
                          f"({len(done)}/{len(rows)} rows, {(time.time() - start) / 60:.1f} min)",
                          flush=True)
                elif failed is None:
                    failed = (row, got)
                    queue.clear()
    except KeyboardInterrupt:  # Ctrl-C reached the workers too: their runs save and stop
        pool.shutdown(wait=True, cancel_futures=True)
        print("demo_rows.py: interrupted", file=sys.stderr, flush=True)
        return 130
    pool.shutdown(wait=True)
    if failed:
        row, why = failed
        log = out / "logs" / f"{row}.log"
        why = f"exit {why}" if isinstance(why, int) else why
        print(f"{tail(log)}\ndemo_rows.py: row {row} failed ({why}); its output: {log}",
              file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--world", required=True, type=Path)
    p.add_argument("--configs", type=Path, default=REPO / "configs",
                   help="where configs/demo_R.yaml are (default: the repository's)")
    p.add_argument("--jobs", type=int, default=None,
                   help="rows at a time (default: one per usable CPU, as memory allows, at most "
                        "one per row); 1 runs them in this process, output on the console")
    p.add_argument("rows", nargs="+", help="demo rows: R for configs/demo_R.yaml")
    a = p.parse_args(argv)
    configs = a.configs.resolve()
    missing = [r for r in a.rows if not (configs / f"demo_{r}.yaml").is_file()]
    if missing:  # a typo fails here, not after the rows before it have trained
        p.error(f"no {configs.name}/demo_{missing[0]}.yaml for demo row {missing[0]!r}")
    if a.jobs is not None and a.jobs < 1:
        p.error(f"--jobs must be a positive integer, got {a.jobs}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # each row's intra-op threads (train.py reads it)
    out, world = a.out.resolve(), a.world.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "timings.tsv").write_text("")
    jobs = a.jobs or default_jobs(a.rows)
    if jobs == 1:
        return run_in_this_process(a.rows, out, world, configs)
    return run_side_by_side(a.rows, out, world, configs, min(jobs, len(a.rows)))


if __name__ == "__main__":
    sys.exit(main())
