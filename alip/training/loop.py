"""The training run: set-up with early checks, the epoch/step loop, checkpoints, evaluation.

``main(argv)`` is train.py. ``run(args, make_loader=None)`` is the same for a parsed
namespace; ``make_loader(args, info, image_size)`` may replace the data loader (tests).
"""
import importlib.util
import logging
import random
from datetime import datetime
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip_train.precision import get_autocast

import alip  # noqa: F401  (registers the ALIP-* model configs)
from alip.cli import one_line
from alip.data.recordio import RecordIOError
from alip.methods import MethodConfigError, get_method
from alip.methods.base import weights_given
from alip.model import to_device_keeping_host_tokens

from . import checkpoint as ckpt
from .distributed import all_gather_object, barrier, cleanup, init_distributed
from .logger import RunLogger, setup_text_log
from .optim import build_optimizer, build_scheduler
from .preemption import StopOnSignal, parse_signals
from .params import (FlagError, check_eval_inputs, check_flags, parse_args, resolved_config,
                     resume_conflicts, write_config)
from .step import StepContext, train_step
from .synthetic import SyntheticLoader


class TrainConfigError(ValueError):
    """Bad flags or inputs, detected before any training starts."""


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
# set-up


def load_optimizer_state(optimizer, saved, resume_path):
    """optimizer.load_state_dict, with a checkpoint whose parameter groups hold other counts of
    parameters (the method's trainable set changed since it was written) named in one line."""
    have = [len(g["params"]) for g in optimizer.param_groups]
    got = [len(g["params"]) for g in saved.get("param_groups", [])]
    if have != got:
        raise TrainConfigError(
            f"--resume {resume_path}: its optimizer state holds {got} parameters per group, this "
            f"run trains {have}: the method's trainable parameters changed since the checkpoint was "
            f"written (SLIP with toolbox views, FILIP, DeCLIP and DeFILIP freeze the ViT's conv1 "
            f"since 2026-12-01); resume it with the alip that wrote it")
    optimizer.load_state_dict(saved)


def lock_towers(model, args, log):
    """open_clip_train's ``--lock-image`` / ``--lock-text`` (LiT), through the open_clip model's
    own ``lock_image_tower`` / ``lock_text_tower``. Called where open_clip_train calls them: on
    the created model (with its --pretrained weights), before grad checkpointing, the method,
    the optimizer and DDP, so a locked parameter is in neither the optimizer nor DDP's reducer.
    A tower without a lock method, a lock the tower refuses (open_clip's asserts), or one that
    locks nothing is a TrainConfigError naming the flag."""
    if args.lock_image:
        _lock(model, args, log, "--lock-image", "image", getattr(model, "visual", None),
              "lock_image_tower", "--lock-image-unlocked-groups", args.lock_image_unlocked_groups,
              unlocked_groups=args.lock_image_unlocked_groups,
              freeze_bn_stats=args.lock_image_freeze_bn_stats)
    if args.lock_text:
        # CustomTextCLIP keeps its text tower in .text (its lock_text_tower calls text.lock);
        # CLIP unpacks it onto the model and locks it with open_clip's lock_text_tower function
        custom = hasattr(model, "text")
        _lock(model, args, log, "--lock-text", "text", model.text if custom else
              getattr(model, "transformer", None), "lock_text_tower",
              "--lock-text-unlocked-layers", args.lock_text_unlocked_layers, tower_lock=custom,
              unlocked_layers=args.lock_text_unlocked_layers,
              freeze_layer_norm=args.lock_text_freeze_layer_norm)
    if (args.lock_image or args.lock_text) and not weights_given(args):
        log.warning("%s without --pretrained: the locked parameters keep their random "
                    "initialisation", " and ".join(
                        f for f, on in (("--lock-image", args.lock_image),
                                        ("--lock-text", args.lock_text)) if on))


def _lock(model, args, log, flag, what, tower, method, n_flag, n, tower_lock=True, **kwargs):
    kind = type(tower).__name__
    where = f"--model {args.model}'s {what} tower ({kind})"
    if not callable(getattr(model, method, None)) or (
            tower_lock and not callable(getattr(tower, "lock", None))):
        raise TrainConfigError(f"{flag}: {where} has no lock method; train it unlocked or pick "
                               f"another --model")
    before = {name for name, p in model.named_parameters() if p.requires_grad}
    try:
        getattr(model, method)(**kwargs)
    except (AssertionError, RuntimeError, ValueError, NotImplementedError, IndexError,
            KeyError) as e:  # open_clip's asserts; an HF arch without the layer names it needs
        why = f"KeyError {e}" if isinstance(e, KeyError) else one_line(e)
        if what == "text" and not kwargs["freeze_layer_norm"] and "LayerNorm" in str(e):
            raise TrainConfigError(
                f"{flag}: {where} locks its LayerNorms with the other weights and cannot leave "
                f"them trainable (open_clip: {why}); add --lock-text-freeze-layer-norm") from e
        raise TrainConfigError(f"{flag}{f' {n_flag} {n}' if n else ''}: {where} refuses: "
                               f"{why}") from e
    after = {name for name, p in model.named_parameters() if p.requires_grad}
    if not before - after:
        raise TrainConfigError(f"{flag} {n_flag} {n}: locks nothing: {where} has no more than "
                               f"{n} groups, all left unlocked; give a smaller {n_flag}")
    log.info(
        "%s: %d parameter tensors locked, %d stay trainable", flag, len(before - after),
        len(after))


def run_dir_of(args):
    if args.name is None:
        stamp = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
        model = "".join("-" if c in "/\\:" else c for c in args.model)  # hf-hub:org/name
        args.name = f"{stamp}-{model}-{args.method}-b{args.batch_size}"
    return Path(args.logs) / args.name


def check_args(args, info):
    """Clear errors for what can be checked before building anything."""
    try:
        check_flags(args)
        check_eval_inputs(args)
    except FlagError as e:
        raise TrainConfigError(str(e)) from e
    if args.model not in open_clip.list_models() and not args.model.startswith(("hf-hub:",
                                                                               "local-dir:")):
        raise TrainConfigError(f"--model: unknown model {args.model!r}; known ALIP models: "
                               f"{[m for m in open_clip.list_models() if m.startswith('ALIP')]}")
    for flag in ("batch_size", "accum_freq", "epochs"):
        if getattr(args, flag) < 1:
            raise TrainConfigError(f"--{flag.replace('_', '-')} must be >= 1, "
                                   f"got {getattr(args, flag)}")
    if args.max_nonfinite < 0:
        raise TrainConfigError(f"--max-nonfinite must be >= 0, got {args.max_nonfinite}")
    if args.dataset_type == "synthetic":
        if not args.train_num_samples:
            raise TrainConfigError("--dataset-type synthetic needs --train-num-samples")
    elif not args.train_data:
        raise TrainConfigError("--train-data is required (a data2rec output dir or .rec paths)")
    else:
        for path in train_data_paths(args.train_data):
            if not Path(path).exists():
                raise TrainConfigError(f"--train-data: not found: {path}")
        if not Path(args.train_data).is_dir():
            from alip.data.loader import rec_paths
            try:
                rec_paths(train_data_paths(args.train_data))
            except (FileNotFoundError, ValueError) as e:
                raise TrainConfigError(f"--train-data: {e}") from e
        if Path(args.train_data).is_dir() and not any(Path(args.train_data).glob("train-*.rec")):
            raise TrainConfigError(f"--train-data: no train-*.rec shards in {args.train_data} "
                                   f"(expected a data2rec output directory)")
    if args.retrieval_frequency and not (args.retrieval_data and args.retrieval_image_root):
        raise TrainConfigError("--retrieval-frequency needs --retrieval-data and "
                               "--retrieval-image-root")
    if args.zeroshot_frequency and not (args.imagenet_val or args.zeroshot_root):
        raise TrainConfigError("--zeroshot-frequency needs --imagenet-val or --zeroshot-root")
    check_global_batch(args, info.world_size)
    if args.ddp_gradients == "global" and args.local_loss and not args.gather_with_grad:
        # local rows against gathered columns: the columns' gradient lives on the other ranks,
        # so exact global gradients need the gather's backward (see alip.loss.local_grad_scale)
        args.gather_with_grad = True
    if args.precision == "amp" and info.device.type == "cpu":
        args.precision = "amp_bf16"  # fp16 autocast on CPU is slow and needs no scaler; use bf16


def check_global_batch(args, world_size):
    """--global-batch-size N: refuse a launch whose samples per step differ from the recipe's."""
    want = args.global_batch_size
    got = args.batch_size * world_size * args.accum_freq
    if want is None or want == got:
        return
    per_process = args.batch_size * args.accum_freq
    fix = (f"launch {want // per_process} processes" if want % per_process == 0 else
           f"no whole number of processes gives {want} at --batch-size {args.batch_size}")
    raise TrainConfigError(
        f"--global-batch-size {want}, but --batch-size {args.batch_size} x {world_size} "
        f"process(es) x --accum-freq {args.accum_freq} = {got}: {fix}, or change --batch-size / "
        f"--accum-freq (the learning rate and schedule of the recipe assume {want})")


def train_data_paths(train_data):
    if isinstance(train_data, (list, tuple)):
        return list(train_data)
    return [p for p in str(train_data).split(",") if p]


def find_resume(args, ckpt_dir, log):
    """The checkpoint this process would resume from (None: a fresh start)."""
    if args.resume == "latest":
        path = ckpt.find_latest(ckpt_dir, verify=True, warn=log.warning)
        if path is None:
            log.info("--resume latest: no complete checkpoint in %s, starting fresh", ckpt_dir)
        return path
    if args.resume:
        path = Path(args.resume)
        if not path.is_file():
            raise TrainConfigError(f"--resume: no such checkpoint: {path}")
        return path
    return None


def agree_on_resume(args, info, ckpt_dir, log):
    """``find_resume`` on every rank, and the same answer on every rank, or an error on every
    rank: with a --logs-dir that is not shared between nodes, rank 0 would resume while the
    others start fresh, and the job would hang at its first collective."""
    try:
        mine, failure = find_resume(args, ckpt_dir, log), None
    except Exception as e:  # noqa: BLE001  (told to every rank below, then raised here)
        mine, failure = None, e
    views = all_gather_object((None if mine is None else str(mine),
                               None if failure is None else one_line(failure)), info)
    if failure is not None:
        raise failure
    errors = [(rank, e) for rank, (_, e) in enumerate(views) if e]
    if errors:
        rank, e = errors[0]
        raise TrainConfigError(f"rank {rank}: {e}")
    ranks_of = {}
    for rank, (path, _) in enumerate(views):
        ranks_of.setdefault(path, []).append(rank)
    if len(ranks_of) > 1:
        seen = "; ".join(f"rank(s) {_span(ranks)}: {path or 'no checkpoint (a fresh start)'}"
                         for path, ranks in ranks_of.items())
        raise TrainConfigError(
            f"--resume {args.resume}: the processes do not see the same checkpoint ({seen}); "
            f"--logs-dir must be one directory every node shares")
    return mine


def _span(ranks):
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 2 and ranks == list(
        range(ranks[0], ranks[-1] + 1)) else ",".join(map(str, ranks))


def prepare_run_dir(args, info):
    run_dir = run_dir_of(args)
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
        if error is None and args.resume is None and ckpt.has_checkpoints(run_dir / "checkpoints"):
            error = (f"run directory {run_dir} already has checkpoints; pass --resume latest to "
                     f"continue it, or another --name")
    error = all_gather_object(error, info)[0]
    if error:
        raise TrainConfigError(error)
    return run_dir


def resolve_data_backend(backend, device, length_bucketing=0):
    """``auto``: DALI on CUDA where nvidia-dali is installed, else the PyTorch reader (said once);
    the PyTorch reader also when length bucketing is on (DALI shuffles inside its pipeline)."""
    if backend != "auto":
        return backend
    if torch.device(device).type != "cuda" or length_bucketing:
        return "torch"
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        logging.warning("--data-backend auto: nvidia-dali is not installed, reading with the "
                        "PyTorch reader (pip install nvidia-dali-cuda130 for GPU decoding)")
        return "torch"
    return "dali"


def default_make_loader(args, info, image_size):
    """The loader of the method's DataSpec (dict batches: its image views, text fields/views)."""
    device = str(info.device)
    spec = get_method(args.method).loader_spec(args)
    if args.dataset_type == "synthetic":
        args.data_reader = "synthetic"
        return SyntheticLoader(args.train_num_samples, args.batch_size, image_size,
                               rank=info.rank, world_size=info.world_size, seed=args.seed,
                               device=device, spec=spec)
    from alip.data.loader import build_train_loader
    bucketing = getattr(args, "length_bucketing", 0)
    backend = resolve_data_backend(args.data_backend, info.device, bucketing)
    args.data_reader = backend  # what --data-backend resolved to: a resume must read the same way
    data = args.train_data
    if not Path(data).is_dir():
        data = train_data_paths(data)
    return build_train_loader(data, backend=backend, batch_size=args.batch_size,
                              image_size=image_size, rank=info.rank, world_size=info.world_size,
                              seed=args.seed, workers=args.workers, device=device, drop_last=True,
                              verify_shards=getattr(args, "verify_shards", True), spec=spec,
                              length_bucketing=bucketing)


def as_batch_dicts(loader, spec, device):
    """Batches as the method's dicts, every tensor on ``device`` (the PyTorch reader yields
    pinned CPU tensors, DALI "mixed" CUDA images beside CPU texts). Loaders that yield the
    legacy (images, raw, caption) tuple are mapped onto the keys ``image``, ``raw``,
    ``caption``; a method that asks for more than those needs a loader built for its DataSpec."""
    legacy = ("image", "raw", "caption")
    missing = [k for k in spec.keys if k not in legacy]
    text_keys = set(spec.text_fields) | {v.name for v in spec.text_views}
    for batch in loader:
        if not isinstance(batch, dict):
            if missing:
                raise TrainConfigError(f"the data loader yields (image, raw, caption) tuples, but "
                                       f"the method also needs {missing}")
            batch = {k: v for k, v in zip(legacy, batch) if k in spec.keys}
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
    results = {}
    if not info.is_master:
        return results
    tokenizer = open_clip.get_tokenizer(args.model)
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
# the run


def run(args, make_loader=None):
    info = init_distributed(args.device, args.dist_backend, args.dist_url)
    try:
        return _run(args, info, make_loader or default_make_loader)
    finally:
        cleanup(info)


def _run(args, info, make_loader):
    check_args(args, info)
    method_cls = get_method(args.method)
    try:
        method_cls.check_args(args)
    except MethodConfigError as e:
        raise TrainConfigError(str(e)) from e
    run_dir = prepare_run_dir(args, info)
    log = setup_text_log(run_dir, info.is_master)
    ckpt_dir = run_dir / "checkpoints"

    resume_path = agree_on_resume(args, info, ckpt_dir, log)

    seed_everything(args.seed)
    try:
        clip_model, _, preprocess = open_clip.create_model_and_transforms(
            args.model, pretrained=args.pretrained, device=info.device)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        raise TrainConfigError(f"--model {args.model} --pretrained {args.pretrained}: {e}") from e
    lock_towers(clip_model, args, log)  # before grad checkpointing, as open_clip_train
    if args.grad_checkpointing:
        clip_model.set_grad_checkpointing(True)
    image_size = clip_model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    try:  # before the data: a method that cannot use this model says so now
        method = method_cls(clip_model, args, rank=info.rank, world_size=info.world_size)
    except MethodConfigError as e:
        raise TrainConfigError(str(e)) from e
    if method.vit == "toolbox":
        log.info("--vit-style %s: the DeCLIP toolbox's ViT (conv1 frozen%s)", args.vit_style,
                 "" if weights_given(args) else ", its init")

    try:
        loader = make_loader(args, info, image_size)
    except (FileNotFoundError, ValueError) as e:
        raise TrainConfigError(f"--train-data {args.train_data}: {e}") from e
    steps_per_epoch = loader.batches_per_epoch // args.accum_freq
    if steps_per_epoch < 1:
        raise TrainConfigError(
            f"--batch-size {args.batch_size} x {info.world_size} processes x --accum-freq "
            f"{args.accum_freq} needs more samples than the data has "
            f"({loader.batches_per_epoch} batches per epoch per process, "
            f"{getattr(loader, 'num_samples', '?')} samples)")
    total_steps = steps_per_epoch * args.epochs
    unused = loader.batches_per_epoch - steps_per_epoch * args.accum_freq

    encoder = method.encoder.to(info.device)
    loss_fn = method.criterion.to(info.device)
    optimizer = build_optimizer(encoder, args.lr, args.wd, (args.beta1, args.beta2), args.eps,
                                exclude_gain_bias=args.wd_exclude_gain_bias)
    scheduler = build_scheduler(optimizer, args.schedule, args.lr, total_steps,
                                pct_start=args.pct_start, cycle_momentum=args.cycle_momentum,
                                warmup=args.warmup, warmup_start_lr=args.warmup_start_lr)
    scaler = None
    if args.precision == "amp" and info.device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda", growth_interval=200)  # as the reference

    args.world_size = info.world_size
    args.steps_per_epoch, args.total_steps = steps_per_epoch, total_steps
    start_epoch, start_batch, step = 0, 0, 0
    loader_state = None  # this rank's reader position (DALI: its pipeline checkpoint)
    nonfinite_total = 0
    if resume_path is not None:
        model_ckpt, state = ckpt.load_checkpoint(resume_path)
        if model_ckpt.get("model") not in (None, args.model):
            raise TrainConfigError(f"--resume {resume_path}: checkpoint is a "
                                   f"{model_ckpt['model']!r}, but --model is {args.model!r}")
        old = state.get("config", {})
        changed = resume_conflicts(old, args)
        if changed:
            raise TrainConfigError(
                f"--resume {resume_path}: the data position, schedule and optimizer state depend "
                f"on " + ", ".join(changed) + "; resume with the same values")
        clip_model.load_state_dict(model_ckpt["state_dict"])
        load_optimizer_state(optimizer, state["optimizer"], resume_path)
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        loss_fn.load_state_dict(state["loss"])
        if state.get("heads"):
            method.load_heads_state_dict(state["heads"])
        start_epoch, start_batch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        nonfinite_total = state.get("nonfinite_total", 0)
        rngs = state.get("rng") or []
        if len(rngs) == info.world_size:
            ckpt.set_rng_state(rngs[info.rank])
        loaders = state.get("loader") or []
        if len(loaders) == info.world_size:
            loader_state = loaders[info.rank]
        log.info("resumed from %s: epoch %d, batch %d, step %d", resume_path, start_epoch,
                 start_batch, step)

    model = encoder
    if info.distributed:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=device_ids, static_graph=args.ddp_static_graph,
            find_unused_parameters=method.find_unused_parameters)
    encoder.train()
    loss_fn.train()

    ctx = StepContext(model=model, criterion=loss_fn, optimizer=optimizer, info=info,
                      after_step=method.after_step, accum_mode=args.accum_mode,
                      grad_clip_norm=args.grad_clip_norm, scaler=scaler,
                      autocast=get_autocast(args.precision, device_type=info.device.type))

    if info.is_master:
        write_config(args, run_dir / "config.yaml")
        n_params = sum(p.numel() for p in clip_model.parameters())
        log.info("run dir %s | %s %s (%.1fM params) | %d process(es) on %s | precision %s",
                 run_dir, args.method, args.model, n_params / 1e6, info.world_size,
                 info.device, args.precision)
        log.info("%d samples, %d batches/epoch/process, %d steps/epoch, %d steps total, "
                 "global batch %d", getattr(loader, "num_samples", -1), loader.batches_per_epoch,
                 steps_per_epoch, total_steps,
                 args.batch_size * args.accum_freq * info.world_size)
        if getattr(loader, "length_bucketing", 0):
            log.info("length bucketing: batches re-formed by text length in pools of %d",
                     loader.length_bucketing)
        dropped = getattr(loader, "dropped_per_epoch", 0)
        if dropped:
            log.warning("drop_last: %d samples per epoch are not seen (a different set each "
                        "epoch)", dropped)
        if unused:
            log.warning("--accum-freq %d: the last %d batch(es) of each epoch do not fill an "
                        "optimizer step and are skipped", args.accum_freq, unused)

    book = StepBook(args.max_nonfinite, nonfinite_total, lambda: ckpt.find_good(ckpt_dir))
    samples_per_step = args.batch_size * args.accum_freq * info.world_size
    logger = RunLogger(run_dir, info.is_master, args.report_to, total_steps, step,
                       samples_per_step, info.world_size,
                       wandb={"name": args.name, "project": args.wandb_project_name,
                              "notes": args.wandb_notes, "config": resolved_config(args),
                              "resumed": resume_path is not None})

    def save(tag, epoch, batch_in_epoch, completed_epochs):
        book.read()
        if book.run or ckpt.nonfinite_weights(clip_model.state_dict()):
            log.warning("not saving %s: %s", tag, f"step {step} is in a streak of {book.run}"
                        " non-finite step(s)" if book.run else "the weights are not finite")
            return
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "loss": loss_fn.state_dict(), "heads": method.heads_state_dict(), "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                 "step": step, "nonfinite_total": book.total,
                 "rng": all_gather_object(ckpt.rng_state(), info),
                 "loader": all_gather_object(loader.state_dict(), info)
                 if hasattr(loader, "state_dict") else None,
                 "config": resolved_config(args), "model": args.model}
        if info.is_master:
            path = ckpt.save_checkpoint(ckpt_dir, tag, args.model, clip_model, state,
                                        completed_epochs, step, keep_last=args.keep_last,
                                        extra={"method": args.method,
                                               "eval_heads": method.eval_heads()})
            log.info("saved %s", path)
        barrier(info)

    stop = args.max_steps is not None and step >= args.max_steps
    signalled = None  # the stop signal every rank agreed on (alip.training.preemption)
    epoch = start_epoch
    stopper = StopOnSignal(parse_signals(args.stop_signals)).install()
    try:
        while epoch < args.epochs and not stop:
            first = start_batch if epoch == start_epoch else 0
            if (loader_state is not None and hasattr(loader, "load_state_dict")
                    and (loader_state["epoch"], loader_state["batch"]) == (epoch, first)):
                loader.load_state_dict(loader_state)  # DALI: from its checkpoint, no replay
            else:
                loader.set_epoch(epoch, start_batch=first)
            loader_state = None
            batch_in_epoch, micro = first, []
            last_batch = steps_per_epoch * args.accum_freq
            logger.reset_clock()
            for batch in as_batch_dicts(loader, method.data, info.device):
                if batch_in_epoch >= last_batch:
                    break
                micro.append(batch)
                batch_in_epoch += 1
                if len(micro) < args.accum_freq:
                    continue
                used = {"lr": optimizer.param_groups[0]["lr"],  # what this step runs with
                        "beta1": optimizer.param_groups[0]["betas"][0]}
                book.add(step + 1, train_step(ctx, micro))
                micro = []
                scheduler.step()
                step += 1
                logger.step()
                last = step == total_steps or (args.max_steps is not None
                                               and step >= args.max_steps)
                if step % args.log_every_n_steps == 0 or last:  # a run's last step is logged
                    metrics = book.read()  # every rank: a long streak stops them all here
                    sps = logger.after_read(metrics)
                    if info.is_master:
                        record = {"kind": "train", "step": step, "epoch": epoch,
                                  "samples": step * samples_per_step,
                                  "lr": used["lr"], "beta1": used["beta1"],
                                  "logit_scale": float(clip_model.logit_scale.detach().exp()),
                                  "samples_per_s": sps,
                                  "samples_per_s_per_gpu": sps / info.world_size,
                                  "nonfinite_total": book.total, "skipped": metrics is None}
                        record.update(metrics or {})
                        logger.write(record)
                    signalled = stopper.agreed(info)  # every rank reads back at this step
                elif len(book.pending) > args.max_nonfinite:
                    book.read()  # a streak is noticed within --max-nonfinite + 1 steps
                if signalled or (args.max_steps is not None and step >= args.max_steps):
                    stop = True
                    break
                if args.save_every_n_steps and step % args.save_every_n_steps == 0 \
                        and batch_in_epoch < last_batch:
                    save(f"step_{step}", epoch, batch_in_epoch, epoch)
            if signalled and info.is_master:
                log.warning("%s (on rank(s) of this job) at step %d: saving, then stopping; run "
                            "the same command with --resume latest to continue", signalled.name,
                            step)
            if stop and batch_in_epoch < last_batch:
                save(f"step_{step}", epoch, batch_in_epoch, epoch)
                break
            book.read()
            epoch += 1
            if (args.save_frequency and epoch % args.save_frequency == 0) or epoch == args.epochs \
                    or signalled:
                save(f"epoch_{epoch}", epoch, 0, epoch)
            results = evaluate(args, clip_model, preprocess, epoch, info, method.dense_head())
            if results and info.is_master:
                log.info("epoch %d eval: %s", epoch,
                         " ".join(f"{k}={v:.2f}" for k, v in results.items()))
                logger.write({"kind": "eval", "step": step, "epoch": epoch, **results})
            barrier(info)
        book.read()
    except BaseException:
        logger.close(failed=True)
        raise
    finally:
        stopper.restore()
    logger.close()
    finished = epoch >= args.epochs or (args.max_steps is not None and step >= args.max_steps)
    return {"step": step, "epoch": epoch, "nonfinite_total": book.total,
            "run_dir": str(run_dir), "stopped_by": None if finished else signalled}


def main(argv=None):
    args = parse_args(argv)
    try:
        out = run(args)
    except (TrainConfigError, NonFiniteLossError, ckpt.CheckpointError, RecordIOError) as e:
        raise SystemExit(f"train.py: error: {one_line(e)}")
    # stopped by a signal, its checkpoint saved: the exit status of a process it killed
    return 128 + out["stopped_by"] if out["stopped_by"] else 0

