"""train.py's flags, the ``--config`` YAML defaults, and the resolved configuration.

Flag names mirror ``open_clip_train`` where the concept is the same. Precedence: built-in
default < ``--config FILE.yaml`` < command line. The YAML keys are flag names with ``-`` or
``_`` (``batch-size`` or ``batch_size``); an unknown key, a value of the wrong type or out of
range is an error naming the file and key. Every numeric flag has its valid range in
``RANGES``, checked by ``parse_args`` before anything is built; ``check_eval_inputs`` checks
the files and directories of the evaluation flags.
"""
import argparse
import functools
import importlib.util
import os
from pathlib import Path

import yaml

from alip.atomic import write_text
from alip.cli import interval_error, resolve_device
from alip.methods import get_method, method_names
from alip.methods.base import SHARED_RANGES, add_shared_args, check_field_flags

from .preemption import parse_signals


PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "fp32")

# Valid range of every training-wide numeric flag (each method declares its own in
# Method.flag_ranges; flag_ranges() joins them), as an interval: "[" / "]" include the bound, "(" / ")"
# exclude it. NaN is never in range, nor is inf (every upper bound "inf" is open).
RANGES = {
    "train_num_samples": "[1, inf)", "workers": "[0, inf)", "batch_size": "[1, inf)",
    "accum_freq": "[1, inf)", "global_batch_size": "[1, inf)", "epochs": "[1, inf)",
    "lr": "(0, inf)", "wd": "[0, inf)", "beta1": "[0, 1)", "beta2": "[0, 1)", "eps": "(0, inf)",
    "pct_start": "(0, 1)", "warmup": "[0, inf)", "warmup_start_lr": "[0, inf)",
    "grad_clip_norm": "[0, inf)",
    "seed": "[0, 4294967295]",  # numpy's seed range
    "save_frequency": "[0, inf)", "save_every_n_steps": "[0, inf)", "keep_last": "[1, inf)",
    "log_every_n_steps": "[1, inf)", "max_nonfinite": "[0, inf)", "max_steps": "[1, inf)",
    "retrieval_frequency": "[0, inf)", "zeroshot_frequency": "[0, inf)",
    "eval_batch_size": "[1, inf)", "length_bucketing": "[0, inf)",
    "lock_image_unlocked_groups": "[0, inf)", "cpu_threads": "[0, inf)", "lock_text_unlocked_layers": "[0, inf)",
    "text_context": "[2, inf)",  # SOT + EOT
}


@functools.cache
def flag_ranges():
    """Every flag's range: the training flags' (``RANGES``) and each method's own
    (``Method.flag_ranges``). The methods are imported here, when flags are first checked, not
    when this module loads."""
    ranges = {**RANGES, **SHARED_RANGES}
    for name in method_names():
        ranges.update(get_method(name).flag_ranges)
    return ranges

# open_clip_train's tower locks: each lock flag and the flags that only qualify it.
LOCK_QUALIFIERS = {"lock_image": ("lock_image_unlocked_groups", "lock_image_freeze_bn_stats"),
                   "lock_text": ("lock_text_unlocked_layers", "lock_text_freeze_layer_norm")}
LOCK_FLAGS = tuple(f for lock, rest in LOCK_QUALIFIERS.items() for f in (lock, *rest))
LOCK_DEFAULTS = {f: (0 if f.endswith(("_groups", "_layers")) else False) for f in LOCK_FLAGS}

# Flags a resumed run must keep: the data position and schedule depend on the first four and
# length_bucketing (the sample order); the optimizer and scheduler states restored on resume
# carry the others (a new value would be overridden by the checkpoint, so it is refused instead
# of being recorded and not used). The tower locks decide which parameters the optimizer holds
# (--lock-image-freeze-bn-stats turns BatchNorm weights into buffers), so they are fixed too,
# as is --vit-style (the toolbox's ViT keeps conv1 out of the optimizer), and --objective (the
# model's logit bias and the loss); a checkpoint from before --objective is not checked for it.
RESUME_FIXED = ("batch_size", "world_size", "accum_freq", "epochs", "length_bucketing", "lr",
                "wd", "beta1", "beta2", "eps", "schedule", "pct_start", "cycle_momentum", "warmup",
                "warmup_start_lr", "wd_exclude_gain_bias", "method", "seed", "data_reader",
                "caption_view", "caption_tokens", "vit_style", "raw_fields", "caption_fields",
                "raw_field_probs", "caption_field_probs", "objective", "text_context", *LOCK_FLAGS)
# What a checkpoint written before a RESUME_FIXED flag existed ran with.
RESUME_DEFAULTS = {"length_bucketing": 0, "vit_style": "reference", "raw_fields": "raw",
                   "caption_fields": "caption", "raw_field_probs": None,
                   "caption_field_probs": None, "text_context": None, **LOCK_DEFAULTS}




class FlagError(ValueError):
    """A flag or --config value that is out of range or of the wrong type (message names it)."""


def range_error(dest, value):
    """Why ``value`` is not a valid ``--dest``, or None."""
    if dest not in flag_ranges() or value is None:
        return None
    return interval_error(flag_ranges()[dest], value)


def _flag(dest):
    return f"--{dest.replace('_', '-')}"


def check_flags(args):
    """Every numeric flag in its range, and a usable --device; raises FlagError."""
    for dest in flag_ranges():
        why = range_error(dest, getattr(args, dest, None))
        if why:
            raise FlagError(f"--{dest.replace('_', '-')} {why}")
    try:
        resolve_device(args.device)
    except ValueError as e:
        raise FlagError(str(e)) from None
    unknown = sorted(report_targets(args.report_to) - {"tensorboard", "wandb"})
    if unknown:
        raise FlagError(f"--report-to {args.report_to!r}: {', '.join(map(repr, unknown))} is not "
                        f"supported; use tensorboard, wandb, all, a comma list of them, or '' "
                        f"(results.jsonl is always written)")
    if "wandb" in report_targets(args.report_to) and importlib.util.find_spec("wandb") is None:
        raise FlagError(f"--report-to {args.report_to!r}: wandb is not installed "
                        f"(pip install wandb)")
    try:
        check_field_flags(args)
    except ValueError as e:
        raise FlagError(str(e)) from None
    try:
        parse_signals(args.stop_signals)
    except ValueError as e:
        raise FlagError(f"--stop-signals {args.stop_signals!r}: {e}") from None
    for lock, qualifiers in LOCK_QUALIFIERS.items():
        if getattr(args, lock, False):
            continue
        for dest in qualifiers:
            value = getattr(args, dest, LOCK_DEFAULTS[dest])
            if value:  # open_clip_train ignores it silently
                given = _flag(dest) + ("" if value is True else f" {value}")
                raise FlagError(f"{given} has no effect without {_flag(lock)}; add {_flag(lock)} "
                                f"or drop it")
    if getattr(args, "length_bucketing", 0):
        if args.data_backend == "dali":
            raise FlagError(f"--length-bucketing {args.length_bucketing}: --data-backend dali does "
                            f"not support it; use --data-backend torch (or auto)")
        if args.dataset_type != "rec":
            raise FlagError(f"--length-bucketing {args.length_bucketing}: --dataset-type "
                            f"{args.dataset_type} has no text lengths to bucket by")


def check_eval_inputs(args):
    """The files and directories of the evaluation flags exist (and the retrieval annotation
    reads), so a bad path fails at start-up, not after the first epoch; raises FlagError."""
    files = ("retrieval_data", "zeroshot_classnames", "zeroshot_templates")
    dirs = ("retrieval_image_root", "imagenet_val", "zeroshot_root")
    for dest in files + dirs:
        path = getattr(args, dest, None)
        if path is None:
            continue
        exists = os.path.isfile(path) if dest in files else os.path.isdir(path)
        if not exists:
            raise FlagError(f"--{dest.replace('_', '-')}: {'file' if dest in files else 'directory'}"
                            f" not found: {path}")
    if args.retrieval_data and args.retrieval_image_root:
        from alip.eval.retrieval import load_annotation
        try:
            load_annotation(args.retrieval_data, args.retrieval_image_root)
        except (ValueError, OSError) as e:
            raise FlagError(f"--retrieval-data: {e}") from e
    if args.zeroshot_root and not args.imagenet_val:
        from alip.eval.datasets import canonical_name, check_layout
        try:
            name = canonical_name(args.zeroshot_dataset or "imagefolder")
            check_layout(name, args.zeroshot_root)
        except (ValueError, OSError) as e:
            raise FlagError(f"--zeroshot-dataset/--zeroshot-root: {e}") from e


def build_parser():
    """train.py's parser: the training flags by topic, then each method's own group."""
    p = argparse.ArgumentParser(
        description="ALIP / CLIP pre-training on open_clip (torchrun for several processes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML file of flag defaults; command-line flags override it.")
    for add in (_model_flags, _data_flags, _optim_flags, _run_flags, _eval_flags):
        add(p.add_argument)
    add_shared_args(p)  # the method layer's flags every method takes
    for name in method_names():  # each method's own flags, in its own group
        get_method(name).add_args(p)
    return p


def _model_flags(a):
    """What to train: the method, the model and its weights, the tower locks."""
    a("--method", choices=method_names(), default="alip",
      help="The training method (alip.methods): alip: ALIPLoss on image/raw-text/caption; "
           "clip: open_clip ClipLoss on image/raw text; see the README's method table. A method "
           "reads the flags of the groups that name it below (clip: none); another method's "
           "flag given to it is an error.")
    a("--model", default="ALIP-ViT-B-32", help="open_clip model name (alip registers ALIP-*).")
    a("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path.")
    a("--text-context", type=int, default=None, metavar="N",
      help="Build the text tower with N token positions (positional embedding, causal mask); "
           "unset: the model config's (77). Weights of a shorter tower (--pretrained, hf-hub:, "
           "local-dir:) are stretched to N by Long-CLIP's interpolation (first 20 positions "
           "kept); a context below the weights' is refused. Checkpoints record it "
           "(docs/models.md).")
    a("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
      help="Activation checkpointing in both towers (the reference forces it on).")
    a("--torchcompile", action="store_true", default=False,
      help="torch.compile the image tower (inductor; CPU and CUDA); the text tower and the "
           "loss stay eager (length-aware text shapes change every batch). Where torch.compile "
           "does not run here (no C++ compiler / triton) or the tower does not compile: one "
           "warning and eager training. docs/training.md.")
    # open_clip_train's tower locks (LiT), applied by the open_clip model's own methods
    a("--lock-image", action="store_true", default=False,
      help="Lock the full image tower by disabling gradients (model.lock_image_tower).")
    a("--lock-image-unlocked-groups", type=int, default=0, metavar="N",
      help="With --lock-image: leave the last N image tower layer groups unlocked.")
    a("--lock-image-freeze-bn-stats", action="store_true", default=False,
      help="With --lock-image: freeze BatchNorm running stats in the locked layers (ResNet and "
           "timm towers; a ViT has none).")
    a("--lock-text", action="store_true", default=False,
      help="Lock the full text tower by disabling gradients (model.lock_text_tower).")
    a("--lock-text-unlocked-layers", type=int, default=0, metavar="N",
      help="With --lock-text: leave the last N text tower layer groups unlocked.")
    a("--lock-text-freeze-layer-norm", action="store_true", default=False,
      help="With --lock-text: lock the LayerNorms of the locked layers too. open_clip's own text "
           "tower cannot leave them trainable, so it needs this flag; an HF tower can.")


def _data_flags(a):
    """The data, the batch and how it is accumulated."""
    a("--train-data", default=None, help="data2rec output dir, or comma-separated .rec paths.")
    a("--dataset-type", choices=("rec", "synthetic"), default="rec",
      help="synthetic: deterministic random tensors (benchmarks, smoke tests).")
    a("--train-num-samples", type=int, default=None,
      help="Dataset size for --dataset-type synthetic.")
    a("--data-backend", choices=("auto", "dali", "torch"), default="auto",
      help="auto: dali on CUDA, torch on CPU.")
    a("--verify-shards", action=argparse.BooleanOptionalAction, default=True,
      help="DALI: check every shard (framing, index, JPEG decode) once before the first epoch; cached.")
    a("--workers", type=int, default=4, help="Data workers per process.")
    a("--batch-size", type=int, default=64, help="Batch size per process (per GPU).")
    a("--length-bucketing", type=int, default=0, metavar="N",
      help="Re-form each pool of N consecutive batches into batches of similar raw-text length "
           "(fewer padded text tokens; changes the in-batch negatives); 0: off. Torch reader "
           "only (--data-backend auto then picks torch on CUDA too).")
    a("--accum-freq", type=int, default=1, help="Micro-batches per optimizer step.")
    a("--global-batch-size", type=int, default=None, metavar="N",
      help="The samples per optimizer step the recipe was made for: start-up fails unless "
           "--batch-size x processes x --accum-freq equals N (a launch on the wrong number of "
           "nodes would silently train another recipe). Unset: no check.")
    a("--accum-mode", choices=("batch", "micro"), default="batch",
      help="batch: loss and gates over the whole accumulated batch (== one batch of "
           "accum-freq x batch-size); micro: each micro-batch its own loss/accum-freq and gates.")
    a("--epochs", type=int, default=32)


def _optim_flags(a):
    """Optimisation (the reference recipe's defaults) and the contrastive loss over processes."""
    a("--lr", type=float, default=1e-3, help="Peak learning rate.")
    a("--wd", type=float, default=0.2, help="AdamW weight decay.")
    a("--wd-exclude-gain-bias", action=argparse.BooleanOptionalAction, default=False,
      help="open_clip's weight-decay exclusion (1-D params, norm gains, biases, logit_scale); "
           "the reference decays ALL parameters.")
    a("--beta1", type=float, default=0.9, help="AdamW beta1 (OneCycle's momentum cycling "
                                               "overrides it unless --no-cycle-momentum).")
    a("--beta2", type=float, default=0.98)
    a("--eps", type=float, default=1e-8)
    a("--schedule", choices=("onecycle", "cosine"), default="onecycle")
    a("--pct-start", type=float, default=0.1, help="OneCycleLR warm-up fraction.")
    a("--cycle-momentum", action=argparse.BooleanOptionalAction, default=True,
      help="OneCycleLR beta1 cycling 0.95 -> 0.85 -> 0.95 (torch default, as the reference).")
    a("--warmup", type=int, default=10000, help="Linear warm-up steps for --schedule cosine.")
    a("--warmup-start-lr", type=float, default=None,
      help="--schedule cosine: warm up linearly from this lr (the DeCLIP toolbox's schedule, "
           "1e-4 in its SLIP/DeCLIP recipes) then cosine to 0; default: open_clip's warm-up.")
    a("--grad-clip-norm", type=float, default=1.0, help="Gradient-norm clip; 0 disables.")
    a("--precision", choices=PRECISIONS, default="amp",
      help="amp: fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU; amp_bf16: bf16.")
    a("--seed", type=int, default=0)
    # contrastive loss over the processes
    a("--local-loss", action="store_true", default=False)
    a("--gather-with-grad", action="store_true", default=False)
    a("--ddp-gradients", choices=("global", "reference"), default="global",
      help="global: every parameter's gradient equals the single-process gradient of the "
           "global-batch loss, whatever the number of processes (--local-loss then implies "
           "--gather-with-grad); reference: open_clip's and the reference's DDP gradients "
           "(towers 1/W of it, logit_scale in full), so clipping acts on a W-dependent norm.")


def _run_flags(a):
    """Distributed set-up, logs, checkpoints and stopping."""
    a("--device", default="auto", help="auto (cuda if available, else cpu), cuda, cpu.")
    a("--cpu-threads", type=int, default=0, metavar="N",
      help="Intra-op threads of each training process on a CPU device. 0: OMP_NUM_THREADS where "
           "set (torchrun sets 1 for several processes), else the CPUs this process may use less "
           "its --workers, at least 1: on a machine other jobs keep busy, every extra thread "
           "stalls the others at each op's barrier (bench/cpu_share.py).")
    a("--dist-backend", default=None, help="Default: nccl on CUDA, gloo on CPU.")
    a("--dist-url", default=None, help="Default env:// (torchrun).")
    a("--ddp-static-graph", action="store_true", default=False)
    a("--fsdp", action="store_true", default=False,
      help="Shard parameters, gradients and optimizer state over the processes (FSDP2, one unit "
           "per tower block plus the method's encoder) instead of DDP; checkpoints are sharded "
           "(torch.distributed.checkpoint) and resume on any number of processes with the same "
           "global batch; python -m alip.training.consolidate makes the open_clip model file. "
           "See docs/training.md.")
    # logging and checkpoints
    a("--logs", "--logs-dir", dest="logs", default="./logs",
      help="Runs go to LOGS/NAME/. Under torchrun write --logs-dir: torchrun's own parser "
           "rejects --logs as an ambiguous prefix of its --logs-specs.")
    a("--name", default=None, help="Run name (default: date-model-method-bBATCH).")
    a("--resume", default=None, help="'latest' (newest complete checkpoint of this run) or a path.")
    a("--save-frequency", type=int, default=1, help="Checkpoint every N epochs (0: never).")
    a("--save-every-n-steps", type=int, default=0, help="Also checkpoint every N steps (0: off).")
    a("--keep-last", type=int, default=2,
      help="Full training states kept (the newest K); model weights of epoch checkpoints are "
           "always kept.")
    a("--log-every-n-steps", type=int, default=10,
      help="Read the step metrics back from the device, log them and check non-finite streaks "
           "every N steps (a step itself never waits for the device).")
    a("--report-to", default="tensorboard",
      help="tensorboard, wandb, all, a comma list, or '' (results.jsonl is always written).")
    a("--wandb-project-name", default="alip", help="W&B project (--report-to wandb).")
    a("--wandb-notes", default="", help="W&B run notes (--report-to wandb).")
    a("--max-nonfinite", type=int, default=10,
      help="Stop when more than this many steps in a row have a non-finite loss (noticed within "
           "this many + 1 steps: the steps are read back from the device at least that often).")
    a("--stop-signals", default="TERM,USR1",
      help="On one of these signals (a comma list; '' for none) every rank saves a checkpoint at "
           "the next read-back (--log-every-n-steps) and the run exits with 128 + the signal's "
           "number; a second signal ends the process at once. SLURM: --signal=TERM@120.")
    a("--max-steps", type=int, default=None,
      help="Stop after this many optimizer steps (the schedule still spans --epochs).")


def _eval_flags(a):
    """Evaluation during training (alip.eval)."""
    a("--retrieval-frequency", type=int, default=0, help="Retrieval eval every N epochs (0: off).")
    a("--retrieval-data", default=None, help="Karpathy-layout annotation json.")
    a("--retrieval-image-root", default=None, help="Image root of --retrieval-data.")
    a("--retrieval-caption-prefix", default="")
    a("--zeroshot-frequency", type=int, default=0, help="Zero-shot eval every N epochs (0: off).")
    a("--imagenet-val", default=None, help="ImageNet val root (zero-shot).")
    a("--zeroshot-dataset", default=None,
      help="Other zero-shot dataset name for alip.eval (e.g. imagefolder).")
    a("--zeroshot-root", default=None)
    a("--zeroshot-classnames", default=None, help="File: one class name per line.")
    a("--zeroshot-templates", default=None, help="File: one template per line with {}.")
    a("--eval-batch-size", type=int, default=64)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(e):
    """A YAMLError in one line: what is wrong, and where."""
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(str(getattr(e, "problem", None) or e).split()) + where


def load_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"train.py: error: --config: file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"train.py: error: --config {path}: not valid YAML: {_yaml_problem(e)}")
    if not isinstance(data, dict):
        raise SystemExit(f"train.py: error: --config {path}: expected a mapping of flag: value, "
                         f"got {type(data).__name__}")
    return data


def _config_keys(parser):
    """Every spelling a --config key may take -> (action, negated): the flag's option strings
    without their dashes, with ``-`` or ``_`` (``logs-dir``, ``no-cycle-momentum`` included)."""
    keys = {}
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        for opt in action.option_strings:
            if opt.startswith("--"):
                negated = isinstance(action, argparse.BooleanOptionalAction) and opt.startswith("--no-")
                for key in (opt[2:], opt[2:].replace("-", "_")):
                    keys[key] = (action, negated)
        keys.setdefault(action.dest, (action, False))
    return keys


# Comma-list flags a --config may also give as a YAML list (``raw-field-probs: [0.2, 0.8]``).
LIST_FLAGS = ("train_data", "raw_fields", "caption_fields", "raw_field_probs", "caption_field_probs")


def yaml_value(action, value):
    """A --config value converted as the flag's parser would; raises FlagError (no file name)."""
    if value is None:
        return None
    if action.choices is not None and value not in action.choices:
        raise FlagError(f"{value!r} is not one of {list(action.choices)}")
    if action.nargs == 0:  # store_true / --[no-]flag
        if not isinstance(value, bool):
            raise FlagError(f"expected true or false, got {value!r}")
        return value
    if action.type in (int, float):
        if isinstance(value, bool) or isinstance(value, (list, dict)) or (
                action.type is int and isinstance(value, float) and not value.is_integer()):
            raise FlagError(f"expected {'an integer' if action.type is int else 'a number'}, "
                            f"got {value!r}")
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            raise FlagError(f"expected {'an integer' if action.type is int else 'a number'}, "
                            f"got {value!r}") from None
        why = range_error(action.dest, value)
        if why:
            raise FlagError(why)
        return value
    if action.dest in LIST_FLAGS and isinstance(value, list):
        value = ",".join(map(str, value))
    if isinstance(value, (list, dict)):
        raise FlagError(f"expected a single value, got {value!r}")
    return str(value)


def command_line_dests(argv=None):
    """The dests of the flags given on the command line (abbreviated ones included), whatever
    their values: the parser again with every default suppressed."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_args(argv=None):
    """Flags (over --config defaults), every numeric one checked against ``RANGES`` and
    --device checked; a bad value exits with one line naming the flag or the file and key.
    ``args.flags_given``: the dests given explicitly (command line or --config file), so a
    method can refuse another method's flags (``Method.check_flags_read``)."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    spelled = {}
    if pre.config:
        known = _config_keys(parser)
        defaults = {}
        for key, value in load_yaml(pre.config).items():
            if str(key) not in known:
                raise SystemExit(f"train.py: error: --config {pre.config}: unknown key {key!r} "
                                 f"(keys are train.py's flag names, as in --help)")
            action, negated = known[str(key)]
            if action.dest in spelled:
                raise SystemExit(f"train.py: error: --config {pre.config}: {key!r} and "
                                 f"{spelled[action.dest]!r} set the same flag")
            spelled[action.dest] = key
            try:
                value = yaml_value(action, value)
            except FlagError as e:
                raise SystemExit(f"train.py: error: --config {pre.config}: {key}: {e}") from None
            defaults[action.dest] = (not value) if negated and value is not None else value
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.flags_given = frozenset(spelled) | frozenset(command_line_dests(argv))
    if args.precision == "amp_bfloat16":
        args.precision = "amp_bf16"
    try:
        check_flags(args)
    except FlagError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    return args


def resume_conflicts(old_config, args):
    """The RESUME_FIXED flags whose value differs from the checkpoint's config, as
    ``name (checkpoint X, now Y)`` strings."""
    old = {**RESUME_DEFAULTS, **old_config}
    now = {k: getattr(args, k, RESUME_DEFAULTS.get(k)) for k in RESUME_FIXED if k in old}
    label = {"data_reader": "the reader --data-backend resolved to"}
    return [f"{label.get(k, k)} (checkpoint {old[k]}, now {v})" for k, v in now.items()
            if old[k] != v]


def report_targets(report_to):
    """``--report-to`` as a set of names: 'all' is tensorboard and wandb, '' is none; any other
    name is kept (check_flags refuses it)."""
    names = {r.strip() for r in str(report_to or "").split(",")} - {""}
    return names - {"all"} | {"tensorboard", "wandb"} if "all" in names else names


def resolved_config(args):
    """The configuration a run used, as a plain dict (written to RUN_DIR/config.yaml)."""
    keep = {k: v for k, v in vars(args).items()
            if not k.startswith("_") and isinstance(v, (str, int, float, bool, type(None)))}
    return dict(sorted(keep.items()))


def write_config(config, path):
    """``config`` (a dict, or a namespace of flags: its ``resolved_config``) as YAML."""
    if not isinstance(config, dict):
        config = resolved_config(config)
    write_text(path, yaml.safe_dump(dict(sorted(config.items())), sort_keys=True))
