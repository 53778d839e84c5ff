#!/usr/bin/env bash
# The README's main command: set up .venv, generate the demo world, train every method on it with
# one recipe, evaluate each on held-out data, write the report.
#
#   ./scripts/demo.sh                            # every method (alip.methods): same data and recipe,
#                                                # then the other configs/demo_<row>.yaml rows
#   DEMO_METHODS="alip clip" ./scripts/demo.sh   # a subset, in this order (DEMO_METHODS=all: every one)
#   DEMO_QUICK=1 ./scripts/demo.sh               # a first look: ALIP and the CLIP baseline only
#                                                # (the same recipe, so the same numbers as in the full run)
#   DEMO_OUT=/tmp/demo ./scripts/demo.sh         # somewhere other than demo_output/ (of the repo)
#   DEMO_JOBS=1 ./scripts/demo.sh                # rows one at a time, output on the console (default:
#                                                # one row per CPU side by side, one thread each)
#
# Outputs go to demo_output/ (DEMO_OUT): the world (shards, retrieval and classification splits),
# one run directory per method (checkpoints, results.jsonl, TensorBoard), the eval JSONs,
# timings.tsv (train and eval wall seconds per method), and report.md with loss.png, recall.png
# and gates.png (ALIP's gates by noise label).
set -euo pipefail
OUT=${DEMO_OUT:+$(realpath -m -- "$DEMO_OUT")}  # relative to where it was run from
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
PY=.venv/bin/python
OUT=${OUT:-demo_output}
if [ "${DEMO_QUICK:-0}" = 1 ]; then
  METHODS=${DEMO_METHODS:-alip clip}
else
  METHODS=${DEMO_METHODS:-all}
fi
if [ "$METHODS" = all ]; then
  METHODS=$($PY -c "from alip.eval.demo_report import demo_rows; print(' '.join(demo_rows('configs')))")
fi
for method in $METHODS; do  # a typo fails here, not after the methods before it have trained
  if [ ! -f "configs/demo_$method.yaml" ]; then
    echo "demo.sh: DEMO_METHODS: no configs/demo_$method.yaml for method '$method'" >&2
    exit 2
  fi
done
START=$(date +%s)
WORLD=$OUT/world

# (re)generate unless a world of this generator's version is there already
if ! $PY -c "import json, sys; from alip.data.demo_world import VERSION
sys.exit(json.load(open(sys.argv[1])).get('version') != VERSION)" "$WORLD/demo_world.json" 2>/dev/null; then
  echo "== generating the demo world in $WORLD"
  $PY make_demo_data.py --out "$WORLD" --overwrite
fi

# the rows side by side, one per CPU, each with one thread (scripts/demo_rows.py): train.py,
# eval_retrieval.py and eval_zeroshot.py's main functions per row, each run seeded from its
# config; timings.tsv
JOBS=${DEMO_JOBS:-$($PY -c "import sys; sys.path.insert(0, 'scripts'); import demo_rows
print(demo_rows.default_jobs(sys.argv[1:]))" $METHODS)}
$PY scripts/demo_rows.py --out "$OUT" --world "$WORLD" --jobs "$JOBS" $METHODS

echo "== report"
$PY -m alip.eval.demo_report --out "$OUT" --world "$WORLD" --methods $METHODS \
  --seconds $(( $(date +%s) - START )) --machine "$(nproc) CPU cores, $JOBS row(s) at a time"
echo "(written to $OUT/report.md with its plots)"
