"""Shared bench helpers: pinned threads, ABBA-interleaved timing, median/min/max of ratios.

Every bench times all its sides inside one loop of repeats, alternating the order
(A B C, C B A, A B C, ...), so machine load that drifts during a run hits every side alike;
ratios are taken per repeat (side / baseline of the same repeat) and reported as median, min
and max. Progress goes to stderr, one line per repeat.
"""
import statistics
import sys
import time

import torch


def setup(threads=1):
    """Pin intra-op threads (default 1: on a shared machine, with every core busy, a 2-thread op
    waits for its slower thread at each barrier, which skews small ops more than large ones)."""
    torch.set_num_threads(threads)
    return threads


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device="cpu"):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def n_times(fn, n):
    """``fn`` called ``n`` times in a row: one timed sample long enough to time (GPU passes take
    milliseconds; launch and clock jitter dominate a single call)."""
    def run():
        for _ in range(n):
            fn()
    return run


def abba(fns, repeats, device="cpu", warmup=1, label="", cpu_times=None):
    """Time each of ``fns`` ({name: callable}) ``repeats`` times, order reversed every other
    repeat, after ``warmup`` untimed rounds. Returns {name: [seconds per repeat]}. A dict given
    as ``cpu_times`` is filled the same way with the process's CPU seconds per call
    (``time.process_time``: on a shared CPU, the time the process ran rather than waited; with
    one torch thread, about the work itself)."""
    names = list(fns)
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names if r % 2 == 0 else names[::-1]
        got, got_cpu = {}, {}
        for n in order:
            c0 = time.process_time()
            got[n] = timed(fns[n], device)
            got_cpu[n] = time.process_time() - c0
        if r >= warmup:
            for n in names:
                times[n].append(got[n])
                cpu[n].append(got_cpu[n])
        tag = "warm-up" if r < warmup else f"repeat {r - warmup + 1}/{repeats}"
        print(f"[{label}] {tag}: " + "  ".join(
            f"{n} {got[n]:.3f}s" + (f" (cpu {got_cpu[n]:.3f}s)" if cpu_times is not None else "")
            for n in names), file=sys.stderr, flush=True)
    if cpu_times is not None:
        cpu_times.update(cpu)
    return times


def stats(values):
    return statistics.median(values), min(values), max(values)


def ratio(times, num, den):
    """(median, min, max) of the per-repeat ratios times[num][i] / times[den][i]."""
    return stats([a / b for a, b in zip(times[num], times[den])])


def fmt(triple, digits=2):
    med, lo, hi = triple
    return f"{med:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def describe(device, threads):
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({threads} torch thread{'s' if threads > 1 else ''} pinned)"
