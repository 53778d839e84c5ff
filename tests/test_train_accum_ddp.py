"""Gradient accumulation on 2 gloo ranks, for every method in each ``--accum-mode`` it supports.

Before, ``--accum-mode batch`` under DDP stopped at step 2 ("Expected to have finished reduction
in the prior iteration"): logit_scale took its gradient in the first micro-step only, so the
last, synchronised one left it out. What is exactly equal (but for summation order):

* batch mode: 2 ranks x batch B x accum 2 == 1 process x batch 4B (the synthetic loader's
  global batches put the same 4B samples in one step; the contrastive loss, the gates and
  their EMAs see the 4B, in another order);
* micro mode: 2 ranks x batch B x accum 2 == 1 process x batch 2B x accum 2 in micro mode
  (micro-batch j of a step is the same 2B samples: the ranks' micro-batches j, gathered).

These two, end to end, for clip and alip (and filip, slow). SLIP (per-rank BatchNorm on gloo),
DeCLIP/DeFILIP (that, and per-rank MLM draws) and CLIPS (its caption loss is a per-rank mean
over that rank's caption tokens) do not equal one process even without accumulation; for every
method (slow) the DDP-accumulated gradient of a step is checked to be the mean over the ranks
of each rank's own accumulated gradient, which is what DDP promises.

Tolerances. The end-to-end runs are in float64 and sum in different orders (all-gather
concatenation vs one batch, the ranks' all-reduce vs one sum, micro-step accumulation): each op
differs by ~1e-16 relative, ~1e-14 through a forward and backward, and Adam's division by
sqrt(v) amplifies that to ~1e-10 on near-zero gradients within a few steps (as in
tests/test_train_ddp.py); 1e-8 is far above that and far below any real difference (batch and
micro semantics differ at 1e-3 or more, asserted so the comparison is known to discriminate).
The gradient contract (float32, as training runs) compares identical local computations that
differ only in DDP's ``g/2`` per rank, summed, vs ``(g0 + g1)/2``: halving is exact in binary
floating point, so they are equal (tolerance 0).
"""
import os

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import alip  # noqa: F401
from alip.methods import METHODS, get_method
from alip.training.distributed import DistInfo
from alip.training.params import parse_args
from alip.training.step import StepContext, train_step
from test_methods import MODELS, batch_for, small_flags
from test_train_helpers import (assert_weights_close, final_state, free_port, gloo_worker,
                                read_results, run_single, tiny_argv)

B, ACCUM, WORLD = 4, 2, 2
STEPS = 4  # 64 samples / (2 ranks x 4 x accum 2)
ALIP_KEYS = ["loss_raw", "loss_caption", "ema_tc", "ema_it", "ema_ic", "w_sample_mean",
             "w_text_mean", "w_caption_mean"]


# a run's key -> its method flags: a method's name, or a variant of it (docs/methods.md §11)
VARIANTS = {"alip-sigmoid": ("--method", "alip", "--objective", "sigmoid"),
            "clip-sigmoid": ("--method", "clip", "--objective", "sigmoid")}


def _argv(tmp_path, name, method, mode, *, batch, accum):
    flags = VARIANTS.get(method, ("--method", method))
    return tiny_argv(tmp_path, name, *flags, "--lr", "5e-3", "--accum-freq",
                     str(accum), "--accum-mode", mode, samples=64, batch=batch)


def _ddp_argvs(tmp_path, methods):
    return [_argv(tmp_path / method, f"ddp-{mode}", method, mode, batch=B, accum=ACCUM)
            for method in methods for mode in ("batch", "micro")]


def _ddp_runs(tmp_path, methods):
    """Each method in both modes on 2 gloo ranks, batch B, accum 2: one spawn for all (a
    process start costs more than these runs)."""
    runs = _ddp_argvs(tmp_path, methods)
    mp.spawn(gloo_worker, nprocs=WORLD, join=True,
             args=(WORLD, free_port(len(runs)), runs, (), None, torch.float64))


def _single_runs(run_dir, method):
    """What each mode equals in one process: batch 4B; batch 2B x accum 2 in micro mode."""
    run_single(_argv(run_dir, "one-batch", method, "batch", batch=WORLD * ACCUM * B, accum=1),
               dtype=torch.float64)
    run_single(_argv(run_dir, "one-micro", method, "micro", batch=WORLD * B, accum=ACCUM),
               dtype=torch.float64)


def _assert_same_run(ddp_dir, one_dir, keys):
    ddp, one = read_results(ddp_dir), read_results(one_dir)
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    assert not any(r["skipped"] for r in ddp + one)
    for a, b in zip(ddp, one):
        assert a["lr"] == b["lr"] and a["beta1"] == b["beta1"]
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-8, abs=1e-12), (a["step"], k)
    assert_weights_close(final_state(ddp_dir, "epoch_1"), final_state(one_dir, "epoch_1"),
                         rtol=1e-8, atol=1e-10, max_outliers=0)


def _assert_modes_differ(run_dir):
    """Batch and micro semantics give different runs: the comparisons above can fail."""
    a = final_state(run_dir / "one-batch", "epoch_1")
    b = final_state(run_dir / "one-micro", "epoch_1")
    assert any(not torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-8) for k in a)


def _check_end_to_end(run_dir, method):
    """``run_dir`` holds the method's 2-rank runs: each equals its one-process run."""
    _single_runs(run_dir, method)
    keys = ["loss", "grad_norm"] + (ALIP_KEYS if method.startswith("alip") else [])
    for mode in ("batch", "micro"):
        _assert_same_run(run_dir / f"ddp-{mode}", run_dir / f"one-{mode}", keys)
    _assert_modes_differ(run_dir)


# siglip: its neighbour exchange against one global batch; alip-sigmoid: ALIP's gate-weighted
# sigmoid loss over the gathered batch (tests/test_objective.py: its --local-loss forms);
# clip-sigmoid: open_clip's SigLipLoss as --objective sigmoid wires it (alip.loss.PairLoss)
FAST = ("clip", "alip", "siglip", "alip-sigmoid", "clip-sigmoid")


@pytest.fixture(scope="module")
def fast_ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("accum-ddp")
    _ddp_runs(root, FAST)
    return root


@pytest.mark.parametrize("method", FAST)
def test_two_ranks_with_accumulation_equal_one_process(fast_ddp_runs, method):
    _check_end_to_end(fast_ddp_runs / method, method)


@pytest.mark.slow
def test_filip_two_ranks_with_accumulation_equal_one_process(tmp_path):
    _ddp_runs(tmp_path, ["filip"])
    _check_end_to_end(tmp_path / "filip", "filip")


# ------------------------------------------------------------------ the DDP gradient contract

def _method(name, mode, rank=0, world_size=WORLD):
    args = parse_args(["--method", name, "--model", MODELS[name], "--accum-freq", str(ACCUM),
                       "--accum-mode", mode, *small_flags(name)])
    method = get_method(name)(args, rank=rank, world_size=world_size)
    torch.manual_seed(0)
    return method.attach(open_clip.create_model(MODELS[name], **method.model_kwargs()))


def _micro_batches(method, step, rank):
    """This rank's micro-batches of a step: different images on each rank and micro-step, and
    texts of different lengths in the two micro-batches (CLIPS' packed caption rows)."""
    whole = batch_for(method.data, ACCUM * B, seed=1000 * step + rank)
    return [{k: v[j * B:(j + 1) * B] for k, v in whole.items()} for j in range(ACCUM)]


def _step_grads(name, mode, rank, ddp):
    """Parameter gradients after each of two accumulated steps (lr 0: the weights stay, the
    criterion state moves), through DDP or this rank's own accumulation averaged by hand."""
    method = _method(name, mode, rank)
    encoder = method.encoder
    if ddp:
        encoder = torch.nn.parallel.DistributedDataParallel(
            encoder, find_unused_parameters=method.find_unused_parameters)
    params = [p for p in method.encoder.parameters() if p.requires_grad]
    ctx = StepContext(model=encoder, criterion=method.criterion,
                      optimizer=torch.optim.SGD(params, lr=0.0),
                      info=DistInfo(rank, rank, WORLD, True, torch.device("cpu")),
                      accum_mode=mode, grad_clip_norm=0, after_step=method.after_step)
    grads = []
    for step in range(2):
        assert train_step(ctx, _micro_batches(method, step, rank)).metrics() is not None
        named = [(n, p) for n, p in method.encoder.named_parameters() if p.requires_grad]
        grads.append({n: p.grad.clone() for n, p in named if p.grad is not None} if ddp
                     else _rank_mean(named))
    return grads


def _rank_mean(named):
    """The mean over ranks of each parameter's gradient (None on a rank: zero there), for the
    parameters with a gradient on some rank."""
    out = {}
    for n, p in named:
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        has = torch.tensor([float(p.grad is not None)])
        dist.all_reduce(g)
        dist.all_reduce(has)
        if has.item():
            out[n] = g / WORLD
    return out


def _contract_worker(rank, port, cases, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    result = {case: {"ddp": _step_grads(*case, rank, ddp=True),
                     "mean": _step_grads(*case, rank, ddp=False)} for case in cases}
    if rank == 0:
        torch.save(result, out_path)
    dist.destroy_process_group()


def _cases(methods):
    return [(m, mode) for m in methods for mode in get_method(m).accum_modes]


def _check_contract(tmp_path, methods):
    cases = _cases(methods)
    mp.spawn(_contract_worker, nprocs=WORLD, join=True,
             args=(free_port(), cases, tmp_path / "grads.pt"))
    result = torch.load(tmp_path / "grads.pt")
    for case in cases:
        for step, (ddp, mean) in enumerate(zip(result[case]["ddp"], result[case]["mean"])):
            assert ddp.keys() == mean.keys(), (case, step, ddp.keys() ^ mean.keys())
            assert any(n.endswith("logit_scale") for n in ddp), case
            for n in ddp:
                torch.testing.assert_close(ddp[n], mean[n], rtol=0, atol=0,
                                           msg=lambda m: f"{case} step {step} {n}: {m}")


@pytest.mark.slow
def test_ddp_accumulated_gradients_are_the_rank_mean_for_every_method(tmp_path):
    _check_contract(tmp_path, sorted(METHODS))


# ------------------------------------------------------- one process: the token methods' batch mode

def _one_process_step(name, micro_batches):
    """(metrics, gradients) of one accumulated batch-mode step in one process, lr 0."""
    method = _method(name, "batch", world_size=1)
    params = [p for p in method.encoder.parameters() if p.requires_grad]
    ctx = StepContext(model=method.encoder, criterion=method.criterion,
                      optimizer=torch.optim.SGD(params, lr=0.0),
                      info=DistInfo(0, 0, 1, False, torch.device("cpu")), grad_clip_norm=0)
    metrics = train_step(ctx, micro_batches).metrics()
    return metrics, {n: p.grad.clone() for n, p in method.encoder.named_parameters()
                     if p.grad is not None}


@pytest.mark.parametrize("name", ["filip", "clips"])
def test_batch_mode_of_the_token_methods_equals_one_big_batch(name, float64):
    """accum 2 x B == one batch of 2B in one process (tests/test_train_accum.py checks clip
    and alip). CLIPS' caption logits and targets are one packed row [1, N, ...] of the decoder
    positions that have a target; the two micro-batches' N differ here (before, joining them
    along dim 0 raised "Sizes of tensors must match"), and joined along N they are the big
    batch's row. float64: the two sum in different orders (tolerances as test_train_accum's)."""
    method = _method(name, "batch", world_size=1)
    whole = batch_for(method.data, ACCUM * B)
    halves = [{k: v[j * B:(j + 1) * B] for k, v in whole.items()} for j in range(ACCUM)]
    if name == "clips":
        from alip.methods.clips import target_positions
        n = [len(target_positions(h["caption"], method.encoder.decoder.num_queries)[1])
             for h in halves]
        assert n[0] != n[1]
    m_big, g_big = _one_process_step(name, [whole])
    m_acc, g_acc = _one_process_step(name, halves)
    assert m_acc["loss"] == pytest.approx(m_big["loss"], rel=1e-12)
    assert g_acc.keys() == g_big.keys()
    for k in g_big:  # logit_scale included: counted once
        torch.testing.assert_close(g_acc[k], g_big[k], rtol=1e-9, atol=1e-12, msg=k)

