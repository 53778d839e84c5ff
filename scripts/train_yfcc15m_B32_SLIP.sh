#!/usr/bin/env bash
# SLIP ViT-B/32 on YFCC15M with the DeCLIP toolbox's recipe (configs/yfcc15m_vit_b32_slip.yaml):
# batch 128 per GPU x 32 GPUs. Same environment variables as train_yfcc15m_B32_ALIP.sh:
#   TRAIN_DATA=/data/yfcc15m_rec NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0> \
#     scripts/train_yfcc15m_B32_SLIP.sh [extra train.py flags]
set -euo pipefail
CONFIG=${CONFIG:-$(dirname "$0")/../configs/yfcc15m_vit_b32_slip.yaml} NAME=${NAME:-yfcc15m-B32-SLIP} \
  exec "$(dirname "$0")/train_yfcc15m_B32_ALIP.sh" "$@"
