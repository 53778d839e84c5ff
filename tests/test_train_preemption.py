"""--stop-signals: on SIGTERM (SLURM's warning before a preemption or the time limit; torchrun
forwards it to its workers) every rank saves a checkpoint at the same step and the run exits
with 143; resuming from it is bit-identical to the run that was never stopped. A second signal
ends the process at once."""
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from alip.training import checkpoint as ckpt
from alip.training.preemption import parse_signals
from test_train_helpers import assert_same_run, free_port, read_results, run_single, tiny_argv
from test_train_resume import EXACT_KEYS


def signalled_worker(argv, at_step, times=1, rank=0, world_size=1, port=None, signal_ranks=(0,)):
    """train.py's main in this (spawned) process, rank ``rank`` of ``world_size`` (gloo); after
    optimizer step ``at_step`` a rank in ``signal_ranks`` sends itself SIGTERM ``times`` times.
    Exits with main's status."""
    from alip.training import logger
    from alip.training.loop import main
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    step, counter = logger.RunLogger.step, {"n": 0}

    def step_then_signal(self):
        step(self)
        counter["n"] += 1
        if counter["n"] == at_step and rank in signal_ranks:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGTERM)

    logger.RunLogger.step = step_then_signal
    raise SystemExit(main(argv))


def spawn(target_args):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=signalled_worker, args=a) for a in target_args]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 180  # a normal run takes ~10 s
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:  # a rank left waiting on the others would hang: the test fails instead
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def argv_of(tmp_path, name, *extra):
    # 6 steps per epoch, 2 epochs; the steps are read back every 2 steps
    return tiny_argv(tmp_path, name, "--lr", "5e-3", "--log-every-n-steps", "2", *extra,
                     samples=48, batch=8, epochs=2)


def test_sigterm_saves_at_the_next_read_back_and_resumes_bit_identically(tmp_path):
    run_single(argv_of(tmp_path, "full"))
    # SIGTERM after step 3: the next read-back is step 4, mid-epoch 0
    assert spawn([(argv_of(tmp_path, "cut"), 3)]) == [128 + signal.SIGTERM]
    cut_dir = tmp_path / "cut" / "checkpoints"
    assert ckpt.find_latest(cut_dir).name == "step_4.pt"
    assert [r["step"] for r in read_results(tmp_path / "cut")] == [2, 4]
    assert "SIGTERM (on rank(s) of this job) at step 4: saving, then stopping" in \
        (tmp_path / "cut" / "out.log").read_text()

    out = run_single(argv_of(tmp_path, "cut", "--resume", "latest"))
    assert out["stopped_by"] is None and out["step"] == 12
    assert_same_run(tmp_path / "full", tmp_path / "cut", range(2, 13, 2), EXACT_KEYS)


def test_a_signal_at_an_epochs_last_read_back_saves_that_epoch(tmp_path):
    # read-backs every 3 steps: the signal after step 5 is seen at step 6, epoch 0's last;
    # --save-frequency 2 would not save epoch 1, the signal does
    argv = argv_of(tmp_path, "e", "--log-every-n-steps", "3", "--save-frequency", "2")
    assert spawn([(argv, 5)]) == [128 + signal.SIGTERM]
    latest = ckpt.find_latest(tmp_path / "e" / "checkpoints")
    assert latest.name == "epoch_1.pt"
    state = torch.load(str(latest).replace(".pt", ".state.pt"), weights_only=False)
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 0, 6)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    port = free_port()
    argv = argv_of(tmp_path, "ddp", "--batch-size", "4")
    codes = spawn([(argv, 3, 1, rank, 2, port, (1,)) for rank in range(2)])
    assert codes == [128 + signal.SIGTERM] * 2  # rank 0 never received it
    assert ckpt.find_latest(tmp_path / "ddp" / "checkpoints").name == "step_4.pt"
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step_4.state.pt", weights_only=False)
    assert (state["step"], state["batch_in_epoch"], len(state["rng"])) == (4, 4, 2)


def test_a_second_signal_ends_the_process_at_once(tmp_path):
    assert spawn([(argv_of(tmp_path, "twice"), 1, 2)]) == [-signal.SIGTERM]
    assert not ckpt.has_checkpoints(tmp_path / "twice" / "checkpoints")


def test_signal_names():
    assert parse_signals("TERM, sigusr1") == [signal.SIGTERM, signal.SIGUSR1]
    assert parse_signals("") == []
    for bad in ("KILL", "FOO", "SIG_DFL"):
        with pytest.raises(ValueError, match="is not a signal a process can catch"):
            parse_signals(bad)


def test_a_signal_at_the_runs_last_step_is_a_finished_run(tmp_path):
    assert spawn([(argv_of(tmp_path, "last"), 12)]) == [0]  # read back at step 12, the last
    assert ckpt.find_latest(tmp_path / "last" / "checkpoints").name == "epoch_2.pt"


def test_a_run_outside_the_main_thread_keeps_the_default_handlers(tmp_path):
    import threading
    out, before = {}, signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=lambda: out.update(run_single(argv_of(tmp_path, "t", "--max-steps", "2"))))
    t.start()
    t.join(120)
    assert out["step"] == 2 and out["stopped_by"] is None
    assert signal.getsignal(signal.SIGTERM) is before
