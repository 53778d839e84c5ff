"""--stop-signals: on SIGTERM (SLURM's warning before a preemption or the time limit; torchrun
forwards it to its workers) every rank saves a checkpoint at the same step and the run exits
with 143; resuming from it is bit-identical to the run that was never stopped. A second signal
ends the process at once. The same holds when the signal reaches the whole process group, as
SLURM and torchrun send it: the data workers get it too, and ignore it."""
import glob
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from alip.training import checkpoint as ckpt
from alip.training.params import parse_args
from alip.training.preemption import REPEAT_WINDOW, parse_signals
from test_train_helpers import assert_same_run, free_port, read_results, run_single, tiny_argv
from test_train_resume import EXACT_KEYS


def signalled_worker(argv, at_step, times=1, rank=0, world_size=1, port=None, signal_ranks=(0,),
                     group=None, gap=None):
    """train.py's main in this (spawned) process, rank ``rank`` of ``world_size`` (gloo); after
    optimizer step ``at_step`` a rank in ``signal_ranks`` sends itself SIGTERM ``times`` times,
    ``gap`` seconds apart (default: past the window in which a repeat is the same notice, so
    the second is a second request; 0: back to back, as SLURM's and torchrun's copies come).
    With ``group`` (a file) the process leads its own process group, as torchrun starts each
    rank, and another process sends the SIGTERMs to the whole group, as SLURM and torchrun do:
    the DataLoader workers get them too (their pids are written to ``group`` first). Exits with
    main's status."""
    from alip.training import logger
    from alip.training.loop import main
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    if group:
        os.setpgid(0, 0)
        # a spawned process would spawn its DataLoader workers; train.py's, started by python or
        # torchrun, forks them
        mp.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    step, counter = logger.RunLogger.step, {"n": 0}

    def step_then_signal(self):
        step(self)
        counter["n"] += 1
        if counter["n"] == at_step and rank in signal_ranks:
            if group:
                with open(group, "w") as f:
                    f.write(" ".join(map(str, children(os.getpid()))))
            for i in range(times):
                if i:
                    time.sleep(REPEAT_WINDOW + 0.5 if gap is None else gap)
                if group:
                    from_elsewhere(f"killpg({os.getpgrp()}, {int(signal.SIGTERM)})")
                else:
                    os.kill(os.getpid(), signal.SIGTERM)

    logger.RunLogger.step = step_then_signal
    raise SystemExit(main(argv))


def children(pid):
    """The pids of the child processes of ``pid`` (Linux: /proc)."""
    return [int(c) for f in glob.glob(f"/proc/{pid}/task/*/children")
            for c in open(f).read().split()]


def from_elsewhere(call):
    """``os.<call>`` (a kill or killpg) run by another, short-lived process, as SLURM or torchrun
    send a signal: a data worker tells its parent's signals from anyone else's. (Killing its own
    group, that process gets the signal too.)"""
    subprocess.run([sys.executable, "-I", "-S", "-c", f"import os; os.{call}"])


def ended(pid):
    """Whether process ``pid`` is gone (or a zombie left to init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def pending(pid, sig):
    """Whether ``sig`` waits, blocked, for process ``pid`` (Linux: /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = [int(line.split()[1], 16) for line in f if line.startswith(("SigPnd", "ShdPnd"))]
    except FileNotFoundError:
        return False
    return any(m >> (int(sig) - 1) & 1 for m in masks)


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
            try:
                os.killpg(p.pid, signal.SIGKILL)  # with its data workers, when it leads a group
            except (ProcessLookupError, PermissionError):
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


def test_the_same_signal_twice_at_once_is_one_notice(tmp_path):
    """srun torchrun: SLURM signals every process of the step and torchrun forwards its copy to
    each rank milliseconds later. Taken as a second request, it killed the rank unsaved; one
    notice delivered twice, it saves and stops as one signal does."""
    assert spawn([(argv_of(tmp_path, "dup"), 3, 2, 0, 1, None, (0,), None, 0.0)]) == [143]
    assert ckpt.has_checkpoints(tmp_path / "dup" / "checkpoints")
    state = torch.load(tmp_path / "dup" / "checkpoints" / "step_4.state.pt", weights_only=False)
    assert state["step"] == 4


def test_signal_names():
    assert parse_signals("TERM, sigusr1") == [signal.SIGTERM, signal.SIGUSR1]
    assert parse_signals("") == []
    accepted = "; accepted: HUP, INT, QUIT, USR1, USR2, ALRM, TERM, XCPU"
    for bad, why in [("KILL", "a signal a process can catch"), ("STOP", "a signal a process can catch"),
                     ("FOO", "a signal name"), ("SIG_DFL", "a signal name")]:
        with pytest.raises(ValueError) as e:
            parse_signals(bad)
        assert str(e.value) == f"{bad!r} is not {why}{accepted}"


@pytest.mark.parametrize("name", ["SEGV", "sigchld", "BUS", "FPE", "CONT", "PIPE"])
def test_a_signal_no_handler_can_serve_is_refused_naming_the_flag(tmp_path, name):
    # a fault returns to the faulting instruction (the handler would run forever, or never save);
    # CHLD comes with every child's exit (a data worker's too), CONT with every resume, PIPE with
    # a write to a closed pipe
    with pytest.raises(SystemExit) as e:
        parse_args(tiny_argv(tmp_path, "r", "--stop-signals", f"TERM,{name}"))
    assert str(e.value) == (f"train.py: error: --stop-signals 'TERM,{name}': {name.upper()!r} is not a "
                            f"request to stop that a handler can serve; accepted: HUP, INT, QUIT, "
                            f"USR1, USR2, ALRM, TERM, XCPU")


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


# ---- the signal to the whole process group, data workers included ---------------------------

@pytest.fixture
def shards(tmp_path):
    """48 demo records in 3 shards (6 batches of 8 per epoch, as argv_of's synthetic runs)."""
    from alip.data import demo_world
    demo_world.generate(tmp_path / "world", num_train=48, num_test=1, classify_train_per_class=0,
                        classify_val_per_class=1, shard_size=20, progress=False)
    return tmp_path / "world" / "shards"


def reader_argv(tmp_path, name, shards, backend, *extra):
    return argv_of(tmp_path, name, "--dataset-type", "rec", "--train-data", str(shards),
                   "--data-backend", backend, "--workers", "2", *extra)


# dali: slow, as it cannot fail on the code before the fix: DALI (CPU pipelines, no parallel
# external source) reads with threads of the rank, no process (the test checks that too)
@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.slow)])
def test_sigterm_to_the_process_group_saves_and_resumes_bit_identically(tmp_path, shards, backend):
    # SLURM signals every process of the job step, torchrun a rank's whole process group: the
    # torch reader's 2 DataLoader workers get the SIGTERM too (they used to die of it, and the
    # rank with them: "DataLoader worker ... is killed by signal: Terminated", exit 1, nothing
    # saved); DALI reads with threads of the rank itself
    argv = lambda name, *x: reader_argv(tmp_path, name, shards, backend, *x)
    run_single(argv("full"))
    pids = tmp_path / "workers"
    assert spawn([(argv("cut"), 3, 1, 0, 1, None, (0,), str(pids))]) == [128 + signal.SIGTERM]
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == (2 if backend == "torch" else 0)
    assert all(map(ended, workers))  # shut down by the rank on its way out
    assert ckpt.find_latest(tmp_path / "cut" / "checkpoints").name == "step_4.pt"
    assert "SIGTERM (on rank(s) of this job) at step 4: saving, then stopping" in \
        (tmp_path / "cut" / "out.log").read_text()

    out = run_single(argv("cut", "--resume", "latest"))
    assert out["stopped_by"] is None and out["step"] == 12
    assert_same_run(tmp_path / "full", tmp_path / "cut", range(2, 13, 2), EXACT_KEYS)


def test_a_second_sigterm_to_the_process_group_ends_the_run_and_its_workers(tmp_path, shards):
    # the workers ignore both signals now; they must still end with their rank, never hang on
    pids = tmp_path / "workers"
    argv = reader_argv(tmp_path, "twice", shards, "torch")
    assert spawn([(argv, 1, 2, 0, 1, None, (0,), str(pids))]) == [-signal.SIGTERM]
    assert not ckpt.has_checkpoints(tmp_path / "twice" / "checkpoints")
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 60  # they see their parent gone within torch's 5 s check
    while not all(map(ended, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(map(ended, workers)), "a data worker outlived its rank"


def test_a_data_worker_drops_a_stop_signal_from_others_and_ends_on_its_parents(shards):
    # what the run above relies on, and what keeps a rank from hanging at its exit: the
    # DataLoader's terminate() (and multiprocessing's, at the interpreter's exit) is a SIGTERM
    # from the worker's parent, and still ends it, with status 0 as torch's own handler does
    from alip.data.loader import build_train_loader
    from alip.training.preemption import StopOnSignal
    loader = build_train_loader(shards, batch_size=8, image_size=32, workers=1, augment=False)
    stopper, worker = StopOnSignal([signal.SIGTERM]).install(), None
    try:
        batches = iter(loader)
        next(batches)  # the worker starts
        (worker,) = loader._loader._iterator._workers  # torch's
        from_elsewhere(f"kill({worker.pid}, {int(signal.SIGTERM)})")
        deadline = time.monotonic() + 60  # taken (and dropped) by the worker's signal thread
        while pending(worker.pid, signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(batches)) == 5
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(60)
        assert worker.exitcode == 0
    finally:
        stopper.restore()
        if worker is not None and worker.is_alive():  # else this process would wait for it at its exit
            worker.kill()
