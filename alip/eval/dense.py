"""Dense (FILIP) zero-shot classification and retrieval scores from token matrices.

FILIP's evaluation (DeCLIP filip_solver.py:839-925, docs/methods.md §5.4):

* a class embedding is a token matrix: each prompt's dense text tokens (normalised per token),
  averaged position by position over the prompts, then divided by the matrix's Frobenius norm;
* image tokens are normalised per token; score(image, class) = mean over the image's patches of
  the max over the class's tokens; no logit scale.

``mask_padding=True`` (default, as FILIP training here) zeroes padding positions before the
average and lets a class token take part only where at least one prompt has a real token;
``mask_padding=False`` is the reference: all 77 positions of every prompt, padding included.
Retrieval uses the same late interaction both ways: image->text scores are the mean over image
patches of the max over a text's real tokens, text->image the mean over a text's real tokens of
the max over an image's patches. Every score matrix is computed in blocks
(``alip.methods.filip.late_interaction``), so MSCOCO's 5k x 25k fits in a few hundred MiB of
working memory beside the token tensors themselves.
"""
import torch
import torch.nn.functional as F

from alip.methods.filip import dense_image_tokens, dense_text_tokens, late_interaction

from .recall import RECALL_K, recall_at_k


def trim_padding(tokens, mask):
    """Drop the trailing positions no row uses (a 77-token set whose longest text has 20 tokens
    costs 20/77 of the work). -> (tokens [N, L', D], mask [N, L'])."""
    used = mask.any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    return tokens[:, :length], mask[:, :length]


def class_token_matrices(prompt_tokens, prompt_mask=None, mask_padding=True):
    """prompt_tokens [C, T, L, D] (per-token normalised dense tokens of T prompts per class),
    prompt_mask [C, T, L] -> (class tokens [C, L, D] with unit Frobenius norm, class mask [C, L])."""
    if prompt_mask is None or not mask_padding:
        prompt_mask = torch.ones(prompt_tokens.shape[:3], dtype=torch.bool, device=prompt_tokens.device)
    summed = (prompt_tokens * prompt_mask[..., None]).mean(dim=1)
    norms = summed.flatten(1).norm(dim=1).clamp_min(1e-12)
    return summed / norms[:, None, None], prompt_mask.any(dim=1)


def dense_scores(query_tokens, key_tokens, query_mask=None, key_mask=None, chunk_size=None,
                 key_chunk_size=None):
    """[Nq, Nk] late-interaction scores (mean over query tokens of max over key tokens), blocked."""
    if key_mask is not None:
        key_tokens, key_mask = trim_padding(key_tokens, key_mask)
    if query_mask is not None:
        query_tokens, query_mask = trim_padding(query_tokens, query_mask)
    return late_interaction(query_tokens, key_tokens, query_mask, key_mask, chunk_size, key_chunk_size)


def dense_zeroshot_logits(image_tokens, class_tokens, class_mask=None, **chunks):
    """[N, C] FILIP zero-shot scores: mean over (normalised) image patches of max over class tokens."""
    return dense_scores(F.normalize(image_tokens, dim=-1), class_tokens, None, class_mask, **chunks)


@torch.no_grad()
def dense_zeroshot_classifier(model, head, tokenizer, classnames, templates, device="cpu",
                              mask_padding=True):
    """-> (class tokens [C, L, D], class mask [C, L]) from an open_clip model, its ``FILIPHead``
    and the prompts ``template.format(classname)``, one text-tower pass per class."""
    matrices, masks = [], []
    for name in classnames:
        text = tokenizer([t.format(name) for t in templates]).to(device)
        tokens, mask, _ = dense_text_tokens(model, text)
        tokens = F.normalize(head.text_proj(tokens), dim=-1)
        m, cm = class_token_matrices(tokens[None], mask[None], mask_padding)
        matrices.append(m[0])
        masks.append(cm[0])
    return torch.stack(matrices), torch.stack(masks)


def recall_from_scores(i2t, t2i, text_to_image, recall_k=RECALL_K):
    """R@K in percent from image->text [Ni, Nt] and text->image [Nt, Ni] score matrices, with the
    definitions and tie order of ``alip.eval.retrieval.retrieval_metrics`` (one ``topk`` per K)."""
    return recall_at_k(i2t, t2i, text_to_image, recall_k)


def dense_retrieval_metrics(image_tokens, text_tokens, text_mask, text_to_image, recall_k=RECALL_K,
                            **chunks):
    """R@K both ways from dense tokens: images [Ni, P, D], texts [Nt, L, D] + mask [Nt, L] (padding
    masked; pass an all-True mask for the reference's behaviour); ``text_to_image[t]`` is text t's
    image."""
    image_tokens, text_tokens = F.normalize(image_tokens, dim=-1), F.normalize(text_tokens, dim=-1)
    i2t = dense_scores(image_tokens, text_tokens, None, text_mask, **chunks)
    t2i = dense_scores(text_tokens, image_tokens, text_mask, None, **chunks)
    return recall_from_scores(i2t, t2i, text_to_image, recall_k)


class DenseView(torch.nn.Module):
    """An open_clip model + its ``FILIPHead`` seen through the global-feature interface the
    evaluators batch, gather and cast: ``encode_image`` returns each image's per-token normalised
    dense tokens flattened ([B, P*D]), ``encode_text`` each text's with padding rows zeroed
    ([B, L*D]); ``unflatten`` turns them back into [N, tokens, D] plus the mask of real tokens."""

    def __init__(self, model, head):
        super().__init__()
        self.model, self.head = model, head

    def encode_image(self, images, normalize=True):
        tokens = dense_image_tokens(self.model, images)[0]
        return F.normalize(self.head.image_proj(tokens), dim=-1).flatten(1)

    def encode_text(self, text, normalize=True):
        tokens, mask, _ = dense_text_tokens(self.model, text)
        tokens = F.normalize(self.head.text_proj(tokens), dim=-1) * mask[..., None]
        return tokens.flatten(1)

    def unflatten(self, flat):
        """[N, T*D] (the evaluators L2-normalise the flat vector) -> per-token normalised
        [N, T, D] and the mask of real (non-zero) tokens."""
        tokens = flat.reshape(flat.shape[0], -1, self.head.image_proj.out_features)
        return F.normalize(tokens, dim=-1), tokens.abs().sum(-1) > 0


def dense_head_from_state(state):
    """A ``FILIPHead`` from the ``eval_heads["dense"]`` state_dict a FILIP/DeFILIP checkpoint
    carries (its widths read from the weights)."""
    from alip.methods.filip import FILIPHead
    head = FILIPHead(state["image_proj.weight"].shape[1], state["text_proj.weight"].shape[1],
                     state["image_proj.weight"].shape[0])
    head.load_state_dict(state)
    return head.eval()


def load_dense_head(checkpoint):
    """The dense head saved in a train.py model file, or None (a global-scoring checkpoint)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    heads = saved.get("eval_heads") if isinstance(saved, dict) else None
    return dense_head_from_state(heads["dense"]) if heads and "dense" in heads else None
