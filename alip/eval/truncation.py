"""How much of the evaluated texts a model's context cuts off.

open_clip's tokenizer keeps the first ``context`` ids of ``[SOT, BPE ids..., EOT]`` and puts EOT
last: a text of ``n > context`` ids loses ``n - context`` of its BPE tokens. A model evaluated
on texts longer than its context (long-text retrieval with a 77-token tower) says so: one log
line, and the same numbers in the result JSON (``truncation``).
"""
import logging


def token_counts(tokenizer, texts):
    """Per text, the ids of its untruncated row ``[SOT, BPE ids..., EOT]``; None for a tokenizer
    whose untruncated length is not known here (an HF tokenizer, a reduction strategy)."""
    encode = getattr(tokenizer, "encode", None)
    if encode is None or getattr(tokenizer, "reduction_fn", None) is not None \
            or not hasattr(tokenizer, "sot_token_id"):
        return None
    return [len(encode(t)) + 2 for t in texts]


def truncation_report(tokenizer, texts, context):
    """{"context", "texts", "truncated_texts", "tokens_lost", "longest"} for ``texts``
    tokenized at ``context``, or None when the tokenizer's untruncated lengths are unknown."""
    counts = token_counts(tokenizer, texts)
    if counts is None:
        return None
    lost = [n - context for n in counts if n > context]
    return {"context": int(context), "texts": len(counts), "truncated_texts": len(lost),
            "tokens_lost": sum(lost), "longest": max(counts, default=0)}


def log_truncation(report, what="texts", log=logging.getLogger(__name__)):
    """The one line a truncating evaluation logs (nothing when no text is cut)."""
    if report and report["truncated_texts"]:
        log.warning("%d of %d %s are longer than the model's %d-token context and are truncated "
                    "(%d tokens lost; the longest has %d)", report["truncated_texts"],
                    report["texts"], what, report["context"], report["tokens_lost"],
                    report["longest"])


def tokenizer_context(tokenizer, model=None):
    """The context the tokenizer pads/truncates to (else the model's)."""
    n = getattr(tokenizer, "context_length", None) or getattr(model, "context_length", None)
    return int(n) if n is not None else None
