"""Shared helpers of the train.py tests (no tests here): tiny runs on synthetic data, a
loader wrapper that injects NaN images, and a gloo worker for multi-process runs."""
import json
import os
import socket
from pathlib import Path

import torch

from alip.training.loop import default_make_loader, run
from alip.training.params import parse_args


def tiny_argv(logs, name, *extra, samples=64, batch=8, epochs=1):
    return ["--model", "ALIP-tiny", "--dataset-type", "synthetic", "--train-num-samples",
            str(samples), "--batch-size", str(batch), "--epochs", str(epochs), "--precision",
            "fp32", "--logs", str(logs), "--name", name, "--log-every-n-steps", "1",
            "--report-to", "", "--workers", "0", "--seed", "0", "--cpu-threads", "1",
            "--device", "cpu", *extra]


def read_results(run_dir, kind="train"):
    lines = Path(run_dir, "results.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def final_state(run_dir, tag):
    return torch.load(Path(run_dir, "checkpoints", f"{tag}.pt"), weights_only=True)["state_dict"]


def assert_same_run(full_dir, cut_dir, steps, keys, tag="epoch_2"):
    """The interrupted-and-resumed run ``cut_dir`` logged ``steps`` once each, with ``keys``
    equal to the uninterrupted ``full_dir``'s, and ended with bit-identical weights ``tag``."""
    full = {r["step"]: r for r in read_results(full_dir)}
    cut = read_results(cut_dir)
    assert [r["step"] for r in cut] == list(steps)
    for r in cut:
        for k in keys:
            assert r[k] == full[r["step"]][k], (r["step"], k)
    a, b = final_state(full_dir, tag), final_state(cut_dir, tag)
    for k in a:
        assert torch.equal(a[k], b[k]), k


class NaNLoader:
    """Wraps a loader; the images of the (epoch, batch) pairs in ``bad`` become NaN."""

    def __init__(self, loader, bad):
        self.loader, self.bad = loader, set(bad)
        self.batches_per_epoch = loader.batches_per_epoch
        self.num_samples = loader.num_samples
        self.dropped_per_epoch = loader.dropped_per_epoch

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch
        self.loader.set_epoch(epoch, start_batch)

    def __getattr__(self, name):  # state_dict / load_state_dict / text_widths, when the loader has them
        if name == "text_widths" and hasattr(self.loader, name):  # checked against the tower
            return self.loader.text_widths
        if name in ("state_dict", "load_state_dict") and hasattr(self.loader, name):
            if name == "load_state_dict":
                return lambda state: (self.set_epoch(state["epoch"], state["batch"]),
                                      self.loader.load_state_dict(state))
            return self.loader.state_dict
        raise AttributeError(name)

    def __iter__(self):
        for i, batch in enumerate(self.loader, start=self.start):
            if (self.epoch, i) in self.bad:
                if isinstance(batch, dict):  # every image view
                    batch = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                             for k, v in batch.items()}
                else:
                    batch = (torch.full_like(batch[0], float("nan")), *batch[1:])
            yield batch


def nan_loader_factory(bad, ranks=None):
    def make(cfg, info, image_size, spec):
        loader = default_make_loader(cfg, info, image_size, spec)
        return NaNLoader(loader, bad if ranks is None or info.rank in ranks else ())
    return make


def free_port(n=None):
    """A free TCP port, or a list of ``n`` distinct ones."""
    socks = [socket.socket() for _ in range(n or 1)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
    return ports if n else ports[0]


def gloo_worker(rank, world_size, port, argvs, bad=(), bad_ranks=None, dtype=torch.float32):
    """torch.multiprocessing.spawn target: one rank of CPU/gloo runs of train.py, one after
    the other (``argvs``: one argv or a list of them; one spawn amortises the start-up).
    ``dtype`` is the default dtype, so float64 builds the model and data in float64."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    torch.set_default_dtype(dtype)
    argvs = [argvs] if isinstance(argvs[0], str) else argvs
    ports = port if isinstance(port, (list, tuple)) else [port] * len(argvs)
    for argv, p in zip(argvs, ports, strict=True):
        # a fresh rendezvous port per run: re-initialising on the port of a destroyed group
        # can hang while the old store's socket lingers
        os.environ["MASTER_PORT"] = str(p)
        run(parse_args(argv), make_loader=nan_loader_factory(bad, bad_ranks))


def run_single(argv, bad=(), dtype=torch.float32):
    """One process. ``dtype=torch.float64`` runs model and data in float64: two computations
    that differ only in summation order then agree to ~1e-12 instead of fp32's ~1e-4 after a
    few Adam steps, so comparisons hold on any CPU."""
    torch.set_num_threads(1)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(k, None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return run(parse_args(argv), make_loader=nan_loader_factory(bad))
    finally:
        torch.set_default_dtype(previous)


def assert_weights_close(sd_a, sd_b, rtol=1e-4, atol=1e-5, max_outliers=1e-3):
    """State dicts equal within rtol/atol, allowing a fraction ``max_outliers`` of entries
    to differ more: where a gradient is ~0 (attention key biases, whose gradient is exactly zero
    in theory; dead MLP units; unused token rows) Adam's normalisation turns float noise of
    ~1e-10 into +-lr steps, so a few entries differ by up to lr per step without any
    difference in the computation."""
    assert sd_a.keys() == sd_b.keys()
    outliers = total = 0
    for k in sd_a:
        a, b = sd_a[k].float(), sd_b[k].float()
        assert a.shape == b.shape, k
        bad = (a - b).abs() > atol + rtol * b.abs()
        outliers += int(bad.sum())
        total += a.numel()
    assert outliers <= max_outliers * total, f"{outliers} of {total} weights differ"


def killed_worker(argv, kill_after_step):
    """Run train.py in this (spawned) process and SIGKILL it right after the results line of
    ``kill_after_step`` is written: a hard kill between two checkpoints."""
    import signal

    from alip.training import logger

    write = logger.RunLogger.write

    def write_then_die(self, record):
        write(self, record)
        if record.get("step") == kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)

    logger.RunLogger.write = write_then_die
    run_single(argv)
