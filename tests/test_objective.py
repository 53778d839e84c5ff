"""``--objective sigmoid`` (docs/methods.md §11): each method's sigmoid term against an
independent replica of SigLIP's loss written here from the paper's formula (float64, losses and
gradients), ALIP's gate-weighted form on 2 gloo ranks against one process over the global batch,
the refusals, the init and clamps, and a sigmoid-trained checkpoint loading for evaluation.

Tolerances: float64 throughout. The replica sums the same N^2 terms in another order (rows then
columns, ``log1p(exp(-u))`` instead of ``logsigmoid``): each term agrees to a few ulps, so sums of
at most 2 x 8 x 8 terms of size <= ~20 agree to ~1e-13 relative; 1e-12 is far above that and far
below any formula change (a weight or sign change moves the loss by >= 1e-3). The 2-rank
comparison differs only in summation order (the gather's concatenation, the all-reduce of the
ranks' gradients vs one sum): the same ~1e-13.
"""
import math
import os

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import alip  # noqa: F401
from alip.loss import ALIPLoss, local_grad_scale
from alip.methods import MethodConfigError, get_method
from alip.methods.base import LOGIT_SCALE_MAX
from alip.training.params import parse_args
from test_train_helpers import free_port

TIGHT = dict(rtol=1e-12, atol=1e-14)
SIGMOID = ("clip", "alip", "slip", "clips")


def method(name, *flags):
    args = parse_args(["--method", name, "--model", "ALIP-tiny", *flags])
    m = get_method(name)(args)
    torch.manual_seed(0)
    return m.attach(open_clip.create_model("ALIP-tiny", **m.model_kwargs()))


def log_sigmoid(u):
    return -torch.log1p(torch.exp(-u))


def replica(x, y, t, b, w=None):
    """SigLIP (arXiv 2303.15343, Algorithm 1) with per-sample weights: sample i's weight on the
    terms of image i's row, sample j's on those of text j's column, each half:
    ``1/N (1/2 sum_i w_i sum_j l_ij + 1/2 sum_j w_j sum_i l_ij)``, ``l_ij = -log sigmoid(z_ij
    (t x_i.y_j + b))``, ``z = +1 on the diagonal, -1 off it``; w = 1: SigLIP's loss."""
    n = len(x)
    w = torch.ones(n, dtype=x.dtype) if w is None else w
    rows, cols = [], []
    for i in range(n):
        row = [-log_sigmoid((1 if i == j else -1) * (t * torch.dot(x[i], y[j]) + b))
               for j in range(n)]
        rows.append(w[i] * sum(row))
    for j in range(n):
        col = [-log_sigmoid((1 if i == j else -1) * (t * torch.dot(x[i], y[j]) + b))
               for i in range(n)]
        cols.append(w[j] * sum(col))
    return (0.5 * sum(rows) + 0.5 * sum(cols)) / n


def unit(n, d, gen):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)


def features(n=6, d=16, seed=0, **extra):
    gen = torch.Generator().manual_seed(seed)
    f = {"image": unit(n, d, gen), "raw": unit(n, d, gen),
         "logit_scale": torch.tensor(10.0, dtype=torch.float64),
         "logit_bias": torch.tensor(-10.0, dtype=torch.float64)}
    f.update({k: v(gen) if callable(v) else v for k, v in extra.items()})
    return {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in f.items()}


def twin(feats):
    return {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in feats.items()}


def assert_same_loss_and_grads(loss, expected, ours, ref, keys):
    torch.testing.assert_close(loss, expected, **TIGHT)
    loss.backward()
    expected.backward()
    for k in keys:
        torch.testing.assert_close(ours[k].grad, ref[k].grad, **TIGHT, msg=k)


def test_clip_sigmoid_term_is_siglips_loss():
    ours = features()
    ref = twin(ours)
    loss = method("clip", "--objective", "sigmoid").criterion(ours)["loss"]
    expected = replica(ref["image"], ref["raw"], ref["logit_scale"], ref["logit_bias"])
    assert_same_loss_and_grads(loss, expected, ours, ref, ours)


def test_slip_sigmoid_clip_term_is_siglips_loss_and_simclr_is_unchanged():
    ours = features(ssl_a=lambda g: unit(6, 8, g), ssl_b=lambda g: unit(6, 8, g))
    ref = twin(ours)
    out = method("slip", "--objective", "sigmoid").criterion(ours)
    softmax = method("slip").criterion(twin(ours))
    torch.testing.assert_close(out["loss_ssl"], softmax["loss_ssl"], rtol=0, atol=0)
    torch.testing.assert_close(out["loss"], out["loss_clip"] + out["loss_ssl"], rtol=0, atol=0)
    expected = replica(ref["image"], ref["raw"], ref["logit_scale"], ref["logit_bias"])
    assert_same_loss_and_grads(out["loss_clip"], expected, ours, ref,
                               ("image", "raw", "logit_scale", "logit_bias"))


def test_clips_sigmoid_contrastive_term_is_the_mean_of_two_siglip_losses():
    ours = features(caption_partial=lambda g: unit(6, 16, g),
                    caption_logits=lambda g: torch.randn(1, 5, 11, generator=g,
                                                         dtype=torch.float64),
                    caption_targets=torch.tensor([[1, 2, 3, 4, 5]]))
    ref = twin(ours)
    out = method("clips", "--objective", "sigmoid", "--clips-w-con", "0.5").criterion(ours)
    t, b = ref["logit_scale"], ref["logit_bias"]
    expected = 0.5 * (replica(ref["image"], ref["raw"], t, b)
                      + replica(ref["image"], ref["caption_partial"], t, b)) / 2
    assert_same_loss_and_grads(out["loss_contrastive"], expected, ours, ref,
                               ("image", "raw", "caption_partial", "logit_scale", "logit_bias"))


def gates_by_hand(img, raw, cap, gamma, momentum, ema_init=1.0):
    """ALIP's gates (docs/methods.md §1.2): the EMAs move once from ema_init, then
    w_s = min(1, e^{g(s_tc - H_tc)}); where that is < 1, w_t = e^{g(s_it - H_it)}, w_c alike."""
    with torch.no_grad():
        s = {"tc": (raw * cap).sum(1), "it": (img * raw).sum(1), "ic": (img * cap).sum(1)}
        h = {k: momentum * ema_init + (1 - momentum) * v.mean() for k, v in s.items()}
        e = {k: torch.exp(gamma * (s[k] - h[k])) for k in s}
        flagged = e["tc"] < 1
        one = torch.ones_like(e["tc"])
        return (torch.where(flagged, e["tc"], one), torch.where(flagged, e["it"], one),
                torch.where(flagged, e["ic"], one))


def test_alip_sigmoid_weights_each_pair_by_its_row_and_column_samples(float64):
    """(float64 default dtype: the gate EMA buffers too.)"""
    gen = torch.Generator().manual_seed(3)
    img = unit(8, 16, gen)
    # captions near the raw text for some samples, far for others: some gates below 1
    raw = unit(8, 16, gen)
    cap = F.normalize(raw + torch.linspace(0.1, 3, 8, dtype=torch.float64)[:, None]
                      * unit(8, 16, gen), dim=-1)
    ours = features(8, 16, image=img, raw=raw, caption=cap)
    ref = twin(ours)
    out = method("alip", "--objective", "sigmoid", "--alip-gamma", "2",
                 "--alip-momentum", "0.5").criterion(ours)
    ws, wt, wc = gates_by_hand(ref["image"], ref["raw"], ref["caption"], 2.0, 0.5)
    assert 0 < ws.min() < 1 and (ws == 1).any()  # both kinds of sample
    torch.testing.assert_close(out["w_sample"], ws, **TIGHT)
    t, b = ref["logit_scale"], ref["logit_bias"]
    raw_term = replica(ref["image"], ref["raw"], t, b, ws * wt)
    cap_term = replica(ref["image"], ref["caption"], t, b, ws * wc)
    torch.testing.assert_close(out["loss_raw"], raw_term, **TIGHT)
    torch.testing.assert_close(out["loss_caption"], cap_term, **TIGHT)
    assert_same_loss_and_grads(out["loss"], raw_term + cap_term, ours, ref,
                               ("image", "raw", "caption", "logit_scale", "logit_bias"))


# ------------------------------------------------------------------ ALIP on 2 gloo ranks

N, D, WORLD = 8, 16, 2
CASES = [(False, False), (False, True), (True, True)]  # (local_loss, gather_with_grad)


def shared_inputs():
    """Parameters every process holds (as DDP replicas): raw feature rows, log-temperature,
    bias; each process turns its rows into unit features."""
    gen = torch.Generator().manual_seed(11)
    p = torch.randn(3, N, D, generator=gen, dtype=torch.float64)
    p[2] = p[1] + 0.8 * p[2]  # captions related to the raw texts: gates on both sides of 1
    return {"feats": p, "scale": torch.tensor(math.log(10), dtype=torch.float64),
            "bias": torch.tensor(-10.0, dtype=torch.float64)}


def alip_step(rank, world, local_loss, gather_with_grad):
    """Two training calls (the EMAs move) of the sigmoid ALIPLoss on this rank's rows; returns
    each call's loss and the gradients DDP would hold (the ranks' mean) after the second."""
    params = {k: v.clone().requires_grad_() for k, v in shared_inputs().items()}
    crit = ALIPLoss(gamma=2.0, momentum=0.5, rank=rank, world_size=world, local_loss=local_loss,
                    gather_with_grad=gather_with_grad, objective="sigmoid",
                    grad_scale=local_grad_scale(world, gather_with_grad, "global"))
    b = N // world
    losses = []
    for step in range(2):
        for p in params.values():
            p.grad = None
        rows = params["feats"][:, rank * b:(rank + 1) * b]
        img, raw, cap = F.normalize(rows + step * rows.roll(1, dims=-1), dim=-1)
        out = crit(img, raw, cap, params["scale"].exp(), params["bias"])
        out["loss"].backward()
        losses.append(out["loss"].detach())
    grads = {k: p.grad for k, p in params.items()}
    if world > 1:
        for g in list(grads.values()) + losses:
            dist.all_reduce(g)
        grads = {k: g / world for k, g in grads.items()}
        losses = [v / world for v in losses]
    return losses, grads, {k: v.clone() for k, v in crit.state_dict().items()}


def _worker(rank, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    result = {case: alip_step(rank, WORLD, *case) for case in CASES}
    if rank == 0:
        torch.save(result, out_path)
    dist.destroy_process_group()


@pytest.mark.slow  # a 2-process spawn (~45 s on a loaded CPU); tests/test_train_accum_ddp.py
def test_alip_sigmoid_on_two_ranks_equals_one_process_over_the_global_batch(tmp_path):  # (CI)
    """With and without --local-loss / --gather-with-grad: the losses (ranks' mean), the
    gradients DDP holds (ranks' mean) and the gate EMAs, over two calls. (End to end, training
    with accumulation on 2 ranks, in tests/test_train_accum_ddp.py, which CI runs.)"""
    mp.spawn(_worker, nprocs=WORLD, join=True, args=(free_port(), tmp_path / "r.pt"))
    result = torch.load(tmp_path / "r.pt")
    one_losses, one_grads, one_state = alip_step(0, 1, False, False)
    assert all(g.abs().max() > 0 for g in one_grads.values())
    for case in CASES:
        losses, grads, state = result[case]
        for a, b in zip(losses, one_losses):
            torch.testing.assert_close(a, b, **TIGHT, msg=str(case))
        for k in one_grads:
            torch.testing.assert_close(grads[k], one_grads[k], **TIGHT, msg=f"{case} {k}")
        for k in one_state:
            torch.testing.assert_close(state[k], one_state[k], **TIGHT, msg=f"{case} {k}")


# ------------------------------------------------------------------ flags, init, clamps

@pytest.mark.parametrize("name", ["declip", "filip", "defilip"])
def test_methods_without_a_sigmoid_form_refuse_it_in_one_line(name):
    args = parse_args(["--method", name, "--objective", "sigmoid"])
    with pytest.raises(MethodConfigError) as e:
        get_method(name).check_args(args)
    msg = str(e.value)
    assert msg.startswith("--objective sigmoid:") and f"--method {name}" in msg and "\n" not in msg
    get_method(name).check_args(parse_args(["--method", name, "--objective", "softmax"]))


def test_siglip_is_the_sigmoid_objective():
    cls = get_method("siglip")
    cls.check_args(parse_args(["--method", "siglip", "--objective", "sigmoid"]))
    cls.check_args(parse_args(["--method", "siglip"]))  # the default, not given
    with pytest.raises(MethodConfigError, match=r"^--objective softmax: --method siglip has no"):
        cls.check_args(parse_args(["--method", "siglip", "--objective", "softmax"]))
    assert cls.resolved_flags(parse_args(["--method", "siglip"])) == {"objective": "sigmoid"}


@pytest.mark.parametrize("flag", ["--local-loss", "--gather-with-grad"])
@pytest.mark.parametrize("name", ["clip", "slip", "clips"])
def test_sigmoid_exchange_terms_refuse_the_gather_flags(name, flag):
    with pytest.raises(MethodConfigError, match=f"^{flag} has no effect with --objective sigmoid"):
        get_method(name).check_args(parse_args(["--method", name, "--objective", "sigmoid", flag]))
    get_method("alip").check_args(parse_args(["--method", "alip", "--objective", "sigmoid", flag]))


@pytest.mark.parametrize("name", SIGMOID)
def test_sigmoid_models_start_at_temperature_10_bias_minus_10_and_stay_in_the_clamp(name):
    m = method(name, "--objective", "sigmoid")
    assert m.model_kwargs() == {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}
    assert m.model.logit_bias.item() == -10.0
    log10 = torch.tensor(math.log(10)).item()  # as float32 rounds it
    assert m.model.logit_scale.item() == log10
    m.after_step()  # the clamp leaves SigLIP's init where it is (SLIP's toolbox [3, 6] would not)
    assert m.model.logit_scale.item() == log10
    with torch.no_grad():
        m.model.logit_scale.fill_(9.0)
    m.after_step()
    assert m.model.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX)
    softmax = method(name)
    assert softmax.model_kwargs() == {} and getattr(softmax.model, "logit_bias", None) is None


def test_a_sigmoid_clip_checkpoint_loads_for_evaluation_with_its_bias(tmp_path):
    from alip.eval.load import load_model
    from test_train_helpers import run_single, tiny_argv
    run_single(tiny_argv(tmp_path, "c", "--method", "clip", "--objective", "sigmoid",
                         "--lr", "5e-3", samples=32, batch=8))
    path = tmp_path / "c" / "checkpoints" / "epoch_1.pt"
    saved = torch.load(path, weights_only=True)
    assert saved["model_kwargs"] == {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}
    assert saved["state_dict"]["logit_bias"].item() != -10.0  # it trained
    model, _, _ = load_model(checkpoint=str(path))
    assert torch.equal(model.logit_bias, saved["state_dict"]["logit_bias"])
    assert torch.equal(model.logit_scale, saved["state_dict"]["logit_scale"])


def test_the_weighted_sigmoid_loss_sums_in_float32_or_wider():
    """Half-precision features (autocast's matmul) are summed in float32: a sum of N^2 terms
    near 10 per positive reaches fp16's 65504 at a global batch of ~6.5k; float64 stays."""
    from alip.loss import weighted_sigmoid_loss
    gen = torch.Generator().manual_seed(5)
    x, y = unit(8, 16, gen), unit(8, 16, gen)
    w = torch.rand(8, generator=gen, dtype=torch.float64)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    exact = weighted_sigmoid_loss(x, y, t.double(), b.double(), w, w)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, replica(x, y, 10.0, -10.0, w), **TIGHT)
    half = weighted_sigmoid_loss(x.half(), y.half(), t, b, w.float(), w.float())
    assert half.dtype == torch.float32
    # fp16 features round each <x, y> by <= ~2^-11 relative; t = 10 moves a logit by <= 0.01
    torch.testing.assert_close(half.double(), exact, rtol=1e-2, atol=0)


def test_resuming_with_another_objective_is_refused():
    from alip.training.params import resume_conflicts
    now = parse_args(["--method", "clip", "--objective", "sigmoid"])
    assert resume_conflicts({"objective": "softmax"}, now) == [
        "objective (checkpoint softmax, now sigmoid)"]
    assert resume_conflicts({"objective": "sigmoid"}, now) == []
    assert resume_conflicts({}, now) == []  # a checkpoint from before --objective: not checked
