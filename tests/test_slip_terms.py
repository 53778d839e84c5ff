"""SLIP building blocks: SimCLR loss, SSL head, pre-projection ViT feature.

The two-process check of simclr_loss is in test_declip_terms.py (one spawn for every term that
gathers).
"""
import math

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

import alip  # noqa: F401  (registers the model configs)
from alip.methods.slip import SLIPHead, simclr_loss, vit_pooled_features


def _views(b=3, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype)


def test_simclr_equals_hand_computation_with_self_masked():
    q_a, q_b = _views()
    t = 0.1
    a, b = F.normalize(q_a, dim=-1), F.normalize(q_b, dim=-1)
    terms = []
    for x, y in ((a, b), (b, a)):  # loss_a: rows of a; loss_b: rows of b
        for i in range(x.shape[0]):
            # candidates: every y_j (positive y_i) and every x_j except x_i itself
            logits = [float(x[i] @ y[j]) / t for j in range(len(y))]
            logits += [float(x[i] @ x[j]) / t for j in range(len(x)) if j != i]
            terms.append(-(logits[i] - math.log(sum(math.exp(v) for v in logits))))
    expected = sum(terms) / len(terms)
    got = simclr_loss(q_a, q_b, temperature=t)
    assert got.dtype == torch.float64
    assert abs(got.item() - expected) < 1e-12


def _nt_xent_gather_one_process(z_i, z_j, temperature=0.1):
    """DeCLIP nt_xent.py:62-97 at one process (z_ib = z_i, z_jb = z_j, rank 0)."""
    bs = z_i.shape[0]
    p = torch.cat((z_i, z_j), dim=0)
    sim = F.cosine_similarity(p.unsqueeze(1), p.unsqueeze(0), dim=2) / temperature
    ids = torch.arange(bs)
    pos = torch.zeros(2 * bs, 2 * bs, dtype=torch.bool)
    pos[ids + bs, ids] = True
    pos[ids, ids + bs] = True
    neg = torch.ones(2 * bs, 2 * bs, dtype=torch.bool)
    neg[ids, ids] = neg[ids + bs, ids] = neg[ids, ids + bs] = neg[ids + bs, ids + bs] = False
    logits = torch.cat((sim[pos].reshape(2 * bs, -1), sim[neg].reshape(2 * bs, -1)), dim=1)
    labels = torch.zeros(2 * bs, dtype=torch.long)
    return F.cross_entropy(logits, labels, reduction="sum") / (2 * bs)


def test_simclr_equals_declip_nt_xent_gather_at_one_process():
    q_a, q_b = _views(b=6, d=8, seed=1)
    torch.testing.assert_close(simclr_loss(q_a, q_b), _nt_xent_gather_one_process(q_a, q_b),
                               rtol=0, atol=1e-12)


def test_simclr_gradient_reaches_both_views_and_is_scale_invariant():
    q_a, q_b = _views(b=4, d=6, seed=2)
    q_a.requires_grad_(True)
    loss = simclr_loss(q_a, q_b)
    # the inputs are normalised inside: scaling a row changes nothing
    torch.testing.assert_close(simclr_loss(3.0 * q_a, q_b), loss, rtol=0, atol=1e-12)
    loss.backward()
    assert q_a.grad.abs().sum() > 0


def test_slip_head_layers_match_official_slip():
    head = SLIPHead(768)
    kinds = [(name, type(m).__name__) for name, m in head.named_children()]
    assert kinds == [("layer1", "Linear"), ("bn1", "BatchNorm1d"), ("relu1", "ReLU"),
                     ("layer2", "Linear"), ("bn2", "BatchNorm1d"), ("relu2", "ReLU"),
                     ("layer3", "Linear")]
    assert (head.layer1.in_features, head.layer1.out_features) == (768, 4096)
    assert (head.layer2.in_features, head.layer2.out_features) == (4096, 4096)
    assert (head.layer3.in_features, head.layer3.out_features) == (4096, 256)
    assert head.bn1.num_features == head.bn2.num_features == 4096
    assert head(torch.randn(4, 768)).shape == (4, 256)


def test_vit_pooled_features_is_the_input_of_proj():
    torch.manual_seed(0)
    model = open_clip.create_model("ALIP-tiny")
    visual = model.visual.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pooled = vit_pooled_features(visual, x)
        assert pooled.shape == (3, 64)  # vision width, not embed_dim
        torch.testing.assert_close(pooled @ visual.proj, visual(x), rtol=1e-5, atol=1e-6)
        # after ln_post: zero mean and unit variance per row, up to ln_post's affine (1, 0)
        torch.testing.assert_close(pooled.mean(-1), torch.zeros(3), rtol=0, atol=1e-5)


def test_vit_pooled_features_rejects_other_towers():
    import pytest
    with pytest.raises(TypeError, match="VisionTransformer"):
        vit_pooled_features(nn.Linear(2, 2), torch.randn(1, 2))
