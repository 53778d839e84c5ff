"""Demo rows on a small CPU: one row with one thread, one row with two, two rows side by side.

    .venv/bin/python bench/demo_side_by_side.py                  # CLIP's demo recipe
    .venv/bin/python bench/demo_side_by_side.py --method clips --repeats 2

Why scripts/demo_rows.py runs one row per CPU with one intra-op thread each instead of one row
at a time with every core's thread: it measures the real thing -- ``train.py --config
configs/demo_<method>.yaml`` on a small demo world, its DataLoader worker included (the same
runs as bench/cpu_share.py) -- as

* ``1 row, 1 thread``: one run, ``OMP_NUM_THREADS=1``;
* ``1 row, N threads``: one run with a thread per CPU (``OMP_NUM_THREADS=N``);
* ``N rows, 1 thread each``: N runs at once, one thread each,

interleaved over repeats (the order reversed every other repeat), and prints each setting's
seconds per step (median [min-max] over the repeats) and its throughput -- rows' steps per
second, summed over the rows running -- over ``1 row, 1 thread``'s, per repeat.
"""
import argparse
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_share import make_world, spread, step_seconds  # noqa: E402


def settings(n):
    return {"1 row, 1 thread": [{"OMP_NUM_THREADS": "1"}],
            f"1 row, {n} threads": [{"OMP_NUM_THREADS": str(n)}],
            f"{n} rows, 1 thread each": [{"OMP_NUM_THREADS": "1"}] * n}


def run_setting(args, shards, logs, name, envs):
    """Seconds per step of each run of the setting (its runs at the same time)."""
    with ThreadPoolExecutor(len(envs)) as pool:
        return list(pool.map(lambda i: step_seconds(args, shards, logs, f"{name}-{i}", envs[i]),
                             range(len(envs))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="clip")
    p.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--skip", type=int, default=3, help="first steps left out of each run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-train", type=int, default=2048)
    args = p.parse_args(argv)
    table = settings(args.cpus)
    names = list(table)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_world(tmp / "world", args.num_train)
        steps = {s: [] for s in names}   # per repeat: the runs' seconds per step
        for r in range(args.repeats):
            for s in (names if r % 2 == 0 else names[::-1]):
                got = run_setting(args, shards, tmp / "runs", f"r{r}-{names.index(s)}", table[s])
                steps[s].append(got)
                print(f"[repeat {r + 1}/{args.repeats}] {s:24s} "
                      + " ".join(f"{t:.3f}" for t in got) + " s/step", file=sys.stderr, flush=True)
    base = [1 / runs[0] for runs in steps[names[0]]]
    print(f"demo {args.method} step on {args.cpus} CPUs; median [min-max] over {args.repeats} "
          f"repeats; throughput = the rows' steps per second over 1 row with 1 thread's")
    print(f"{'setting':26s}{'s/step (each row)':>24s}{'throughput ratio':>24s}")
    for s in names:
        per_step = [t for runs in steps[s] for t in runs]
        ratio = [sum(1 / t for t in runs) / b for runs, b in zip(steps[s], base)]
        print(f"{s:26s}{spread(per_step):>24s}{spread(ratio):>24s}")


if __name__ == "__main__":
    main()
