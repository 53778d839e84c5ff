"""The run's configuration, resolved once: the parsed flags checked, every value the run derives
from them or from the launch decided (run name, world size, the reader ``--data-backend auto``
picks, the precision on a CPU, ``--gather-with-grad`` implied by ``--local-loss``), then frozen.
Nothing after ``resolve_config`` changes it: what config.yaml and the checkpoints record is what
the run used.
"""
import argparse
import importlib.util
import logging
import os
from datetime import datetime
from pathlib import Path

import open_clip
import torch

from alip.methods import MethodConfigError, get_method

from .params import FlagError, check_eval_inputs, check_flags


class TrainConfigError(ValueError):
    """Bad flags or inputs, detected before any training starts."""


class Config(argparse.Namespace):
    """The resolved flags: an argparse namespace that refuses any change once ``freeze()`` ran
    (a phase that would set a flag after resolution fails at once instead of recording a value
    the run did not use)."""

    def freeze(self):
        object.__setattr__(self, "_frozen", True)
        return self

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(f"the run's configuration is resolved and frozen; {name} cannot "
                                 f"change (resolve it in alip.training.config.resolve_config)")
        super().__setattr__(name, value)

    def __delattr__(self, name):
        self.__setattr__(name, None)


def resolve_config(args, info):
    """``args`` (parsed, left untouched) checked and completed for this launch -> a frozen
    Config. Raises TrainConfigError naming the flag at fault."""
    check_run_flags(args, info.world_size)
    cfg = Config(**vars(args))
    cfg.name = args.name or default_run_name(args)
    cfg.world_size = info.world_size
    cfg.data_reader = resolve_data_reader(args, info.device)
    cfg.cpu_threads = resolve_cpu_threads(args, info.device)
    if args.ddp_gradients == "global" and args.local_loss and not args.gather_with_grad:
        # local rows against gathered columns: the columns' gradient lives on the other ranks,
        # so exact global gradients need the gather's backward (see alip.loss.local_grad_scale)
        cfg.gather_with_grad = True
    if args.precision == "amp" and info.device.type == "cpu":
        cfg.precision = "amp_bf16"  # fp16 autocast on CPU is slow and needs no scaler; use bf16
    try:
        for dest, value in get_method(args.method).resolved_flags(args).items():
            setattr(cfg, dest, value)
    except MethodConfigError as e:
        raise TrainConfigError(str(e)) from e
    return cfg.freeze()


def resolve_cpu_threads(args, device):
    """The intra-op threads of this process: ``--cpu-threads``; else ``OMP_NUM_THREADS``; on a
    CPU device the CPUs this process may use less its data workers (at least 1: the workers
    and the step's threads then fit the cores; a thread more than that, or other jobs on the
    cores, makes every parallel op wait at its barrier for a descheduled thread: measured by
    bench/cpu_share.py at 10-30x a step's idle time beside 4 busy processes, against 2.7x with
    one thread); elsewhere torch's own count."""
    if args.cpu_threads:
        return args.cpu_threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if torch.device(device).type != "cpu":
        return torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) - args.workers)


def default_run_name(args):
    stamp = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    model = "".join("-" if c in "/\\:" else c for c in args.model)  # hf-hub:org/name
    return f"{stamp}-{model}-{args.method}-b{args.batch_size}"


def run_dir_of(cfg):
    return Path(cfg.logs) / (cfg.name or default_run_name(cfg))


def check_run_flags(args, world_size):
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
    check_train_data(args)
    if args.retrieval_frequency and not (args.retrieval_data and args.retrieval_image_root):
        raise TrainConfigError("--retrieval-frequency needs --retrieval-data and "
                               "--retrieval-image-root")
    if args.zeroshot_frequency and not (args.imagenet_val or args.zeroshot_root):
        raise TrainConfigError("--zeroshot-frequency needs --imagenet-val or --zeroshot-root")
    check_global_batch(args, world_size)
    if getattr(args, "fsdp", False) and (args.retrieval_frequency or args.zeroshot_frequency):
        raise TrainConfigError("--fsdp with --retrieval-frequency / --zeroshot-frequency: the "
                               "evaluation runs on rank 0 alone, which a sharded model cannot; "
                               "evaluate the consolidated checkpoint (python -m "
                               "alip.training.consolidate) with eval_*.py")
    if getattr(args, "fsdp", False) and getattr(args, "torchcompile", False):
        raise TrainConfigError("--fsdp with --torchcompile: the compiled image tower under "
                               "FSDP2's hooks is not tested yet; use one of them")


def check_train_data(args):
    if args.dataset_type == "synthetic":
        if not args.train_num_samples:
            raise TrainConfigError("--dataset-type synthetic needs --train-num-samples")
        return
    if not args.train_data:
        raise TrainConfigError("--train-data is required (a data2rec output dir or .rec paths)")
    for path in train_data_paths(args.train_data):
        if not Path(path).exists():
            raise TrainConfigError(f"--train-data: not found: {path}")
    if not Path(args.train_data).is_dir():
        from alip.data.shards import rec_paths
        try:
            rec_paths(train_data_paths(args.train_data))
        except (FileNotFoundError, ValueError) as e:
            raise TrainConfigError(f"--train-data: {e}") from e
    if Path(args.train_data).is_dir() and not any(Path(args.train_data).glob("train-*.rec")):
        raise TrainConfigError(f"--train-data: no train-*.rec shards in {args.train_data} "
                               f"(expected a data2rec output directory)")


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


def resolve_data_reader(args, device):
    """The reader this run reads with: "synthetic", or what --data-backend resolves to."""
    if args.dataset_type == "synthetic":
        return "synthetic"
    return resolve_data_backend(args.data_backend, device, getattr(args, "length_bucketing", 0))


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
