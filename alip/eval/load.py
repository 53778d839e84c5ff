"""Load a model to evaluate: any open_clip model, a train.py checkpoint, or the ALIP authors' weights.

* ``pretrained`` is handed to open_clip as is (a tag such as ``openai``, a file, ``hf-hub:...``).
* ``checkpoint`` is a file written by train.py (``{"state_dict", "model", "epoch", "step"}``, so the
  model name is read from it) or the ALIP authors' released ``model_{epoch}.pt`` (a DDP
  ``state_dict``: keys prefixed ``module.``, the legacy open_clip ``CLIP`` layout, GELU ViT-B/32 ==
  our ``ALIP-ViT-B-32``; give ``model_name``). Both go through ``open_clip.load_checkpoint``, which
  takes ``"state_dict"`` out of a dict, strips ``module.`` and converts legacy layouts.
"""
import logging
import os

import open_clip
import torch

import alip  # noqa: F401  (registers the ALIP-* model configs with open_clip)
from alip.cli import resolve_device

PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16", "amp", "amp_bf16")


def refuse_training_state(path, what="checkpoint"):
    """A train.py training state (``epoch_N.state.pt``) given where model weights go is named as
    such, with the model file to give instead (torch.load's own error is an unpickling traceback).
    Shared with caption.py's weights checks."""
    if str(path).endswith(".state.pt"):
        raise ValueError(f"{what} {path} is a train.py training state (optimizer, "
                         f"RNG, ...), not model weights: give "
                         f"{str(path)[:-len('.state.pt')]}.pt")


def read_checkpoint(path, what="checkpoint"):
    """torch.load(path) of tensors only, memory-mapped where it can be; anything unreadable (an
    empty file, a pickle of other objects, garbage) is a one-line ValueError naming the file.
    Shared with caption.py's CLIPS backend."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else "no data"
        raise ValueError(f"{what} {path}: cannot be read as a torch checkpoint "
                         f"({type(e).__name__}: {first})") from e


def _recorded(saved, key, kind):
    """``saved[key]`` when a train.py model file records it as a ``kind``, else None."""
    value = saved.get(key) if isinstance(saved, dict) else None
    return value if isinstance(value, kind) else None


def checkpoint_model_name(path):
    """The model name a train.py checkpoint records, or None (e.g. a bare state_dict)."""
    return _recorded(read_checkpoint(path), "model", str)


def pretrained_model_kwargs(path):
    """The open_clip model arguments a ``--pretrained`` file records when train.py wrote it
    (``model_kwargs``: what its method asked ``create_model`` for, e.g. SigLIP's logit bias);
    {} for any other file, which open_clip reads itself (safetensors, other pickles)."""
    try:
        return dict(_recorded(read_checkpoint(path), "model_kwargs", dict) or {})
    except ValueError:
        return {}


def model_files_in(folder):
    """The model files (``*.pt`` but not a ``*.state.pt`` training state) in ``folder`` and in
    its ``checkpoints/`` (a train.py run directory), newest first."""
    found = [os.path.join(d, name) for d in (folder, os.path.join(folder, "checkpoints"))
             if os.path.isdir(d) for name in os.listdir(d)
             if name.endswith(".pt") and not name.endswith(".state.pt")]
    return sorted(found, key=os.path.getmtime, reverse=True)


def checkpoint_path_error(checkpoint):
    """Why ``--checkpoint PATH`` cannot be a model file, as an exception to raise, or None: a
    directory (a run directory or its checkpoints/) is told apart from a missing path, and the
    model file to give is named."""
    if os.path.isfile(checkpoint):
        return None
    if not os.path.isdir(checkpoint):
        return FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    files = model_files_in(checkpoint)
    what = (f"e.g. {files[0]} (the newest there)" if files else
            "none is in it: a train.py run's RUN/checkpoints/epoch_N.pt, or the ALIP authors' "
            "model_{epoch}.pt")
    return IsADirectoryError(f"checkpoint {checkpoint} is a directory; give a model file, {what}")


def load_model(model_name=None, pretrained=None, checkpoint=None, device="cpu", precision="fp32"):
    """-> (model in eval mode, preprocess (the eval transform), tokenizer)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = resolve_device(device)
    if pretrained and checkpoint:
        raise ValueError("give either pretrained (--pretrained) or checkpoint (--checkpoint), not both")
    if checkpoint is not None:
        why = checkpoint_path_error(checkpoint)
        if why is not None:
            raise why
        refuse_training_state(checkpoint)
        saved = read_checkpoint(checkpoint)
        saved_name = _recorded(saved, "model", str)
        kwargs = dict(_recorded(saved, "model_kwargs", dict) or {})
        if model_name is None:
            model_name = saved_name
        elif saved_name is not None and saved_name != model_name:
            logging.warning("checkpoint %s was saved for model %s; loading it into %s as asked",
                            checkpoint, saved_name, model_name)
        if model_name is None:
            raise ValueError(
                f"checkpoint {checkpoint} does not record its model name (it is not a train.py "
                "checkpoint; the ALIP authors' model_{epoch}.pt is a bare state_dict): give the "
                "model name (--model), e.g. ALIP-ViT-B-32")
    if model_name is None:
        raise ValueError("a model name (--model) is needed, e.g. ALIP-ViT-B-32")
    if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"unknown model {model_name!r}; known: {', '.join(open_clip.list_models())}")
    weights = checkpoint if checkpoint is not None else pretrained
    if checkpoint is None:
        kwargs = pretrained_model_kwargs(pretrained) if pretrained and os.path.isfile(pretrained) \
            else {}
    try:  # at the context the file records (force_context_length), else the config's
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=weights, precision=precision, device=device, **kwargs)
    except (RuntimeError, AssertionError, KeyError, ValueError) as e:
        if weights is not None and os.path.isfile(weights):
            raise ValueError(f"weights {weights} do not fit model {model_name}: "
                             f"{type(e).__name__}: {e}") from e
        raise
    model.eval()  # the tokenizer pads/truncates to the model's context, not the config's
    return model, preprocess, open_clip.get_tokenizer(
        model_name, context_length=getattr(model, "context_length", None))


def add_model_args(parser):
    """The model flags every eval CLI shares."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="open_clip model name (e.g. ALIP-ViT-B-32); read from --checkpoint if omitted")
    g.add_argument("--pretrained", default=None,
                   help="whatever open_clip accepts: a tag (openai, laion2b_s34b_b79k), a file, hf-hub:...")
    g.add_argument("--checkpoint", default=None,
                   help="a train.py checkpoint, or the ALIP authors' model_{epoch}.pt (with --model)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS)
    g.add_argument("--device", default="auto",
                   help="auto (cuda if a GPU is visible, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--batch-size", type=int, default=64, help="images per batch (>= 1)")
    g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes (>= 0)")
    g.add_argument("--scoring", choices=("auto", "global", "dense"), default="auto",
                   help="auto: the checkpoint's method decides (dense for FILIP/DeFILIP, whose "
                        "model files carry the dense head; global otherwise); global: one "
                        "embedding per image/text (any checkpoint, FILIP's too); dense: FILIP's "
                        "token-wise scores (needs a FILIP/DeFILIP checkpoint)")
    return parser


def load_model_from_args(args):
    return load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                      device=args.device, precision=args.precision)


def no_dense_head(args):
    """Why ``--scoring dense`` has no head to score with. The head is read from --checkpoint
    only: --pretrained goes to open_clip, which loads the open_clip weights of a file and
    nothing else, so a FILIP/DeFILIP model file given there has its head left behind."""
    pretrained = args.pretrained
    if args.checkpoint is None and pretrained and os.path.isfile(pretrained):
        from .dense import load_dense_head
        try:
            has_head = load_dense_head(pretrained) is not None
        except Exception:  # not a train.py model file: open_clip reads it, we cannot
            has_head = False
        if has_head:
            return (f"--scoring dense: --pretrained loads only the open_clip weights of "
                    f"{pretrained}, not its dense head; give it as --checkpoint {pretrained}")
    return (f"--scoring dense: {args.checkpoint or pretrained or args.model} carries no dense "
            f"head (only FILIP/DeFILIP train.py checkpoints do, given as --checkpoint)")


def dense_head_from_args(args):
    """The FILIPHead to score with, or None for global scoring (``--scoring``)."""
    if args.scoring == "global":
        return None
    head = None
    if args.checkpoint is not None:
        from .dense import load_dense_head
        head = load_dense_head(args.checkpoint)
    if args.scoring == "dense" and head is None:
        raise ValueError(no_dense_head(args))
    return None if head is None else head.to(resolve_device(args.device))
