"""ALIPLoss: the reference numbers, the CLIP limit, distributed equivalence, bad input."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from alip.loss import ALIPLoss

SCALE = torch.tensor(1 / 0.07)


def reference_batch(n=8, d=16, seed=0):
    """The batch of docs/methods.md §1.6."""
    torch.manual_seed(seed)
    img = F.normalize(torch.randn(n, d), dim=-1)
    raw = F.normalize(img + 0.8 * torch.randn(n, d), dim=-1)
    cap = F.normalize(img + 0.5 * torch.randn(n, d), dim=-1)
    return img, raw, cap


def test_reference_vector_after_one_step():
    out = ALIPLoss()(*reference_batch(), SCALE)
    ema = torch.stack([out["ema_tc"], out["ema_it"], out["ema_ic"]])
    torch.testing.assert_close(ema, torch.tensor([0.99196, 0.99438, 0.99357]), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        out["w_sample"],
        torch.tensor([0.2716, 0.1574, 0.2589, 0.1561, 0.3755, 0.1546, 0.1478, 0.1998]),
        atol=1e-4, rtol=0)
    assert out["loss"].item() == pytest.approx(0.09357, abs=1e-4)
    assert out["loss"].item() == pytest.approx((out["loss_raw"] + out["loss_caption"]).item())


def test_loss_equals_hand_computed_weighted_ce():
    img, raw, cap = reference_batch()
    out = ALIPLoss()(img, raw, cap, SCALE)
    h_tc, h_it, h_ic = (0.99 + 0.01 * (a * b).sum(-1).mean() for a, b in
                        ((raw, cap), (img, raw), (img, cap)))
    w_hat = torch.exp(2 * ((raw * cap).sum(-1) - h_tc))
    flagged = w_hat < 1
    w_s = torch.where(flagged, w_hat, torch.ones(8))
    w_t = torch.where(flagged, torch.exp(2 * ((img * raw).sum(-1) - h_it)), torch.ones(8))
    w_c = torch.where(flagged, torch.exp(2 * ((img * cap).sum(-1) - h_ic)), torch.ones(8))

    def sym_ce(a, b):
        logits = SCALE * a @ b.T
        labels = torch.arange(8)
        return 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                      + F.cross_entropy(logits.T, labels, reduction="none"))

    expected = (w_s * w_t * sym_ce(img, raw)).mean() + (w_s * w_c * sym_ce(img, cap)).mean()
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["w_text"], w_t)
    torch.testing.assert_close(out["w_caption"], w_c)


def test_unit_weights_equal_twice_clip_loss():
    img, raw, cap = reference_batch(n=16, d=32, seed=3)
    out = ALIPLoss(gamma=0.0)(img, raw, cap, SCALE)
    for w in ("w_sample", "w_text", "w_caption"):
        assert torch.equal(out[w], torch.ones(16))
    clip = ClipLoss()
    expected = clip(img, raw, SCALE) + clip(img, cap, SCALE)
    torch.testing.assert_close(out["loss"], expected)
    # and with caption == raw text, exactly twice open_clip's ClipLoss
    out = ALIPLoss(gamma=0.0)(img, raw, raw, SCALE)
    torch.testing.assert_close(out["loss"], 2 * clip(img, raw, SCALE))


def test_dcg_weights_exceed_one_after_many_steps():
    batch = reference_batch()
    loss = ALIPLoss()
    first = loss(*batch, SCALE)
    assert first["w_text"].max() < 1  # cold start: H = 1 pulls every weight down
    for _ in range(1999):  # the gates alone: same EMA updates, no loss
        loss.gates(*batch)
    out = loss(*batch, SCALE)  # step 2,001
    assert out["w_text"].max().item() == pytest.approx(1.834, abs=1e-3)
    assert out["w_sample"].max() <= 1  # LCG stays capped


def test_eval_mode_reads_but_does_not_update_emas():
    loss = ALIPLoss()
    loss(*reference_batch(), SCALE)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    loss.eval()
    loss(*reference_batch(seed=1), SCALE)
    for k, v in loss.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_round_trip_restores_emas():
    a = ALIPLoss()
    for seed in range(5):
        a(*reference_batch(seed=seed), SCALE)
    sd = a.state_dict()
    assert set(sd) == {"ema_tc", "ema_it", "ema_ic"}
    b = ALIPLoss()
    b.load_state_dict(sd)
    for k in sd:
        assert torch.equal(b.state_dict()[k], sd[k])
    batch = reference_batch(seed=9)
    out_a, out_b = a(*batch, SCALE), b(*batch, SCALE)
    assert torch.equal(out_a["loss"], out_b["loss"])


@pytest.mark.parametrize("bad, match", [
    (lambda i, r, c, s: (i * 2, r, c, s), "image_features must be L2-normalised"),
    (lambda i, r, c, s: (i, r[:4], c, s), r"share one \[B, D\] shape"),
    (lambda i, r, c, s: (i, r, c[:, :8], s), r"share one \[B, D\] shape"),
    (lambda i, r, c, s: (i, r, c, torch.ones(2)), "logit_scale must be a scalar"),
    (lambda i, r, c, s: (i, r, c, torch.tensor(float("inf"))), "logit_scale must be finite"),
    (lambda i, r, c, s: (i, r.clone().index_fill_(0, torch.tensor([3]), float("nan")) * 1.5, c,
                         s), "raw_features must be L2-normalised"),
    (lambda i, r, c, s: (i[0], r, c, s), r"image_features must be \[B, D\]"),
])
def test_bad_input_raises_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        ALIPLoss()(*bad(*reference_batch(), SCALE))


def test_values_are_checked_once_and_non_finite_rows_are_left_to_the_step():
    """The value checks read back to the host, so they run on a module's first call only (a
    training step never waits for them); a NaN row is not an error but a NaN loss, which the
    training step skips (tests/test_train_smoke.py)."""
    img, raw, cap = reference_batch()
    loss = ALIPLoss()
    nan_raw = raw.clone().index_fill_(0, torch.tensor([3]), float("nan"))
    assert torch.isnan(loss(img, nan_raw, cap, SCALE)["loss"])
    assert torch.isfinite(loss(img * 2, raw, cap, SCALE)["loss"])  # not checked again
    with pytest.raises(ValueError, match="image_features must be L2-normalised"):
        ALIPLoss()(img * 2, raw, cap, SCALE)


# ---------------------------------------------------------------- two processes over gloo

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIGS = [dict(local_loss=False, gather_with_grad=False),
           dict(local_loss=True, gather_with_grad=True),
           dict(local_loss=False, gather_with_grad=True)]


def _worker(rank, world_size, port, batch, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a 2-core machine: no oversubscription
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        b = batch[0].shape[0] // world_size
        for c, kwargs in enumerate(CONFIGS):  # one spawn for every config: start-up dominates
            local = [t[rank * b:(rank + 1) * b].clone().requires_grad_(True) for t in batch]
            loss_fn = ALIPLoss(rank=rank, world_size=world_size, **kwargs)
            for _ in range(2):  # two steps: the second uses EMAs carried from the first
                for t in local:
                    t.grad = None
                out = loss_fn(*local, SCALE)
                out["loss"].backward()
            torch.save({"out": {k: v.detach() for k, v in out.items()},
                        "grads": [t.grad for t in local]}, os.path.join(out_dir, f"{c}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process(batch, **kwargs):
    batch = [t.clone().requires_grad_(True) for t in batch]
    loss_fn = ALIPLoss(**kwargs)
    for _ in range(2):
        for t in batch:
            t.grad = None
        out = loss_fn(*batch, SCALE)
        out["loss"].backward()
    return out, [t.grad for t in batch]


def test_two_gloo_ranks_equal_one_process_with_global_batch(tmp_path):
    world, b = 2, 6
    batch = reference_batch(n=world * b, d=16, seed=5)
    mp.spawn(_worker, args=(world, _free_port(), batch, str(tmp_path)), nprocs=world)
    ref, ref_grads = _single_process(batch)
    for c, kwargs in enumerate(CONFIGS):
        ranks = [torch.load(tmp_path / f"{c}-{r}.pt") for r in range(world)]
        for r, res in enumerate(ranks):
            out, where = res["out"], f"{kwargs} rank {r}"
            for k in ("w_sample", "w_text", "w_caption", "ema_tc", "ema_it", "ema_ic",
                      "s_tc", "s_it", "s_ic"):
                torch.testing.assert_close(out[k], ref[k].detach(), msg=f"{where} {k}")
            if not kwargs["local_loss"]:
                torch.testing.assert_close(out["loss"], ref["loss"].detach(), msg=where)
            # Gradient on the local features: the matching rows of the single-process
            # gradient; gather_with_grad sums every rank's contribution back (x world), as
            # open_clip does.
            factor = world if kwargs["gather_with_grad"] else 1
            rows = slice(r * b, (r + 1) * b)
            for g, g_ref in zip(res["grads"], ref_grads):
                torch.testing.assert_close(g, factor * g_ref[rows], msg=f"{where} grad")
        if kwargs["local_loss"]:
            mean = sum(res["out"]["loss"] for res in ranks) / world
            torch.testing.assert_close(mean, ref["loss"].detach())
