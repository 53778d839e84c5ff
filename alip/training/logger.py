"""Run logging on rank 0: tqdm progress, TensorBoard / Weights & Biases scalars, results.jsonl,
out.log."""
import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from alip.atomic import write_text

from .params import report_targets

log = logging.getLogger("alip.train")


def setup_text_log(run_dir, is_master):
    """INFO to stderr and RUN_DIR/out.log on rank 0; warnings only elsewhere."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_master else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s | %(levelname)s | %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if is_master and run_dir is not None:
        handlers.append(logging.FileHandler(Path(run_dir) / "out.log"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    return log


def truncate_results(path, last_step):
    """Drop the results.jsonl lines past ``last_step`` (and a torn last line), atomically.

    On resume the steps after the checkpoint are run again; without this the file would hold
    them twice. The rewrite goes to a temporary file that replaces the original.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if record.get("step", 0) > last_step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        write_text(path, "".join(kept))
    return dropped


def wandb_run_id(name):
    """A W&B run id from a run name: W&B refuses ``/ \\ # ? % :`` in ids."""
    return "".join("-" if c in "/\\#?%:" else c for c in name)


class WandbLog:
    """A W&B run (open_clip_train's: project, run name and id = the run's name, the resolved
    config). Files go to RUN_DIR/wandb; WANDB_MODE=offline keeps them there for
    ``wandb sync``. A resumed run continues the same W&B run; steps W&B already has (rerun
    after the checkpoint, identical under exact resume) are not sent again."""

    def __init__(self, run_dir, name, project, notes, config, resumed):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, id=wandb_run_id(name), notes=notes or None,
                              dir=str(run_dir), config=config, resume="allow" if resumed else None)
        self.first_new_step = int(getattr(self.run, "step", 0) or 0)
        if self.first_new_step:
            log.info("wandb: run %s resumed; steps below %d are already logged there",
                     self.run.id, self.first_new_step)

    def log(self, prefix, values, step):
        if step >= self.first_new_step:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def finish(self, exit_code):
        self.wandb.finish(exit_code=exit_code)


class RunLogger:
    """tqdm progress every step; the loss (when read back), results.jsonl and TensorBoard /
    W&B every N steps. ``wandb``: WandbLog's keyword arguments when --report-to names it."""

    def __init__(self, run_dir, is_master, report_to, total_steps, start_step, samples_per_step,
                 world_size, wandb=None):
        self.is_master = is_master
        self.samples_per_step = samples_per_step
        self.world_size = world_size
        self.jsonl = self.tb = self.wandb = None
        if is_master:
            dropped = truncate_results(Path(run_dir) / "results.jsonl", start_step)
            if dropped:
                log.info("results.jsonl: dropped %d line(s) past the resumed step %d", dropped,
                         start_step)
            self.jsonl = open(Path(run_dir) / "results.jsonl", "a")
            targets = report_targets(report_to)
            if "tensorboard" in targets:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            if "wandb" in targets:
                self.wandb = WandbLog(run_dir, **(wandb or {}))
        self.pbar = tqdm(total=total_steps, initial=start_step, disable=not is_master,
                         unit="step", dynamic_ncols=True, file=sys.stderr)
        self.last_time = time.perf_counter()
        self.samples_per_s = 0.0
        self.loss = None
        self.steps_since = 0

    def step(self):
        """Call once per optimizer step (the progress bar)."""
        self.steps_since += 1
        if self.is_master:
            self.pbar.set_postfix(self._postfix(), refresh=False)
            self.pbar.update(1)

    def after_read(self, metrics):
        """Call after the steps were read back from the device: shows the newest loss (None:
        that step was skipped) and returns samples/s (global) over the steps since the last
        read. Steps do not wait for the device, so only the time between two reads is the
        time the device took for the steps between them."""
        now = time.perf_counter()
        if self.steps_since:
            self.samples_per_s = (self.samples_per_step * self.steps_since
                                  / max(now - self.last_time, 1e-9))
        self.last_time, self.steps_since = now, 0
        self.loss = None if metrics is None else metrics["loss"]
        return self.samples_per_s

    def _postfix(self):
        post = {}  # both known from the first read-back on
        if self.samples_per_s:
            post["samples/s"] = f"{self.samples_per_s:.0f}"
        if self.loss is not None:
            post["loss"] = f"{self.loss:.4f}"
        return post

    def reset_clock(self):
        self.last_time, self.steps_since = time.perf_counter(), 0

    def write(self, record):
        """One results.jsonl line; every numeric field also goes to TensorBoard and W&B as
        KIND/<key> (train/loss, eval/zeroshot_top1, ...)."""
        if not self.is_master:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step, prefix = record["step"], record.get("kind", "train")
        values = {k: v for k, v in record.items() if k not in ("step", "kind")
                  and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(prefix, values, step)

    def close(self, failed=False):
        self.pbar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
