#!/usr/bin/env bash
# Zero-shot retrieval on MSCOCO 5k test and Flickr30k 1k test (Karpathy splits): the ALIP README's
# retrieval table for one checkpoint (the counterpart of the reference's run_retrieval.sh).
#
#   scripts/run_retrieval.sh CHECKPOINT DATA_ROOT [eval_retrieval.py flags...]
#   e.g. scripts/run_retrieval.sh runs/alip/checkpoints/epoch_32.pt /data
#        scripts/run_retrieval.sh model_31.pt /data --model ALIP-ViT-B-32 --caption-prefix "a photo of "
#
# DATA_ROOT layout:  coco/dataset_coco.json       coco/val2014/*.jpg (the json's filepath/filename)
#                    flickr30k/dataset_flickr30k.json   flickr30k/flickr30k-images/*.jpg
# Every dataset's annotation, images and flags are checked (eval_retrieval.py --check-only) before
# any is evaluated. Env: OUT (results dir, default results/), PYTHON (default .venv/bin/python),
# DATASETS ("coco flickr30k").
set -euo pipefail
if [ $# -lt 2 ]; then grep '^#' "$0" | sed 1d; exit 2; fi
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$HERE/.venv/bin/python}"
CKPT="$1"; ROOT="$2"; shift 2
OUT="${OUT:-results}"
inputs() {  # DATASET -> ann images name
  case "$1" in
    coco)      ann="$ROOT/coco/dataset_coco.json"; images="$ROOT/coco"; name=MSCOCO ;;
    flickr30k) ann="$ROOT/flickr30k/dataset_flickr30k.json"; images="$ROOT/flickr30k/flickr30k-images"; name=Flickr30k ;;
    *) echo "run_retrieval.sh: error: unknown retrieval dataset $1 in DATASETS (coco, flickr30k)" >&2; exit 2 ;;
  esac
}
for ds in ${DATASETS:-coco flickr30k}; do
  inputs "$ds"
  "$PY" "$HERE/eval_retrieval.py" --checkpoint "$CKPT" --annotation "$ann" --image-root "$images" \
    --name "$name" --output "$OUT/retrieval_$ds.json" "$@" --check-only
done
for ds in ${DATASETS:-coco flickr30k}; do
  inputs "$ds"
  "$PY" "$HERE/eval_retrieval.py" --checkpoint "$CKPT" --annotation "$ann" --image-root "$images" \
    --name "$name" --output "$OUT/retrieval_$ds.json" "$@"
done
