"""The training run, as named phases: resolve the configuration, build the method, the run
directory, the model and data and optimizer, resume, train (the epoch/step loop with its
checkpoints, logs and evaluation), and the result.

``main(argv)`` is train.py. ``run(args, make_loader=None)`` is the same for a parsed
namespace; ``make_loader(cfg, info, image_size, spec)`` may replace the data loader (tests).
The loop knows no method: it asks the method object (``alip.methods.base.Method``) for its data
spec, model arguments, encoder, criterion, state, evaluation heads and after-step hook.
"""
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip_train.precision import get_autocast

import alip  # noqa: F401  (registers the ALIP-* model configs)
from alip import long_context
from alip.cli import one_line
from alip.data.recordio import RecordIOError
from alip.methods import MethodConfigError, get_method
from alip.model import to_device_keeping_host_tokens

from . import checkpoint as ckpt
from . import sharded
from .compile import compile_towers
from .config import TrainConfigError, resolve_config, run_dir_of, train_data_paths
from .distributed import all_gather_object, barrier, cleanup, init_distributed
from .field_log import FieldCounts
from .fsdp import full, is_fsdp, release_group, shard
from .locks import lock_towers
from .logger import RunLogger, setup_text_log
from .optim import build_optimizer, build_scheduler
from .params import parse_args, resolved_config, write_config
from .preemption import StopOnSignal, parse_signals
from .resume import Position, agree_on_resume, restore
from .step import StepContext, train_step
from .synthetic import SyntheticLoader


class NonFiniteLossError(RuntimeError):
    """More than --max-nonfinite consecutive steps had a non-finite loss."""


class StepBook:
    """The optimizer steps whose results are still on the device, read back in one go.

    Reading a step (``StepResult.metrics``) waits for the device, so the loop reads the
    pending steps only when it needs their numbers: at a log step, before a checkpoint, at the
    end of an epoch, and when more than ``max_nonfinite`` steps are pending (every rank at the
    same steps). Reading counts the skipped (non-finite) steps and stops a streak longer than
    ``max_nonfinite``: it is noticed within ``max_nonfinite + 1`` steps, and a skipped step
    changes nothing meanwhile.
    """

    def __init__(self, max_nonfinite, total=0, good_checkpoint=lambda: None):
        self.max_nonfinite, self.total, self.run = max_nonfinite, total, 0
        self.good_checkpoint = good_checkpoint
        self.pending, self.last = [], None

    def add(self, step, result):
        self.pending.append((step, result))

    def read(self):
        """Reads every pending step; returns the newest one's metrics (None: skipped)."""
        log = logging.getLogger("alip.train")
        pending, self.pending = self.pending, []
        for step, result in pending:
            self.last = result.metrics()
            if self.last is not None:
                self.run = 0
                continue
            self.total += 1
            self.run += 1
            log.warning("step %d: non-finite loss, step skipped (%d in a row, %d in total)",
                        step, self.run, self.total)
            if self.run > self.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self.run} steps in a row had a non-finite loss (more than "
                    f"--max-nonfinite {self.max_nonfinite}), stopping at step {step}; "
                    f"last good checkpoint: {self.good_checkpoint() or 'none'}")
        return self.last


# ---------------------------------------------------------------------------------------------
# run directory


def prepare_run_dir(cfg, info):
    run_dir = run_dir_of(cfg)
    error = None
    if info.is_master:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "checkpoints").mkdir(exist_ok=True)
            probe = run_dir / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            error = f"--logs: cannot write the run directory {run_dir}: {e}"
        if error is None and cfg.resume is None and ckpt.has_checkpoints(run_dir / "checkpoints"):
            error = (f"run directory {run_dir} already has checkpoints; pass --resume latest to "
                     f"continue it, or another --name")
    error = all_gather_object(error, info)[0]
    if error:
        raise TrainConfigError(error)
    return run_dir


# ---------------------------------------------------------------------------------------------
# build


@dataclass
class Run:
    """What the build phase makes: the configuration, the method (attached to the model), the
    open_clip model and its eval transform, the loader, the optimizer, scheduler and scaler."""
    cfg: object
    info: object
    method: object
    model: object
    preprocess: object
    loader: object
    optimizer: object
    scheduler: object
    scaler: object
    run_dir: Path
    log: logging.Logger
    steps_per_epoch: int

    @property
    def total_steps(self):
        return self.steps_per_epoch * self.cfg.epochs

    @property
    def samples_per_step(self):
        return self.cfg.batch_size * self.cfg.accum_freq * self.info.world_size

    @property
    def ckpt_dir(self):
        return self.run_dir / "checkpoints"

    def record(self):
        """The configuration as config.yaml, the checkpoints and W&B record it: the resolved
        flags and the schedule's length."""
        return {**resolved_config(self.cfg), "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps}


def build_method(cfg, info):
    """The method object for the resolved configuration (its flags checked, its data spec
    fixed); it meets the model in ``build_run``."""
    try:
        return get_method(cfg.method)(cfg, rank=info.rank, world_size=info.world_size)
    except MethodConfigError as e:
        raise TrainConfigError(str(e)) from e


def build_model(cfg, method, info, log):
    """The open_clip model with the method's model arguments, under the training seed, locked
    and checkpointed as open_clip_train does, and the method attached to it."""
    torch.set_num_threads(cfg.cpu_threads)
    seed_everything(cfg.seed)
    try:
        model, _, preprocess = long_context.create_model_and_transforms(  # open_clip's, at
            cfg.model, pretrained=cfg.pretrained, device=info.device,  # --text-context
            **method.model_kwargs())
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        raise TrainConfigError(f"--model {cfg.model} --pretrained {cfg.pretrained}: {e}") from e
    lock_towers(model, cfg, log)  # before grad checkpointing, as open_clip_train
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    try:  # before the data: a method that cannot use this model says so now
        method.attach(model)
    except MethodConfigError as e:
        raise TrainConfigError(str(e)) from e
    for line in method.notes():
        log.info("%s", line)
    return model, preprocess


def image_size_of(model):
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else size


def build_data(cfg, method, info, make_loader, image_size):
    """The loader of the method's data spec -> (loader, optimizer steps per epoch)."""
    try:
        loader = make_loader(cfg, info, image_size, method.data)
    except (FileNotFoundError, ValueError) as e:
        raise TrainConfigError(f"--train-data {cfg.train_data}: {e}") from e
    steps_per_epoch = loader.batches_per_epoch // cfg.accum_freq
    if steps_per_epoch < 1:
        raise TrainConfigError(
            f"--batch-size {cfg.batch_size} x {info.world_size} processes x --accum-freq "
            f"{cfg.accum_freq} needs more samples than the data has "
            f"({loader.batches_per_epoch} batches per epoch per process, "
            f"{getattr(loader, 'num_samples', '?')} samples)")
    return loader, steps_per_epoch


def build_run(cfg, info, method, run_dir, log, make_loader):
    """Model, method, data, optimizer, scheduler and scaler, in the order that fixes the random
    draws (model init, then the method's heads, then the loader)."""
    model, preprocess = build_model(cfg, method, info, log)
    loader, steps_per_epoch = build_data(cfg, method, info, make_loader, image_size_of(model))
    try:  # a loader that knows its fields' widths (text_widths) is checked against the tower
        encoded = set(method.tower_text_keys())
        widths = {k: w for k, w in (getattr(loader, "text_widths", None) or {}).items()
                  if k in encoded}
        long_context.check_field_widths(widths, model.context_length,
                                        sources={v.name: v.sources for v in method.data.text_views})
    except ValueError as e:
        raise TrainConfigError(str(e)) from e
    encoder = method.encoder.to(info.device)
    compile_towers(cfg, model, info.device, log)  # --torchcompile (alip/training/compile.py)
    method.criterion.to(info.device)
    if cfg.fsdp:  # before the optimizer: sharding replaces the parameters
        shard(encoder, cfg, info)
    optimizer = build_optimizer(encoder, cfg.lr, cfg.wd, (cfg.beta1, cfg.beta2), cfg.eps,
                                exclude_gain_bias=cfg.wd_exclude_gain_bias)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.lr, steps_per_epoch * cfg.epochs,
                                pct_start=cfg.pct_start, cycle_momentum=cfg.cycle_momentum,
                                warmup=cfg.warmup, warmup_start_lr=cfg.warmup_start_lr)
    scaler = None
    if cfg.precision == "amp" and info.device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda", growth_interval=200)  # as the reference
    return Run(cfg, info, method, model, preprocess, loader, optimizer, scheduler, scaler,
               run_dir, log, steps_per_epoch)


def default_make_loader(cfg, info, image_size, spec):
    """The loader of the method's DataSpec (dict batches: its image views, text fields/views),
    read with the reader the configuration resolved."""
    device = str(info.device)
    if cfg.data_reader == "synthetic":
        return SyntheticLoader(cfg.train_num_samples, cfg.batch_size, image_size,
                               rank=info.rank, world_size=info.world_size, seed=cfg.seed,
                               device=device, spec=spec)
    from alip.data.loader import build_train_loader
    data = cfg.train_data
    if not Path(data).is_dir():
        data = train_data_paths(data)
    return build_train_loader(data, backend=cfg.data_reader, batch_size=cfg.batch_size,
                              image_size=image_size, rank=info.rank, world_size=info.world_size,
                              seed=cfg.seed, workers=cfg.workers, device=device, drop_last=True,
                              verify_shards=getattr(cfg, "verify_shards", True), spec=spec,
                              length_bucketing=getattr(cfg, "length_bucketing", 0))


def as_batch_dicts(loader, spec, device):
    """The loader's batches (dicts keyed by the spec) with every tensor on ``device`` (the
    PyTorch reader yields pinned CPU tensors, DALI "mixed" CUDA images beside CPU texts)."""
    text_keys = set(spec.text_fields) | {v.name for v in spec.text_views}
    for batch in loader:
        if not isinstance(batch, dict):
            raise TrainConfigError(f"the data loader yields {type(batch).__name__} batches; a "
                                   f"loader must yield dicts keyed {spec.keys} (built for the "
                                   f"method's DataSpec)")
        yield {k: _to_device(v, device, text=k in text_keys) for k, v in batch.items()}


def _to_device(value, device, text):
    """Tensors to ``device``; token tensors keep their host copy for ``alip.model.encode_text``
    (it plans length groups / packing on the host, so the step never waits for the GPU)."""
    if not torch.is_tensor(value):
        return value
    if text:
        return to_device_keeping_host_tokens(value, device)
    return value.to(device, non_blocking=True)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# evaluation during training (alip.eval, rank 0)


def _due(frequency, epoch, epochs):
    """open_clip's rule: every ``frequency`` epochs and after the last one."""
    return bool(frequency) and (epoch % frequency == 0 or epoch == epochs)


def evaluate(args, clip_model, preprocess, epoch, info, dense_head=None):
    """Retrieval and zero-shot evaluation due after ``epoch`` (rank 0; the others get {})."""
    results = {}
    if not info.is_master:
        return results
    tokenizer = open_clip.get_tokenizer(  # at the model's own context (--text-context)
        args.model, context_length=getattr(clip_model, "context_length", None))
    device = str(info.device)
    clip_model.eval()
    try:
        if _due(args.retrieval_frequency, epoch, args.epochs):
            from alip.eval.retrieval import evaluate_retrieval
            m = evaluate_retrieval(clip_model, preprocess, tokenizer, args.retrieval_data,
                                   args.retrieval_image_root,
                                   caption_prefix=args.retrieval_caption_prefix,
                                   batch_size=args.eval_batch_size, device=device,
                                   dense_head=dense_head)
            results.update({f"retrieval/{k}": v for k, v in m.items()})
        if _due(args.zeroshot_frequency, epoch, args.epochs):
            from alip.eval.zeroshot import evaluate_zeroshot
            if args.imagenet_val:
                dataset, root = "imagenet1k", args.imagenet_val
            else:
                dataset, root = args.zeroshot_dataset or "imagefolder", args.zeroshot_root
            kw = {}
            if args.zeroshot_classnames:
                kw["classnames"] = Path(args.zeroshot_classnames).read_text().splitlines()
            if args.zeroshot_templates:
                kw["templates"] = Path(args.zeroshot_templates).read_text().splitlines()
            m = evaluate_zeroshot(clip_model, preprocess, tokenizer, dataset, root,
                                  batch_size=args.eval_batch_size, device=device,
                                  dense_head=dense_head, **kw)
            results.update({f"zeroshot/{k}": v for k, v in m.items()})
    finally:
        clip_model.train()
    return results


# ---------------------------------------------------------------------------------------------
# train


class Trainer:
    """The epoch/step loop of one built (and maybe resumed) run: DDP around the method's
    encoder, the step context, the step book, the logger and the stop-signal handler."""

    def __init__(self, run, position, resumed):
        self.run, self.pos = run, position
        cfg, info, method = run.cfg, run.info, run.method
        model = method.encoder
        if info.distributed and not is_fsdp(model):
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(
                method.encoder, device_ids=device_ids, static_graph=cfg.ddp_static_graph,
                find_unused_parameters=method.find_unused_parameters)
        method.encoder.train()
        method.criterion.train()
        self.ctx = StepContext(model=model, criterion=method.criterion, optimizer=run.optimizer,
                               info=info, after_step=method.after_step,
                               accum_mode=cfg.accum_mode, grad_clip_norm=cfg.grad_clip_norm,
                               scaler=run.scaler,
                               autocast=get_autocast(cfg.precision, device_type=info.device.type))
        announce(run)
        self.book = StepBook(cfg.max_nonfinite, position.nonfinite_total,
                             lambda: ckpt.find_good(run.ckpt_dir))
        self.logger = RunLogger(run.run_dir, info.is_master, cfg.report_to, run.total_steps,
                                position.step, run.samples_per_step, info.world_size,
                                wandb={"name": cfg.name, "project": cfg.wandb_project_name,
                                       "notes": cfg.wandb_notes, "config": run.record(),
                                       "resumed": resumed})
        self.stopper = StopOnSignal(parse_signals(cfg.stop_signals))
        self.fields = FieldCounts(method.data, info.device, position.field_counts)
        self.signalled = None  # the stop signal every rank agreed on (alip.training.preemption)

    def done(self):
        """The run reached its last epoch or --max-steps."""
        max_steps = self.run.cfg.max_steps
        return self.pos.epoch >= self.run.cfg.epochs or (max_steps is not None
                                                          and self.pos.step >= max_steps)

    def train(self):
        """Epochs until the last, --max-steps or an agreed stop signal -> the run's summary."""
        self.stopper.install()
        try:
            stopped = self.pos.step >= (self.run.cfg.max_steps or float("inf"))
            while self.pos.epoch < self.run.cfg.epochs and not stopped:
                stopped = self.run_epoch()
            self.book.read()
        except BaseException:
            self.logger.close(failed=True)
            raise
        finally:
            self.stopper.restore()
        self.logger.close()
        return {"step": self.pos.step, "epoch": self.pos.epoch, "nonfinite_total": self.book.total,
                "run_dir": str(self.run.run_dir),
                "stopped_by": None if self.done() else self.signalled}

    def start_epoch(self):
        """The loader at the run's position: a resumed reader state (DALI: its pipeline
        checkpoint, no replay) where it matches, else the epoch from the batch to start at."""
        loader, pos = self.run.loader, self.pos
        state, pos.loader_state = pos.loader_state, None
        if (state is not None and hasattr(loader, "load_state_dict")
                and (state["epoch"], state["batch"]) == (pos.epoch, pos.batch)):
            loader.load_state_dict(state)
        else:
            loader.set_epoch(pos.epoch, start_batch=pos.batch)
        self.logger.reset_clock()

    def run_epoch(self):
        """The epoch's optimizer steps from the position; True when the run stops inside it
        (--max-steps or a stop signal), after saving where it stopped."""
        cfg, run, pos = self.run.cfg, self.run, self.pos
        self.start_epoch()
        last_batch, micro, stop = run.steps_per_epoch * cfg.accum_freq, [], False
        for batch in as_batch_dicts(run.loader, run.method.data, run.info.device):
            if pos.batch >= last_batch:
                break
            self.fields.take(batch)  # the drawn fields' indices: counted, not trained on
            micro.append(batch)
            pos.batch += 1
            if len(micro) < cfg.accum_freq:
                continue
            stop = self.optimizer_step(micro)
            micro = []
            if stop:
                break
            if cfg.save_every_n_steps and pos.step % cfg.save_every_n_steps == 0 \
                    and pos.batch < last_batch:
                self.save(f"step_{pos.step}", pos.epoch)
        if self.signalled and run.info.is_master:
            run.log.warning("%s (on rank(s) of this job) at step %d: saving, then stopping; run "
                            "the same command with --resume latest to continue",
                            self.signalled.name, pos.step)
        if stop and pos.batch < last_batch:
            self.save(f"step_{pos.step}", pos.epoch)
            return True
        self.end_epoch()
        return stop

    def optimizer_step(self, micro):
        """One optimizer step on the accumulated micro-batches, its log at a log step (where
        the ranks also agree on a stop signal) -> True when the run stops after it."""
        cfg, run, pos = self.run.cfg, self.run, self.pos
        used = {"lr": run.optimizer.param_groups[0]["lr"],  # what this step runs with
                "beta1": run.optimizer.param_groups[0]["betas"][0]}
        self.book.add(pos.step + 1, train_step(self.ctx, micro))
        run.scheduler.step()
        pos.step += 1
        self.logger.step()
        at_max = cfg.max_steps is not None and pos.step >= cfg.max_steps
        if pos.step % cfg.log_every_n_steps == 0 or pos.step == run.total_steps or at_max:
            self.log_step(used)  # a run's last step is logged
            self.signalled = self.stopper.agreed(run.info)  # every rank reads back here
        elif len(self.book.pending) > cfg.max_nonfinite:
            self.book.read()  # a streak is noticed within --max-nonfinite + 1 steps
        return bool(self.signalled) or at_max

    def log_step(self, used):
        metrics = self.book.read()  # every rank: a long streak stops them all here
        sps = self.logger.after_read(metrics)
        run, pos = self.run, self.pos
        logit_scale = full(run.model.logit_scale.detach())  # FSDP: a collective, every rank
        if not run.info.is_master:
            return
        record = {"kind": "train", "step": pos.step, "epoch": pos.epoch,
                  "samples": pos.step * run.samples_per_step, "lr": used["lr"],
                  "beta1": used["beta1"],
                  "logit_scale": float(logit_scale.exp()),
                  "samples_per_s": sps, "samples_per_s_per_gpu": sps / run.info.world_size,
                  "nonfinite_total": self.book.total, "skipped": metrics is None}
        record.update(metrics or {})
        self.logger.write(record)

    def end_epoch(self):
        """The epoch's checkpoint when due (or on a stop signal), then its evaluation."""
        cfg, run, pos = self.run.cfg, self.run, self.pos
        self.book.read()
        fields = self.fields.epoch_record(run.info)  # every rank
        if fields and run.info.is_master:
            self.logger.write({"kind": "epoch", "step": pos.step, "epoch": pos.epoch + 1, **fields})
        pos.epoch, pos.batch = pos.epoch + 1, 0
        if (cfg.save_frequency and pos.epoch % cfg.save_frequency == 0) \
                or pos.epoch == cfg.epochs or self.signalled:
            self.save(f"epoch_{pos.epoch}", pos.epoch)
        results = evaluate(cfg, run.model, run.preprocess, pos.epoch, run.info,
                           run.method.dense_head())
        if results and run.info.is_master:
            run.log.info("epoch %d eval: %s", pos.epoch,
                         " ".join(f"{k}={v:.2f}" for k, v in results.items()))
            self.logger.write({"kind": "eval", "step": pos.step, "epoch": pos.epoch, **results})
        barrier(run.info)

    def save(self, tag, completed_epochs):
        """A checkpoint of the position (every rank: RNG and reader states are gathered; an
        --fsdp run's shards, alip.training.sharded), unless the step is in a non-finite streak
        or the weights are not finite."""
        run, pos, book = self.run, self.pos, self.book
        book.read()
        fsdp = is_fsdp(run.method.encoder)
        bad = sharded.nonfinite(run.method.encoder, run.info) if fsdp else \
            ckpt.nonfinite_weights(run.model.state_dict())
        if book.run or bad:
            run.log.warning("not saving %s: %s", tag, f"step {pos.step} is in a streak of "
                            f"{book.run} non-finite step(s)" if book.run else
                            "the weights are not finite")
            return
        state = {"optimizer": None if fsdp else run.optimizer.state_dict(),
                 "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                 **run.method.state_dict(), "epoch": pos.epoch, "batch_in_epoch": pos.batch,
                 "step": pos.step, "nonfinite_total": book.total,
                 "field_counts": all_gather_object(self.fields.state(), run.info),
                 "rng": all_gather_object(ckpt.rng_state(), run.info),
                 "loader": all_gather_object(run.loader.state_dict(), run.info)
                 if hasattr(run.loader, "state_dict") else None,
                 "config": run.record(), "model": run.cfg.model}
        extra = {"method": run.cfg.method, "eval_heads": run.method.eval_heads(),
                 "model_kwargs": run.method.model_kwargs()}
        if fsdp:  # the heads are in the encoder's shards
            path = sharded.save(run, tag, {**state, "heads": None}, completed_epochs, pos.step,
                                extra)
        elif run.info.is_master:
            path = ckpt.save_checkpoint(run.ckpt_dir, tag, run.cfg.model, run.model, state,
                                        completed_epochs, pos.step, keep_last=run.cfg.keep_last,
                                        extra=extra)
        if run.info.is_master:
            run.log.info("saved %s", path)
        barrier(run.info)


def announce(run):
    """config.yaml and the run's opening log lines (rank 0)."""
    cfg, info, loader = run.cfg, run.info, run.loader
    if not info.is_master:
        return
    write_config(run.record(), run.run_dir / "config.yaml")
    n_params = sum(p.numel() for p in run.model.parameters())
    log = run.log
    log.info("run dir %s | %s %s (%.1fM params) | %d process(es) on %s | precision %s",
             run.run_dir, cfg.method, cfg.model, n_params / 1e6, info.world_size, info.device,
             cfg.precision)
    log.info("%d samples, %d batches/epoch/process, %d steps/epoch, %d steps total, global "
             "batch %d", getattr(loader, "num_samples", -1), loader.batches_per_epoch,
             run.steps_per_epoch, run.total_steps, run.samples_per_step)
    if getattr(loader, "length_bucketing", 0):
        log.info("length bucketing: batches re-formed by text length in pools of %d",
                 loader.length_bucketing)
    dropped = getattr(loader, "dropped_per_epoch", 0)
    if dropped:
        log.warning("drop_last: %d samples per epoch are not seen (a different set each epoch)",
                    dropped)
    unused = loader.batches_per_epoch - run.steps_per_epoch * cfg.accum_freq
    if unused:
        log.warning("--accum-freq %d: the last %d batch(es) of each epoch do not fill an "
                    "optimizer step and are skipped", cfg.accum_freq, unused)


# ---------------------------------------------------------------------------------------------
# the run


def run(args, make_loader=None):
    info = init_distributed(args.device, args.dist_backend, args.dist_url)
    try:
        return _run(args, info, make_loader or default_make_loader)
    finally:
        release_group()
        cleanup(info)


def _run(args, info, make_loader):
    cfg = resolve_config(args, info)
    method = build_method(cfg, info)
    run_dir = prepare_run_dir(cfg, info)
    log = setup_text_log(run_dir, info.is_master)
    resume_path = agree_on_resume(cfg, info, run_dir / "checkpoints", log)
    built = build_run(cfg, info, method, run_dir, log, make_loader)
    position = restore(built, resume_path) if resume_path is not None else Position()
    return Trainer(built, position, resumed=resume_path is not None).train()


def main(argv=None):
    args = parse_args(argv)
    try:
        out = run(args)
    except (TrainConfigError, NonFiniteLossError, ckpt.CheckpointError, RecordIOError) as e:
        raise SystemExit(f"train.py: error: {one_line(e)}")
    # stopped by a signal, its checkpoint saved: the exit status of a process it killed
    return 128 + out["stopped_by"] if out["stopped_by"] else 0
