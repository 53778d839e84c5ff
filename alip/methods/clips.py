"""CLIPS' caption decoder and loss terms (UCSC-VLAA/CLIPS open_clip/model.py:267-525,
transformer.py TextDecoder; docs/methods.md §7). The text views (token reduction) are in
``alip.text_views``.

The decoder is self-attention only, over ``[image patch tokens ; web-text encoder token outputs ;
L learnable query tokens]`` (L = 128), with the reference mask: the prefix (image + web text)
attends bidirectionally within itself and never to the queries; each query sees the whole prefix
and the queries before it. Query outputs -> ``ln_final`` -> projection to the vocabulary.

How training lines up (the reference's labels are ``caption[:, 1:]``): query ``i`` predicts
caption token ``i + 1``, i.e. query 0 predicts the first word after SOT, and the query after the
last word predicts EOT; queries past the caption's end (or past the 76 targets of a 77-token row)
have padding targets, ignored by the loss. The queries are learned "soft prompts" (CLIPS#1): the
caption tokens themselves are never fed in, so one forward gives every position's distribution,
and ``generate`` searches over those per-position distributions (greedy = argmax per position up
to the first EOT; beam search keeps the ``num_beams`` best prefixes by summed log-probability and
ranks finished captions by ``score / length**length_penalty``).

The prefix text is what the reference feeds: the web text's ``ln_final`` token outputs with the
last position dropped (a CoCa leftover: ``token_embs[:, :-1]``), padding positions included. The
decoder takes any [B, T, text width] here; the method glue chooses. No positional embedding is
added (the reference adds none: patch tokens carry the vision tower's, text tokens the text
tower's, and each query is its own parameter).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.coca_model import MultimodalCfg
from open_clip.transformer import LayerNorm, Transformer

from ..data.spec import ALIP_DATA
from ..loss import PairLoss
from ..model import encode_text, host_tokens
from .base import (CAPTION_VIEW, ContrastiveEncoder, Method, MethodConfigError, ModelDims,
                   logit_params, with_caption_view)
from .clip import pair_kwargs, require_logit_bias
from .filip import dense_image_tokens, dense_text_tokens, require_token_towers

SOT_ID, EOT_ID = 49406, 49407
_MM = MultimodalCfg()


def decoder_mask(prefix_len, num_queries, device=None, dtype=torch.float32):
    """Additive [S, S] mask (0 = may attend, -inf = blocked), S = prefix_len + num_queries."""
    size = prefix_len + num_queries
    blocked = torch.zeros(size, size, dtype=torch.bool, device=device)
    blocked[:prefix_len, prefix_len:] = True  # the prefix never sees the queries
    blocked[prefix_len:, prefix_len:] = torch.ones(num_queries, num_queries, dtype=torch.bool,
                                                   device=device).triu(1)  # causal queries
    return torch.zeros(size, size, dtype=dtype, device=device).masked_fill(blocked, float("-inf"))


class CaptionDecoder(nn.Module):
    """``forward(image_tokens, text_tokens=None)`` -> logits [B, num_queries, vocab_size].

    image_tokens [B, P, image_width] (the vision tower's patch tokens, e.g.
    ``alip.methods.filip.dense_image_tokens(model, images, ln_post=True)``), text_tokens
    [B, T, text_width] or None (image-only captioning). Inputs whose width differs from the
    decoder's go through a Linear; equal widths pass unchanged, as in the reference. Width, layers,
    heads, MLP ratio and vocabulary default to open_clip's ``MultimodalCfg``.
    """

    def __init__(self, image_width, text_width, vocab_size=_MM.vocab_size, width=_MM.width,
                 layers=_MM.layers, heads=_MM.heads, mlp_ratio=_MM.mlp_ratio, num_queries=128,
                 act_layer=nn.GELU):
        super().__init__()
        self.config = dict(image_width=image_width, text_width=text_width, vocab_size=vocab_size,
                           width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio,
                           num_queries=num_queries)  # what rebuilds it (CLIPS model files)
        self.image_in = nn.Linear(image_width, width) if image_width != width else nn.Identity()
        self.text_in = nn.Linear(text_width, width) if text_width != width else nn.Identity()
        # the reference's ``learnable_tokens = nn.Parameter(torch.randn(L, width))``: std 1
        # (UCSC-VLAA/CLIPS open_clip/model.py:297-299)
        self.queries = nn.Parameter(torch.randn(num_queries, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer=act_layer)
        self.ln_final = LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.init_parameters()

    def init_parameters(self):
        """The reference ``TextDecoder.init_parameters`` (UCSC-VLAA/CLIPS open_clip/
        transformer.py:1161-1182) for the layers the decoder has: each block's attention
        in-projection N(0, width^-0.5), attention out-projection and MLP c_proj
        N(0, width^-0.5 (2 layers)^-0.5), MLP c_fc N(0, (2 width)^-0.5), the vocabulary
        projection (its ``text_projection``, no bias) N(0, width^-0.5). Its token and positional
        embedding lines have nothing to act on (the decoder reads no tokens and adds no
        positions). The width adapters (``image_in``/``text_in``, not in the reference) keep
        PyTorch's default init."""
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        attn_std, fc_std = width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.head.weight, std=width ** -0.5)

    @property
    def num_queries(self):
        return self.queries.shape[0]

    def forward(self, image_tokens, text_tokens=None):
        return self.head(self.features(image_tokens, text_tokens))

    def features(self, image_tokens, text_tokens=None):
        """The queries' outputs after ``ln_final`` ([B, num_queries, width]), before the
        vocabulary projection (training projects only the positions that have a target)."""
        prefix = self.image_in(image_tokens)
        if text_tokens is not None:
            prefix = torch.cat([prefix, self.text_in(text_tokens)], dim=1)
        queries = self.queries.to(prefix.dtype).expand(prefix.shape[0], -1, -1)
        x = torch.cat([prefix, queries], dim=1)
        mask = decoder_mask(prefix.shape[1], self.num_queries, x.device, x.dtype)
        x = self.transformer(x, attn_mask=mask)[:, prefix.shape[1]:]
        return self.ln_final(x)

    @torch.no_grad()
    def generate(self, image_tokens, text_tokens=None, num_beams=1, context_length=77,
                 length_penalty=1.0, sot_id=SOT_ID, eot_id=EOT_ID):
        """-> int64 [B, context_length] rows ``[SOT, tokens..., EOT, 0...]`` (open_clip layout:
        ``open_clip.decode`` reads them). At most ``min(num_queries, context_length - 2)`` tokens
        are generated; a caption that reaches the limit without EOT gets one appended."""
        steps = min(self.num_queries, context_length - 2)
        logp = F.log_softmax(self(image_tokens, text_tokens)[:, :steps].float(), dim=-1)
        logp[..., sot_id] = float("-inf")  # SOT never inside a caption
        out = torch.zeros(logp.shape[0], context_length, dtype=torch.long, device=logp.device)
        for b in range(logp.shape[0]):
            tokens = _greedy(logp[b], eot_id) if num_beams == 1 else _beam(logp[b], num_beams, eot_id, length_penalty)
            row = [sot_id] + tokens + [eot_id]
            out[b, :len(row)] = torch.tensor(row, device=out.device)
        return out


def _greedy(logp, eot_id):
    tokens = []
    for t in logp.argmax(dim=-1).tolist():
        if t == eot_id:
            break
        tokens.append(t)
    return tokens


def _beam(logp, num_beams, eot_id, length_penalty):
    """Beam search over per-position log-probabilities [steps, V]; returns the caption tokens."""
    beams, finished = [(0.0, [])], []
    for t in range(logp.shape[0]):
        top = logp[t].topk(num_beams + 1)
        candidates = [(score + s, tokens + [tok]) for score, tokens in beams
                      for s, tok in zip(top.values.tolist(), top.indices.tolist())]
        candidates.sort(key=lambda c: -c[0])
        beams = []
        for score, tokens in candidates:
            if tokens[-1] == eot_id:
                finished.append((score / len(tokens) ** length_penalty, tokens[:-1]))
            elif len(beams) < num_beams:
                beams.append((score, tokens))
            if len(beams) == num_beams:
                break
        if len(finished) >= num_beams:
            break
    finished += [(score / (len(tokens) + 1) ** length_penalty, tokens) for score, tokens in beams]
    return max(finished, key=lambda f: f[0])[1]


def caption_targets(caption, num_queries, pad_id=0):
    """[B, T] caption token rows -> [B, num_queries] targets: ``caption[:, 1:]`` cut or padded.

    Positions after each row's EOT are set to ``pad_id`` (open_clip rows are already zero there).
    Caveat of open_clip's vocabulary: id 0 is also the token '!' (without end-of-word), so
    ``pad_id=0`` ignores it too, as the reference and open_clip's CoCa do; pass ``pad_id=-100``
    here and to ``caption_loss`` to keep it.
    """
    targets = caption[:, 1:1 + num_queries]
    eot = (caption == EOT_ID).int().argmax(dim=1, keepdim=True)  # EOT at row position eot
    after = torch.arange(targets.shape[1], device=caption.device)[None] >= eot  # target j = row j+1
    targets = targets.masked_fill(after, pad_id)
    if targets.shape[1] < num_queries:
        targets = F.pad(targets, (0, num_queries - targets.shape[1]), value=pad_id)
    return targets


def caption_loss(logits, targets, pad_id=0):
    """Mean cross-entropy over the non-padding targets of the batch: logits [B, L, V], targets [B, L]."""
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"caption_loss: logits {tuple(logits.shape)} do not line up with targets "
                         f"{tuple(targets.shape)} (use caption_targets(caption, num_queries))")
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad_id)


def clips_loss(clip_web, clip_partial, cap, w_con=1.0, w_cap=2.0):
    """``w_con * (CLIP(image, web) + CLIP(image, partial caption)) / 2 + w_cap * caption CE``.

    The weights are open_clip's CoCa defaults (``--coca-contrastive-loss-weight 1``,
    ``--coca-caption-loss-weight 2``), which CLIPS' released code uses; the paper's values are
    unverified. -> {"loss", "loss_contrastive", "loss_caption"} (the last two weighted)."""
    contrastive = w_con * (clip_web + clip_partial) / 2
    caption = w_cap * cap
    return {"loss": contrastive + caption, "loss_contrastive": contrastive, "loss_caption": caption}


# ------------------------------------------------------------------------------ the method

def target_positions(caption, num_queries):
    """-> (flat indices of the decoder positions that have a target, those targets): the
    decoder projects to the vocabulary only there (padding is most). Planned from the caption's
    host copy (``alip.model.host_tokens``) when there is one, so the step reads nothing back."""
    host = host_tokens(caption)
    targets = caption_targets(host if host is not None else caption, num_queries).flatten()
    keep = (targets != 0).nonzero().squeeze(1)
    return (keep.to(caption.device, non_blocking=True),
            targets[keep].to(caption.device, non_blocking=True))


class CLIPSEncoder(ContrastiveEncoder):
    """Image: patch tokens after ln_post (decoder prefix) and the global feature, one pass; web
    text: ln_final tokens (prefix, last position dropped as the reference) and its global
    feature, one pass; the partial caption (``caption_view``) through the same text tower; the
    decoder's logits for the full caption."""

    def __init__(self, model, decoder):
        super().__init__(model)
        self.decoder = decoder

    def forward(self, batch):
        image_tokens, image = dense_image_tokens(self.model, batch["image"], ln_post=True)
        text_tokens, _, raw = dense_text_tokens(self.model, batch["raw"])
        partial = batch.get(CAPTION_VIEW, batch["caption"])
        keep, targets = target_positions(batch["caption"], self.decoder.num_queries)
        hidden = self.decoder.features(image_tokens, text_tokens[:, :-1])
        return {"image": image, "raw": raw, "caption_partial": encode_text(self.model, partial),
                "caption_logits": self.decoder.head(hidden.flatten(0, 1)[keep])[None],
                "caption_targets": targets[None], **logit_params(self.model)}

    @torch.no_grad()
    def caption(self, images, raw=None, num_beams=1):
        """Caption images (optionally with their web text) with the trained decoder: int64 rows
        that ``open_clip.decode`` reads."""
        image_tokens, _ = dense_image_tokens(self.model, images, ln_post=True)
        text_tokens = dense_text_tokens(self.model, raw)[0][:, :-1] if raw is not None else None
        return self.decoder.generate(image_tokens, text_tokens, num_beams=num_beams)


class CLIPSCriterion(nn.Module):
    def __init__(self, w_con, w_cap, clip_kwargs):
        super().__init__()
        self.w_con, self.w_cap = w_con, w_cap
        self.clip = PairLoss(**clip_kwargs)

    def forward(self, f):
        web = self.clip(f["image"], f["raw"], f)
        partial = self.clip(f["image"], f["caption_partial"], f)
        cap = caption_loss(f["caption_logits"], f["caption_targets"])
        return clips_loss(web, partial, cap, self.w_con, self.w_cap)


class CLIPS(Method):
    """CLIPS (UCSC-VLAA/CLIPS, arXiv 2411.16828; docs/methods.md §7): contrastive on (image,
    web text) and (image, partial synthetic caption: ``--caption-view``, default subcaption
    K=32) plus an autoregressive-style decoder predicting the full synthetic caption from the
    image patch tokens and the web text's token outputs through learnable queries. The text
    tower and tokenizer are open_clip's (the CLIPS BERT-uncased configuration is not supported:
    its tokenizer needs a download)."""

    name = "clips"
    objectives = ("softmax", "sigmoid")  # its two contrastive terms (the caption loss stays CE)
    sigmoid_exchange = True
    find_unused_parameters = True  # the text tower's projection is unused by the decoder prefix
    flag_ranges = {"clips_w_con": "[0, inf)", "clips_w_cap": "[0, inf)",
                   "clips_queries": "[1, inf)", "clips_decoder_layers": "[1, inf)",
                   "clips_decoder_width": "[1, inf)", "clips_decoder_heads": "[1, inf)"}

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("clips (--method clips; the partial caption is "
                                      "--caption-view/--caption-tokens)")
        g.add_argument("--clips-w-con", type=float, default=1.0,
                       help="Weight of the two contrastive terms' mean (open_clip CoCa default).")
        g.add_argument("--clips-w-cap", type=float, default=2.0,
                       help="Weight of the caption loss (open_clip CoCa default).")
        g.add_argument("--clips-queries", type=int, default=None,
                       help="Learnable query tokens (the caption positions predicted), at most "
                            "the text context - 2. Default: the reference's 128, at most "
                            "context - 2 (75 at 77; 128 at --text-context 256).")
        g.add_argument("--clips-decoder-width", type=int, default=None,
                       help="Decoder width (default: the text tower's).")
        g.add_argument("--clips-decoder-layers", type=int, default=None,
                       help="Decoder layers (default: the text tower's).")
        g.add_argument("--clips-decoder-heads", type=int, default=None,
                       help="Decoder heads (default: the text tower's).")

    @classmethod
    def resolved_flags(cls, args):
        """CLIPS always reads a partial caption: ``--caption-view full`` (the default) is the
        reference's sub-caption view."""
        return {"caption_view": "subcaption"} if args.caption_view == "full" else {}

    @classmethod
    def data_spec(cls, args):
        return with_caption_view(ALIP_DATA, args, full="subcaption")

    @classmethod
    def check_shapes(cls, args, dims):
        super().check_shapes(args, dims)
        why = decoder_shape_error(args, dims)
        if why:
            raise MethodConfigError(why)

    def build(self, model):
        args, rank, world_size = self.args, self.rank, self.world_size
        require_token_towers(model, self.name, args.model)
        require_logit_bias(model, args)
        text = model.transformer
        why = decoder_shape_error(args, ModelDims(  # the built model (an hf-hub: one too)
            text.width, text.resblocks[0].attn.num_heads, text.layers, model.context_length))
        if why:
            raise MethodConfigError(why)
        decoder = CaptionDecoder(
            model.visual.transformer.width, text.width,
            vocab_size=model.token_embedding.num_embeddings,
            width=args.clips_decoder_width or text.width,
            layers=args.clips_decoder_layers or text.layers,
            heads=args.clips_decoder_heads or model.transformer.resblocks[0].attn.num_heads,
            num_queries=clips_queries(args, model.context_length))
        self.encoder = CLIPSEncoder(model, decoder)
        self.criterion = CLIPSCriterion(args.clips_w_con, args.clips_w_cap,
                                        pair_kwargs(args, rank, world_size))

    def eval_heads(self):
        return clips_eval_heads(self.encoder.decoder)


REFERENCE_QUERIES = 128  # MultimodalCfg.num_learnable_tokens (UCSC-VLAA/CLIPS open_clip/model.py:229)


def clips_queries(args, context_length):
    """``--clips-queries``, or unset the reference's 128 capped at ``context_length - 2`` (the
    targets between SOT and EOT a row holds): 75 at 77, 128 at 256. Before, the default was a
    fixed 75 and the flag's range stopped at 75 whatever the context, so with captions stored
    256 wide the decoder never predicted a token past row position 76 (docs/methods.md §7.5)."""
    return args.clips_queries or min(REFERENCE_QUERIES, context_length - 2)


def decoder_shape_error(args, dims):
    """Why the decoder ``--clips-decoder-*`` / ``--clips-queries`` ask for cannot be built on
    ``--model`` (``dims``: its ``ModelDims``; a None size is unknown, unchecked), or None.

    * the width must be a multiple of the heads (``nn.MultiheadAttention`` splits it evenly;
      it would assert when the model is built); unset, each is the text tower's;
    * each query predicts one caption token: a ``context_length`` row holds at most
      ``context_length - 2`` between SOT and EOT (75 at 77, 254 at --text-context 256).
    Layers and the MLP have no constraint."""
    width = args.clips_decoder_width or dims.text_width
    heads = args.clips_decoder_heads or dims.text_heads
    if width is not None and heads is not None and width % heads:
        of_model = f"--model {args.model}'s text tower's"
        w = (f"--clips-decoder-width {width}" if args.clips_decoder_width else
             f"the decoder width {width} ({of_model}; set --clips-decoder-width)")
        h = (f"--clips-decoder-heads {heads}" if args.clips_decoder_heads else
             f"the decoder's {heads} heads ({of_model}; set --clips-decoder-heads)")
        return f"{w} is not a multiple of {h}: attention splits the width evenly across heads"
    most = None if dims.context_length is None else dims.context_length - 2
    if most is not None and args.clips_queries is not None and args.clips_queries > most:
        return (f"--clips-queries {args.clips_queries}: --model {args.model}'s captions hold at "
                f"most {most} tokens (context length {dims.context_length}); give at most {most}")
    return None


def clips_eval_heads(decoder):
    """What captioning with a trained CLIPS model needs beside the open_clip weights."""
    return {"decoder": decoder.state_dict(), "decoder_config": dict(decoder.config)}


def decoder_from_eval_heads(heads):
    decoder = CaptionDecoder(**heads["decoder_config"])
    decoder.load_state_dict(heads["decoder"])
    return decoder.eval()
