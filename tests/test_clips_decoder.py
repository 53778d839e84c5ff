"""CLIPS decoder: attention mask, causality, target alignment, caption / CLIPS losses, generation."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from alip.methods.clips import (EOT_ID, SOT_ID, CaptionDecoder, _beam, _greedy, caption_loss,
                                caption_targets, clips_loss, decoder_mask)

INF = float("-inf")


def tiny_decoder(num_queries=3, vocab_size=49408, seed=0):
    torch.manual_seed(seed)
    return CaptionDecoder(image_width=16, text_width=24, vocab_size=vocab_size, width=32, layers=2,
                          heads=2, num_queries=num_queries).eval()


def test_mask_by_hand():
    # prefix of 2 (image + text tokens), 3 queries
    expected = torch.tensor([
        [0, 0, INF, INF, INF],
        [0, 0, INF, INF, INF],
        [0, 0, 0, INF, INF],
        [0, 0, 0, 0, INF],
        [0, 0, 0, 0, 0],
    ])
    assert torch.equal(decoder_mask(2, 3), expected)


def test_later_query_does_not_change_earlier_outputs():
    dec = tiny_decoder()
    image, text = torch.randn(2, 4, 16), torch.randn(2, 5, 24)
    before = dec(image, text)
    assert before.shape == (2, 3, 49408)
    text2 = text.clone()
    text2[:, -1] = torch.randn(2, 24)  # every query sees the whole prefix, the last text token too
    assert (dec(image, text2)[:, 0] - before[:, 0]).abs().max() > 1e-3
    with torch.no_grad():
        dec.queries[2] = torch.randn(32)
    after = dec(image, text)
    # two layers: if the prefix saw query 2, queries 0 and 1 would change through it in layer 2
    torch.testing.assert_close(after[:, :2], before[:, :2], rtol=0, atol=1e-6)
    assert (after[:, 2] - before[:, 2]).abs().max() > 1e-3
    with torch.no_grad():
        dec.queries[0] = torch.randn(32)
    assert (dec(image, text)[:, 1:] - after[:, 1:]).abs().max() > 1e-3  # later ones do see it
    assert dec(image).shape == (2, 3, 49408)  # image-only prefix


def test_caption_targets_line_up_with_queries():
    row = torch.zeros(1, 77, dtype=torch.long)
    row[0, :4] = torch.tensor([SOT_ID, 5, 6, EOT_ID])
    # query 0 predicts the first word, query 2 predicts EOT, later queries are padding
    assert caption_targets(row, 4).tolist() == [[5, 6, EOT_ID, 0]]
    assert caption_targets(row, 2).tolist() == [[5, 6]]
    long = caption_targets(row, 128)
    assert long.shape == (1, 128) and long[0, 3:].eq(0).all()
    row[0, 4] = 9  # junk after EOT is not a target
    assert caption_targets(row, 5, pad_id=-100).tolist() == [[5, 6, EOT_ID, -100, -100]]


def test_caption_loss_ignores_padding_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [5.0, -5.0, 9.0]]], dtype=torch.float64)
    targets = torch.tensor([[2, 1, 0]])  # last position is padding
    lse = lambda v: math.log(sum(math.exp(x) for x in v))  # noqa: E731
    expected = ((lse([2, 0, 1]) - 1.0) + (lse([0, 3, 0]) - 3.0)) / 2
    assert caption_loss(logits, targets).item() == pytest.approx(expected, abs=1e-6)
    logits[0, 2] = torch.tensor([-9.0, 9.0, 0.0])  # padding position: no effect
    assert caption_loss(logits, targets).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="do not line up"):
        caption_loss(logits, targets[:, :2])


@pytest.mark.parametrize("w_con, w_cap", [(1.0, 2.0), (0.5, 3.0)])
def test_clips_loss_weights_hand_terms(w_con, w_cap):
    torch.manual_seed(0)
    image, web, partial = (F.normalize(torch.randn(6, 8), dim=-1) for _ in range(3))
    scale = torch.tensor(10.0)
    clip = ClipLoss()
    a, b = clip(image, web, scale), clip(image, partial, scale)
    logits, targets = torch.randn(6, 4, 11), torch.randint(0, 11, (6, 4))
    c = caption_loss(logits, targets)
    out = clips_loss(a, b, c, w_con=w_con, w_cap=w_cap)
    assert out["loss"].item() == pytest.approx(w_con * (a.item() + b.item()) / 2 + w_cap * c.item(), rel=1e-6)
    assert out["loss_caption"].item() == pytest.approx(w_cap * c.item(), rel=1e-6)
    assert out["loss_contrastive"].item() == pytest.approx(w_con * (a.item() + b.item()) / 2, rel=1e-6)


def test_greedy_and_beam_by_hand():
    eot = 3
    logp = torch.tensor([[0.55, 1e-9, 1e-9, 0.45], [0.35, 0.25, 0.1, 0.3]]).log()
    assert _greedy(logp, eot) == [0, 0]
    # length-normalised (penalty 1): [0, 0] + EOT scores (ln .55 + ln .35) / 3 = -0.549, best
    assert _beam(logp, 2, eot, length_penalty=1.0) == [0, 0]
    # plain sum (penalty 0): stopping at once, ln .45 = -0.80, beats -1.65 for [0, 0]
    assert _beam(logp, 2, eot, length_penalty=0.0) == []


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_returns_rows_open_clip_decodes(num_beams):
    dec = tiny_decoder(num_queries=128)
    image, text = torch.randn(2, 4, 16), torch.randn(2, 5, 24)
    rows = dec.generate(image, text, num_beams=num_beams)
    assert rows.shape == (2, 77) and rows.dtype == torch.long
    for row in rows:
        assert row[0] == SOT_ID and (row == EOT_ID).sum() == 1 and (row[1:] != SOT_ID).all()
        end = int((row == EOT_ID).nonzero())
        assert (row[end + 1:] == 0).all()
        text_out = open_clip.decode(row)
        assert text_out.startswith("<start_of_text>") and "<end_of_text>" in text_out
    if num_beams == 1:  # greedy: per-position argmax (SOT excluded) up to the first EOT
        logits = dec(image, text)[:, :75]
        logits[..., SOT_ID] = INF
        best = logits.argmax(-1)[0].tolist()
        expected = best[:best.index(EOT_ID)] if EOT_ID in best else best
        assert rows[0, 1:1 + len(expected)].tolist() == expected


def test_beam_normalises_finished_captions_by_hand():
    eot = 3
    logp = torch.tensor([[0.9, 1e-9, 1e-9, 0.1], [0.2, 0.15, 0.15, 0.5]]).log()
    # [0] + EOT: (ln .9 + ln .5) / 2 = -0.399 beats [0, 0] (+ EOT): (ln .9 + ln .2) / 3 = -0.571;
    # unnormalised, -0.798 would lose
    assert _beam(logp, 2, eot, length_penalty=1.0) == [0]


def test_generate_never_emits_sot():
    dec = tiny_decoder(num_queries=8)
    with torch.no_grad():  # every position's logits = head(bias): SOT first, EOT second
        dec.ln_final.weight.zero_()
        dec.ln_final.bias.copy_(torch.randn(32))
        dec.head.weight[SOT_ID] = 10 * dec.ln_final.bias
        dec.head.weight[EOT_ID] = 5 * dec.ln_final.bias
    for beams in (1, 2):
        rows = dec.generate(torch.randn(1, 4, 16), num_beams=beams)
        assert rows[0, :3].tolist() == [SOT_ID, EOT_ID, 0]  # empty caption, not SOT SOT SOT ...


def test_query_tokens_start_as_standard_normal():
    """The reference's ``learnable_tokens = nn.Parameter(torch.randn(128, width))`` (UCSC-VLAA/
    CLIPS open_clip/model.py:297-299): std 1, not a small init. 128 x 512 draws of N(0, 1): the
    sample std is 1 +- 1/sqrt(2 * 65536) = 0.0028, so [0.95, 1.05] is ~18 standard errors wide
    on either side, and a std of 0.02 fails it by far; the mean is 0 +- 0.004."""
    torch.manual_seed(0)
    dec = CaptionDecoder(image_width=16, text_width=16, vocab_size=8, width=512, layers=1,
                         heads=2, num_queries=128)
    q = dec.queries.detach()
    assert 0.95 < q.std().item() < 1.05
    assert abs(q.mean().item()) < 0.05


def test_decoder_weights_start_as_the_reference_init():
    """TextDecoder.init_parameters (UCSC-VLAA/CLIPS open_clip/transformer.py:1161-1182): width
    w = 64, 4 layers: in_proj N(0, w^-0.5) = 0.125, out_proj and c_proj N(0, w^-0.5 / sqrt(8))
    = 0.0442, c_fc N(0, (2w)^-0.5) = 0.0884, vocabulary projection N(0, w^-0.5) = 0.125. Each
    tensor has >= 4096 draws, so its sample std is within 1/sqrt(2 * 4096) = 1.1% of sigma per
    standard error; a 10% band is ~9 standard errors. PyTorch's default inits are 0.707x
    (xavier in_proj), 1.63x (out_proj, c_proj), 0.816x (c_fc) and 0.577x (head) of these."""
    torch.manual_seed(0)
    w, layers = 64, 4
    dec = CaptionDecoder(image_width=w, text_width=w, vocab_size=256, width=w, layers=layers,
                         heads=2, num_queries=4)
    attn, proj, fc = w ** -0.5, w ** -0.5 * (2 * layers) ** -0.5, (2 * w) ** -0.5
    for block in dec.transformer.resblocks:
        for t, sigma in ((block.attn.in_proj_weight, attn), (block.attn.out_proj.weight, proj),
                         (block.mlp.c_fc.weight, fc), (block.mlp.c_proj.weight, proj)):
            assert t.numel() >= 4096
            assert abs(t.detach().std().item() / sigma - 1) < 0.10, (tuple(t.shape), sigma)
    assert abs(dec.head.weight.detach().std().item() / attn - 1) < 0.10
    assert dec.head.bias is None
