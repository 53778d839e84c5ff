"""A demo training step on an idle CPU and on one other jobs keep busy, per thread setting.

    .venv/bin/python bench/cpu_share.py                    # ALIP's demo recipe, load of 4
    .venv/bin/python bench/cpu_share.py --method clip --load 5 --repeats 3

On a 2-core machine with other jobs holding both cores, a demo step was measured at 9.5-16 s
against about 0.36 s idle (26-45x, where the CPU share explains about 3x). This bench runs the
real thing -- ``train.py --config configs/demo_<method>.yaml`` on a small demo world, its
DataLoader worker included -- for a few steps per setting, idle and beside ``--load`` busy
processes (one pure-Python spin each, as a CPU-bound job), interleaved over repeats (the order
reversed every other repeat), and prints for each setting the seconds per step idle and loaded
(median [min-max] over the repeats' medians) and the loaded/idle ratio per repeat. The settings:

* ``spin, 2 threads``: torch's intra-op pool at the core count with OpenMP's active wait (the
  default before this bench: libgomp spins at each barrier before it sleeps);
* ``passive, 2 threads``: the same pool with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once);
* ``short spin, 2 threads``: the pool spinning 10,000 times instead of libgomp's 300,000 before
  it sleeps (``GOMP_SPINCOUNT=10000``);
* ``1 thread``: no intra-op pool (``OMP_NUM_THREADS=1``);
* ``train.py default``: whatever train.py sets itself (no environment override).

A step's time is its samples over the rate train.py logs between two read-backs
(``--log-every-n-steps 1``), after the first ``--skip`` steps (start-up, warm-up).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SETTINGS = {
    "spin, 2 threads": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
    "passive, 2 threads": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "short spin, 2 threads": {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "10000"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "train.py default": {},
}


ENV_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # each run sets its own


def start_load(n):
    """``n`` busy processes (each one core's worth of pure-Python work)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_load(procs):
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def make_world(root, num_train):
    subprocess.run([sys.executable, str(REPO / "make_demo_data.py"), "--out", str(root),
                    "--num-train", str(num_train), "--num-test", "20"], check=True,
                   stdout=subprocess.DEVNULL)
    return root / "shards"


def step_seconds(args, shards, logs, name, env):
    """Median seconds per step of one short train.py run with ``env`` over the environment."""
    clean = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    subprocess.run([sys.executable, str(REPO / "train.py"), "--config",
                    str(REPO / "configs" / f"demo_{args.method}.yaml"), "--train-data", str(shards),
                    "--logs", str(logs), "--name", name, "--max-steps", str(args.steps),
                    "--log-every-n-steps", "1", "--report-to", ""],
                   check=True, env={**clean, **env}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, cwd=REPO)
    rows = [json.loads(line) for line in (logs / name / "results.jsonl").read_text().splitlines()]
    rates = [r for r in rows if r.get("kind") == "train"][args.skip:]
    per_step = rows[0]["samples"] / rows[0]["step"]
    return statistics.median(per_step / r["samples_per_s"] for r in rates)


def spread(xs):
    return f"{statistics.median(xs):7.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="alip")
    p.add_argument("--load", type=int, default=4, help="busy processes beside the loaded runs")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=int, default=3, help="first steps left out of each run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-train", type=int, default=2048)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_world(tmp / "world", args.num_train)
        times = {(s, m): [] for s in args.settings for m in ("idle", "loaded")}
        for r in range(args.repeats):
            order = args.settings if r % 2 == 0 else args.settings[::-1]
            for mode in (("idle", "loaded") if r % 2 == 0 else ("loaded", "idle")):
                load = start_load(args.load) if mode == "loaded" else []
                try:
                    time.sleep(0.5 if load else 0)
                    for s in order:
                        name = f"r{r}-{mode}-{args.settings.index(s)}"
                        t = step_seconds(args, shards, tmp / "runs", name, SETTINGS[s])
                        times[s, mode].append(t)
                        print(f"[repeat {r + 1}/{args.repeats}] {mode:6s} {s:20s} {t:.3f} s/step",
                              file=sys.stderr, flush=True)
                finally:
                    stop_load(load)
    print(f"demo {args.method} step on {os.cpu_count()} CPUs, idle and beside {args.load} busy "
          f"processes; median [min-max] over {args.repeats} repeats")
    print(f"{'setting':22s}{'idle s/step':>24s}{'loaded s/step':>24s}{'loaded/idle':>24s}")
    for s in args.settings:
        ratios = [b / a for a, b in zip(times[s, "idle"], times[s, "loaded"])]
        print(f"{s:22s}{spread(times[s, 'idle']):>24s}{spread(times[s, 'loaded']):>24s}"
              f"{spread(ratios):>24s}")


if __name__ == "__main__":
    main()
