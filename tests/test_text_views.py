"""CLIPS token reduction on hand-built token rows."""
import numpy as np
import open_clip
import pytest
import torch

from alip.text_views import (EOT_ID, SOT_ID, STRATEGIES, TextView, reduce_tokens,
                             sentence_end_ids, view_seed)

DOT, BANG, QMARK = 269, 256, 286
# three sentences: [10 11 .] [20 21 22 ?] [30 31] (the last one has no terminator)
S0, S1, S2 = [10, 11, DOT], [20, 21, 22, QMARK], [30, 31]
CAPTION = S0 + S1 + S2


def row(caption, width=77):
    r = torch.zeros(width, dtype=torch.long)
    r[0], r[1:len(caption) + 1], r[len(caption) + 1] = SOT_ID, torch.tensor(caption), EOT_ID
    return r


def caption_of(r):
    """Caption ids between SOT and EOT, checking the row's layout on the way."""
    r = r.tolist()
    assert r[0] == SOT_ID
    end = r.index(EOT_ID)
    assert all(t == 0 for t in r[end + 1:]), "padding after EOT must be zeros"
    return r[1:end]


def views(strategy, k, seeds, caption=CAPTION):
    batch = row(caption)[None].repeat(len(seeds), 1)
    return [caption_of(r) for r in reduce_tokens(batch, strategy, k, seeds)]


def test_sentence_terminators_from_open_clip_tokenizer():
    ends = sentence_end_ids()
    tok = open_clip.get_tokenizer("ViT-B-32")
    assert {DOT, BANG, QMARK} <= ends
    assert {tok.encoder["...</w>"], tok.encoder["?!</w>"]} <= ends
    assert tok.encoder["."] not in ends  # '.' inside a word is not a sentence end
    assert tok.encoder["a</w>"] not in ends and tok.encoder[",</w>"] not in ends


def test_truncate_keeps_first_k():
    assert views("truncate", 4, [0]) == [[10, 11, DOT, 20]]


def test_random_mask_keeps_k_tokens_in_order_uniformly():
    got = views("random", 4, range(3000))
    counts = np.zeros(len(CAPTION))
    for v in got:
        assert len(v) == 4
        pos = [CAPTION.index(t) for t in v]  # caption ids are distinct
        assert pos == sorted(pos)
        counts[pos] += 1
    # each position kept with probability k/n = 4/9; 3000 draws: sd 27, allow 5 sd
    np.testing.assert_allclose(counts, 3000 * 4 / 9, atol=140)


def test_block_mask_is_one_contiguous_span_with_every_start():
    starts = set()
    for v in views("block", 4, range(200)):
        start = CAPTION.index(v[0])
        assert v == CAPTION[start:start + 4]
        starts.add(start)
    assert starts == set(range(len(CAPTION) - 4 + 1))


def test_subcaption_whole_sentences_in_caption_order():
    # k=6: S0+S2 (3+2) or S1+S2 (4+2); S0+S1 = 7 never fits
    assert {tuple(v) for v in views("subcaption", 6, range(200))} == {
        tuple(S0 + S2), tuple(S1 + S2)}
    # k=2: only S2 fits whole; a longer first sentence is cut to its first k tokens
    assert {tuple(v) for v in views("subcaption", 2, range(200))} == {
        (10, 11), (20, 21), (30, 31)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_short_rows_unchanged_and_sot_eot_kept(strategy):
    batch = torch.stack([row(CAPTION), row([5, 6]), row(list(range(100, 175)))])  # n = 9, 2, 75
    for k in (9, 50):  # K equal to / larger than the 9-token caption
        out = reduce_tokens(batch[:2], strategy, k, [1, 2])
        assert torch.equal(out, batch[:2])
    out = reduce_tokens(batch, strategy, 3, [1, 2, 3])
    assert torch.equal(out[1], batch[1])
    for r in out:
        assert len(caption_of(r)) <= 3  # caption_of checks SOT first, EOT, zero padding
    # a full row (75 caption tokens, EOT at position 76) is reduced too
    assert out[2].argmax().item() == len(caption_of(out[2])) + 1  # argmax pooling finds EOT


@pytest.mark.parametrize("strategy", ["random", "block", "subcaption"])
def test_same_seed_same_view_independent_of_batch(strategy):
    a = reduce_tokens(row(CAPTION)[None], strategy, 3, [42])[0]
    batch = torch.stack([row([7, 8, 9, 10, 11]), row(CAPTION)])
    b = reduce_tokens(batch, strategy, 3, [7, 42])[1]
    assert torch.equal(a, b)
    assert len({tuple(v) for v in views(strategy, 3, range(30))}) > 1  # seeds do matter


def test_text_view_seeded_by_seed_epoch_key():
    view = TextView("random", 3, seed=5)
    batch = row(CAPTION)[None].repeat(4, 1)
    keys = torch.tensor([0, 1, 2, 3])
    first = view(batch, keys)
    assert torch.equal(view(batch[2], 2), first[2])  # one row as a field transform
    assert torch.equal(TextView("random", 3, seed=5)(batch, keys), first)  # fresh object: resume
    assert view_seed(5, 0, 2) != view_seed(5, 1, 2) != view_seed(6, 0, 2)
    view.set_epoch(1)
    assert not torch.equal(view(batch, keys), first)


def test_real_caption_subcaption_decodes_to_whole_sentences():
    tok = open_clip.get_tokenizer("ViT-B-32")
    tokens = tok(["a red dog runs on grass. the cat sleeps! is it raining?"])
    sentences = {"a red dog runs on grass .", "the cat sleeps !", "is it raining ?"}
    seen = set()
    for seed in range(20):
        text = open_clip.decode(reduce_tokens(tokens, "subcaption", 7, [seed])[0])
        seen.add(text.split("<end_of_text>")[0].replace("<start_of_text>", "").strip())
    assert seen == sentences  # k=7: one whole sentence each time (two never fit)


def test_bad_rows_name_the_row():
    batch = torch.stack([row(CAPTION), row(CAPTION)])
    batch[1, 0] = 5
    with pytest.raises(ValueError, match="row 1 does not start with SOT"):
        reduce_tokens(batch, "truncate", 3, [0, 0])
    batch[1, 0], batch[1, 1 + len(CAPTION)] = SOT_ID, 0
    with pytest.raises(ValueError, match="row 1 has no EOT"):
        reduce_tokens(batch, "truncate", 3, [0, 0])
    with pytest.raises(ValueError, match="strategy must be one of"):
        reduce_tokens(batch, "middle", 3, [0, 0])
