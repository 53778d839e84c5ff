"""A stand-in for SLURM's srun and scontrol on this machine, so that the real batch scripts of
scripts/slurm/ run as a job's batch shell would (tests/test_slurm.py).

``srun`` starts the step's tasks with the variables slurmstepd gives each task (SLURM_PROCID,
SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS, SLURM_STEP_ID), each task in a process group of its
own; it hands the signals it receives to every task (as srun does), ends the other tasks with
SIGKILL as soon as one exits non-zero under ``--kill-on-bad-exit=1``, writes the tasks' pids to
FAKE_SLURM/tasks and exits with the highest exit status (128 + n for a task killed by signal n).
``scontrol show hostnames`` prints a comma list one name a line; ``scontrol requeue ID`` appends
the id to FAKE_SLURM/requeued. One node only: --ntasks / --ntasks-per-node count the tasks."""
import os
import stat
import sys
from pathlib import Path

SRUN = r'''
import os, signal, subprocess, sys, time
args, opts = sys.argv[1:], {}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
env_n = os.environ.get("SLURM_NTASKS", "1")
n = int(opts.get("ntasks") or opts.get("ntasks-per-node") or env_n)
tasks = []
for rank in range(n):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
               SLURM_NTASKS=str(n), SLURM_STEP_ID="0")
    tasks.append(subprocess.Popen(args, env=env, start_new_session=True))
state = os.environ["FAKE_SLURM"]
with open(os.path.join(state, "tasks.tmp"), "w") as f:
    f.write(" ".join(str(t.pid) for t in tasks))
os.replace(os.path.join(state, "tasks.tmp"), os.path.join(state, "tasks"))
with open(os.path.join(state, "srun.log"), "a") as f:
    f.write(f"{opts} {args}\n")
def forward(sig, frame):
    for t in tasks:
        if t.poll() is None:
            t.send_signal(sig)
for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, forward)
codes = {}
while len(codes) < n:
    for i, t in enumerate(tasks):
        if i not in codes and t.poll() is not None:
            codes[i] = t.returncode if t.returncode >= 0 else 128 - t.returncode
            if codes[i] and opts.get("kill-on-bad-exit") == "1":
                for other in tasks:
                    if other.poll() is None:
                        other.kill()
    time.sleep(0.05)
sys.exit(max(codes.values()))
'''

SCONTROL = r'''
import os, sys
a = sys.argv[1:]
if a[:2] == ["show", "hostnames"]:
    print("\n".join(a[2].split(",")))
elif a[:1] == ["requeue"]:
    with open(os.path.join(os.environ["FAKE_SLURM"], "requeued"), "a") as f:
        f.write(a[1] + "\n")
else:
    sys.exit(f"fake scontrol: {a} not emulated")
'''


def install(state_dir):
    """srun and scontrol in ``state_dir``/bin -> the environment a batch shell sees (PATH first,
    FAKE_SLURM for their records)."""
    bin_dir = Path(state_dir, "bin")
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL)):
        p = bin_dir / name
        p.write_text(f"#!{sys.executable}\n{body}")
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM": str(state_dir)}
