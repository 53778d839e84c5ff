"""DeFILIP (Sense-GVT/DeCLIP prototype/model/defilip.py; YFCC15M ViT-B/32 IN-1K 45.0, the best
row of the DeCLIP toolbox): DeCLIP's four terms plus 0.2 x FILIP's dense loss on image view 1
against the MLM-masked original text (docs/methods.md §6)::

    L = 0.4 L_clip + 0.2 L_simsiam + 0.2 L_mlm + 0.2 L_nn + 0.2 L_filip

summed in the reference's order (docs/methods.md §6). The dense temperature is clamped to
[3, 6] as the reference.
"""
import torch.nn as nn

from .declip import DeCLIP, DeCLIPCriterion, DeCLIPEncoder
from .filip import FILIPCriterion, FILIPHead, add_filip_args, check_k, require_token_towers

FILIP_WEIGHT = 0.2


class DeFILIPEncoder(DeCLIPEncoder):
    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self.dense = FILIPHead(model.visual.transformer.width, model.transformer.width)

    def forward(self, batch):
        out, extras = self.encode(batch, image_tokens=True)
        out["image_tokens"], out["text_tokens"] = self.dense(extras["image_tokens"],
                                                             extras["text_tokens"])
        out["text_mask"] = extras["text_mask"]
        out["logit_scale_dense"] = self.dense.logit_scale.exp()
        return out


class DeFILIPCriterion(nn.Module):
    def __init__(self, declip, filip):
        super().__init__()
        self.declip, self.filip = declip, filip

    def forward(self, f):
        out = self.declip(f)
        dense = self.filip(f)["loss"]
        return {**out, "loss": out["loss"] + FILIP_WEIGHT * dense, "loss_filip": dense}


class DeFILIP(DeCLIP):
    name = "defilip"
    find_unused_parameters = True  # ln_post/proj of view 1's dense path, as FILIP
    flag_ranges = {**DeCLIP.flag_ranges, "defilip_k_image": "[1, inf)",
                   "defilip_k_text": "[1, inf)", "defilip_chunk_size": "[1, inf)"}
    # DeCLIP's flags (its __init__ builds DeCLIP's heads), none of FILIP's: the reference
    # DeFILIP (Sense-GVT/DeCLIP prototype/model/defilip.py) has its own token selection (k = 16
    # for image and text, all 77 positions), its text is DeCLIP's MLM-masked text (so no
    # --filip-input-mask) and its image is DeCLIP's view 1 (so no --filip-augment); its own
    # --defilip-k-image/-k-text/-padding/-chunk-size are FILIP's settings it has.
    shared_flags = ("declip_bank_size", "declip_augment")

    @classmethod
    def add_args(cls, parser):
        add_filip_args(parser.add_argument_group(
            "defilip (--method defilip, which reads --declip-* too; these are its copies of "
            "--filip-k-image/-k-text/-padding/-chunk-size)"), prefix="defilip")

    @classmethod
    def check_shapes(cls, args, dims):
        super().check_shapes(args, dims)
        check_k(args, dims, "defilip")

    def build(self, model):
        args, rank, world_size = self.args, self.rank, self.world_size
        require_token_towers(model, self.name, args.model)
        super().build(model)
        self.encoder = DeFILIPEncoder(model, seed=args.seed, rank=rank)
        self.criterion = DeFILIPCriterion(
            self.criterion, FILIPCriterion(args.defilip_k_image, args.defilip_k_text,
                                           args.defilip_padding == "paper", rank, world_size,
                                           args.defilip_chunk_size))

    def dense_head(self):
        return self.encoder.dense

    def after_step(self):
        super().after_step()
        self.encoder.dense.clamp_logit_scale_()
