#!/usr/bin/env bash
# The body of the SLURM batch scripts in this directory (they exec it; see docs/training.md
# "SLURM"). Runs one YFCC15M ViT-B/32 recipe as one job step inside the allocation:
#   LAUNCH=srun      one task per GPU (srun python train.py); every task finds its rank in
#                    SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS (open_clip_train.distributed)
#   LAUNCH=torchrun  one task per node running torchrun with NPROC_PER_NODE workers
# Arguments: RECIPE (ALIP, ALIP_subcaption, CLIP, CLIPS, SLIP, DECLIP, FILIP, DEFILIP), then
# extra train.py flags. Environment: TRAIN_DATA (required), LOGS (./logs: one directory every
# node shares), NAME (yfcc15m-B32-RECIPE), CONFIG (the recipe's), MASTER_PORT (from the job id),
# NPROC_PER_NODE (torchrun: the node's GPUs, else 8), PYTHON (REPO/.venv/bin/python),
# REQUEUE (1). Paths are relative to the directory the job runs in (sbatch: where you submitted).
# The same job resubmitted (or requeued) resumes: a fixed --name and --resume latest.
# Stopping: a USR1 to this shell (sbatch --signal=B:USR1@120, the time limit's warning) is
# passed to the step (srun hands it to every task; torchrun, told to handle USR1, to its
# workers); the ranks save at their next read-back and exit 128+signal (train.py
# --stop-signals); after a USR1 the job requeues itself (scontrol requeue) and resumes.
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "$0")/../.." && pwd)}
RECIPE=${1:?usage: launch.sh RECIPE [train.py flags]; RECIPE: ALIP, ALIP_subcaption, CLIP, CLIPS, SLIP, DECLIP, FILIP, DEFILIP}
shift
CONFIG=${CONFIG:-$REPO/configs/yfcc15m_vit_b32_${RECIPE,,}.yaml}
if [ ! -f "$CONFIG" ]; then
  echo "launch.sh: error: recipe $RECIPE: no $CONFIG; recipes: ALIP, ALIP_subcaption, CLIP, CLIPS, SLIP, DECLIP, FILIP, DEFILIP" >&2
  exit 2
fi
: "${TRAIN_DATA:?set TRAIN_DATA to the data2rec output directory of YFCC15M}"
: "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch (or run scripts/train_yfcc15m_B32_*.sh)}"
NAME=${NAME:-yfcc15m-B32-$RECIPE}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
LAUNCH=${LAUNCH:-srun}

# node 0 of the allocation hosts the rendezvous; a port of its own per job (jobs share nodes)
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${MASTER_ADDR:-${hosts%%$'\n'*}}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# srun (SLURM >= 22.05) does not inherit sbatch's --cpus-per-task
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
export NCCL_ALGO=${NCCL_ALGO:-Ring}   # as the reference script
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}  # torchrun: time to save

train=("$REPO/train.py" --config "$CONFIG" --train-data "$TRAIN_DATA" --logs-dir "${LOGS:-./logs}"
       --name "$NAME" --resume latest --stop-signals TERM,USR1 "$@")
case $LAUNCH in
  srun)
    step=(srun --kill-on-bad-exit=1 "$PYTHON" "${train[@]}") ;;
  torchrun)
    step=(srun --ntasks-per-node=1 --ntasks="${SLURM_NNODES:-1}" --kill-on-bad-exit=1
          "$PYTHON" -m torch.distributed.run --nnodes "${SLURM_NNODES:-1}"
          --nproc-per-node "${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
          --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID"
          --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 "${train[@]}") ;;
  *) echo "launch.sh: error: LAUNCH=$LAUNCH: srun or torchrun" >&2; exit 2 ;;
esac
echo "launch.sh: job $SLURM_JOB_ID ($LAUNCH) recipe $RECIPE, run $NAME, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2

# The step runs in the background so that this shell can take a signal while it waits
# (bash runs a trap only after the foreground command ends) and pass it on.
# USR1 (the B: form of --signal) reaches this shell only: pass it to srun, which hands it to
# every task. A TERM from SLURM (time limit, preemption, scancel) reaches every process of the
# job by itself: this shell only keeps waiting (a default TERM would end the job at once).
stopped_by= pid=
forward() { stopped_by=$1; [ -z "$pid" ] || kill -s "$1" "$pid" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'stopped_by=TERM' TERM
"${step[@]}" &
pid=$!
rc=0; wait "$pid" || rc=$?
while kill -0 "$pid" 2>/dev/null; do rc=0; wait "$pid" || rc=$?; done  # woken by a trap
trap - USR1 TERM
# the ranks saved and stopped on USR1 (srun: 138; torchrun reports 1): come back, resume
if [ "${REQUEUE:-1}" = 1 ] && { [ "$rc" = 138 ] || { [ "$stopped_by" = USR1 ] && [ "$rc" != 0 ]; }; }; then
  echo "launch.sh: stopped by USR1 (exit $rc): scontrol requeue $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
