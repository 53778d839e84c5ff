"""train.py's flags, the ``--config`` YAML defaults, and the resolved configuration.

Flag names mirror ``open_clip_train`` where the concept is the same. Precedence: built-in
default < ``--config FILE.yaml`` < command line. The YAML keys are flag names with ``-`` or
``_`` (``batch-size`` or ``batch_size``); an unknown key is an error naming the file and key.
"""
import argparse
from pathlib import Path

import yaml

PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "fp32")


def build_parser():
    p = argparse.ArgumentParser(
        description="ALIP / CLIP pre-training on open_clip (torchrun for several processes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--config", default=None, help="YAML file of flag defaults; command-line flags override it.")
    # what to train
    a("--method", choices=("alip", "clip"), default="alip",
      help="alip: ALIPLoss on image/raw-text/caption; clip: open_clip ClipLoss on image/raw text.")
    a("--model", default="ALIP-ViT-B-32", help="open_clip model name (alip registers ALIP-*).")
    a("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path.")
    a("--text-mode", choices=("separate", "joint"), default="separate",
      help="ALIP text passes: two trimmed passes, or one 2B pass (alip.model.TripletEncoder).")
    a("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
      help="Activation checkpointing in both towers (the reference forces it on).")
    # data
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
    a("--accum-freq", type=int, default=1, help="Micro-batches per optimizer step.")
    a("--accum-mode", choices=("batch", "micro"), default="batch",
      help="batch: loss and gates over the whole accumulated batch (== one batch of "
           "accum-freq x batch-size); micro: each micro-batch its own loss/accum-freq and gates.")
    a("--epochs", type=int, default=32)
    # optimisation (reference recipe defaults)
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
    a("--grad-clip-norm", type=float, default=1.0, help="Gradient-norm clip; 0 disables.")
    a("--precision", choices=PRECISIONS, default="amp",
      help="amp: fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU; amp_bf16: bf16.")
    a("--seed", type=int, default=0)
    # ALIP
    a("--alip-gamma", type=float, default=2.0)
    a("--alip-momentum", type=float, default=0.99)
    a("--alip-ema-init", type=float, default=1.0)
    a("--local-loss", action="store_true", default=False)
    a("--gather-with-grad", action="store_true", default=False)
    # distributed
    a("--device", default="auto", help="auto (cuda if available, else cpu), cuda, cpu.")
    a("--dist-backend", default=None, help="Default: nccl on CUDA, gloo on CPU.")
    a("--dist-url", default=None, help="Default env:// (torchrun).")
    a("--ddp-static-graph", action="store_true", default=False)
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
    a("--log-every-n-steps", type=int, default=10)
    a("--report-to", default="tensorboard", help="'tensorboard' or '' (results.jsonl always).")
    a("--max-nonfinite", type=int, default=10,
      help="Stop when more than this many steps in a row have a non-finite loss.")
    a("--max-steps", type=int, default=None,
      help="Stop after this many optimizer steps (the schedule still spans --epochs).")
    # evaluation during training (alip.eval)
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
    return p


def load_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--config: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"--config {path}: not valid YAML: {e}")
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping of flag: value, got "
                         f"{type(data).__name__}")
    return data


def parse_args(argv=None):
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        known = {a.dest: a for a in parser._actions}
        defaults = {}
        for key, value in load_yaml(pre.config).items():
            dest = str(key).replace("-", "_")
            if dest not in known or dest in ("help", "config"):
                raise SystemExit(f"--config {pre.config}: unknown key {key!r}")
            action = known[dest]
            if action.choices is not None and value not in action.choices:
                raise SystemExit(f"--config {pre.config}: {key}: {value!r} is not one of "
                                 f"{list(action.choices)}")
            if action.type is not None and value is not None:
                value = action.type(value)
            defaults[dest] = value
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.precision == "amp_bfloat16":
        args.precision = "amp_bf16"
    return args


def resolved_config(args):
    """The configuration a run used, as a plain dict (written to RUN_DIR/config.yaml)."""
    keep = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    return dict(sorted(keep.items()))


def write_config(args, path):
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(resolved_config(args), sort_keys=True))
    tmp.replace(path)
