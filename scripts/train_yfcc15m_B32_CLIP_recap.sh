#!/usr/bin/env bash
# CLIP on raw text and recaptions mixed 0.2/0.8 (Recap-DataComp-1B's CLIP), ViT-B/32 on YFCC15M-style shards
# (configs/yfcc15m_vit_b32_clip_recap.yaml). Same environment variables as train_yfcc15m_B32_ALIP.sh:
#   TRAIN_DATA=/data/yfcc15m_rec scripts/train_yfcc15m_B32_CLIP_recap.sh [extra train.py flags]
# on one node of 8 GPUs (global batch 4096; the recipe's global-batch-size refuses other counts).
set -euo pipefail
CONFIG=${CONFIG:-$(dirname "$0")/../configs/yfcc15m_vit_b32_clip_recap.yaml} NAME=${NAME:-yfcc15m-B32-CLIP_recap} \
  exec "$(dirname "$0")/train_yfcc15m_B32_ALIP.sh" "$@"
