"""FILIP building blocks: dense tokens, token selection, late interaction, the distributed loss."""
import os
import socket

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import alip  # noqa: F401  (registers ALIP-tiny)
from alip.methods.filip import (FILIPHead, dense_tokens, filip_loss, late_interaction,
                                mask_input_tokens, select_tokens)

T, F_ = True, False
X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)  # 3 image tokens


def test_late_interaction_by_hand_max_not_first_and_padding():
    # one image (tokens e1, e2) and one text with a padding token [0, 1] at the end
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    txt = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    mask = torch.tensor([[T, T, F_]])
    # image->text, masked: e1 -> max(0.6, 1.0) = 1.0 (second token), e2 -> max(0.8, 0) = 0.8
    assert late_interaction(img, txt, None, mask).item() == pytest.approx(0.9, abs=1e-12)
    # reference (padding kept): e2 -> the padding token wins, 1.0
    assert late_interaction(img, txt).item() == pytest.approx(1.0, abs=1e-12)
    # text->image, masked: mean over the 2 real text tokens of max over e1, e2: (0.8 + 1.0) / 2
    assert late_interaction(txt, img, mask, None).item() == pytest.approx(0.9, abs=1e-12)
    # reference: mean over all 3 positions, the padding's 1.0 included
    assert late_interaction(txt, img).item() == pytest.approx(2.8 / 3, abs=1e-12)
    # a key row with nothing unmasked scores -inf (not checked: that would read the mask back)
    two = torch.cat([txt, txt])
    scores = late_interaction(img, two, None, torch.cat([mask, torch.zeros_like(mask)]))
    assert scores[0, 0].item() == pytest.approx(0.9, abs=1e-12) and scores[0, 1].item() == float("-inf")


def test_late_interaction_matrix_against_loops():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, 3, generator=g, dtype=torch.float64), torch.randn(6, 7, 3, generator=g, dtype=torch.float64)
    qm, km = torch.rand(5, 4, generator=g) > 0.3, torch.rand(6, 7, generator=g) > 0.3
    qm[:, 0], km[:, 0] = True, True
    expected = torch.empty(5, 6, dtype=torch.float64)
    for i in range(5):
        for j in range(6):
            sim = q[i][qm[i]] @ k[j][km[j]].T
            expected[i, j] = sim.max(dim=1).values.mean()
    torch.testing.assert_close(late_interaction(q, k, qm, km), expected, rtol=0, atol=1e-12)


def test_token_selection_by_hand():
    # text tokens y1..y4, y4 padding; column sums of X Y^T: 0, 0.8, -1, 1 (padding highest)
    y = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0], [0.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[T, T, T, F_]])
    img, txt, sel_mask = select_tokens(X[None], y[None], mask, k_image=2, k_text=2)
    assert {tuple(t.tolist()) for t in txt[0]} == {(0.6, 0.8), (1.0, 0.0)}  # padding never chosen
    assert sel_mask.tolist() == [[T, T]]
    _, txt, sel_mask = select_tokens(X[None], y[None], None, k_image=2, k_text=2)
    assert {tuple(t.tolist()) for t in txt[0]} == {(0.0, 1.0), (0.6, 0.8)}  # reference: padding wins
    # image rows: padding y4 = [-3, 0] lifts x3's row sum only when it is counted
    y = torch.tensor([[1.0, 0.2], [0.6, 0.8], [0.0, -1.0], [-3.0, 0.0]], dtype=torch.float64)
    img, _, _ = select_tokens(X[None], y[None], mask, k_image=2, k_text=2)  # rows 1.6, 0, -1.6
    assert {tuple(t.tolist()) for t in img[0]} == {(1.0, 0.0), (0.0, 1.0)}
    img, _, _ = select_tokens(X[None], y[None], None, k_image=2, k_text=2)  # rows -1.4, 0, 1.4
    assert {tuple(t.tolist()) for t in img[0]} == {(-1.0, 0.0), (0.0, 1.0)}
    # fewer real text tokens than k: the extra pick is padding and is marked False
    _, _, sel_mask = select_tokens(X[None], y[None], torch.tensor([[T, F_, F_, F_]]), 2, 2)
    assert sel_mask.tolist() == [[T, F_]]


def random_tokens(b=6, p=5, length=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, p, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(b, length, d, generator=g, dtype=torch.float64), dim=-1)
    lengths = torch.randint(2, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    return img, txt, mask


def test_filip_loss_single_process_by_hand():
    img, txt, mask = random_tokens()
    scale = torch.tensor(20.0, dtype=torch.float64)
    out = filip_loss(img, txt, mask, scale, k_image=3, k_text=4)
    img_sel, txt_sel, txt_sel_mask = select_tokens(img, txt, mask, 3, 4)
    b = len(img)
    i2t, t2i = torch.empty(b, b, dtype=torch.float64), torch.empty(b, b, dtype=torch.float64)
    for i in range(b):
        for j in range(b):
            i2t[i, j] = (img[i] @ txt_sel[j][txt_sel_mask[j]].T).max(1).values.mean()
            t2i[i, j] = (txt[i][mask[i]] @ img_sel[j].T).max(1).values.mean()
    labels = torch.arange(b)
    expected = (F.cross_entropy(scale * i2t, labels) + F.cross_entropy(scale * t2i, labels)) / 2
    torch.testing.assert_close(out["loss"], expected, rtol=0, atol=1e-12)
    ref = filip_loss(img, txt, mask, scale, k_image=3, k_text=4, mask_padding=False)
    assert abs(ref["loss"].item() - out["loss"].item()) > 1e-3  # padding changes the loss


def test_chunked_equals_unchunked_values_and_gradients():
    img, txt, mask = random_tokens(b=9, seed=1)
    q, k = img.clone().requires_grad_(), txt.clone().requires_grad_()
    full = late_interaction(q, k, None, mask)
    parts = late_interaction(q, k, None, mask, chunk_size=2, key_chunk_size=4)
    torch.testing.assert_close(parts, full, rtol=0, atol=1e-12)
    scale = torch.tensor(10.0, dtype=torch.float64)
    grads = []
    for chunk in (None, 1, 4):
        a, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        loss = filip_loss(a, t, mask, scale, k_image=3, k_text=3, chunk_size=chunk)["loss"]
        loss.backward()
        grads.append((loss.detach(), a.grad, t.grad))
    for other in grads[1:]:
        for x, y in zip(other, grads[0]):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def test_dense_tokens_match_open_clip_towers():
    torch.manual_seed(0)
    model = open_clip.create_model("ALIP-tiny").eval()
    images = torch.randn(3, 3, 32, 32)
    text = open_clip.get_tokenizer("ALIP-tiny")(["a dog", "two red cats on a mat", "x"])
    out = dense_tokens(model, images, text)
    v = model.visual  # the same blocks by hand: patch tokens before ln_post
    x = v.transformer(v._embeds(images))
    torch.testing.assert_close(out.image_tokens, x[:, 1:])
    assert out.image_tokens.shape == (3, 16, 64)
    h = model.ln_final(model.transformer(model.token_embedding(text) + model.positional_embedding,
                                         attn_mask=model.attn_mask))
    torch.testing.assert_close(out.text_tokens, h)
    torch.testing.assert_close(out.image_features, model.encode_image(images, normalize=True))
    torch.testing.assert_close(out.text_features, model.encode_text(text, normalize=True))
    assert out.text_mask.sum(1).tolist() == [4, 8, 3]  # SOT + words + EOT
    after = dense_tokens(model, images, text, image_ln_post=True).image_tokens
    torch.testing.assert_close(after, v.ln_post(x[:, 1:]))
    head = FILIPHead(64, 64)
    di, dt = head(out.image_tokens, out.text_tokens)
    assert di.shape == (3, 16, 256) and dt.shape == (3, 77, 256)
    torch.testing.assert_close(di.norm(dim=-1), torch.ones(3, 16))
    assert head.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    head.clamp_logit_scale_()
    assert head.logit_scale.item() == 3.0


def test_mask_input_tokens_spares_specials_and_padding():
    text = open_clip.get_tokenizer("ViT-B-32")(["a photo of a small red dog"] * 400)
    g = torch.Generator().manual_seed(0)
    out = mask_input_tokens(text, mask_id=49408, vocab_size=49409, generator=g)
    length = text.argmax(1) + 1
    real = torch.arange(77)[None] < length[:, None]
    changed = out != text
    assert not changed[~real].any() and (out[:, 0] == 49406).all() and (out == 49407).sum() == 400
    inner = real.clone()
    inner[:, 0] = False
    inner[torch.arange(400), length - 1] = False
    n = inner.sum().item()
    masked = (out == 49408).sum().item()  # expected 0.15 * 0.8 * n = 0.12 n, sd ~ sqrt(0.12 n)
    assert abs(masked - 0.12 * n) < 5 * (0.12 * n) ** 0.5
    assert not (mask_input_tokens(text, 49408, 49409, prob=0.0) != text).any()


# ---------------------------------------------------------------- two processes over gloo

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, batch, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        img, txt, mask, scale = batch
        b = img.shape[0] // world
        rows = slice(rank * b, (rank + 1) * b)
        a, t = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
        out = filip_loss(a, t, mask[rows], scale, k_image=3, k_text=4, rank=rank, world_size=world,
                         chunk_size=2)
        out["loss"].backward()
        torch.save({"loss": out["loss"].detach(), "grads": (a.grad, t.grad)},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_with_global_batch(tmp_path):
    world, b = 2, 4
    img, txt, mask = random_tokens(b=world * b, seed=3)
    scale = torch.tensor(15.0, dtype=torch.float64)
    mp.spawn(_worker, args=(world, _free_port(), (img, txt, mask, scale), str(tmp_path)), nprocs=world)
    a, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ref = filip_loss(a, t, mask, scale, k_image=3, k_text=4)["loss"]
    ref.backward()
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / world, ref.detach(), rtol=0, atol=1e-12)
    for r, res in enumerate(ranks):
        rows = slice(r * b, (r + 1) * b)
        # the gather's backward sums every rank's loss into the local tokens: W x the rows of the
        # single-process gradient (DDP's average then gives the single-process parameter gradient)
        torch.testing.assert_close(res["grads"][0], world * a.grad[rows], rtol=0, atol=1e-12)
        torch.testing.assert_close(res["grads"][1], world * t.grad[rows], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- dense evaluation

def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_dense_zeroshot_by_hand():
    from alip.eval.dense import class_token_matrices, dense_zeroshot_logits
    # class A: prompts [[1,0],[0,1]] and [[1,0],(pad [0,-1])]; class B: twice [[0,1],(pad [1,0])]
    prompts = _t([[[[1, 0], [0, 1]], [[1, 0], [0, -1]]],
                  [[[0, 1], [1, 0]], [[0, 1], [1, 0]]]])
    mask = torch.tensor([[[T, T], [T, F_]], [[T, F_], [T, F_]]])
    images = _t([[[1, 0], [0, 1]], [[0, 1], [0, 1]]])
    # paper: A = [[1,0],[0,.5]] / sqrt(1.25), B = [[0,1]] (second position masked), |B| = 1
    cls, cls_mask = class_token_matrices(prompts, mask)
    torch.testing.assert_close(cls[0], _t([[1, 0], [0, 0.5]]) / 1.25 ** 0.5)
    assert cls_mask.tolist() == [[T, T], [T, F_]]
    a = 1 / 1.25 ** 0.5
    expected = _t([[(a + 0.5 * a) / 2, (0 + 1) / 2],  # image 1: patches e1, e2
                   [0.5 * a, 1.0]])  # image 2: e2 twice
    logits = dense_zeroshot_logits(images, cls, cls_mask)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)
    assert logits.argmax(1).tolist() == [0, 1]
    # reference (padding averaged in): A = [[1,0],[0,0]], B = [[0,1],[1,0]] / sqrt 2 -> image 1 is B
    cls, cls_mask = class_token_matrices(prompts, mask, mask_padding=False)
    logits = dense_zeroshot_logits(images, cls, cls_mask)
    torch.testing.assert_close(logits[0], _t([0.5, 2 ** -0.5]), rtol=0, atol=1e-12)
    assert logits.argmax(1).tolist() == [1, 1]


def test_dense_retrieval_recall_by_hand():
    from alip.eval.dense import dense_retrieval_metrics
    images = _t([[[1, 0]], [[0, 1]]])
    texts = _t([[[1, 0], [0, 1]], [[0.6, 0.8], [0, 1]], [[0.28, 0.96], [0, 1]]])  # t0, t2: padded
    mask = torch.tensor([[T, F_], [T, T], [T, F_]])
    text_to_image = torch.tensor([0, 0, 1])
    m = dense_retrieval_metrics(images, texts, mask, text_to_image, recall_k=(1, 2))
    # i2t: I0 -> t0 (1.0) hit; I1 -> t1 (1.0) over t2 (0.96) miss, t2 second
    assert (m["i2t_R@1"], m["i2t_R@2"]) == (50.0, 100.0)
    # t2i: t0 -> I0 hit; t1 -> I1 (0.9 vs 0.3) miss; t2 -> I1 hit
    assert m["t2i_R@1"] == pytest.approx(200 / 3) and m["t2i_R@2"] == 100.0
    # padding counted (reference): t0's pad [0, 1] is I1's best match for t0
    from alip.eval.dense import dense_scores
    assert dense_scores(images, texts, None, mask)[1, 0].item() == 0.0
    assert dense_scores(images, texts, None, torch.ones_like(mask))[1, 0].item() == 1.0


def test_dense_scores_trim_and_blocks_do_not_change_scores():
    from alip.eval.dense import dense_scores
    img, txt, mask = random_tokens(b=7, length=9, seed=4)
    mask[:, 6:] = False  # every text shorter than 7 positions: the tail is trimmed
    full = late_interaction(txt, img, mask, None)
    torch.testing.assert_close(dense_scores(txt, img, mask, None, chunk_size=2, key_chunk_size=3),
                               full, rtol=0, atol=1e-12)


def test_dense_zeroshot_classifier_from_model():
    from alip.eval.dense import dense_zeroshot_classifier
    torch.manual_seed(0)
    model = open_clip.create_model("ALIP-tiny").eval()
    head = FILIPHead(64, 64, dense_dim=32)
    cls, mask = dense_zeroshot_classifier(model, head, open_clip.get_tokenizer("ALIP-tiny"),
                                          ["dog", "red car"], ["a {}.", "a photo of the {}."])
    assert cls.shape == (2, 77, 32)
    torch.testing.assert_close(cls.flatten(1).norm(dim=1), torch.ones(2))
    assert mask.sum(1).tolist() == [8, 9]  # longest prompt: SOT a photo of the X . EOT
