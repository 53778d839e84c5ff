"""DeCLIP's loss terms and heads as pure building blocks.

Reference code: Sense-GVT/DeCLIP @ 5d99a855: model ``prototype/model/declip.py``, solver
``prototype/solver/declip_solver.py``, losses ``prototype/loss_functions/loss.py``, masking
``prototype/model/utils/text_utils/mask_tokens.py``, text tower
``prototype/model/text_encoder/text_transformer.py``, memory bank
``prototype/model/utils/nnclr_modules/{memory_bank,nn_memory_bank}.py``.

Per training step (declip.py:196-335, declip_solver.py:437-517), with two image views and the
text plus its EDA copy (``alip.text_aug``)::

    L = 0.4 L_clip + 0.2 L_simsiam + 0.2 L_mlm + 0.2 L_nn          (declip_total)
    L_clip    = mean of clip_info_nce over {img1, img2} x {masked text, EDA text}
    L_simsiam = simsiam_loss(pred(proj(e1)), pred(proj(e2)), proj(e1), proj(e2)), e = image
                embeddings after the CLIP projection, before normalisation
    L_mlm     = mlm_loss(MLMHead(ln_final tokens of the masked text), labels)
    L_nn      = nn_loss(img1, img2, NN(text), NN(text_aug))       (NNMemoryBank)

The reference divides every term by world_size because linklink sums gradients; with DDP
(which averages) that division is dropped here.

Deviations, stated where they act: MLM's random replacement never draws a special id;
the memory bank is an ``nn.Module`` whose bank and pointer are buffers (checkpointed, on the
model's device) instead of a CPU tensor outside the state_dict; ``mlm_loss`` returns 0 instead
of NaN when nothing is masked.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from alip.loss import gather_features

from ..data.spec import RECIPES, DataSpec, ImageView, TextView
from ..model import (encode_text, host_tokens, pad_to_context, text_lengths,
                     to_device_keeping_host_tokens)
from .base import ContrastiveEncoder, Method, MethodConfigError, clamp_logit_scale

# DeCLIP's vocabulary: open_clip's 49408 BPE ids (SOT 49406, EOT 49407, so open_clip's tokenizer
# works unchanged) plus <|mask|> = 49408. The reference puts mask at 49406 and shifts SOT/EOT to
# 49407/49408; the ids differ, the set of special tokens is the same.
SOT_ID, EOT_ID, MASK_ID = 49406, 49407, 49408
VOCAB_SIZE = 49409
LOSS_WEIGHTS = {"clip": 0.4, "nn": 0.2, "simsiam": 0.2, "mlm": 0.2}


# ------------------------------------------------------------------------------- contrastive

def clip_info_nce(img, txt, logit_scale, rank=0, world_size=1):
    """Symmetric InfoNCE of local rows against columns all-gathered with full gradient.

    ``y = rank*B + arange(B)``, ``I = all_gather(img)``, ``T = all_gather(txt)`` (backward sums
    every rank's gradient)::

        L = (CE(s * img T^T, y) + CE(s * txt I^T, y)) / 2

    Reproduces DeCLIP's ClipInfoCELoss (loss.py:37-47) on the logits of declip.py:271-278, with
    the AllGather of slip.py:27-47. Inputs are L2-normalised [B, D] features and
    ``s = logit_scale.exp()`` (DeCLIP caps its forward value at 100 through ``.data``: the
    caller's business). Each rank's gradient on its local rows is ``world_size`` x the matching
    rows of the single-process gradient, so DDP's average gives the single-process one.
    """
    _check_same_shape("clip_info_nce", img=img, txt=txt)
    all_img = gather_features(img, rank, world_size, gather_with_grad=True)
    all_txt = gather_features(txt, rank, world_size, gather_with_grad=True)
    labels = _labels(img, rank)
    loss_i = F.cross_entropy(logit_scale * img @ all_txt.T, labels)
    loss_t = F.cross_entropy(logit_scale * txt @ all_img.T, labels)
    return (loss_i + loss_t) / 2


def nn_loss(img1, img2, nn_t, nn_t_aug, logit_scale, rank=0, world_size=1):
    """Nearest-neighbour supervision: image rows against the gathered NN text embeddings.

    ``N = all_gather(nn_t.detach())``, ``N' = all_gather(nn_t_aug.detach())``, ``y`` as in
    ``clip_info_nce``; only image->text directions::

        CIE(a, b) = (CE(a, y) + CE(b, y)) / 2
        L = (CIE(s img1 N^T, s img1 N'^T) + CIE(s img2 N^T, s img2 N'^T)) / 2

    Reproduces declip.py:281-300 (query, renormalise, gather, logits) and
    declip_solver.py:474-478. ``nn_t``/``nn_t_aug`` are the renormalised bank rows
    (``NNMemoryBank.query(x) / (norm + 1e-10)``); gradient reaches the images and
    ``logit_scale``, never the text tower.
    """
    _check_same_shape("nn_loss", img1=img1, img2=img2, nn_t=nn_t, nn_t_aug=nn_t_aug)
    all_nn = gather_features(nn_t.detach(), rank, world_size)
    all_nn_aug = gather_features(nn_t_aug.detach(), rank, world_size)
    labels = _labels(img1, rank)

    def cie(img):
        return (F.cross_entropy(logit_scale * img @ all_nn.T, labels)
                + F.cross_entropy(logit_scale * img @ all_nn_aug.T, labels)) / 2

    return (cie(img1) + cie(img2)) / 2


def _check_same_shape(fn, **tensors):
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1 or any(len(s) != 2 for s in shapes.values()):
        raise ValueError(f"{fn}: inputs must share one [B, D] shape, got {shapes}")


def _labels(x, rank):
    return rank * x.shape[0] + torch.arange(x.shape[0], device=x.device)


# ----------------------------------------------------------------------------------- SimSiam

class SimSiamProjector(nn.Module):
    """Linear(512->1024)-BN-ReLU-Linear(1024->1024)-BN-ReLU-Linear(1024->1024)-BN.

    declip.py:33-90 (projection_MLP; its last BN is BatchNorm1d(hidden_dim), the same layer
    here because hidden = out = 1024). Plain ``nn.BatchNorm1d``, not synced, as the reference.
    """

    def __init__(self, in_dim=512, hidden_dim=1024, out_dim=1024):
        super().__init__()
        if out_dim != hidden_dim:
            raise ValueError(f"SimSiamProjector: the reference's output BN has hidden_dim "
                             f"features, so out_dim must equal hidden_dim, got {out_dim} != "
                             f"{hidden_dim}")
        self.linear1, self.bn1 = nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim)
        self.linear2, self.bn2 = nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim)
        self.linear3, self.bn3 = nn.Linear(hidden_dim, out_dim), nn.BatchNorm1d(hidden_dim)

    def forward(self, x):
        x = F.relu(self.bn1(self.linear1(x)))
        x = F.relu(self.bn2(self.linear2(x)))
        return self.bn3(self.linear3(x))


class SimSiamPredictor(nn.Module):
    """Linear(1024->512)-BN-ReLU-Linear(512->1024), no output BN (declip.py:92-130)."""

    def __init__(self, in_dim=1024, hidden_dim=512, out_dim=1024):
        super().__init__()
        self.linear1, self.bn1 = nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim)
        self.layer2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x):
        return self.layer2(F.relu(self.bn1(self.linear1(x))))


def simsiam_loss(p1, p2, z1, z2):
    """``-1/2 [D(p1, sg(z2)) + D(p2, sg(z1))]``, ``D(p, z) = mean_b <p_b/|p_b|, z_b/|z_b|>``.

    loss.py:49-55 (D: no epsilon in the norms) and loss.py:65-81 (SimsiamLoss, symmetric). The
    inputs are the unnormalised projector (z) and predictor (p) outputs; no gradient flows
    into z.
    """
    _check_same_shape("simsiam_loss", p1=p1, p2=p2, z1=z1, z2=z2)

    def d(p, z):
        z = z.detach()
        p = p / p.norm(dim=-1, keepdim=True)
        z = z / z.norm(dim=-1, keepdim=True)
        return (p * z).sum(dim=1).mean()

    return -0.5 * (d(p1, z2) + d(p2, z1))


# ----------------------------------------------------------------------------------------- MLM

def mlm_mask(tokens, generator, mask_id=MASK_ID, vocab_size=VOCAB_SIZE,
             special_ids=(SOT_ID, EOT_ID, MASK_ID), eot_id=EOT_ID, prob=0.15):
    """BERT masking of a padded [B, L] token batch: returns (masked tokens, labels).

    Per sequence, on its unpadded tokens (SOT .. first EOT), in the reference's draw order
    (mask_tokens.py:5-29, called per sequence by text_transformer.py:157-172)::

        chosen  = bernoulli(0.15), 0 on special ids     -> labels = token there, else -100
        replace = bernoulli(0.8) & chosen               -> mask_id
        random  = bernoulli(0.5) & chosen & ~replace    -> randint(...)
        the rest of ``chosen`` keeps its token

    Deviation: the random replacement is uniform over the vocabulary *without* the special ids
    (the reference draws from all of it; a random EOT would move EOT pooling): one randint per
    position over ``vocab_size - len(special_ids)`` values, mapped past the special ids. The
    draws keep the reference's count and order, so the same generator state gives the
    reference's chosen / [mask] / random / kept positions (the random ids themselves differ).
    Padding (after the first EOT) is never touched and its labels are -100. ``generator`` is a
    CPU ``torch.Generator``; the work is done on the CPU and returned on ``tokens.device``.
    """
    if tokens.dim() != 2:
        raise ValueError(f"mlm_mask: tokens must be [B, L], got {tuple(tokens.shape)}")
    has_eot = (tokens == eot_id).any(dim=1)
    if not bool(has_eot.all()):
        row = int((~has_eot).nonzero()[0])
        raise ValueError(f"mlm_mask: row {row} has no end-of-text token {eot_id}")
    specials = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    cpu = tokens.cpu()
    lengths = ((cpu == eot_id).int().argmax(dim=1) + 1).tolist()
    masked, labels = cpu.clone(), torch.full_like(cpu, -100)
    for row, length in enumerate(lengths):
        masked[row, :length], labels[row, :length] = _mask_sequence(
            cpu[row, :length], generator, mask_id, vocab_size, specials, prob)
    return masked.to(tokens.device), labels.to(tokens.device)


def _mask_sequence(seq, generator, mask_id, vocab_size, specials, prob):
    is_special = torch.isin(seq, specials)
    chosen = torch.bernoulli(torch.full(seq.shape, prob).masked_fill(is_special, 0.0),
                             generator=generator).bool()
    labels = torch.where(chosen, seq, torch.full_like(seq, -100))
    replace = torch.bernoulli(torch.full(seq.shape, 0.8), generator=generator).bool() & chosen
    rand = torch.bernoulli(torch.full(seq.shape, 0.5), generator=generator).bool() \
        & chosen & ~replace
    words = torch.randint(vocab_size - len(specials), seq.shape, generator=generator)
    for s in specials.tolist():  # sorted: map the draw past each special id in turn
        words = words + (words >= s).long()
    out = seq.clone()
    out[replace] = mask_id
    out[rand] = words[rand]
    return out, labels


class MLMHead(nn.Linear):
    """``Linear(width, vocab)`` on the text tower's ``ln_final`` outputs (declip.py:169-171).

    Apply it to the masked positions only (``head(tokens[labels != -100])``): the same numbers
    as the reference's all-position pass (declip.py:330-333) without a [B, 77, 49409] logit
    tensor (1.9 GB in float32 at B = 128).
    """

    def __init__(self, width, vocab_size=VOCAB_SIZE):
        super().__init__(width, vocab_size)


def mlm_loss(logits, labels):
    """Cross-entropy averaged over every masked position of the local batch, pooled.

    ``logits`` [..., V] and ``labels`` [...] with -100 where nothing is predicted (shapes
    [B, L, V]/[B, L] or the masked selection [M, V]/[M]). declip.py:332-334. When nothing is
    masked the reference gives NaN; this returns a 0 that keeps the graph. Reads nothing back
    from the device.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp_min(1).to(total.dtype)


def text_tokens_and_features(model, text):
    """One text-tower pass giving the ``ln_final`` outputs at every position [B, L, width] and
    the pooled, projected, unnormalised text embedding [B, D] (``model.encode_text(text)``).

    Uses open_clip's ``forward_intermediates`` (the last block's output through ``ln_final``
    is the tensor the pooling reads), for both the built-in text tower of ``CLIP`` and a
    ``TextTransformer`` in ``CustomTextCLIP``.
    """
    width, text = text.shape[1], pad_to_context(model, text)  # narrower rows: cut back below
    if hasattr(model, "text"):
        out = model.text.forward_intermediates(text, indices=1, normalize_intermediates=True,
                                               output_fmt="NLC")
    else:
        out = model.forward_intermediates(text=text, text_indices=1, normalize=False,
                                          normalize_intermediates=True)
    return out["text_intermediates"][-1][:, :width], out["text_features"]


# ---------------------------------------------------------------------------------- NN bank

class NNMemoryBank(nn.Module):
    """Per-process FIFO queue of detached embeddings with top-1 nearest-neighbour lookup.

    Reproduces the CPU module DeCLIP imports (memory_bank.py:40-124, nn_memory_bank.py:38-65):

    * init: ``randn(dim, size)`` from ``generator``, columns normalised (stored here as
      ``bank[size, dim]``, row i = the reference's column i);
    * ``query(x, update)``: cosine of ``normalize(x)`` against the normalised bank *as it was
      before this call*, returns the raw bank row of the top-1 neighbour (the caller
      renormalises with +1e-10); with ``update`` it then enqueues ``x.detach()``;
    * enqueue at pointer p of B rows: if ``p + B >= size`` it writes the first ``size - p`` rows,
      drops the rest and resets p to 0, else writes all B and p += B.

    DeCLIP's order per step (declip.py:282-288): ``query(t, update=False)``,
    ``query(t_aug, update=True)``, then ``enqueue(t)``; t, t_aug the normalised text features.

    Deviation: ``bank`` and ``ptr`` are buffers, so they follow the model's device and are saved
    and restored with its state_dict (the reference keeps them on the CPU outside it and
    restarts from noise after a resume).
    """

    def __init__(self, dim, size=2 ** 16, generator=None):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"NNMemoryBank: need dim >= 1 and size >= 1, got {dim}, {size}")
        bank = F.normalize(torch.randn(dim, size, generator=generator), dim=0)
        self.register_buffer("bank", bank.T.contiguous())
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self):
        return self.bank.shape[0]

    @torch.no_grad()
    def query(self, x, update=False):
        if x.dim() != 2 or x.shape[1] != self.bank.shape[1]:
            raise ValueError(f"NNMemoryBank.query: x must be [B, {self.bank.shape[1]}], got "
                             f"{tuple(x.shape)}")
        sim = F.normalize(x.float(), dim=1) @ F.normalize(self.bank, dim=1).T
        neighbours = self.bank[torch.topk(sim, k=1, dim=1).indices[:, 0]]  # a copy
        if update:
            self.enqueue(x)
        return neighbours

    @torch.no_grad()
    def enqueue(self, x):
        """The reference's rule at pointer p, computed on the device (p is never read back):
        rows p + j < size are written at p + j; if p + B >= size the pointer returns to 0."""
        b = x.shape[0]
        x = x[:self.size].detach().to(self.bank.dtype)  # rows past the bank's size never land
        pos = self.ptr + torch.arange(x.shape[0], device=self.bank.device)
        slot = pos % self.size  # distinct: at most ``size`` rows
        fits = (pos < self.size)[:, None]
        self.bank.index_copy_(0, slot, torch.where(fits, x, self.bank[slot]))
        self.ptr.copy_(torch.where(self.ptr + b >= self.size, 0, self.ptr + b))


# --------------------------------------------------------------------------------------- total

def declip_total(clip, nn_text, simsiam, mlm, weights=LOSS_WEIGHTS):
    """``0.4 clip + 0.2 simsiam + 0.2 mlm + 0.2 nn`` summed in the reference's order
    (declip_solver.py:507-517: clip, simsiam, mlm, nn; the order only moves the last ulp)."""
    loss = clip * weights["clip"]
    loss = loss + simsiam * weights["simsiam"]
    loss = loss + mlm * weights["mlm"]
    return loss + nn_text * weights["nn"]


# ------------------------------------------------------------------------------ the method



def capped_scale(logit_scale, cap=100.0):
    """``exp(p)`` with its forward value capped at ``cap`` and the gradient of the uncapped
    ``exp`` (DeCLIP's ``logit_scale.data = clamp(exp(p), max=100)``, docs/methods.md §4.7)."""
    s = logit_scale.exp()
    return s + (s.clamp(max=cap) - s).detach()


def embed_dim(model):
    proj = model.text_projection
    return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[-1]


class DeCLIPEncoder(ContrastiveEncoder):
    """Two image views, the MLM-masked text (its CLIP embedding, as the reference, and its
    ln_final tokens for the MLM head) and the EDA text view; SimSiam projector/predictor on the
    projected, unnormalised image embeddings."""

    def __init__(self, model, seed=0, rank=0, mask_id=MASK_ID, vocab_size=VOCAB_SIZE):
        super().__init__(model)
        dim, width = embed_dim(model), model.transformer.width
        self.projector = SimSiamProjector(dim)
        self.predictor = SimSiamPredictor()
        self.mlm_head = MLMHead(width, vocab_size)
        self.mask_id, self.vocab_size = mask_id, vocab_size
        self.seed, self.rank = seed, rank
        # masking draws come from (seed, rank, this counter), a host int saved with the heads
        # (``get_extra_state``): masks replay exactly on resume, and nothing is read back from
        # the device. A skipped (non-finite) step still counts its draw: its batch is gone too.
        self.mlm_draws = 0

    def get_extra_state(self):  # a CPU tensor, so state_dict holds tensors only
        return torch.tensor(self.mlm_draws)

    def set_extra_state(self, state):
        self.mlm_draws = int(state)

    def _mask(self, tokens):
        """(masked tokens, labels) on ``tokens.device``, drawn on the host from the tokens' host
        copy; the masked tokens keep theirs (``encode_text`` plans from it)."""
        gen = torch.Generator().manual_seed(
            int(torch.randint(2 ** 62, (1,), generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + self.rank * 7919 + self.mlm_draws * 104_729))))
        if self.training:
            self.mlm_draws += 1
        host = host_tokens(tokens)
        masked, labels = mlm_mask(tokens.cpu() if host is None else host, gen,
                                  mask_id=self.mask_id, vocab_size=self.vocab_size)
        return to_device_keeping_host_tokens(masked, tokens.device), labels

    def forward(self, batch):
        return self.encode(batch)[0]

    def encode(self, batch, image_tokens=False):
        """-> (features, extras): extras holds the masked text's ln_final tokens and mask, and
        with ``image_tokens`` view 1's patch tokens before ln_post (for DeFILIP)."""
        masked, labels = self._mask(batch["raw"])
        tokens, text = text_tokens_and_features(self.model, masked)
        # the masked positions, chosen on the host: only an index tensor goes to the device
        picked = (labels != -100).flatten().nonzero().squeeze(1)
        device = masked.device
        out = {"text": F.normalize(text, dim=-1),
               "text_aug": encode_text(self.model, batch["raw_eda"]),
               "mlm_logits": self.mlm_head(tokens.flatten(0, 1)[picked.to(device, non_blocking=True)]),
               "mlm_labels": labels.flatten()[picked].to(device, non_blocking=True),
               "logit_scale": capped_scale(self.model.logit_scale)}
        positions = torch.arange(masked.shape[1], device=masked.device)
        extras = {"text_tokens": tokens,
                  "text_mask": positions[None] < text_lengths(masked, self.model)[:, None]}
        for i, view in enumerate(("image", "image_aug"), start=1):
            if i == 1 and image_tokens:
                r = self.model.forward_intermediates(image=batch[view], image_indices=1,
                                                     image_output_fmt="NLC", normalize=False)
                e, extras["image_tokens"] = r["image_features"], r["image_intermediates"][0]
            else:
                e = self.model.encode_image(batch[view], normalize=False)
            z = self.projector(e)
            out[f"img{i}"], out[f"z{i}"], out[f"p{i}"] = F.normalize(e, dim=-1), z, self.predictor(z)
        return out, extras


class DeCLIPCriterion(nn.Module):
    """``0.4 L_clip + 0.2 L_simsiam + 0.2 L_mlm + 0.2 L_nn`` (``declip_total``) with the
    per-process NN memory bank; the bank moves only in train mode."""

    def __init__(self, dim, bank_size=2 ** 16, rank=0, world_size=1, seed=0):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        self.bank = NNMemoryBank(dim, bank_size, generator=gen)

    def forward(self, f):
        s, r, w = f["logit_scale"], self.rank, self.world_size
        clip = sum(clip_info_nce(img, txt, s, r, w) for img in (f["img1"], f["img2"])
                   for txt in (f["text"], f["text_aug"])) / 4
        nn_t = self.bank.query(f["text"], update=False)
        nn_aug = self.bank.query(f["text_aug"], update=self.training)
        if self.training:
            self.bank.enqueue(f["text"])
        renorm = lambda x: x / (x.norm(dim=1, keepdim=True) + 1e-10)  # noqa: E731 (reference)
        nn_text = nn_loss(f["img1"], f["img2"], renorm(nn_t).to(s.dtype),
                          renorm(nn_aug).to(s.dtype), s, r, w)
        simsiam = simsiam_loss(f["p1"], f["p2"], f["z1"], f["z2"])
        mlm = mlm_loss(f["mlm_logits"], f["mlm_labels"])
        return {"loss": declip_total(clip, nn_text, simsiam, mlm), "loss_clip": clip,
                "loss_nn": nn_text, "loss_simsiam": simsiam, "loss_mlm": mlm}


class DeCLIP(Method):
    """DeCLIP (Sense-GVT/DeCLIP; YFCC15M ViT-B/32 IN-1K 43.2): multi-view CLIP over two MoCo-v2
    image views x {masked text, EDA text}, NN text supervision from a memory bank, SimSiam on
    the image embeddings and MLM on the shared causal text tower.

    Needs a model whose vocabulary has the mask token (``DeCLIP-ViT-B-32``, ``DeCLIP-tiny``:
    vocab 49409, mask 49408, open_clip's SOT/EOT). BatchNorm in SimSiam's heads: micro-batch
    accumulation only.
    """

    name = "declip"
    accum_modes = ("micro",)
    batchnorm_heads = True  # SimSiam's projector and predictor
    flag_ranges = {"declip_bank_size": "[1, inf)"}

    @classmethod
    def data_spec(cls, args):
        view = args.declip_augment
        return DataSpec(image_views=(ImageView("image", view), ImageView("image_aug", view)),
                        text_fields=("raw",),
                        text_views=(TextView("raw_eda", source="raw",
                                             transform="alip.text_aug:eda_tokens"),))

    @classmethod
    def reference_vit(cls, args):  # DeCLIP and DeFILIP: the toolbox's ViT (base.toolbox_vit)
        return "toolbox"

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("declip (--method declip and --method defilip)")
        g.add_argument("--declip-bank-size", type=int, default=2 ** 16,
                       help="NN memory bank entries per process (reference: 2^16).")
        g.add_argument("--declip-augment", choices=RECIPES, default="mocov2",
                       help="Both image views' augmentation: mocov2 (the reference's MOCOV2 "
                            "transform), reference (ALIP's and CLIP's here), slip_base, simclr.")

    def build(self, model):
        args, rank, world_size = self.args, self.rank, self.world_size
        vocab = model.token_embedding.num_embeddings if hasattr(model, "token_embedding") else 0
        if vocab < VOCAB_SIZE:
            raise MethodConfigError(
                f"--method {self.name} needs a text vocabulary with the mask token {MASK_ID} "
                f"({VOCAB_SIZE} entries); --model {args.model} has {vocab}: use DeCLIP-ViT-B-32 "
                f"or DeCLIP-tiny")
        self.encoder = DeCLIPEncoder(model, seed=args.seed, rank=rank)
        self.criterion = DeCLIPCriterion(embed_dim(model), args.declip_bank_size,
                                         rank, world_size, seed=args.seed)

    def load_heads_state_dict(self, state):
        if "mlm_draws" in state and "_extra_state" not in state:  # a buffer before 2026-12
            state = {("_extra_state" if k == "mlm_draws" else k): v for k, v in state.items()}
        super().load_heads_state_dict(state)

    def after_step(self):
        clamp_logit_scale(self.model, 3.0, 6.0)  # the parameter, as the reference (before step too)
