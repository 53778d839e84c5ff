"""CLIPS token reduction: shorter views of a tokenized caption (truncation, random mask, block
mask, sub-caption), as a transform on token rows.

Rows are open_clip token rows: ``[SOT, BPE ids..., EOT, 0, 0, ...]`` (int64, width 77). ``k`` is the
number of caption tokens kept *between* SOT and EOT (open_clip's ``random_mask_tokenize`` /
``simple_mask_tokenize`` with ``context_length = k + 2`` keep the same count). Every view starts
with SOT, keeps its tokens in their original order, ends with EOT and is zero-padded to the row
width, so argmax / eos pooling still finds the end of the text. Rows with at most ``k`` caption
tokens are returned unchanged.

* ``truncate``: the first ``k`` tokens;
* ``random``: ``k`` tokens drawn uniformly without replacement, kept in order;
* ``block``: one contiguous span of ``k`` tokens, start uniform over the valid starts;
* ``subcaption``: whole sentences (a sentence ends at a ``.``/``!``/``?``-only token such as
  ``.</w>``, ``...</w>`` or ``?!</w>``; a tail without one is a sentence too) in a random order,
  each added if it still fits in ``k``; the chosen ones are emitted in caption order. If the first
  sentence drawn alone is longer than ``k`` it is cut to its first ``k`` tokens.

Randomness is per row and a pure function of the row's seed, so a view does not depend on batch
composition, worker count or order: ``view_seed(seed, epoch, key)`` makes that seed from the run
seed, the epoch and the record key, and a resumed run draws the same views.
"""
from functools import lru_cache

import numpy as np
import torch

SOT_ID, EOT_ID, PAD_ID = 49406, 49407, 0
STRATEGIES = ("truncate", "random", "block", "subcaption")


@lru_cache(maxsize=None)
def sentence_end_ids():
    """Ids of open_clip BPE tokens that end a word and consist only of '.', '!' and '?'
    ('.</w>' = 269, '!</w>' = 256, '?</w>' = 286, '...</w>', '?!</w>', ...)."""
    from open_clip.tokenizer import SimpleTokenizer
    encoder = SimpleTokenizer().encoder
    return frozenset(i for tok, i in encoder.items()
                     if tok.endswith("</w>") and len(tok) > 4 and set(tok[:-4]) <= set(".!?"))


def view_seed(seed, epoch, key):
    """A 63-bit seed that is a function of (run seed, epoch, record key) only."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(key)]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def _sentences(caption, ends):
    """Split caption token ids into sentences [(start, stop)], each ending after a terminator."""
    spans, start = [], 0
    for i, t in enumerate(caption):
        if t in ends:
            spans.append((start, i + 1))
            start = i + 1
    if start < len(caption):
        spans.append((start, len(caption)))
    return spans


def _keep_indices(n, k, strategy, rng, caption, ends):
    """Indices (sorted) of the caption tokens a view keeps; n > k."""
    if strategy == "truncate":
        return np.arange(k)
    if strategy == "random":
        return np.sort(rng.choice(n, size=k, replace=False))
    if strategy == "block":
        start = int(rng.integers(0, n - k + 1))
        return np.arange(start, start + k)
    spans = _sentences(caption, ends)
    chosen, used = [], 0
    for s in rng.permutation(len(spans)):
        a, b = spans[s]
        if not chosen and b - a > k:  # a first sentence longer than k: its first k tokens
            return np.arange(a, a + k)
        if used + (b - a) <= k:
            chosen.append((a, b))
            used += b - a
    return np.concatenate([np.arange(a, b) for a, b in sorted(chosen)])


def _caption_length(row, r, sot_id, eot_id):
    """Number of caption tokens between SOT and the first EOT; errors name the row."""
    if row[0] != sot_id:
        raise ValueError(f"reduce_tokens: row {r} does not start with SOT ({sot_id}): {row[:4].tolist()}")
    eot = np.flatnonzero(row == eot_id)
    if len(eot) == 0:
        raise ValueError(f"reduce_tokens: row {r} has no EOT ({eot_id})")
    return int(eot[0]) - 1


def reduce_tokens(tokens, strategy, k, seeds, sot_id=SOT_ID, eot_id=EOT_ID, pad_id=PAD_ID,
                  sentence_ends=None):
    """[B, T] int64 token rows -> the same shape with each row reduced to at most k caption tokens.

    ``seeds``: one int per row (e.g. ``view_seed(seed, epoch, key)``); ``truncate`` ignores them.
    ``sentence_ends``: token ids that end a sentence (default ``sentence_end_ids()``).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"reduce_tokens: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if int(k) < 1:
        raise ValueError(f"reduce_tokens: k must be >= 1, got {k}")
    if tokens.dim() != 2:
        raise ValueError(f"reduce_tokens: tokens must be [B, T], got shape {tuple(tokens.shape)}")
    seeds = [int(s) for s in seeds]
    if len(seeds) != tokens.shape[0]:
        raise ValueError(f"reduce_tokens: {len(seeds)} seeds for {tokens.shape[0]} rows")
    ends = sentence_end_ids() if sentence_ends is None else frozenset(int(i) for i in sentence_ends)
    rows = tokens.cpu().numpy()
    out = np.full_like(rows, pad_id)
    for r, (row, seed) in enumerate(zip(rows, seeds)):
        n = _caption_length(row, r, sot_id, eot_id)
        if n <= k:
            out[r] = row
            continue
        caption = row[1:n + 1]
        keep = caption[_keep_indices(n, k, strategy, np.random.default_rng(seed), caption.tolist(), ends)]
        out[r, 0], out[r, 1:len(keep) + 1], out[r, len(keep) + 1] = sot_id, keep, eot_id
    return torch.from_numpy(out).to(tokens.device)


class TextView:
    """A seeded token-reduction transform for one text field.

    ``view(tokens, keys)`` with ``tokens`` a [T] row or [B, T] rows and ``keys`` the record key(s);
    call ``set_epoch(e)`` at every epoch (as a sampler): the view of a record is a function of
    (seed, epoch, key, strategy, k) only.
    """

    def __init__(self, strategy, k, seed=0, sot_id=SOT_ID, eot_id=EOT_ID):
        if strategy not in STRATEGIES:
            raise ValueError(f"TextView: strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy, self.k, self.seed, self.epoch = strategy, int(k), int(seed), 0
        self.sot_id, self.eot_id = sot_id, eot_id

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __call__(self, tokens, keys):
        single = tokens.dim() == 1
        rows = tokens[None] if single else tokens
        keys = [keys] if single else (keys.tolist() if torch.is_tensor(keys) else list(keys))
        seeds = [view_seed(self.seed, self.epoch, key) for key in keys]
        out = reduce_tokens(rows, self.strategy, self.k, seeds, self.sot_id, self.eot_id)
        return out[0] if single else out

    def __repr__(self):
        return f"TextView(strategy={self.strategy!r}, k={self.k}, seed={self.seed}, epoch={self.epoch})"


def reduce_row(tokens, rng, strategy, k, width=None):
    """``reduce_tokens`` on one row with the sample's own generator: the registered
    ``alip.data.text_views`` transform "reduce" (options strategy, k), seeded per sample. The
    draw is from the row's whole caption, however wide the row (a 256-wide field holds a
    200-token caption whole, so its last sentence can be drawn); ``width``: the output row's
    width (the view's ``TextView.width``; None: the input's), at least ``k + 2``."""
    if width is not None and int(width) < int(k) + 2:
        raise ValueError(f"reduce_row: width {width} cannot hold k={k} caption tokens with SOT and EOT")
    out = reduce_tokens(tokens[None], strategy, k, [rng.getrandbits(63)])[0]
    if width is None or int(width) == out.shape[0]:
        return out
    if int(width) < out.shape[0]:  # the view holds at most k + 2 tokens: only padding is cut
        return out[:int(width)].clone()
    return torch.nn.functional.pad(out, (0, int(width) - out.shape[0]), value=PAD_ID)
