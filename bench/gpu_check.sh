#!/usr/bin/env bash
# The checks that need a GPU, in one command; prints one table (check, PASS/FAIL, figure).
#
#   bench/gpu_check.sh                # CUDA required: fails loudly without it
#   bench/gpu_check.sh --cpu-smoke    # the same steps at toy sizes on CPU (gloo, DALI cpu,
#                                     # reference attention): checks the script, not the GPU
#
# Steps: DALI "mixed" decoding through build_train_loader; a train.py step with fp16 AMP +
# GradScaler and one with bf16; DDP over NCCL on every GPU (torchrun); the packed varlen text
# path against the padded pass (allclose on features and gradients, and timing); a short
# train.py run on DALI SIGKILLed mid-run and resumed; every bench at its GPU setting.
# Logs stay in $GPU_CHECK_DIR (default: a new temporary directory, printed at the end).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
WORK=${GPU_CHECK_DIR:-$(mktemp -d -t alip-gpu-check.XXXXXX)}
mkdir -p "$WORK"

if [ "$SMOKE" = 1 ]; then
  DEV=cpu; DALI_DEV=cpu; NGPU=2; BACKEND=gloo; MODEL=ALIP-tiny; BIG=ALIP-tiny
  AMP16=fp32; AMP_BF16=amp; BATCH=16; TRAIN_N=256
else
  if ! NGPU=$("$PY" -c 'import torch, sys; n = torch.cuda.device_count(); print(n); sys.exit(0 if torch.cuda.is_available() and n else 1)'); then
    echo "gpu_check.sh: error: CUDA is not available to $PY (torch.cuda.is_available() is False); nothing was checked" >&2
    exit 2
  fi
  DEV=cuda; DALI_DEV=cuda:0; BACKEND=nccl; MODEL=ALIP-ViT-B-32; BIG=ALIP-ViT-B-32
  AMP16=amp; AMP_BF16=amp_bf16; BATCH=64; TRAIN_N=2048
fi

ROWS=()
FAILED=0
# check NAME CMD...: runs CMD, logs to $WORK/NAME.log; the figure is the log's last "FIGURE " line
# (or its last line); PASS if CMD exits 0
check() {
  local name=$1; shift
  local log="$WORK/$name.log" start=$SECONDS status figure
  echo "== $name" >&2
  if "$@" >"$log" 2>&1; then status=PASS; else status=FAIL; FAILED=$((FAILED + 1)); fi
  figure=$(grep '^FIGURE ' "$log" | tail -n 1 | cut -d' ' -f2-)
  [ -n "$figure" ] || figure=$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-110)
  ROWS+=("$(printf '%-22s %-5s %5ss  %s' "$name" "$status" "$((SECONDS - start))" "$figure")")
}

# --- data: the demo world's shards (make_demo_data.py runs data2rec.py) --------------------------
check data "$PY" make_demo_data.py --out "$WORK/world" --num-train "$TRAIN_N" --num-test 10 \
  --shard-size 256 --overwrite
SHARDS="$WORK/world/shards"

# --- DALI "mixed" decoding through the training loader ------------------------------------------
check dali-mixed "$PY" - "$SHARDS" "$DALI_DEV" <<'PYEOF'
import sys, time, torch
from alip.data.loader import build_train_loader
shards, device = sys.argv[1], sys.argv[2]
loader = build_train_loader(shards, backend="dali", batch_size=64, image_size=224, workers=4,
                            device=device)
n, t = 0, time.perf_counter()
for images, raw, cap in loader:
    assert images.shape[1:] == (3, 224, 224) and images.dtype == torch.float32, images.shape
    assert str(images.device).startswith(device.split(":")[0]), images.device
    assert raw.shape[1] == cap.shape[1] == 77 and torch.isfinite(images).all()
    n += len(images)
assert n == loader.batches_per_epoch * 64, (n, loader.batches_per_epoch)
print(f"FIGURE {n} records decoded on {device}: {n / (time.perf_counter() - t):.0f} rec/s")
PYEOF

# --- train.py steps: fp16 AMP + GradScaler, bf16 -------------------------------------------------
train() {  # train NAME PRECISION [extra args...]
  local name=$1 precision=$2; shift 2
  "$PY" train.py --train-data "$SHARDS" --model ALIP-demo --batch-size "$BATCH" --epochs 1 \
    --max-steps 3 --precision "$precision" --device "$DEV" --workers 2 --logs "$WORK/runs" \
    --name "$name" --log-every-n-steps 1 --report-to '' "$@" &&
  "$PY" - "$WORK/runs/$name/results.jsonl" <<'PYEOF'
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
assert rows and all(math.isfinite(r["loss"]) for r in rows), rows
print(f"FIGURE steps {rows[-1].get('step')}, loss {rows[-1]['loss']:.4f}, {rows[-1].get('samples_per_second', 0):.0f} samples/s")
PYEOF
}
check train-fp16-scaler train amp16 "$AMP16"
check train-bf16 train bf16 "$AMP_BF16"

# --- DDP over NCCL on every GPU (gloo x2 in the smoke run) --------------------------------------
ddp() {
  # --logs-dir, not --logs: torchrun's parser takes --logs for a prefix of its --logs-specs
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" train.py \
    --train-data "$SHARDS" --model ALIP-demo --batch-size 16 --epochs 1 --max-steps 3 \
    --precision "$AMP_BF16" --device "$DEV" --dist-backend "$BACKEND" --workers 1 \
    --logs-dir "$WORK/runs" --name ddp --log-every-n-steps 1 --report-to '' &&
  echo "FIGURE $NGPU processes over $BACKEND: $(grep -c '"loss"' "$WORK/runs/ddp/results.jsonl") logged steps"
}
check "ddp-$BACKEND" ddp

# --- packed varlen text path vs the padded pass -------------------------------------------------
check varlen-vs-padded "$PY" - "$BIG" "$DEV" <<'PYEOF'
import sys, time, torch, open_clip
sys.path.insert(0, "bench")
import _texts, alip
from alip.model import encode_text, reference_varlen_attn, packed_supported, _text_tower
name, device = sys.argv[1], torch.device(sys.argv[2])
torch.manual_seed(0)
model = open_clip.create_model(name).to(device)
text = _texts.batch("yfcc", 256, torch.Generator().manual_seed(0)).to(device)
attn_fn = None if device.type == "cuda" else reference_varlen_attn
def run(padded):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        f = model.encode_text(text, normalize=True) if padded else encode_text(model, text, path="packed", attn_fn=attn_fn)
    f.float().square().sum().backward()  # any loss; its gradient reaches every text param
    return f.float().detach(), model.transformer.resblocks[0].attn.in_proj_weight.grad.float().clone()
with torch.autocast(device.type, dtype=torch.bfloat16):
    assert device.type != "cuda" or packed_supported(_text_tower(model), text), "auto would not pick packed"
(fp, gp), (fk, gk) = run(True), run(False)
# bf16: 8 mantissa bits; unit-norm features agree to a few bf16 ulps, grads relative to their norm
torch.testing.assert_close(fk, fp, atol=3e-2, rtol=0)
assert (gk - gp).norm() / gp.norm() < 5e-2, float((gk - gp).norm() / gp.norm())
def timed(fn, n=5):
    fn(); torch.cuda.synchronize() if device.type == "cuda" else None
    t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize() if device.type == "cuda" else None
    return (time.perf_counter() - t) / n
tp, tk = timed(lambda: run(True)), timed(lambda: run(False))
print(f"FIGURE features max|diff| {float((fk - fp).abs().max()):.2e}; fwd+bwd packed/padded time {tk / tp:.2f}")
PYEOF

# --- train.py on DALI, SIGKILL mid-run, resume --------------------------------------------------
kill_resume() {
  local args=(train.py --train-data "$SHARDS" --model ALIP-demo --batch-size 16 --epochs 1
              --max-steps 12 --save-every-n-steps 4 --precision "$AMP_BF16" --device "$DEV"
              --data-backend dali --workers 2 --logs "$WORK/runs" --name kill --report-to ''
              --log-every-n-steps 1)
  "$PY" "${args[@]}" & local pid=$!
  local ckdir="$WORK/runs/kill/checkpoints" waited=0
  until [ -f "$ckdir/index.json" ] && grep -q step_4 "$ckdir/index.json" 2>/dev/null; do
    sleep 0.2; waited=$((waited + 1))
    if ! kill -0 "$pid" 2>/dev/null || [ "$waited" -gt 3000 ]; then
      echo "no step_4 checkpoint before the run ended or 10 minutes passed"; return 1; fi
  done
  kill -9 "$pid"; wait "$pid"; local rc=$?
  [ "$rc" = 137 ] || { echo "run ended with $rc before the kill landed"; return 1; }
  "$PY" "${args[@]}" --resume latest || return 1
  "$PY" - "$WORK/runs/kill/results.jsonl" <<'PYEOF'
import json, sys
steps = [json.loads(l).get("step") for l in open(sys.argv[1]) if '"loss"' in l]
assert steps and max(steps) == 12, steps
print(f"FIGURE killed after step_4 checkpoint, resumed, reached step {max(steps)}")
PYEOF
}
check dali-kill-resume kill_resume

# --- every bench at its GPU setting (toy sizes in the smoke run) --------------------------------
if [ "$SMOKE" = 1 ]; then
  check bench-text_encoding "$PY" bench/text_encoding.py --model ALIP-tiny --text-batch 64 --step-batch 8 --repeats 1
  check bench-loss_step "$PY" bench/loss_step.py --models ALIP-tiny --reps 1
  check bench-train_throughput "$PY" bench/train_throughput.py --models ALIP-tiny --batch-size 16 --reps 1
  check bench-eval_throughput "$PY" bench/eval_throughput.py --num-images 128 --repeats 1
  check bench-reader "$PY" bench/reader.py --images 128 --rounds 1
else
  check bench-text_encoding "$PY" bench/text_encoding.py
  check bench-loss_step "$PY" bench/loss_step.py --models ALIP-ViT-B-32
  check bench-train_throughput "$PY" bench/train_throughput.py
  check bench-eval_throughput "$PY" bench/eval_throughput.py --model ALIP-ViT-B-32 --batch-size 256 \
    --num-images 4096 --workers 8 --precision amp --inputs tensors
  check bench-reader "$PY" bench/reader.py
fi

echo
echo "gpu_check.sh ($([ "$SMOKE" = 1 ] && echo "CPU smoke" || echo "$NGPU GPU(s)")), logs in $WORK"
printf '%-22s %-5s %6s  %s\n' check result time figure
printf '%s\n' "${ROWS[@]}"
[ "$FAILED" = 0 ] || { echo "$FAILED check(s) FAILED" >&2; exit 1; }
