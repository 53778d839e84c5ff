#!/usr/bin/env bash
# SigLIP baseline ViT-B/32 on YFCC15M (arXiv 2303.15343), the CLIP recipe with the sigmoid loss
# (configs/yfcc15m_vit_b32_siglip.yaml). Same environment variables as train_yfcc15m_B32_ALIP.sh:
#   TRAIN_DATA=/data/yfcc15m_rec scripts/train_yfcc15m_B32_SIGLIP.sh [extra train.py flags]
# on one node of 8 GPUs (global batch 4096; the recipe's global-batch-size refuses other counts).
set -euo pipefail
CONFIG=${CONFIG:-$(dirname "$0")/../configs/yfcc15m_vit_b32_siglip.yaml} NAME=${NAME:-yfcc15m-B32-SIGLIP} \
  exec "$(dirname "$0")/train_yfcc15m_B32_ALIP.sh" "$@"
