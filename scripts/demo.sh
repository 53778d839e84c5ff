#!/usr/bin/env bash
# The README's main command: set up .venv, generate the demo world, train on it, evaluate.
#
#   ./scripts/demo.sh                            # ALIP, then the CLIP baseline on the same data
#   DEMO_METHODS=alip ./scripts/demo.sh          # ALIP only
#
# Outputs go to demo_output/ (DEMO_OUT): the world (shards, retrieval and classification splits),
# one run directory per method (checkpoints, results.jsonl, TensorBoard), and the eval JSONs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
PY=.venv/bin/python
OUT=${DEMO_OUT:-demo_output}
METHODS=${DEMO_METHODS:-alip clip}
WORLD=$OUT/world

if [ ! -f "$WORLD/demo_world.json" ]; then
  echo "== generating the demo world in $WORLD"
  $PY make_demo_data.py --out "$WORLD" --overwrite
fi

for method in $METHODS; do
  run=$OUT/runs/demo-$method
  rm -rf "$run"   # a fresh run each time; train.py --resume latest continues an interrupted one
  echo "== training --method $method ($run)"
  $PY train.py --config "configs/demo_$method.yaml" --train-data "$WORLD/shards" \
    --logs "$OUT/runs" --name "demo-$method"
  ckpt=$(ls -v "$run"/checkpoints/epoch_*.pt | grep -v '\.state\.pt$' | tail -n 1)
  echo "== evaluating $ckpt"
  $PY eval_retrieval.py --checkpoint "$ckpt" --annotation "$WORLD/retrieval/dataset_demo.json" \
    --image-root "$WORLD/retrieval" --name "demo held-out ($method)" --workers 0 \
    --output "$OUT/retrieval_$method.json"
  $PY eval_zeroshot.py --checkpoint "$ckpt" --dataset imagefolder --root "$WORLD/classify" \
    --classnames "$WORLD/classify/classnames.txt" --templates "$WORLD/classify/templates.txt" \
    --workers 0 --output "$OUT/zeroshot_$method.json"
done

$PY - "$OUT" "$WORLD" $METHODS <<'EOF'
import json, sys
out, world, methods = sys.argv[1], sys.argv[2], sys.argv[3:]
ann = json.load(open(f"{world}/retrieval/dataset_demo.json"))
test = [im for im in ann["images"] if im["split"] == "test"]
n_img, n_txt = len(test), sum(len(im["sentences"]) for im in test)
classes = len(open(f"{world}/classify/classnames.txt").read().split("\n")) - 1
print(f"\nDemo results on held-out data ({n_img} images, {n_txt} captions, {classes} classes)")
print(f"{'method':<8}{'I->T R@1':>10}{'T->I R@1':>10}{'zero-shot top-1':>17}")
print(f"{'chance':<8}{100 * 5 / n_txt:>10.1f}{100 / n_img:>10.1f}{100 / classes:>17.1f}")
for m in methods:
    r = json.load(open(f"{out}/retrieval_{m}.json"))["metrics"]
    z = json.load(open(f"{out}/zeroshot_{m}.json"))["metrics"]
    z = z if "top1" in z else next(iter(z.values()))
    print(f"{m:<8}{r['i2t_R@1']:>10.1f}{r['t2i_R@1']:>10.1f}{z['top1']:>17.1f}")
EOF
