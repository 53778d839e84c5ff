"""The SLURM batch scripts (scripts/slurm/): their body runs as a job's batch shell would, with
tests/slurm_fakes.py's srun and scontrol on PATH starting 2 tasks on this machine (CPU, gloo,
ALIP-tiny on synthetic data over the real recipe's flags). A second submission resumes; a USR1
to the batch shell (--signal=B:USR1) or to the tasks themselves (--signal=USR1, scancel
--signal) makes the ranks save and stop, and the job requeue itself; the requeued job ends with
the weights of a run never stopped, bit for bit."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import slurm_fakes
from test_train_helpers import final_state, free_port, read_results

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "scripts" / "slurm"
JOB = "4242"
# the recipe's own flags, made tiny: 2 ranks x 4 = global batch 8, 16 steps per epoch
TINY = ["--model", "ALIP-tiny", "--dataset-type", "synthetic", "--train-num-samples", "128",
        "--batch-size", "4", "--global-batch-size", "8", "--epochs", "2", "--precision", "fp32",
        "--device", "cpu", "--workers", "0", "--report-to", "", "--log-every-n-steps", "1",
        "--cpu-threads", "1", "--seed", "0", "--save-every-n-steps", "0", "--save-frequency", "1"]


def job_env(tmp_path, **extra):
    state = tmp_path / "slurm"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(slurm_fakes.install(state), SLURM_JOB_ID=JOB, SLURM_JOB_NODELIST="localhost",
               SLURM_NNODES="1", SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="1",
               SLURM_SUBMIT_DIR=str(tmp_path), PYTHON=sys.executable, TRAIN_DATA="unused",
               LOGS="logs", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    env.update(extra)
    return env


def submit(tmp_path, script, *argv, env=None, **extra):
    """The batch script started as sbatch starts it: in the submit directory -> Popen."""
    full = job_env(tmp_path, **extra) if env is None else env
    (tmp_path / "slurm" / "tasks").unlink(missing_ok=True)
    return subprocess.Popen([str(SLURM / script), *argv], cwd=tmp_path, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def steps_of(run_dir):
    p = run_dir / "results.jsonl"
    return [r["step"] for r in read_results(run_dir)] if p.exists() else []


def wait_for_step(proc, run_dir, step, timeout=300):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before step {step}: "
                                 f"{proc.communicate()[0][-3000:]}")
        if len(steps_of(run_dir)) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {timeout} s")


def requeued(tmp_path):
    p = tmp_path / "slurm" / "requeued"
    return p.read_text().split() if p.exists() else []


def task_pids(tmp_path):
    return [int(p) for p in (tmp_path / "slurm" / "tasks").read_text().split()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The recipe run never stopped, through the same script (the reference for the others)."""
    tmp = tmp_path_factory.mktemp("full")
    rc, out = finish(submit(tmp, "yfcc15m_B32_1x8.sbatch", "ALIP", *TINY))
    assert rc == 0, out[-3000:]
    assert steps_of(tmp / "logs" / "yfcc15m-B32-ALIP") == list(range(1, 33))
    assert requeued(tmp) == []
    return tmp / "logs" / "yfcc15m-B32-ALIP"


def assert_resumed_like(run_dir, full_dir):
    steps = steps_of(run_dir)
    assert steps == list(range(1, 33)), steps  # each step once: the resumes continued
    full = {r["step"]: r for r in read_results(full_dir)}
    for r in read_results(run_dir):
        assert r["loss"] == full[r["step"]]["loss"], r["step"]
    a, b = final_state(full_dir, "epoch_2"), final_state(run_dir, "epoch_2")
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)


def torch_equal(x, y):
    import torch
    return torch.equal(x, y)


@pytest.mark.slow
def test_srun_tasks_stop_on_usr1_requeue_and_resume_bit_identically(tmp_path, full_run):
    """Submission 1: USR1 to the batch shell (--signal=B:USR1@120), which hands it to srun and
    srun to the tasks. Submission 2 (the requeue): USR1 to the tasks' process groups directly,
    as --signal=USR1@120 (no B:) or scancel --signal=USR1 send it. Submission 3 finishes."""
    run_dir = tmp_path / "logs" / "yfcc15m-B32-ALIP"
    env = job_env(tmp_path)
    job = submit(tmp_path, "yfcc15m_B32_1x8.sbatch", "ALIP", *TINY, env=env)
    wait_for_step(job, run_dir, 3)
    job.send_signal(signal.SIGUSR1)
    rc, out = finish(job)
    assert rc == 128 + signal.SIGUSR1, out[-3000:]
    assert requeued(tmp_path) == [JOB], out[-3000:]
    first = steps_of(run_dir)
    assert 3 <= len(first) < 32 and (run_dir / "checkpoints" / "index.json").exists()

    job = submit(tmp_path, "yfcc15m_B32_1x8.sbatch", "ALIP", *TINY, env=env)
    wait_for_step(job, run_dir, len(first) + 3)
    for pid in task_pids(tmp_path):
        os.killpg(pid, signal.SIGUSR1)
    rc, out = finish(job)
    assert rc == 128 + signal.SIGUSR1, out[-3000:]
    assert requeued(tmp_path) == [JOB, JOB]
    assert re.search(rf"resumed from \S+: epoch \d, batch \d+, step {len(first)}\b", out), out[-3000:]

    rc, out = finish(submit(tmp_path, "yfcc15m_B32_1x8.sbatch", "ALIP", *TINY, env=env))
    assert rc == 0, out[-3000:]
    assert requeued(tmp_path) == [JOB, JOB]  # a finished run is not requeued
    assert_resumed_like(run_dir, full_run)


@pytest.mark.slow
def test_one_torchrun_per_node_stops_on_usr1_and_resumes_bit_identically(tmp_path, full_run):
    """The torchrun variant: srun starts one torchrun (2 workers); USR1 to the batch shell goes
    through srun to torchrun, which was told to handle it, and on to the workers."""
    run_dir = tmp_path / "logs" / "yfcc15m-B32-ALIP"
    env = job_env(tmp_path, SLURM_NTASKS="1", NPROC_PER_NODE="2")
    job = submit(tmp_path, "yfcc15m_B32_torchrun.sbatch", "ALIP", *TINY, env=env)
    wait_for_step(job, run_dir, 3)
    job.send_signal(signal.SIGUSR1)
    rc, out = finish(job)
    assert rc != 0 and requeued(tmp_path) == [JOB], out[-3000:]
    assert "'ntasks': '1'" in (tmp_path / "slurm" / "srun.log").read_text()
    rc, out = finish(submit(tmp_path, "yfcc15m_B32_torchrun.sbatch", "ALIP", *TINY, env=env))
    assert rc == 0, out[-3000:]
    assert_resumed_like(run_dir, full_run)


def test_the_step_line(tmp_path):
    """What the 1x8 script hands srun: one task per GPU running train.py with the recipe's
    config, a fixed run name and --resume latest; node 0 of the list as the rendezvous, a port
    from the job id, sbatch's --cpus-per-task passed on to srun."""
    env = job_env(tmp_path, SLURM_JOB_NODELIST="gpu7,gpu8", SLURM_CPUS_PER_TASK="10",
                  PYTHON="/bin/echo")
    del env["MASTER_PORT"]
    env["PATH"] = env["PATH"]
    rc, out = finish(submit(tmp_path, "yfcc15m_B32_1x8.sbatch", "CLIP", "--epochs", "1", env=env))
    assert rc == 0, out
    line = [ln for ln in out.splitlines() if "train.py" in ln and "--config" in ln][0]
    assert line.split() == [
        str(REPO / "train.py"), "--config", str(REPO / "configs/yfcc15m_vit_b32_clip.yaml"),
        "--train-data", "unused", "--logs-dir", "logs", "--name", "yfcc15m-B32-CLIP", "--resume",
        "latest", "--stop-signals", "TERM,USR1", "--epochs", "1"]
    assert "rendezvous gpu7:24242" in out  # 20000 + 4242 % 20000


def test_the_step_environment(tmp_path):
    env = job_env(tmp_path, SLURM_JOB_NODELIST="gpu7,gpu8", SLURM_CPUS_PER_TASK="10",
                  PYTHON=str(tmp_path / "show_env"))
    del env["MASTER_PORT"]
    (tmp_path / "show_env").write_text("#!/bin/sh\necho \"$SLURM_PROCID $MASTER_ADDR "
                                       "$MASTER_PORT $SRUN_CPUS_PER_TASK\"\n")
    (tmp_path / "show_env").chmod(0o755)
    rc, out = finish(submit(tmp_path, "yfcc15m_B32_1x8.sbatch", "ALIP", env=env))
    assert rc == 0, out
    assert sorted(ln for ln in out.splitlines() if ln.endswith(" 10")) == [
        "0 gpu7 24242 10", "1 gpu7 24242 10"]


@pytest.mark.parametrize("script, default", [("yfcc15m_B32_1x8.sbatch", "ALIP"),
                                             ("yfcc15m_B32_4x8.sbatch", "DECLIP"),
                                             ("yfcc15m_B32_torchrun.sbatch", "ALIP")])
def test_the_default_recipe(tmp_path, script, default):
    rc, out = finish(submit(tmp_path, script, env=job_env(tmp_path, PYTHON="/bin/echo")))
    assert rc == 0 and f"recipe {default}," in out, out


def headers(script):
    text = (SLURM / script).read_text()
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M)), text


@pytest.mark.parametrize("script", ["yfcc15m_B32_1x8.sbatch", "yfcc15m_B32_4x8.sbatch"])
def test_each_recipe_named_fits_the_allocation(script):
    """The recipes a script's usage names have their global batch on its nodes x tasks (the
    run would refuse to start otherwise), and the script asks for a GPU per task, the warning
    before the time limit to its shell, and requeueing."""
    h, text = headers(script)
    tasks = int(h["nodes"]) * int(h["ntasks-per-node"])
    assert h["gres"] == f"gpu:{h['ntasks-per-node']}"
    assert h["signal"] == "B:USR1@120" and "#SBATCH --requeue" in text
    named = re.search(r"^# Recipes: (.*)$", text, re.M).group(1).split()
    assert len(named) == 4 and set(re.findall(r"sbatch scripts/slurm/\S+ (\w+)", text)) <= set(named)
    for recipe in named:
        cfg = yaml.safe_load((REPO / f"configs/yfcc15m_vit_b32_{recipe.lower()}.yaml").read_text())
        assert cfg["batch-size"] * tasks == cfg["global-batch-size"], recipe


def test_an_unknown_recipe_is_one_line_naming_it(tmp_path):
    rc, out = finish(submit(tmp_path, "yfcc15m_B32_1x8.sbatch", "ALPI",
                            env=job_env(tmp_path, PYTHON="/bin/echo")))
    assert rc == 2 and out.strip().startswith("launch.sh: error: recipe ALPI: no ")
    assert len(out.strip().splitlines()) == 1


def test_outside_a_job_and_outside_the_repository(tmp_path):
    env = {k: v for k, v in job_env(tmp_path).items() if k != "SLURM_JOB_ID"}
    rc, out = finish(submit(tmp_path, "yfcc15m_B32_1x8.sbatch", env=env))
    assert rc == 1 and "not inside a SLURM job: submit with sbatch" in out
    # sbatch's copy of the script, in a spool directory, submitted from elsewhere
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = spool / "slurm_script"
    copy.write_text((SLURM / "yfcc15m_B32_1x8.sbatch").read_text())
    copy.chmod(0o755)
    r = subprocess.run([str(copy)], cwd=tmp_path, env=job_env(tmp_path), capture_output=True,
                       text=True)
    assert r.returncode == 2 and "slurm_script: error: no train.py in " in r.stderr
    r = subprocess.run([str(copy)], cwd=tmp_path, capture_output=True, text=True,
                       env=job_env(tmp_path, SLURM_SUBMIT_DIR=str(REPO), PYTHON="/bin/echo"))
    assert r.returncode == 0 and "recipe ALIP," in r.stderr, r.stderr


RANK = r'''#!{python}
import os, signal, sys, time
def stop(sig, frame):
    open(os.path.join(os.environ["FAKE_SLURM"], f"got-{{sig}}-" + os.environ["SLURM_PROCID"]), "w")
    sys.exit(int(os.environ.get("RANK_EXIT", 128 + sig)))
signal.signal(signal.SIGUSR1, stop)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(os.environ["FAKE_SLURM"], "ready-" + os.environ["SLURM_PROCID"]), "w")
time.sleep(120)
sys.exit(3)
'''


def rank_stub(tmp_path):
    """A task that waits for a stop signal, notes it, and exits 128 + the signal (saved and
    stopped, as train.py), or RANK_EXIT."""
    p = tmp_path / "rank"
    p.write_text(RANK.format(python=sys.executable))
    p.chmod(0o755)
    return str(p)


def ready(tmp_path, job, n=2, timeout=60):
    end = time.monotonic() + timeout
    while not all((tmp_path / "slurm" / f"ready-{r}").exists() for r in range(n)):
        assert job.poll() is None and time.monotonic() < end, job.communicate()[0]
        time.sleep(0.05)


@pytest.mark.parametrize("rank_exit, requeues", [(None, [JOB]), ("0", [])])
def test_a_usr1_to_the_batch_shell_reaches_every_task(tmp_path, rank_exit, requeues):
    """--signal=B:USR1 signals the batch shell only: it passes the signal to srun, srun to
    every task; tasks that saved and stopped (138) get the job requeued, a finished run (0)
    does not."""
    env = job_env(tmp_path, PYTHON=rank_stub(tmp_path), **({"RANK_EXIT": rank_exit} if rank_exit else {}))
    job = submit(tmp_path, "yfcc15m_B32_1x8.sbatch", "ALIP", env=env)
    ready(tmp_path, job)
    job.send_signal(signal.SIGUSR1)
    rc, out = finish(job, timeout=60)
    assert rc == int(rank_exit or 128 + signal.SIGUSR1), out
    assert all((tmp_path / "slurm" / f"got-{int(signal.SIGUSR1)}-{r}").exists() for r in (0, 1))
    assert requeued(tmp_path) == requeues


def test_a_term_to_the_batch_shell_is_not_passed_on(tmp_path):
    """SLURM sends its TERM to every process itself: the shell neither dies of it (that would end
    the job under the saving ranks) nor passes it on (a second notice), nor requeues."""
    env = job_env(tmp_path, PYTHON=rank_stub(tmp_path))
    job = submit(tmp_path, "yfcc15m_B32_1x8.sbatch", "ALIP", env=env)
    ready(tmp_path, job)
    job.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert job.poll() is None and not list((tmp_path / "slurm").glob("got-*"))
    for pid in task_pids(tmp_path):  # SLURM's own TERM to the tasks
        os.killpg(pid, signal.SIGTERM)
    rc, out = finish(job, timeout=60)
    assert rc == 128 + signal.SIGTERM and requeued(tmp_path) == [], out
