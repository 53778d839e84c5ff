#!/usr/bin/env bash
# CLIP baseline ViT-B/32 on YFCC15M, same recipe, data and stack as ALIP
# (configs/yfcc15m_vit_b32_clip.yaml). Same environment variables as train_yfcc15m_B32_ALIP.sh:
#   TRAIN_DATA=/data/yfcc15m_rec scripts/train_yfcc15m_B32_CLIP.sh [extra train.py flags]
# on one node of 8 GPUs (global batch 4096; the recipe's global-batch-size refuses other counts).
set -euo pipefail
CONFIG=${CONFIG:-$(dirname "$0")/../configs/yfcc15m_vit_b32_clip.yaml} NAME=${NAME:-yfcc15m-B32-CLIP} \
  exec "$(dirname "$0")/train_yfcc15m_B32_ALIP.sh" "$@"
