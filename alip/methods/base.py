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
import argparse
import functools
import math
from typing import NamedTuple, Optional

import open_clip
import torch
import torch.nn as nn

from ..data.spec import DataSpec, TextView, probs_error, with_sources
from ..long_context import context_kwargs

REDUCE = "alip.text_views:reduce_row"  # CLIPS' token reduction as a text view
CAPTION_VIEW = "caption_view"


def text_sources(args):
    """{"raw": fields, "caption": fields} from ``--raw-fields`` / ``--caption-fields``."""
    return {key: tuple(str(getattr(args, f"{key}_fields", None) or key).split(","))
            for key in ("raw", "caption")}


def text_probs(args):
    """{"raw": probabilities, ...} from ``--raw-field-probs`` / ``--caption-field-probs``, for
    the keys given (floats, one per field of ``text_sources``; ``check_field_flags`` checks them)."""
    return {key: tuple(float(p) for p in str(value).split(","))
            for key in ("raw", "caption")
            if (value := getattr(args, f"{key}_field_probs", None)) not in (None, "")}


def with_caption_view(spec, args, full="full"):
    """``spec`` plus the partial-caption view of ``--caption-view STRATEGY --caption-tokens K``
    (truncate / random / block / subcaption, alip.text_views), batch key ``caption_view``; the
    spec unchanged for ``--caption-view full``, or the strategy ``full`` stands for in a method
    that always reads a partial caption (CLIPS: subcaption)."""
    strategy = getattr(args, "caption_view", "full")
    strategy = full if strategy == "full" else strategy
    if strategy == "full":
        return spec
    view = TextView(CAPTION_VIEW, "caption", REDUCE,  # drawn from the caption's full row, 77 wide
                    (("strategy", strategy), ("k", args.caption_tokens)), width=CAPTION_VIEW_WIDTH)
    return DataSpec(spec.image_views, spec.text_fields, spec.text_views + (view,))


CAPTION_TOKENS = 32  # --caption-tokens
CAPTION_VIEW_WIDTH = 77  # the reduced caption's row width (K <= 75 tokens + SOT + EOT), any caption width
SHARED_RANGES = {"caption_tokens": "[1, 75]"}  # of the flags below, as Method.flag_ranges


def add_shared_args(parser):
    """The flags of the method layer that every method takes (each reads those that apply to
    it; ``check_args`` refuses the others): the ViT it trains, the partial caption view, and the
    shard fields that feed its raw text and caption."""
    g = parser.add_argument_group("every method (the caption flags: methods that read a caption)")
    g.add_argument(
        "--vit-style", choices=("reference", "open_clip", "toolbox"), default="reference",
        help="A ViT image tower as built by open_clip (trained from its init), or as the DeCLIP "
             "toolbox's VisualTransformer (conv1 frozen; its init when not --pretrained). "
             "reference: the method's reference (toolbox for SLIP with toolbox views, FILIP, "
             "DeCLIP, DeFILIP; open_clip for the others). Set one for all methods to compare "
             "them on the same tower.")
    add_objective_arg(g)
    g.add_argument(
        "--caption-view", choices=("full", "truncate", "random", "block", "subcaption"),
        default="full",
        help="Feed the text encoder a reduced synthetic caption (CLIPS' token reduction, "
             "alip.text_views): truncate = first K tokens, random = K random tokens in order, "
             "block = one random span of K, subcaption = whole random sentences up to K; seeded "
             "per sample. Methods that read the caption (alip, clips) use it.")
    g.add_argument("--caption-tokens", type=int, default=CAPTION_TOKENS,
                   help="K of --caption-view.")
    g.add_argument(
        "--raw-fields", default="raw", metavar="F[,F...]",
        help="The shard text field(s) the method reads as its raw text: e.g. caption trains CLIP "
             "on the synthetic captions; several: one drawn per sample and epoch.")
    g.add_argument(
        "--caption-fields", default="caption", metavar="F[,F...]",
        help="The shard text field(s) the method reads as its synthetic caption (alip, clips): "
             "e.g. generated (RWKV-CLIP's shards); several: one drawn per sample and epoch.")
    for key in ("raw", "caption"):
        g.add_argument(
            f"--{key}-field-probs", default=None, metavar="P[,P...]",
            help=f"With several --{key}-fields: the probability of drawing each (same order, "
                 f"summing to 1), e.g. 0.2,0.8; drawn per sample and epoch from (seed, epoch, "
                 f"record index). Default: uniform. The fraction each field was read is logged "
                 f"per epoch (results.jsonl field_fractions).")


OBJECTIVES = ("softmax", "sigmoid")  # --objective (alip.loss.OBJECTIVES)
# SigLIP's init (Zhai et al. 2023, arXiv 2303.15343 §3.2): t' = log 10, b = -10; open_clip
# creates ``model.logit_bias`` for a non-None ``init_logit_bias``
SIGMOID_MODEL_KWARGS = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}


def add_objective_arg(g):
    g.add_argument(
        "--objective", choices=OBJECTIVES, default="softmax",
        help="The CLIP-style contrastive terms' objective: softmax (InfoNCE, the methods' "
             "own) or sigmoid (SigLIP's pairwise loss, learnable temperature from 10 and bias "
             "from -10): clip, alip (gate-weighted), slip's CLIP term, clips' two contrastive "
             "terms; other methods refuse sigmoid (docs/methods.md §11).")


def objective(args):
    """``--objective`` (softmax when the flag is absent)."""
    return getattr(args, "objective", "softmax")


def logit_params(model):
    """The features' temperature ``logit_scale`` (exp of the parameter) and, for a model with a
    logit bias (created for ``--objective sigmoid``), ``logit_bias`` as a 0-dim tensor."""
    out = {"logit_scale": model.logit_scale.exp()}
    if getattr(model, "logit_bias", None) is not None:
        out["logit_bias"] = model.logit_bias.reshape(())
    return out


def check_field_flags(args):
    """--raw-fields / --caption-fields name fields, each once, and --raw-field-probs /
    --caption-field-probs are one probability per field of several, summing to 1; raises
    ValueError naming the flag."""
    for flag in ("raw_fields", "caption_fields"):
        names = str(getattr(args, flag)).split(",")
        bad = [n for n in names if not n.isidentifier()] or (
            [n for n in names if names.count(n) > 1][:1])
        if bad:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: {bad[0]!r} is "
                             f"not a field name or is named twice (e.g. caption,generated)")
    for key, fields in text_sources(args).items():
        given = getattr(args, f"{key}_field_probs", None)
        if given in (None, ""):
            continue
        flag = f"--{key}-field-probs {given!r}"
        try:
            probs = tuple(float(p) for p in str(given).split(","))
        except ValueError:
            raise ValueError(f"{flag}: expected numbers separated by commas, e.g. 0.2,0.8") from None
        why = probs_error(probs, len(fields))
        if why:
            raise ValueError(f"{flag}: {why} (--{key}-fields {','.join(fields)})")


LOGIT_SCALE_MAX = math.log(100)


class MethodConfigError(ValueError):
    """A flag combination the method does not support (raised before any training)."""


class ModelDims(NamedTuple):
    """The sizes of ``--model`` that the methods' heads must fit, read from its open_clip
    config before anything is built (``model_dims``). None: not known (another kind of tower,
    or a model whose config is not at hand), so not checked."""
    text_width: Optional[int] = None  # open_clip's text transformer
    text_heads: Optional[int] = None
    text_layers: Optional[int] = None
    context_length: Optional[int] = None
    image_tokens: Optional[int] = None  # a ViT's patch tokens


def _grid(size, patch):
    """Patch tokens of a ViT: prod(size // patch) over (h, w), ints or pairs."""
    size = size if isinstance(size, (tuple, list)) else (size, size)
    patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
    return math.prod(s // p for s, p in zip(size, patch))


def model_dims(model_name):
    """``ModelDims`` of a model open_clip knows locally; all None for another (an ``hf-hub:`` /
    ``local-dir:`` model's config would be downloaded or read from elsewhere): its shapes are
    checked on the built model instead, in the method's ``__init__``."""
    if model_name not in open_clip.list_models():
        return ModelDims()
    cfg = open_clip.get_model_config(model_name) or {}
    text, vision = dict(cfg.get("text_cfg", {})), dict(cfg.get("vision_cfg", {}))
    defaults = open_clip.model.CLIPTextCfg()
    own_text = "hf_model_name" not in text
    get = lambda key: text.get(key, getattr(defaults, key)) if own_text else None  # noqa: E731
    vit = isinstance(vision.get("layers", 12), int) and not vision.get("timm_model_name") \
        and vision.get("patch_size")
    return ModelDims(get("width"), get("heads"), get("layers"),
                     text.get("context_length", defaults.context_length),
                     _grid(vision.get("image_size", 224), vision["patch_size"]) if vit else None)


@functools.lru_cache(maxsize=None)
def _declared_flags(cls):
    parser = argparse.ArgumentParser(add_help=False)
    cls.add_args(parser)
    return tuple((a.dest, a.option_strings[0]) for a in parser._actions if a.option_strings)


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


WEIGHT_SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip model names that load their own weights


def weights_given(args):
    """True when the model the method gets was loaded from weights rather than built at random:
    ``--pretrained TAG_OR_PATH`` (``open_clip.create_model_and_transforms(args.model,
    pretrained=args.pretrained)`` in alip.training.loop), or a ``--model`` with an ``hf-hub:`` /
    ``local-dir:`` schema (open_clip loads that source's weights and ignores ``pretrained``).
    (``--resume`` loads its checkpoint after the method is built, over whatever init it did.)"""
    return bool(getattr(args, "pretrained", None)) or \
        str(getattr(args, "model", "") or "").startswith(WEIGHT_SCHEMAS)


def _normal_(param, std):
    """``param`` <- N(0, std) drawn by ``nn.init.normal_`` on a float32 CPU tensor (torch's
    global CPU generator, seeded by the training seed) and copied in, so the draw is the same
    whichever device/precision the model was moved to (open_clip inits on the CPU too). A meta
    parameter (shapes only) is left as it is."""
    if param.is_meta:  # a model without storage (shapes only): nothing to draw
        return
    param.copy_(nn.init.normal_(torch.empty(param.shape), std=std))


@torch.no_grad()
def init_toolbox_vit(visual):
    """Re-draw a ViT image tower's weights as the DeCLIP toolbox's
    ``VisualTransformer.initialize_parameters()`` does (Sense-GVT/DeCLIP @ 5d99a855
    prototype/model/image_encoder/visual_transformer.py:28-38), in its order: the positional
    embedding ~ N(0, 0.01), then per residual block attn.in_proj_weight ~ N(0, w^-0.5),
    attn.out_proj.weight ~ N(0, w^-0.5 (2L)^-0.5), mlp.c_fc.weight ~ N(0, (2w)^-0.5),
    mlp.c_proj.weight ~ N(0, w^-0.5 (2L)^-0.5) (w = width, L = layers). open_clip's
    VisionTransformer leaves these at scale*randn (positional) and PyTorch's defaults (blocks);
    class_embedding and proj (scale*randn), conv1, the biases and LayerNorms start the same in
    both and are not touched. Returns False (changing nothing) unless ``visual`` is an open_clip
    ViT whose blocks are nn.MultiheadAttention + mlp.c_fc/c_proj Linears."""
    transformer = getattr(visual, "transformer", None)
    blocks = list(getattr(transformer, "resblocks", ()))
    pos = getattr(visual, "positional_embedding", None)
    if not blocks or not isinstance(pos, nn.Parameter) or not all(
            isinstance(getattr(b, "attn", None), nn.MultiheadAttention)
            and b.attn.in_proj_weight is not None
            and isinstance(getattr(getattr(b, "mlp", None), "c_fc", None), nn.Linear)
            and isinstance(getattr(b.mlp, "c_proj", None), nn.Linear) for b in blocks):
        return False
    width, layers = transformer.width, transformer.layers
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
    attn_std = width ** -0.5
    fc_std = (2 * width) ** -0.5
    if pos.requires_grad:  # a fixed sin-cos table (pos_embed_type='sin_cos_2d') stays
        _normal_(pos, 0.01)
    for block in blocks:
        _normal_(block.attn.in_proj_weight, attn_std)
        _normal_(block.attn.out_proj.weight, proj_std)
        _normal_(block.mlp.c_fc.weight, fc_std)
        _normal_(block.mlp.c_proj.weight, proj_std)
    return True


def toolbox_vit(model, args):
    """Make a ViT image tower the DeCLIP toolbox's ``VisualTransformer``, for the methods that
    toolbox trains (SLIP with its views, FILIP, DeCLIP, DeFILIP): its patch embedding stays
    frozen (``freeze_patch_embedding``), and, when the model was built at random (not
    ``weights_given(args)``), its weights start from the toolbox's init (``init_toolbox_vit``).
    Called in the method's __init__, i.e. right after ``create_model`` under the training seed,
    so the draw is reproducible from ``--seed``. A ResNet or timm image tower is left as it is.
    Returns (froze the patch embedding, re-initialised)."""
    if not freeze_patch_embedding(model):
        return False, False
    return True, (not weights_given(args)) and init_toolbox_vit(model.visual)


class Method:
    """One training method, built once from the resolved configuration (``args``), before the
    model: it checks its flags, fixes its data spec (``data``: what the loader is built from and
    the batches are keyed by), and says what it needs of the model (``model_kwargs``). Then
    ``attach(model)`` builds, on the created open_clip model, its trainable ``encoder`` (the
    module the step runs and DDP wraps) and its ``criterion``. The loop asks it for nothing
    else than: ``data``, ``model_kwargs()``, ``attach()``, ``notes()``, ``encoder``,
    ``criterion``, ``find_unused_parameters``, ``state_dict()`` / ``load_state_dict()``,
    ``eval_heads()``, ``dense_head()`` and ``after_step()``.

    A subclass sets ``name`` (its registry key) and implements ``build(model)``; it may add
    flags (``add_args`` + ``flag_ranges``), a ``data_spec``, ``model_kwargs`` and hooks."""

    name = None
    accum_modes = ("batch", "micro")
    data = DataSpec()
    flag_ranges = {}  # dest -> interval ("[0, 1]", "(0, inf)"): checked before any work
    find_unused_parameters = False  # DDP: True when some model parameters are outside the loss
    shared_flags = ()  # dests of other methods' flags it reads too (``flags_read``)
    batchnorm_heads = False  # heads with BatchNorm: a training batch needs 2+ samples
    objectives = ("softmax",)  # --objective values it has a form for (docs/methods.md §11)
    sigmoid_exchange = False  # its sigmoid terms are open_clip's SigLipLoss (alip.loss.PairLoss)

    def __init__(self, args, rank=0, world_size=1):
        self.check_args(args)
        self.args, self.rank, self.world_size = args, rank, world_size
        self.data = self.loader_spec(args)  # what the loader is built from, for these flags
        self.vit = self.vit_style(args)
        self.model = self.encoder = self.criterion = None

    @classmethod
    def resolved_flags(cls, args):
        """{flag dest: value} for flags whose value the method decides from the others (a
        default of its own): applied once, when the configuration is resolved, so config.yaml
        and the checkpoints record what the run used."""
        return {}

    def model_kwargs(self):
        """Keyword arguments ``open_clip.create_model_and_transforms`` gets (the checkpoints
        record them, so evaluation rebuilds the same model): the text context of
        ``--text-context`` (``force_context_length``, alip.long_context), and SigLIP's
        temperature and bias init for ``--objective sigmoid``; a method that needs more adds to
        ``super().model_kwargs()``."""
        kwargs = context_kwargs(getattr(self.args, "text_context", None))
        if objective(self.args) == "sigmoid":
            kwargs.update(SIGMOID_MODEL_KWARGS)
        return kwargs

    def attach(self, model):
        """Build the method on ``model`` (created with ``model_kwargs()``, under the training
        seed): the DeCLIP toolbox's ViT where the method trains it, before any head draws its
        init, as the references build; then ``build(model)``. Returns self."""
        self.model = model
        if self.vit == "toolbox":
            froze, _ = toolbox_vit(model, self.args)
            if not froze and getattr(self.args, "vit_style", "reference") == "toolbox":
                raise MethodConfigError(
                    f"--vit-style toolbox: the image tower of --model {self.args.model} "
                    f"({type(getattr(model, 'visual', None)).__name__}) is not an open_clip ViT")
        self.build(model)
        return self

    def build(self, model):
        """Set ``self.encoder`` (an nn.Module with the open_clip model at ``.model``) and
        ``self.criterion`` (an nn.Module without parameters)."""
        raise NotImplementedError(f"{type(self).__name__}.build")

    def notes(self):
        """Lines worth a log entry about how the method was built."""
        if self.vit != "toolbox":
            return []
        return [f"--vit-style {getattr(self.args, 'vit_style', 'reference')}: the DeCLIP "
                f"toolbox's ViT (conv1 frozen{'' if weights_given(self.args) else ', its init'})"]

    @classmethod
    def reference_vit(cls, args):
        """The ViT its reference trains: "open_clip" (the tower as open_clip builds it) or
        "toolbox" (the DeCLIP toolbox's VisualTransformer: conv1 frozen, its init;
        ``toolbox_vit``)."""
        return "open_clip"

    @classmethod
    def vit_style(cls, args):
        """``--vit-style`` resolved: "reference" is ``reference_vit(args)``."""
        style = getattr(args, "vit_style", "reference")
        return cls.reference_vit(args) if style == "reference" else style

    @classmethod
    def add_args(cls, parser):
        """Method-specific flags (an argparse group); names start with the method name; every
        numeric one gets an interval in ``flag_ranges``."""

    @classmethod
    def own_flags(cls):
        """{dest: "--flag"} of the flags ``add_args`` declares, in its order. Derived from
        ``add_args`` on a scratch parser, so the declaration cannot drift from the parser."""
        return dict(_declared_flags(cls))

    @classmethod
    def flags_read(cls):
        """The dests of every method flag this method reads: its own group and
        ``shared_flags`` (another method's flags it reads, e.g. DeFILIP's ``--declip-*``).
        Any other method's flag given to it is refused (``check_flags_read``): it would be
        ignored."""
        return frozenset(cls.own_flags()) | frozenset(cls.shared_flags)

    @classmethod
    def check_flags_read(cls, args):
        """Refuse the method flags given explicitly (``args.flags_given``: on the command line
        or in the --config file, at any value) that this method does not read: train.py takes
        every method's flags whatever ``--method``, and would otherwise ignore them silently."""
        from . import method_flags  # the registry imports this module
        given = getattr(args, "flags_given", ())
        ignored = [(dest, flag, readers) for dest, (flag, readers) in method_flags().items()
                   if dest in given and dest not in cls.flags_read()]
        if ignored:
            clauses = ", ".join(cls._ignored_clause(*i) for i in ignored)
            raise MethodConfigError(f"--method {cls.name} does not read {clauses}: "
                                    f"{'it' if len(ignored) == 1 else 'they'} would be ignored")

    @classmethod
    def _ignored_clause(cls, dest, flag, readers):
        """``--filip-padding (--method filip does; defilip's own is --defilip-padding)``: who
        reads it, and this method's flag of the same setting if it has one."""
        who = " and ".join(f"--method {r}" for r in readers) + (" does" if len(readers) == 1
                                                                 else " do")
        suffix = next((dest[len(r) + 1:] for r in readers if dest.startswith(r + "_")), None)
        own = cls.own_flags().get(f"{cls.name}_{suffix}") if suffix else None
        return f"{flag} ({who}{f'; {cls.name} reads {own}' if own else ''})"

    @classmethod
    def check_objective(cls, args):
        """``--objective`` must be one of ``objectives`` when given or not softmax (a method
        whose only form is sigmoid, SigLIP, takes the default softmax as not given). A sigmoid
        term through open_clip's SigLipLoss (``sigmoid_exchange``) has no use for --local-loss /
        --gather-with-grad: refused rather than ignored."""
        value, given = objective(args), "objective" in getattr(args, "flags_given", ())
        if (given or value != "softmax") and value not in cls.objectives:
            raise MethodConfigError(
                f"--objective {value}: --method {cls.name} has no {value} form of its "
                f"contrastive terms (it has: {', '.join(cls.objectives)})")
        effective = cls.resolved_flags(args).get("objective", value)  # SigLIP's is sigmoid
        if effective == "sigmoid" and cls.sigmoid_exchange:
            for flag in ("local_loss", "gather_with_grad"):
                if getattr(args, flag, False):
                    raise MethodConfigError(
                        f"--{flag.replace('_', '-')} has no effect with --objective sigmoid on "
                        f"--method {cls.name}: each rank scores its images against every rank's "
                        f"texts by neighbour exchange (open_clip SigLipLoss)")

    @classmethod
    def check_shapes(cls, args, dims):
        """Raise MethodConfigError, naming the flags, for head sizes that do not fit together
        or do not fit ``--model`` (``dims``: its ``ModelDims``; a None size is known only to
        the built model), before the model is built; the methods' own checks extend this one."""
        if cls.batchnorm_heads and args.batch_size < 2:
            raise MethodConfigError(
                f"--batch-size {args.batch_size}: --method {cls.name}'s heads use BatchNorm, "
                f"which needs at least 2 samples per process in a training batch")

    @classmethod
    def data_spec(cls, args):
        """The DataSpec for these flags (the loader is built before the method)."""
        return cls.data

    @classmethod
    def loader_spec(cls, args):
        """``data_spec`` with its raw / caption inputs read from the shard fields
        ``--raw-fields`` / ``--caption-fields`` name (``spec.with_sources``): what the loader
        yields and the method reads."""
        spec, sources, probs = cls.data_spec(args), text_sources(args), text_probs(args)
        for key, fields in sources.items():
            if (fields != (key,) or key in probs) and key not in spec.fields_read:
                given = f"--{key}-fields {','.join(fields)}" + (
                    f" --{key}-field-probs {getattr(args, f'{key}_field_probs')}" if key in probs else "")
                raise MethodConfigError(f"--method {cls.name} reads no {key!r} text: {given} "
                                        f"would be ignored")
        return with_sources(spec, sources, probs)

    @classmethod
    def check_args(cls, args):
        """Raise MethodConfigError for flags the method cannot honour, before any work: other
        methods' flags (``check_flags_read``), head shapes (``check_shapes``), accumulation,
        text fields and caption views."""
        cls.check_flags_read(args)
        cls.check_objective(args)
        dims = model_dims(args.model)
        if getattr(args, "text_context", None):  # the context the tower is built with
            dims = dims._replace(context_length=args.text_context)
        cls.check_shapes(args, dims)
        if args.accum_freq > 1 and args.accum_mode not in cls.accum_modes:
            raise MethodConfigError(
                f"--method {cls.name} does not support --accum-mode {args.accum_mode} "
                f"(supported: {', '.join(cls.accum_modes)})")
        cls.loader_spec(args)
        view = getattr(args, "caption_view", "full")
        if view != "full" or "caption_tokens" in getattr(args, "flags_given", ()):
            if CAPTION_VIEW not in {v.name for v in cls.data_spec(args).text_views}:
                raise MethodConfigError(
                    f"--method {cls.name} reads no caption view: --caption-view {view} "
                    f"--caption-tokens {args.caption_tokens} would be ignored" if view != "full"
                    else f"--caption-tokens {args.caption_tokens} takes effect with --caption-view "
                         f"truncate, random, block or subcaption; --caption-view is full")

    def tower_text_keys(self):
        """The batch keys whose token rows the text tower encodes, so their widths must fit its
        context: the data's text fields and views, less the full caption where the caption view
        replaces it (``--caption-view``: ALIP's and CLIPS' towers read ``caption_view``, a
        77-wide row drawn from any caption width)."""
        keys = [*self.data.text_fields, *(v.name for v in self.data.text_views)]
        return [k for k in keys if not (k == "caption" and CAPTION_VIEW in keys)]

    def after_step(self):
        clamp_logit_scale(self.model)

    def dense_head(self):
        """The module dense (token-wise) scoring needs (FILIP's), or None for global scoring."""
        return None

    def eval_heads(self):
        """What evaluation needs beyond the open_clip model, stored in the model file (small)."""
        head = self.dense_head()
        return {} if head is None else {"dense": head.state_dict()}

    def state_dict(self):
        """Everything the method checkpoints beyond the open_clip model, as keys of the training
        state: ``loss`` (the criterion's buffers: gate EMAs, memory banks) and ``heads`` (the
        encoder's trainable heads)."""
        return {"loss": self.criterion.state_dict(), "heads": self.heads_state_dict()}

    def load_state_dict(self, state):
        self.criterion.load_state_dict(state["loss"])
        if state.get("heads"):
            self.load_heads_state_dict(state["heads"])

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
