"""train.py --fsdp (FSDP2) and its sharded checkpoints, on CPU/gloo.

* 2 FSDP ranks train as 2 DDP ranks: the same per-step loss and gradient norm over 12 steps
  with accumulation and clipping on (CLIP in batch mode here; ALIP in both modes, slow), and
  the same final weights (the consolidated sharded checkpoint against DDP's model file).
* One FSDP process trains as one plain process.
* A 2-rank sharded checkpoint resumes on 1 rank (DCP reshards) with the same losses.
* SIGKILL mid-run, then --resume latest: every later step bit-identical (slow).
* Bad input: a sharded checkpoint missing a rank's shard, a tower FSDP cannot shard, the
  wrong kind of checkpoint: one-line errors before any step, nothing overwritten.

Tolerances. The runs are fp32 and the two sides compute the same sums in other orders: FSDP's
gradient norm adds each rank's partial sums of squares (DDP: one sum over the whole
gradient), its reduce-scatter averages what DDP's all-reduce averages (for 2 ranks g0/2 + g1/2
either way). So the clip coefficient and then every update differ by a few fp32 ulps (~1e-7
relative) per step, and Adam's division by sqrt(v) turns that noise on near-zero gradients into
up to lr-sized steps on a few weights (hence ``assert_weights_close`` with its outlier
allowance, as the DDP tests). The loss averages over all weights and samples: measured <= 2.2e-7
relative over the 12 steps, asserted at 1e-5. The gradient norm is dominated by the largest
entries, which those few moved weights feed: measured <= 3.8e-6, asserted at 1e-4 (1e-5 would
leave a factor 2.6, too little for another CPU's kernels).
"""
import os
import signal
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from alip.training import checkpoint as ckpt
from alip.training.config import TrainConfigError
from alip.training.consolidate import consolidate
from alip.training.fsdp import tower_blocks
from alip.training.loop import main
from test_train_helpers import (assert_weights_close, final_state, free_port, gloo_worker,
                                read_results, run_single, tiny_argv)

WORLD, B, ACCUM, STEPS = 2, 4, 2, 12
SAMPLES = STEPS * WORLD * B * ACCUM


def _argv(logs, name, method, mode, *extra, batch=B):
    return tiny_argv(logs, name, "--method", method, "--lr", "5e-3", "--accum-freq", str(ACCUM),
                     "--accum-mode", mode, "--grad-clip-norm", "0.5", "--save-every-n-steps",
                     "4", *extra, samples=SAMPLES, batch=batch)


def _pair(logs, method, mode, *extra):
    return [_argv(logs / method / mode, "ddp", method, mode, *extra),
            _argv(logs / method / mode, "fsdp", method, mode, "--fsdp", *extra)]


# each rank's loss over its own rows: every gradient differs between the ranks, logit_scale's
# too (FSDP leaves that one whole on every rank and the step averages it by hand)
LOCAL = ("--local-loss", "--gather-with-grad")


def _spawn(runs, worker=gloo_worker):
    mp.spawn(worker, nprocs=WORLD, join=True, args=(WORLD, free_port(len(runs)), runs))


def _consolidated(run_dir, tag, out_dir):
    path = consolidate(run_dir / "checkpoints" / f"{tag}.dcp", out_dir / f"{tag}.pt")
    return torch.load(path, weights_only=True)


def _assert_as_ddp(root, tmp_path):
    ddp, fsdp = read_results(root / "ddp"), read_results(root / "fsdp")
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] == list(range(1, STEPS + 1))
    assert not any(r["skipped"] for r in ddp + fsdp)
    assert any(r["grad_norm"] > 0.5 for r in ddp)  # the clip acts
    for a, b in zip(ddp, fsdp):
        assert b["lr"] == a["lr"]
        for k, rel in (("loss", 1e-5), ("logit_scale", 1e-5), ("grad_norm", 1e-4)):
            assert b[k] == pytest.approx(a[k], rel=rel), (a["step"], k)
    whole = _consolidated(root / "fsdp", "epoch_1", tmp_path)
    assert whole["model"] == "ALIP-tiny" and whole["step"] == STEPS and whole["epoch"] == 1
    assert_weights_close(whole["state_dict"], final_state(root / "ddp", "epoch_1"))


@pytest.fixture(scope="module")
def clip_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    _spawn(_pair(root, "clip", "batch", *LOCAL))
    return root / "clip" / "batch"


def test_two_fsdp_ranks_train_as_two_ddp_ranks(clip_runs, tmp_path):
    _assert_as_ddp(clip_runs, tmp_path)
    d = clip_runs / "fsdp" / "checkpoints"
    names = sorted(p.name for p in d.iterdir())
    # keep-last 2: step_4 pruned whole; the newest two states kept; no temporary debris
    assert names == ["epoch_1.dcp", "epoch_1.state.pt", "index.json", "step_8.dcp",
                     "step_8.state.pt"]
    assert sorted(p.name for p in (d / "step_8.dcp" / "model").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]  # every rank wrote its shard
    assert ckpt.find_latest(d, verify=True).name == "epoch_1.dcp"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["batch", "micro"])
def test_alip_two_fsdp_ranks_train_as_two_ddp_ranks(tmp_path, mode):
    _spawn(_pair(tmp_path, "alip", mode))
    _assert_as_ddp(tmp_path / "alip" / mode, tmp_path)


@pytest.mark.slow
def test_every_method_under_fsdp_trains_as_under_ddp(tmp_path):
    """Every method (heads, criterion buffers, extra views, token features) for 3 accumulated
    steps: FSDP's losses are DDP's (each rank draws the same views and masks either way)."""
    from alip.methods import get_method, method_names
    from test_methods import MODELS, small_flags
    runs = []
    for m in method_names():
        for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
            runs.append(tiny_argv(tmp_path / m, name, "--method", m, "--model", MODELS[m],
                                  *small_flags(m), "--lr", "5e-3", "--accum-freq", "2",
                                  "--accum-mode", get_method(m).accum_modes[0],
                                  "--max-steps", "3", samples=64, batch=4))
    _spawn(runs)
    for m in method_names():
        ddp, fsdp = read_results(tmp_path / m / "ddp"), read_results(tmp_path / m / "fsdp")
        assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] == [1, 2, 3], m
        for a, b in zip(ddp, fsdp):
            assert not b["skipped"], m
            for k in a:
                if k.startswith(("loss", "ema_", "w_")):
                    assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (m, a["step"], k)


def test_two_rank_checkpoint_resumes_on_one_rank(clip_runs, tmp_path):
    """step_8 of the 2-rank run on 1 process with batch 2B (the same global batch): DCP
    reshards; steps 9-12 as the 2-rank run's to fp32 rounding (the same samples per step in
    another order, four steps from equal weights: measured loss <= 1.7e-7, grad_norm <= 4.2e-7
    relative; asserted at 1e-5)."""
    start = clip_runs / "fsdp" / "checkpoints" / "step_8.dcp"
    argv = lambda *x: _argv(tmp_path, "one", "clip", "batch", "--fsdp", *LOCAL, *x,
                            batch=WORLD * B)
    with pytest.raises(TrainConfigError, match=r"the global batch \(checkpoint 16 = "
                                               r"--batch-size 4 x 2 processes x --accum-freq, "
                                               r"now 8\)"):
        run_single(_argv(tmp_path, "one", "clip", "batch", "--fsdp", *LOCAL, "--resume",
                         str(start)))
    run_single(argv("--resume", str(start)))
    two = {r["step"]: r for r in read_results(clip_runs / "fsdp")}
    one = read_results(tmp_path / "one")
    assert [r["step"] for r in one] == [9, 10, 11, 12]
    for r in one:
        for k in ("loss", "grad_norm", "logit_scale"):
            assert r[k] == pytest.approx(two[r["step"]][k], rel=1e-5), (r["step"], k)
    assert_weights_close(_consolidated(tmp_path / "one", "epoch_1", tmp_path)["state_dict"],
                         _consolidated(clip_runs / "fsdp", "epoch_1", tmp_path / "one")
                         ["state_dict"])


@pytest.mark.parametrize("flags", [(), ("--grad-checkpointing", "--lock-image",
                                     "--lock-image-unlocked-groups", "2", "--lock-text",
                                     "--lock-text-unlocked-layers", "1",
                                     "--lock-text-freeze-layer-norm")],
                         ids=["plain", "checkpointing-locks"])
def test_one_fsdp_process_trains_as_one_plain_process(tmp_path, flags):
    """Also with activation checkpointing and the towers partly locked (blocks holding frozen
    and trainable parameters in one FSDP unit)."""
    argv = lambda name, *x: _argv(tmp_path, name, "alip", "batch", *flags, *x,
                                  batch=WORLD * B)
    run_single(argv("plain", "--max-steps", "4"))
    run_single(argv("fsdp", "--fsdp", "--max-steps", "4"))
    plain, fsdp = read_results(tmp_path / "plain"), read_results(tmp_path / "fsdp")
    assert [r["step"] for r in fsdp] == [1, 2, 3, 4]
    for a, b in zip(plain, fsdp):
        for k in ("loss", "grad_norm", "ema_tc", "w_sample_mean"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), (a["step"], k)


# ------------------------------------------------------------------------------ bad input

def _one_process_run(tmp_path):
    argv = lambda *x: tiny_argv(tmp_path, "r", "--fsdp", *x, samples=32, batch=8, epochs=2)
    run_single(argv())
    return argv, tmp_path / "r" / "checkpoints"


def _snapshot(d):
    return {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


def test_missing_shard_is_named_before_any_step(tmp_path):
    argv, d = _one_process_run(tmp_path)
    (d / "epoch_2.dcp" / "model" / "__0_0.distcp").unlink()
    before = _snapshot(d)
    with pytest.raises(SystemExit, match=r"^train.py: error: --resume \S+epoch_2.dcp: shard "
                                         r"file \S+epoch_2.dcp/model/__0_0.distcp is missing "
                                         r"\(a rank's shard\)$"):
        main(argv("--resume", str(d / "epoch_2.dcp")))
    assert _snapshot(d) == before
    lines = read_results(tmp_path / "r")
    assert [r["step"] for r in lines] == list(range(1, 9))  # no step ran
    with pytest.raises(SystemExit, match=r"^consolidate: error: .*epoch_2.dcp: shard file "
                                         r".*__0_0.distcp is missing"):
        from alip.training.consolidate import main as consolidate_main
        consolidate_main([str(d / "epoch_2.dcp"), str(tmp_path / "out.pt")])
    assert not (tmp_path / "out.pt").exists()
    # --resume latest passes over it (saying why) to the newest complete one
    warnings = []
    assert ckpt.find_latest(d, verify=True, warn=warnings.append).name == "epoch_1.dcp"
    assert "__0_0.distcp is missing" in warnings[0]


def test_debris_of_a_killed_save_is_not_a_checkpoint(tmp_path):
    argv, d = _one_process_run(tmp_path)
    shutil.copytree(d / "epoch_2.dcp", d / "step_9.dcp.tmp")  # a save killed before its rename
    assert ckpt.find_latest(d, verify=True).name == "epoch_2.dcp"
    out = run_single(argv("--resume", "latest"))
    assert out["step"] == 8 and out["epoch"] == 2


def test_wrong_kind_of_checkpoint(tmp_path):
    argv, d = _one_process_run(tmp_path)
    with pytest.raises(TrainConfigError, match=r"a sharded \(--fsdp\) checkpoint; resume it "
                                               r"with --fsdp"):
        run_single([a for a in argv("--resume", "latest") if a != "--fsdp"])
    plain = tiny_argv(tmp_path, "p", samples=32, batch=8)
    run_single(plain)
    with pytest.raises(TrainConfigError, match=r"a DDP checkpoint; resume it without --fsdp"):
        run_single(plain + ["--fsdp", "--resume", "latest"])


def test_a_tower_fsdp_cannot_shard_is_named():
    model = torch.nn.Module()
    model.visual = torch.nn.Linear(2, 2)
    with pytest.raises(TrainConfigError, match=r"^--fsdp: --model X's image tower \(Linear\) "
                                               r"has no transformer.resblocks"):
        tower_blocks(model, "X")


def test_fsdp_refuses_evaluation_during_training(tmp_path):
    with pytest.raises(SystemExit, match=r"^train.py: error: --fsdp with --retrieval-frequency"):
        main(tiny_argv(tmp_path, "e", "--fsdp", "--zeroshot-frequency", "1", "--zeroshot-root",
                       str(tmp_path)))
    assert not (tmp_path / "e").exists()


def test_fsdp_refuses_torchcompile_until_they_are_tested_together(tmp_path):
    with pytest.raises(SystemExit, match=r"^train.py: error: --fsdp with --torchcompile: "):
        main(tiny_argv(tmp_path, "c", "--fsdp", "--torchcompile"))
    assert not (tmp_path / "c").exists()


def test_fsdp_refuses_fp16_on_cuda():
    from alip.training.fsdp import policy
    with pytest.raises(TrainConfigError, match="--fsdp --precision amp: fp16"):
        policy("amp", torch.device("cuda", 0))
    assert policy("amp_bf16", torch.device("cpu")).param_dtype == torch.bfloat16
    assert policy("fp32", torch.device("cpu")).param_dtype is None


# ------------------------------------------------------------------------------ exact resume

def _killed_worker(rank, world_size, port, argv, kill_after_step):
    """One rank of a 2-rank --fsdp run that SIGKILLs itself right after optimizer step
    ``kill_after_step`` (every rank at the same step: a hard kill between checkpoints)."""
    from alip.training import loop
    step = loop.Trainer.optimizer_step

    def step_then_die(self, micro):
        out = step(self, micro)
        if self.pos.step == kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    loop.Trainer.optimizer_step = step_then_die
    gloo_worker(rank, world_size, port, argv)


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(clip_runs, tmp_path):
    cut = _argv(tmp_path, "cut", "clip", "batch", "--fsdp", *LOCAL)
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(_killed_worker, nprocs=WORLD, join=True, args=(WORLD, free_port(), cut, 6))
    d = tmp_path / "cut" / "checkpoints"
    assert ckpt.find_latest(d, verify=True).name == "step_4.dcp"
    _spawn([cut + ["--resume", "latest"]])
    full = {r["step"]: r for r in read_results(clip_runs / "fsdp")}
    got = read_results(tmp_path / "cut")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for r in got:
        for k in ("loss", "grad_norm", "lr", "logit_scale", "samples"):
            assert r[k] == full[r["step"]][k], (r["step"], k)
    a = _consolidated(clip_runs / "fsdp", "epoch_1", tmp_path)["state_dict"]
    b = _consolidated(tmp_path / "cut", "epoch_1", d)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
