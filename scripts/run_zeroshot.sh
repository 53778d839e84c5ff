#!/usr/bin/env bash
# Zero-shot classification on the 11 datasets of the ALIP README's table (10 + ImageNet) for one
# checkpoint, printing that table with its 11-dataset average (the reference's run_zeroshot.sh).
#
#   scripts/run_zeroshot.sh CHECKPOINT DATA_ROOT [eval_zeroshot.py flags...]
#   e.g. scripts/run_zeroshot.sh runs/alip/checkpoints/epoch_32.pt /data
#        DATASETS=cifar10,cifar100 scripts/run_zeroshot.sh model_31.pt /data --model ALIP-ViT-B-32
#
# DATA_ROOT layout: one folder per dataset, each in torchvision's own on-disk format
#   cifar10/cifar-10-batches-py  cifar100/cifar-100-python  food101/food-101  pets/oxford-iiit-pet
#   flowers/flowers-102  sun397/SUN397  cars/stanford_cars  dtd/dtd  caltech101/caltech101
#   fgvc_aircraft/fgvc-aircraft-2013b  imagenet1k/val/<wnid>/*.JPEG
# Nothing is downloaded. Env: OUT (default results/), PYTHON, DATASETS (default all).
set -euo pipefail
if [ $# -lt 2 ]; then grep '^#' "$0" | sed 1d; exit 2; fi
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$HERE/.venv/bin/python}"
CKPT="$1"; ROOT="$2"; shift 2
OUT="${OUT:-results}"  # eval_zeroshot.py makes it
"$PY" "$HERE/eval_zeroshot.py" --checkpoint "$CKPT" --dataset "${DATASETS:-all}" --root "$ROOT/{dataset}" \
  --output "$OUT/zeroshot.json" "$@"
