"""ALIP: one image tower and ONE shared text tower for the raw web text and the synthetic
caption, the LCG/DCG gates weighting an adaptive contrastive loss (``alip.loss.ALIPLoss``,
deepglint/ALIP train.py:106-156, open_alip/loss.py:84-121)."""

from ..data.spec import ALIP_DATA
from ..loss import ALIPLoss, local_grad_scale
from ..model import TEXT_MODES, encode_text_pair
from .base import (CAPTION_VIEW, ContrastiveEncoder, Method, logit_params, objective,
                   with_caption_view)
from .clip import require_logit_bias


class ALIPEncoder(ContrastiveEncoder):
    """Raw text and caption through the same text tower (``alip.model.encode_text_pair``): two
    passes each with its own lengths (``separate``), one 2B pass (``joint``), or ``auto``: joint
    on the packed CUDA path, separate elsewhere. ``trim_text=False`` runs every text padded to
    its full context (the benchmarks' baseline; the features are the same)."""

    def __init__(self, model, text_mode="auto", trim_text=True):
        super().__init__(model)
        if text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
        self.text_mode, self.trim_text = text_mode, trim_text

    def forward(self, batch):
        raw = batch["raw"]
        cap = batch.get(CAPTION_VIEW, batch["caption"])  # --caption-view: a partial caption
        raw_f, cap_f = encode_text_pair(self.model, raw, cap, self.text_mode, self.trim_text)
        return {"image": self.model.encode_image(batch["image"], normalize=True),
                "raw": raw_f, "caption": cap_f, **logit_params(self.model)}


class ALIPCriterion(ALIPLoss):
    def forward(self, feats):
        return super().forward(feats["image"], feats["raw"], feats["caption"],
                               feats["logit_scale"], feats.get("logit_bias"))


class ALIP(Method):
    name = "alip"
    data = ALIP_DATA
    objectives = ("softmax", "sigmoid")  # sigmoid: the gate-weighted pairwise sigmoid loss
    flag_ranges = {"alip_gamma": "[0, inf)", "alip_momentum": "[0, 1]", "alip_ema_init": "[-1, 1]"}

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("alip (--method alip)")
        g.add_argument("--alip-gamma", type=float, default=2.0, help="Gate sharpness gamma.")
        g.add_argument("--alip-momentum", type=float, default=0.99, help="Gate EMA momentum.")
        g.add_argument("--alip-ema-init", type=float, default=1.0, help="Gate EMA start value.")
        g.add_argument("--text-mode", choices=TEXT_MODES, default="auto",
                       help="Raw text and caption as two length-aware passes (separate), one 2B "
                            "pass (joint), or auto: joint on the packed CUDA path, else separate.")

    @classmethod
    def data_spec(cls, args):
        return with_caption_view(ALIP_DATA, args)

    def build(self, model):
        args, rank, world_size = self.args, self.rank, self.world_size
        require_logit_bias(model, args)
        self.encoder = ALIPEncoder(model, args.text_mode)
        self.criterion = ALIPCriterion(
            gamma=args.alip_gamma, momentum=args.alip_momentum, ema_init=args.alip_ema_init,
            rank=rank, world_size=world_size, local_loss=args.local_loss,
            gather_with_grad=args.gather_with_grad,
            grad_scale=local_grad_scale(world_size, args.gather_with_grad, args.ddp_gradients),
            objective=objective(args))
