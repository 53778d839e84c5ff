#!/usr/bin/env bash
# LaCLIP: CLIP on the original text and 4 rewrites drawn uniformly, ViT-B/32 on YFCC15M-style shards
# (configs/yfcc15m_vit_b32_laclip.yaml). Same environment variables as train_yfcc15m_B32_ALIP.sh:
#   TRAIN_DATA=/data/yfcc15m_rec scripts/train_yfcc15m_B32_LaCLIP.sh [extra train.py flags]
# on one node of 8 GPUs (global batch 4096; the recipe's global-batch-size refuses other counts).
set -euo pipefail
CONFIG=${CONFIG:-$(dirname "$0")/../configs/yfcc15m_vit_b32_laclip.yaml} NAME=${NAME:-yfcc15m-B32-LaCLIP} \
  exec "$(dirname "$0")/train_yfcc15m_B32_ALIP.sh" "$@"
