"""DeCLIP building blocks: each term against a hand computation, the memory bank's queue, MLM
masking statistics, and two gloo processes against one process for every term that gathers
(simclr_loss of SLIP included: one spawn for all)."""
import math
import os
import socket

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import alip  # noqa: F401  (registers the model configs)
from alip.methods.declip import (EOT_ID, MASK_ID, SOT_ID, VOCAB_SIZE, MLMHead, NNMemoryBank,
                                 SimSiamPredictor, SimSiamProjector, clip_info_nce,
                                 declip_total, mlm_loss, mlm_mask, nn_loss, simsiam_loss,
                                 text_tokens_and_features)
from alip.methods.slip import simclr_loss


def _unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def _ce(logits_row, target):
    return -(logits_row[target] - math.log(sum(math.exp(v) for v in logits_row)))


# ------------------------------------------------------------------------------- contrastive

def test_clip_info_nce_equals_hand_computation():
    img, txt, s = _unit(4, 6, seed=0), _unit(4, 6, seed=1), 7.5
    per_img = [_ce([s * float(img[i] @ txt[j]) for j in range(4)], i) for i in range(4)]
    per_txt = [_ce([s * float(txt[i] @ img[j]) for j in range(4)], i) for i in range(4)]
    expected = (sum(per_img) / 4 + sum(per_txt) / 4) / 2
    assert abs(clip_info_nce(img, txt, torch.tensor(s, dtype=torch.float64)).item()
               - expected) < 1e-12


def test_nn_loss_equals_hand_computation_and_detaches_the_neighbours():
    img1, img2 = _unit(3, 5, seed=2), _unit(3, 5, seed=3)
    nn_t, nn_a = _unit(3, 5, seed=4), _unit(3, 5, seed=5)
    s = 4.0
    img1.requires_grad_(True)
    nn_t.requires_grad_(True)

    def cie(img):
        a = sum(_ce([s * float(img[i] @ nn_t[j].detach()) for j in range(3)], i) for i in range(3)) / 3
        b = sum(_ce([s * float(img[i] @ nn_a[j]) for j in range(3)], i) for i in range(3)) / 3
        return (a + b) / 2

    expected = (cie(img1.detach()) + cie(img2)) / 2
    loss = nn_loss(img1, img2, nn_t, nn_a, torch.tensor(s, dtype=torch.float64))
    assert abs(loss.item() - expected) < 1e-12
    loss.backward()
    assert img1.grad.abs().sum() > 0
    assert nn_t.grad is None  # only image->NN-text, the neighbours are constants


@pytest.mark.parametrize("call, match", [
    (lambda a, b: clip_info_nce(a, b[:3], torch.tensor(1.0)), r"clip_info_nce: .*'txt': \(3, 6\)"),
    (lambda a, b: nn_loss(a, a, b, b[:, :5], torch.tensor(1.0)), r"nn_loss: .*'nn_t_aug': \(4, 5\)"),
    (lambda a, b: simsiam_loss(a, b, a, b[0]), r"simsiam_loss: .*'z2': \(6,\)"),
])
def test_terms_name_mismatched_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call(_unit(4, 6, seed=0), _unit(4, 6, seed=1))


# ----------------------------------------------------------------------------------- SimSiam

def test_simsiam_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (3 * torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(4))

    def d(p, z):
        return sum(float(p[b] @ z[b]) / (float(p[b].norm()) * float(z[b].norm()))
                   for b in range(4)) / 4

    expected = -0.5 * (d(p1, z2) + d(p2, z1))
    assert abs(simsiam_loss(p1, p2, z1, z2).item() - expected) < 1e-12


def test_simsiam_stop_gradient_blocks_the_projection_branch():
    g = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_(True)
                      for _ in range(4))
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0

    # through the predictor: z1's gradient is exactly the one through p1 = pred(z1)
    torch.manual_seed(0)
    pred = SimSiamPredictor(in_dim=6, hidden_dim=4, out_dim=6).double()
    z1, z2 = (torch.randn(8, 6, generator=g, dtype=torch.float64).requires_grad_(True)
              for _ in range(2))
    (g_full,) = torch.autograd.grad(simsiam_loss(pred(z1), pred(z2), z1, z2), z1)
    (g_p1,) = torch.autograd.grad(
        -0.5 * F.cosine_similarity(pred(z1), z2.detach(), eps=0).mean(), z1)
    assert g_full.abs().sum() > 0
    torch.testing.assert_close(g_full, g_p1, rtol=1e-10, atol=1e-12)


def test_simsiam_heads_shapes_and_output_bn():
    proj, pred = SimSiamProjector(), SimSiamPredictor()
    assert [type(m).__name__ for m in proj.children()] == [
        "Linear", "BatchNorm1d", "Linear", "BatchNorm1d", "Linear", "BatchNorm1d"]
    assert (proj.linear1.in_features, proj.linear1.out_features) == (512, 1024)
    assert (proj.linear3.out_features, proj.bn3.num_features) == (1024, 1024)
    assert (pred.linear1.in_features, pred.linear1.out_features, pred.layer2.out_features) == (
        1024, 512, 1024)
    z = proj(torch.randn(16, 512))
    # the output BN (train mode): every output feature has batch mean 0 and variance 1
    torch.testing.assert_close(z.mean(0), torch.zeros(1024), rtol=0, atol=1e-5)
    assert pred(z).shape == (16, 1024)
    with pytest.raises(ValueError, match="out_dim"):
        SimSiamProjector(hidden_dim=1024, out_dim=256)


# --------------------------------------------------------------------------------------- MLM

def _texts(n, min_len=5, max_len=40, seed=0):
    """Random BPE-like rows: SOT + ids < 49406 + EOT + padding 0 to 77."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(n, 77, dtype=torch.long)
    for r in range(n):
        length = int(torch.randint(min_len, max_len, (1,), generator=g))
        rows[r, 0] = SOT_ID
        rows[r, 1:length + 1] = torch.randint(0, 49406, (length,), generator=g)
        rows[r, length + 1] = EOT_ID
    return rows


def test_mlm_mask_labels_specials_and_padding():
    tokens = _texts(64)
    masked, labels = mlm_mask(tokens, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert chosen.any()
    assert torch.equal(labels[chosen], tokens[chosen])  # labels: the original token
    assert torch.equal(masked[~chosen], tokens[~chosen])  # only chosen positions change
    special = (tokens == SOT_ID) | (tokens == EOT_ID)
    after_eot = torch.arange(77) > (tokens == EOT_ID).int().argmax(1, keepdim=True)
    assert not chosen[special].any() and not chosen[after_eot].any()
    assert torch.equal(masked[after_eot], tokens[after_eot])
    # pooling position unchanged: the first EOT is where it was
    assert torch.equal((masked == EOT_ID).int().argmax(1), (tokens == EOT_ID).int().argmax(1))


def test_mlm_mask_80_10_10_over_many_draws():
    tokens = _texts(3000, seed=1)
    masked, labels = mlm_mask(tokens, torch.Generator().manual_seed(1))
    chosen = labels != -100
    maskable = ((tokens != SOT_ID) & (tokens != EOT_ID)
                & (torch.arange(77) < (tokens == EOT_ID).int().argmax(1, keepdim=True)))
    n, m = int(chosen.sum()), int(maskable.sum())
    to_mask = int((masked[chosen] == MASK_ID).sum())
    kept = int((masked[chosen] == tokens[chosen]).sum())
    rand = n - to_mask - kept
    # binomial bounds at 5 sigma (m ~ 66k maskable positions, n ~ 10k chosen)
    for got, p, total in ((n, 0.15, m), (to_mask, 0.8, n), (rand, 0.1, n), (kept, 0.1, n)):
        assert abs(got / total - p) < 5 * math.sqrt(p * (1 - p) / total), (got, total, p)


def test_mlm_random_replacement_excludes_special_ids():
    # tiny vocabulary 0..9 with specials 7 (SOT), 8 (EOT), 9 (mask): every random id in 0..6
    tokens = torch.full((4000, 12), 0, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:10], tokens[:, 10] = 7, 3, 8
    masked, labels = mlm_mask(tokens, torch.Generator().manual_seed(2), mask_id=9,
                              vocab_size=10, special_ids=(7, 8, 9), eot_id=8, prob=0.5)
    chosen = labels != -100
    replaced = masked[chosen & (masked != 9)]
    assert set(replaced.unique().tolist()) == set(range(7))  # all non-special ids, no special


def _reference_mask_positions(seq, generator, prob=0.15, specials=(SOT_ID, EOT_ID, MASK_ID)):
    """mask_tokens.py:5-29 with an explicit generator: the position masks it draws."""
    pm = torch.full(seq.shape, prob)
    pm.masked_fill_(torch.tensor([int(v) in specials for v in seq.tolist()]), 0.0)
    chosen = torch.bernoulli(pm, generator=generator).bool()
    replace = torch.bernoulli(torch.full(seq.shape, 0.8), generator=generator).bool() & chosen
    rand = torch.bernoulli(torch.full(seq.shape, 0.5), generator=generator).bool() \
        & chosen & ~replace
    torch.randint(VOCAB_SIZE, seq.shape, generator=generator)
    return chosen, replace, rand


def test_mlm_draw_order_gives_the_reference_positions():
    tokens = _texts(20, seed=3)
    masked, labels = mlm_mask(tokens, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    n_rand = 0
    for r in range(20):
        length = int((tokens[r] == EOT_ID).int().argmax()) + 1
        chosen, replace, rand = _reference_mask_positions(tokens[r, :length], g)
        assert torch.equal(labels[r, :length] != -100, chosen)
        assert torch.equal(masked[r, :length] == MASK_ID, replace)
        # a random id equals the original with p = 1/49406: none does for this seed
        assert torch.equal(masked[r, :length] != tokens[r, :length], replace | rand)
        n_rand += int(rand.sum())
    assert n_rand > 0


def test_mlm_mask_rejects_a_row_without_eot():
    tokens = _texts(3)
    tokens[1] = 5
    with pytest.raises(ValueError, match="row 1 has no end-of-text"):
        mlm_mask(tokens, torch.Generator().manual_seed(0))


def test_mlm_loss_pools_masked_positions_of_the_batch():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.full((2, 5), -100)
    labels[0, 1] = 3                        # one masked position in row 0
    labels[1, 0], labels[1, 2], labels[1, 4] = 1, 6, 0  # three in row 1
    picks = [(0, 1, 3), (1, 0, 1), (1, 2, 6), (1, 4, 0)]
    expected = sum(_ce(logits[b, p].tolist(), t) for b, p, t in picks) / 4  # pooled, not per-row
    assert abs(mlm_loss(logits, labels).item() - expected) < 1e-12
    keep = labels != -100
    assert abs(mlm_loss(logits[keep], labels[keep]).item() - expected) < 1e-12


def test_mlm_loss_is_zero_not_nan_when_nothing_is_masked():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 5), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    # the encoder's form: the masked selection, empty here
    empty = mlm_loss(logits[:, :0].reshape(0, 7), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0 and empty.requires_grad


def test_declip_tiny_text_tokens_pool_at_eot_not_at_the_mask_token():
    torch.manual_seed(0)
    model = open_clip.create_model("DeCLIP-tiny").eval()
    assert model.vocab_size == VOCAB_SIZE == MASK_ID + 1
    text = open_clip.get_tokenizer("DeCLIP-tiny")(["a photo of a dog on the grass", "a cat"])
    assert text[0, 0] == SOT_ID and (text == EOT_ID).sum() == 2
    text[0, 3] = MASK_ID  # a mask id above EOT: argmax pooling would pick it
    with torch.no_grad():
        tokens, features = text_tokens_and_features(model, text)
        assert tokens.shape == (2, 77, 64)
        torch.testing.assert_close(features, model.encode_text(text), rtol=1e-5, atol=1e-6)
        eot = (text == EOT_ID).int().argmax(1)
        at_eot = model.text_projection(tokens[torch.arange(2), eot])
        torch.testing.assert_close(features, at_eot, rtol=1e-5, atol=1e-6)
        logits = MLMHead(64)(tokens[:, 3])
    assert logits.shape == (2, VOCAB_SIZE)


# ---------------------------------------------------------------------------------- NN bank

def test_nn_bank_init_matches_reference_layout():
    bank = NNMemoryBank(4, size=6, generator=torch.Generator().manual_seed(5))
    ref = F.normalize(torch.randn(4, 6, generator=torch.Generator().manual_seed(5)), dim=0)
    assert torch.equal(bank.bank, ref.T)
    assert int(bank.ptr) == 0


def test_nn_bank_enqueue_order_and_wrap_around():
    bank = NNMemoryBank(2, size=5)
    rows = torch.arange(16, dtype=torch.float32).reshape(8, 2)
    bank.enqueue(rows[:2])
    assert torch.equal(bank.bank[:2], rows[:2]) and int(bank.ptr) == 2
    bank.enqueue(rows[2:3])
    assert torch.equal(bank.bank[2], rows[2]) and int(bank.ptr) == 3
    old_rest = bank.bank[0:3].clone()
    bank.enqueue(rows[3:7])  # 4 rows at ptr 3 of 5: rows 3, 4 fit, 5 and 6 are dropped
    assert torch.equal(bank.bank[3:5], rows[3:5]) and int(bank.ptr) == 0
    assert torch.equal(bank.bank[0:3], old_rest)
    bank.enqueue(rows[:3])
    bank.enqueue(rows[5:7])  # exactly fills to the end: pointer back to 0
    assert torch.equal(bank.bank[3:5], rows[5:7]) and int(bank.ptr) == 0
    # more rows than the bank holds: the first size - p land, the pointer returns to 0
    bank.enqueue(rows[:2])
    bank.enqueue(rows)  # 8 rows at ptr 2 of 5: rows 0..2 at 2..4
    assert torch.equal(bank.bank[2:5], rows[:3]) and int(bank.ptr) == 0
    bank.enqueue(rows[2:])  # 6 rows at ptr 0 of 5: rows 2..6 fill it
    assert torch.equal(bank.bank, rows[2:7]) and int(bank.ptr) == 0


def test_nn_bank_top1_by_cosine_returns_raw_row_and_sees_the_old_bank():
    bank = NNMemoryBank(2, size=3)
    bank.bank.copy_(torch.tensor([[10.0, 1.0], [0.0, 0.5], [-1.0, 0.0]]))
    x = torch.tensor([[0.1, 1.0], [1.0, 0.0]])
    # row 0 of x: the largest dot is with [10, 1], the largest cosine with [0, 0.5]
    got = bank.query(x, update=True)
    assert torch.equal(got, torch.tensor([[0.0, 0.5], [10.0, 1.0]]))
    # the update enqueued x after the lookup
    assert torch.equal(bank.bank[:2], x) and int(bank.ptr) == 2
    # a new query sees x itself in the bank now
    assert torch.equal(bank.query(x[:1]), x[:1])


def test_nn_bank_state_dict_round_trip():
    a = NNMemoryBank(3, size=8, generator=torch.Generator().manual_seed(0))
    a.query(torch.randn(5, 3), update=True)
    b = NNMemoryBank(3, size=8, generator=torch.Generator().manual_seed(1))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.bank, b.bank) and int(b.ptr) == 5


# ------------------------------------------------------------------------------------- total

def test_declip_total_weights_and_reference_order():
    # values where float32 rounding depends on the summation order
    clip, nn_text, simsiam, mlm = (torch.tensor(v, dtype=torch.float32) for v in (
        2.3861591815948486, 9.675402641296387, 8.031794548034668, 4.479695796966553))
    ref = clip * 0.4 + simsiam * 0.2 + mlm * 0.2 + nn_text * 0.2  # declip_solver.py:507-517
    assert torch.equal(declip_total(clip, nn_text, simsiam, mlm), ref)
    assert not torch.equal(ref, clip * 0.4 + nn_text * 0.2 + simsiam * 0.2 + mlm * 0.2)


# ---------------------------------------------------------------- two processes over gloo

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(n):
    g = torch.Generator().manual_seed(11)
    return {"a": torch.randn(n, 6, generator=g), "b": torch.randn(n, 6, generator=g),
            "img": F.normalize(torch.randn(n, 6, generator=g), dim=-1),
            "img2": F.normalize(torch.randn(n, 6, generator=g), dim=-1),
            "txt": F.normalize(torch.randn(n, 6, generator=g), dim=-1),
            "nn": F.normalize(torch.randn(n, 6, generator=g), dim=-1),
            "nn_aug": F.normalize(torch.randn(n, 6, generator=g), dim=-1)}


TERMS = {
    "simclr": (("a", "b"), lambda t, s, r, w: simclr_loss(t["a"], t["b"], 0.1, r, w)),
    "clip": (("img", "txt"), lambda t, s, r, w: clip_info_nce(t["img"], t["txt"], s, r, w)),
    "nn": (("img", "img2"), lambda t, s, r, w: nn_loss(t["img"], t["img2"], t["nn"],
                                                       t["nn_aug"], s, r, w)),
}


def _run_terms(batch, rank, world):
    out = {}
    for name, (grad_keys, fn) in TERMS.items():
        t = {k: v.clone().requires_grad_(k in grad_keys) for k, v in batch.items()}
        scale = torch.tensor(5.0, requires_grad=True)
        loss = fn(t, scale, rank, world)
        loss.backward()
        out[name] = {"loss": loss.detach(), "scale_grad": scale.grad,
                     **{k: t[k].grad for k in grad_keys}}
    return out


def _worker(rank, world, port, batch, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = next(iter(batch.values())).shape[0] // world
        local = {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
        torch.save(_run_terms(local, rank, world), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_with_global_batch(tmp_path):
    world, b = 2, 4
    batch = _batch(world * b)
    mp.spawn(_worker, args=(world, _free_port(), batch, str(tmp_path)), nprocs=world)
    ref = _run_terms(batch, 0, 1)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    for name, (grad_keys, _) in TERMS.items():
        # the mean of the per-rank losses (what DDP optimises) is the global-batch loss
        mean = sum(res[name]["loss"] for res in ranks) / world
        torch.testing.assert_close(mean, ref[name]["loss"], msg=name)
        if name != "simclr":  # logit_scale: DDP's average of the ranks' gradients
            scale_grad = sum(res[name]["scale_grad"] for res in ranks) / world
            torch.testing.assert_close(scale_grad, ref[name]["scale_grad"], msg=name)
        for r, res in enumerate(ranks):
            rows = slice(r * b, (r + 1) * b)
            for k in grad_keys:
                # local gradient = world x the single-process rows: DDP's average then gives
                # the single-process parameter gradient
                torch.testing.assert_close(res[name][k], world * ref[name][k][rows],
                                           msg=f"{name} rank {r} grad {k}")
