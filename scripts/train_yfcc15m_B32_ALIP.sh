#!/usr/bin/env bash
# ALIP ViT-B/32 on YFCC15M with the reference recipe (configs/yfcc15m_vit_b32_alip.yaml):
# one node of 8 GPUs, batch 512 per GPU (global 4096), 32 epochs:
#   TRAIN_DATA=/data/yfcc15m_rec scripts/train_yfcc15m_B32_ALIP.sh [extra train.py flags]
# Recipes for several nodes (SLIP, DeCLIP, FILIP, DeFILIP: 4 x 8 GPUs) run the same command on
# every node with NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0>. Each recipe's
# global-batch-size makes a launch on another number of GPUs fail at start-up, naming the count.
# Restarting the command resumes the run from its newest complete checkpoint.
# Environment: TRAIN_DATA (required), NNODES (1), NODE_RANK and MASTER_ADDR (required when
# NNODES > 1), NPROC_PER_NODE (8), MASTER_PORT (29500), LOGS (./logs: one directory every node
# shares), CONFIG, NAME. Paths, here and in extra flags, are relative to the current directory.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
: "${TRAIN_DATA:?set TRAIN_DATA to the data2rec output directory of YFCC15M}"
CONFIG=${CONFIG:-$REPO/configs/yfcc15m_vit_b32_alip.yaml}
NAME=${NAME:-yfcc15m-B32-ALIP}
NNODES=${NNODES:-1}
if [ "$NNODES" != 1 ]; then  # the defaults (node 0 at 127.0.0.1) would make every node wait
  : "${MASTER_ADDR:?NNODES=$NNODES: set MASTER_ADDR to the address of node 0, on every node}"
  : "${NODE_RANK:?NNODES=$NNODES: set NODE_RANK (0 to NNODES-1) on every node}"
fi
export NCCL_ALGO=${NCCL_ALGO:-Ring}   # as the reference script
# on SIGTERM (a preemption) torchrun gives the workers this long to save (train.py --stop-signals)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
exec "$REPO/.venv/bin/torchrun" \
  --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC_PER_NODE:-8}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  "$REPO/train.py" --config "$CONFIG" --train-data "$TRAIN_DATA" --logs-dir "${LOGS:-./logs}" \
  --name "$NAME" --resume latest "$@"
