"""Time one ALIP training step (towers + ALIPLoss, forward + backward): eager vs --torchcompile.

    .venv/bin/python bench/compile_step.py                          # ViT-B/32, batch 8, CPU
    .venv/bin/python bench/compile_step.py --device cuda --batch-size 256 --precision amp_bf16
    .venv/bin/python bench/compile_step.py --text                   # also a compiled text tower

Sides, on copies of one model (same weights), ABBA-interleaved over --reps after the first
call of each (the compile, timed and printed apart):
  eager      ALIPEncoder (text separate, length-grouped) + ALIPLoss, as train.py without the flag
  compiled   the same with train.py --torchcompile: the image tower compiled
             (alip.training.compile.compile_towers), text tower and loss eager
  text       (--text) also the text tower's transformer compiled with dynamic=True: the
             length-grouped passes change their shapes every batch (YFCC-like raw text and
             captions, bench/_texts.py; --batches different batches in turn)
Prints per side the median step (ms), the per-repeat ratio to eager as median [min-max], and
the first call's seconds.
"""
import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _texts  # noqa: E402
import _timing  # noqa: E402
import alip  # noqa: E402,F401
from alip.loss import ALIPLoss  # noqa: E402
from alip.methods.alip import ALIPEncoder  # noqa: E402
from alip.model import to_device_keeping_host_tokens  # noqa: E402
from alip.training import compile as tc  # noqa: E402


class _Flag:
    torchcompile = True


def batches(n, batch_size, image_size, device, gen):
    out = []
    for _ in range(n):
        out.append({"image": torch.randn(batch_size, 3, image_size, image_size, generator=gen).to(device),
                    "raw": to_device_keeping_host_tokens(_texts.batch("yfcc", batch_size, gen), device),
                    "caption": to_device_keeping_host_tokens(_texts.batch("caption", batch_size, gen),
                                                             device)})
    return out


def step_fn(model, data, autocast, device):
    encoder, loss_fn, i = ALIPEncoder(model, "separate"), ALIPLoss().to(device), [0]

    def step():
        batch = data[i[0] % len(data)]
        i[0] += 1
        with autocast():
            f = encoder(batch)
            loss = loss_fn(f["image"], f["raw"], f["caption"], f["logit_scale"])["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="ALIP-ViT-B-32")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 8 on CPU")
    p.add_argument("--batches", type=int, default=4, help="different batches, used in turn")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--calls", type=int, default=4, help="steps per timed sample")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text", action="store_true", help="also time a compiled text tower")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "amp", "amp_bf16"], default=None,
                   help="default: amp_bf16 on CUDA, fp32 on CPU")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    device = torch.device(args.device)
    threads = _timing.setup(args.threads)
    precision = args.precision or ("amp_bf16" if device.type == "cuda" else "fp32")
    dtype = {"amp": torch.float16, "amp_bf16": torch.bfloat16}.get(precision)
    batch_size = args.batch_size or (256 if device.type == "cuda" else 8)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    torch.manual_seed(0)
    eager = open_clip.create_model(args.model).to(device).train()
    size = eager.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    data = batches(args.batches, batch_size, size, device, torch.Generator().manual_seed(0))
    models = {"eager": eager, "compiled": copy.deepcopy(eager)}
    assert tc.compile_towers(_Flag, models["compiled"], device) == ["image tower"]
    if args.text:
        models["text"] = copy.deepcopy(eager)
        tc.compile_towers(_Flag, models["text"], device)
        t = models["text"].transformer
        t.forward = tc._CompiledForward(t, "text transformer", logging.getLogger(), dynamic=True)
    fns = {k: step_fn(m, data, autocast, device) for k, m in models.items()}
    first = {}
    for k, fn in fns.items():  # the compile, then one pass over every batch shape
        first[k] = _timing.timed(fn, device)
        for _ in range(args.batches - 1):
            fn()
    times = _timing.abba({k: _timing.n_times(fn, args.calls) for k, fn in fns.items()}, args.reps,
                         device, label=args.model)
    print(f"bench/compile_step.py on {_timing.describe(device, threads)}, torch {torch.__version__}, "
          f"{args.model} batch {batch_size}, precision {precision}, median [min-max] of {args.reps} "
          f"ABBA repeats of {args.calls} steps")
    print(f"{'side':<10}{'ms/step':>9}   x eager            first call (s)")
    for k in fns:
        ms = 1e3 * _timing.stats(times[k])[0] / args.calls
        print(f"{k:<10}{ms:9.1f}   {_timing.fmt(_timing.ratio(times, k, 'eager'), 3):<18} "
              f"{first[k]:8.1f}", flush=True)


if __name__ == "__main__":
    main()
