"""How many of caption.py's captions a data2rec field of a given context would cut: the captions
are tokenized as data2rec tokenizes them (``pack.tokenize_at``: open_clip's tokenizer at the
field's context), and those whose text does not fit are counted. caption.py records the count
in captions.json (``caption_context``) and prints it, so a run of long, detailed captions says
before packing whether ``--text-fields caption:N`` holds them."""
import json

import numpy as np

BATCH = 1024  # captions tokenized at once


def captions_cut(captions_path, tokenizer_name, context=0):
    """{"tokenizer", "caption_context", "captions_cut", "caption_tokens_max"} of a captions.jsonl:
    ``context`` 0 is the tokenizer's own context; ``caption_tokens_max``: the longest caption's
    tokens up to its EOT, at most context + 1 (a longer one is cut anyway)."""
    import open_clip

    import alip  # noqa: F401  (registers the ALIP-* model configs)
    from ..data.pack import tokenize_at
    tok = open_clip.get_tokenizer(tokenizer_name)
    width = int(context) or int(tok.context_length)
    with open(captions_path, encoding="utf-8") as f:
        texts = [json.loads(line)["caption"] for line in f if line.strip()]
    cut, longest = 0, 0
    for i in range(0, len(texts), BATCH):
        rows, was_cut = tokenize_at(tok, texts[i:i + BATCH], width)
        cut += int(was_cut.sum())
        lengths = np.where(was_cut, width + 1, rows.argmax(axis=1) + 1)
        longest = max(longest, int(lengths.max()))
    return {"tokenizer": tokenizer_name, "caption_context": width, "captions_cut": cut,
            "caption_tokens_max": longest}
