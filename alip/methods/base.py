"""The method contract the training step runs, whatever the method.

* ``data`` -- a ``DataSpec``: the image views (with augmentation recipes) and text fields/views
  the loaders put in each batch dict;
* ``encoder`` -- an ``nn.Module`` holding the open_clip model at ``.model`` plus the method's
  trainable heads; ``encoder(batch) -> features``, a dict of tensors: ``[B, ...]`` per-sample
  features and 0-dim scalars (``logit_scale``). Every trainable parameter is used here, so DDP
  wraps this module;
* ``criterion`` -- an ``nn.Module`` without parameters: ``criterion(features) -> {"loss": ...,
  <named terms>}``. Its buffers (gate EMAs, memory banks) are checkpointed. It should update its
  state only in ``train()`` mode: gradient accumulation over a whole batch calls it once per
  micro-batch and keeps it in train mode for the first call only;
* ``after_step()`` -- called after each optimizer step (the logit_scale clamp).

What it logs: every 0-dim entry of the criterion's output under its key, and the mean of every
other floating entry as ``<key>_mean``.
"""
import math

import torch
import torch.nn as nn

from .. import text_views as token_views
from ..data import text_views
from ..data.spec import DataSpec, TextView

text_views.register("reduce", token_views.reduce_row)  # CLIPS' token reduction as a text view
CAPTION_VIEW = "caption_view"


def with_caption_view(spec, args):
    """``spec`` plus the partial-caption view of ``--caption-view STRATEGY --caption-tokens K``
    (truncate / random / block / subcaption, alip.text_views), batch key ``caption_view``; the
    spec unchanged for ``--caption-view full``."""
    if getattr(args, "caption_view", "full") == "full":
        return spec
    view = TextView(CAPTION_VIEW, "caption", "reduce",
                    (("strategy", args.caption_view), ("k", args.caption_tokens)))
    return DataSpec(spec.image_views, spec.text_fields, spec.text_views + (view,))

LOGIT_SCALE_MAX = math.log(100)


class MethodConfigError(ValueError):
    """A flag combination the method does not support (raised before any training)."""


@torch.no_grad()
def clamp_logit_scale(model, low=0.0, high=LOGIT_SCALE_MAX, name="logit_scale"):
    """Clamp the logit-scale parameter (default: temperature in [1, 100], as CLIP/ALIP)."""
    getattr(model, name).clamp_(low, high)


def freeze_patch_embedding(model):
    """Keep a ViT's patch embedding (``visual.conv1``) at its initial weights, as the DeCLIP
    toolbox's ViT does for every method it trains (CLIP, SLIP, FILIP, DeCLIP, DeFILIP):
    ``VisualTransformer.train()`` sets ``conv1.requires_grad = False`` (``freeze_conv1 = True``,
    Sense-GVT/DeCLIP @ 5d99a855 prototype/model/image_encoder/visual_transformer.py:12-52), so
    the patch projection stays at its random init. A frozen parameter is left out of the
    optimizer (``alip.training.optim.param_groups``) and of DDP. A ResNet image tower (the
    toolbox's ModifiedResNet freezes nothing) is left as it is. Returns True if it froze one."""
    visual = getattr(model, "visual", None)
    conv1 = getattr(visual, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(visual, "transformer"):
        return False
    conv1.requires_grad_(False)
    return True


class Method:
    """Base class; subclasses set ``name``, build ``encoder`` and ``criterion`` in __init__."""

    name = None
    accum_modes = ("batch", "micro")
    data = DataSpec()
    flag_ranges = {}  # dest -> interval ("[0, 1]", "(0, inf)"): checked before any work
    scoring = "global"  # how its checkpoints are evaluated: global embeddings or dense tokens
    find_unused_parameters = False  # DDP: True when some model parameters are outside the loss

    def __init__(self, model, args, rank=0, world_size=1):
        self.model, self.args = model, args
        self.rank, self.world_size = rank, world_size
        self.data = self.data_spec(args)  # what the loader was built from, for these flags
        self.encoder = None
        self.criterion = None

    @classmethod
    def add_args(cls, parser):
        """Method-specific flags (an argparse group); names start with the method name; every
        numeric one gets an interval in ``flag_ranges``."""

    @classmethod
    def data_spec(cls, args):
        """The DataSpec for these flags (the loader is built before the method)."""
        return cls.data

    @classmethod
    def check_args(cls, args):
        """Raise MethodConfigError for flags the method cannot honour, before any work."""
        if args.accum_freq > 1 and args.accum_mode not in cls.accum_modes:
            raise MethodConfigError(
                f"--method {cls.name} does not support --accum-mode {args.accum_mode} "
                f"(supported: {', '.join(cls.accum_modes)})")
        view = getattr(args, "caption_view", "full")
        if view != "full" or getattr(args, "caption_tokens_given", False):
            if CAPTION_VIEW not in {v.name for v in cls.data_spec(args).text_views}:
                raise MethodConfigError(
                    f"--method {cls.name} reads no caption view: --caption-view {view} "
                    f"--caption-tokens {args.caption_tokens} would be ignored" if view != "full"
                    else f"--caption-tokens {args.caption_tokens} takes effect with --caption-view "
                         f"truncate, random, block or subcaption; --caption-view is full")

    def after_step(self):
        clamp_logit_scale(self.model)

    def dense_head(self):
        """The module dense (token-wise) scoring needs (FILIP's), or None for global scoring."""
        return None

    def eval_heads(self):
        """What evaluation needs beyond the open_clip model, stored in the model file (small)."""
        head = self.dense_head()
        return {} if head is None else {"dense": head.state_dict()}

    def heads_state_dict(self):
        """The encoder's state outside the open_clip model (trainable heads), for checkpoints."""
        return {k: v for k, v in self.encoder.state_dict().items() if not k.startswith("model.")}

    def load_heads_state_dict(self, state):
        missing = [k for k in self.heads_state_dict() if k not in state]
        if missing:
            raise KeyError(f"training state lacks the {self.name} heads' keys {missing[:4]}")
        self.encoder.load_state_dict({**self.encoder.state_dict(), **state})


def scalar(x):
    """True for the 0-dim entries of a features/loss dict (logit_scale, loss terms)."""
    return torch.is_tensor(x) and x.dim() == 0


class ContrastiveEncoder(nn.Module):
    """Shared piece: the open_clip model at ``.model``; subclasses define forward(batch)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
