"""W gloo processes x batch B train exactly like 1 process x batch W*B (``--ddp-gradients
global``, the default), with the default gradient clip, for ALIP and CLIP, local_loss on and
off; and ``--ddp-gradients reference`` gives open_clip's / the reference's DDP gradients (tower
gradients 1/W of the single-process ones, logit_scale's in full).

Runs are compared in float64: the two computations sum in different orders, and Adam amplifies
fp32's ~1e-7 differences to ~1e-4 within a few steps by a CPU-dependent amount; in float64 the
same amplification leaves them ~1e-10 apart, far inside the 1e-8 tolerance and far from any real
difference (with the reference's gradients the clip makes the runs differ at 1e-3 and more).
"""
import os

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import alip  # noqa: F401
from alip.loss import ALIPLoss, GlobalGradClipLoss, local_grad_scale
from alip.methods.alip import ALIPEncoder
from alip.methods.clip import CLIPEncoder
from alip.training import checkpoint as ckpt
from alip.training.synthetic import synthetic_sample
from test_train_helpers import (assert_weights_close, final_state, free_port, gloo_worker, read_results,
                                run_single, tiny_argv)

COMBOS = [("alip", False), ("alip", True), ("clip", False), ("clip", True)]
# a NaN image batch on rank 1 at epoch 0 batch 2 == NaN in the global batch's second half
BAD = [(0, 2)]


def _argv(tmp_path, name, method, local_loss, *extra, batch):
    flags = ["--method", method, "--lr", "5e-3", *(["--local-loss"] if local_loss else []), *extra]
    return tiny_argv(tmp_path, name, *flags, samples=96, batch=batch, epochs=2)


def _compare(ddp_dir, one_dir, method):
    ddp, one = read_results(ddp_dir), read_results(one_dir)
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == list(range(1, 13))
    assert [r["skipped"] for r in ddp] == [r["skipped"] for r in one] == [False] * 2 + [True] + [False] * 9
    keys = ["loss", "grad_norm"] + (["loss_raw", "loss_caption", "ema_tc", "ema_it", "ema_ic",
                                     "w_sample_mean", "w_text_mean", "w_caption_mean"]
                                    if method == "alip" else [])
    assert one[0]["grad_norm"] > 1.0  # the default clip (1.0) is active
    for a, b in zip(ddp, one):
        assert a["lr"] == b["lr"]
        if not a["skipped"]:
            for k in keys:
                assert a[k] == pytest.approx(b[k], rel=1e-8, abs=1e-12), (a["step"], k)
    sd_ddp, sd_one = final_state(ddp_dir, "epoch_2"), final_state(one_dir, "epoch_2")
    assert not any(k.startswith("module.") for k in sd_ddp)
    assert_weights_close(sd_ddp, sd_one, rtol=1e-8, atol=1e-10, max_outliers=0)
    init = final_state(one_dir, "epoch_1")  # training moved the weights: equality is not trivial
    assert any(not torch.equal(init[k], sd_one[k]) for k in sd_one)


def test_two_processes_equal_one_with_global_batch(tmp_path):
    runs = [_argv(tmp_path, f"ddp-{m}-{ll}", m, ll, batch=8) for m, ll in COMBOS]
    mp.spawn(gloo_worker, nprocs=2, join=True,
             args=(2, free_port(len(runs)), runs, BAD, [1], torch.float64))
    for method in ("alip", "clip"):
        run_single(_argv(tmp_path, f"one-{method}", method, False, batch=16), bad=BAD,
                   dtype=torch.float64)
    for method, local_loss in COMBOS:
        _compare(tmp_path / f"ddp-{method}-{local_loss}", tmp_path / f"one-{method}", method)


def _grads_worker(rank, world_size, port, out_path, method):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    result = {}
    for mode in ("global", "reference"):
        result[mode] = _grads(method, rank, world_size, mode)
    if rank == 0:
        torch.save(result, out_path)
    dist.destroy_process_group()


def _grads(method, rank, world_size, mode):
    """Parameter gradients of one step on the global batch of 16, split over the ranks."""
    torch.manual_seed(0)
    model = open_clip.create_model("ALIP-tiny")
    enc = ALIPEncoder(model) if method == "alip" else CLIPEncoder(model)
    if world_size > 1:
        enc = torch.nn.parallel.DistributedDataParallel(enc)
    scale = local_grad_scale(world_size, False, mode)
    if method == "alip":
        loss_fn = ALIPLoss(rank=rank, world_size=world_size, grad_scale=scale)
    else:
        loss_fn = GlobalGradClipLoss(grad_scale=scale, rank=rank, world_size=world_size)
    b = 16 // world_size
    samples = [synthetic_sample(0, i, 32) for i in range(rank * b, (rank + 1) * b)]
    images, raw, cap = (torch.stack(x) for x in zip(*samples))
    f = enc({"image": images, "raw": raw, "caption": cap})
    out = loss_fn(*(f[k] for k in ("image", "raw", "caption", "logit_scale") if k in f))
    (out["loss"] if method == "alip" else out).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["alip", "clip"])
def test_ddp_gradient_semantics(tmp_path, method):
    """global: every averaged gradient equals the single-process one; reference: the towers'
    are 1/W of it and logit_scale's is the full gradient (what the README states)."""
    mp.spawn(_grads_worker, nprocs=2, join=True,
             args=(2, free_port(), tmp_path / "g.pt", method))
    ddp = torch.load(tmp_path / "g.pt")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        one = _grads(method, 0, 1, "global")
    finally:
        torch.set_default_dtype(prev)
    for name, g in one.items():
        torch.testing.assert_close(ddp["global"][name], g, rtol=1e-9, atol=1e-14, msg=name)
        expected = g if name == "logit_scale" else g / 2
        torch.testing.assert_close(ddp["reference"][name], expected, rtol=1e-9, atol=1e-14,
                                   msg=name)
    assert one["logit_scale"].abs() > 0


def _resume_worker(rank, world_size, port, logs, out_dir):
    """Rank r reads --logs-dir logs[r]: rank 0 sees the run's checkpoints, rank 1 a node-local
    directory without them. Records what each rank raised."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from alip.training.loop import run
    from alip.training.params import parse_args
    try:
        run(parse_args(tiny_argv(logs[rank], "r", "--save-every-n-steps", "2", "--resume", "latest")))
        outcome = "trained"
    except Exception as e:  # noqa: BLE001
        outcome = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


def test_ranks_that_see_different_checkpoints_fail_together_instead_of_hanging(tmp_path):
    mp.spawn(gloo_worker, nprocs=2, join=True,  # a 2-process run with checkpoints
             args=(2, free_port(), tiny_argv(tmp_path / "shared", "r", "--save-every-n-steps", "2")))
    latest = ckpt.find_latest(tmp_path / "shared" / "r" / "checkpoints")
    (tmp_path / "local").mkdir()
    ctx = mp.start_processes(_resume_worker, nprocs=2, join=False, start_method="spawn",
                             args=(2, free_port(), [tmp_path / "shared", tmp_path / "local"],
                                   str(tmp_path)))
    for _ in range(120):  # both ranks must end; before the check rank 0 waited forever
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("the ranks hung")
    expected = (f"TrainConfigError: --resume latest: the processes do not see the same checkpoint "
                f"(rank(s) 0: {latest}; rank(s) 1: "
                f"no checkpoint (a fresh start)); --logs-dir must be one directory every node shares")
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == expected


def test_a_resume_error_on_one_rank_is_raised_on_every_rank(tmp_path, monkeypatch):
    """Rank 1 cannot find --resume PATH (not on its node): rank 0, which can, raises too, naming
    rank 1 and its error, instead of waiting for it at the first collective."""
    import logging

    from alip.training import resume
    from alip.training.config import TrainConfigError
    from alip.training.distributed import DistInfo
    from alip.training.params import parse_args
    path = tmp_path / "step_2.pt"
    path.write_bytes(b"")
    args = parse_args(tiny_argv(tmp_path, "r", "--resume", str(path)))
    info = DistInfo(rank=0, local_rank=0, world_size=2, distributed=True, device=torch.device("cpu"))
    gathered = []

    def fake_gather(obj, info):
        gathered.append(obj)
        return [obj, (None, f"--resume: no such checkpoint: {path}")]
    monkeypatch.setattr(resume, "all_gather_object", fake_gather)
    with pytest.raises(TrainConfigError) as e:
        resume.agree_on_resume(args, info, tmp_path, logging.getLogger("t"))
    assert str(e.value) == f"rank 1: --resume: no such checkpoint: {path}"
    assert gathered == [(str(path), None)]  # rank 0 told the others what it found
