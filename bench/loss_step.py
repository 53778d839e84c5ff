"""Time one training step (towers + loss, forward + backward): open_clip CLIP vs ALIP.

    .venv/bin/python bench/loss_step.py                       # tiny + ViT-B/32, ~6 min on 2 CPU cores
    .venv/bin/python bench/loss_step.py --models ALIP-ViT-B-32 --batch-size 256   # on a GPU

Per model it times, ABBA-interleaved over --reps (every side and both text regimes in the same
loop, so load drift hits them alike) on the same model and batch:
  clip          open_clip's own step: model(images, raw_text) + open_clip.loss.ClipLoss
  alip          ours: ALIPEncoder (text_mode separate, trimmed) + ALIPLoss
  alip-joint    ours with raw text and caption as one 2B trimmed pass
  alip-naive    two untrimmed 77-token text passes + ALIPLoss (how deepglint/ALIP does it,
                checkpointing aside)
and prints each step time (median), median [min-max] of the per-repeat ratio to clip, and the
share of the alip step spent in the gates (similarities, EMA update, weights). Regimes: "full"
(every text 77 tokens) and "realistic" (YFCC-like raw text, bench/_texts.py; captions 10-25).
"""
import argparse
import sys
from pathlib import Path

import open_clip
import torch
from open_clip.loss import ClipLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _texts  # noqa: E402
import _timing  # noqa: E402
import alip  # noqa: E402,F401
from alip.loss import ALIPLoss  # noqa: E402
from alip.methods.alip import ALIPEncoder  # noqa: E402
from alip.model import to_device_keeping_host_tokens  # noqa: E402


def make_batch(batch_size, image_size, regime, gen):
    raw, cap = ("full", "full") if regime == "full" else ("yfcc", "caption")
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    return images, _texts.batch(raw, batch_size, gen), _texts.batch(cap, batch_size, gen)


def features(f):
    """ALIPLoss's arguments from the encoder's features."""
    return f["image"], f["raw"], f["caption"], f["logit_scale"]


def build_steps(model, batch, device, autocast):
    images, raw, cap = batch[0].to(device), *(to_device_keeping_host_tokens(t, device)
                                              for t in batch[1:])  # as the training loop does
    clip_loss, alip_loss = ClipLoss(), ALIPLoss().to(device)
    encoders = {"alip": ALIPEncoder(model, "separate"),
                "alip-joint": ALIPEncoder(model, "joint"),
                "alip-naive": ALIPEncoder(model, "separate", trim_text=False)}
    batch = {"image": images, "raw": raw, "caption": cap}

    def clip_step():
        with autocast():
            loss = clip_loss(*model(images, raw)[:3])
        loss.backward()
        model.zero_grad(set_to_none=True)

    def alip_step(name):
        def step():
            with autocast():
                loss = alip_loss(*features(encoders[name](batch)))["loss"]
            loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    with torch.no_grad(), autocast():
        feats = features(encoders["alip"](batch))[:3]

    def gates_only():
        alip_loss.gates(*feats)

    steps = {"clip": clip_step}
    steps.update({name: alip_step(name) for name in encoders})
    return steps, gates_only


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ALIP-tiny", "ALIP-ViT-B-32"])
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: 256 on CUDA; on CPU 32 for ALIP-tiny, 8 for bigger models")
    p.add_argument("--sides", nargs="+", default=["clip", "alip", "alip-joint", "alip-naive"],
                   choices=["clip", "alip", "alip-joint", "alip-naive"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "amp", "amp_bf16"], default=None,
                   help="default: amp_bf16 on CUDA, fp32 on CPU")
    args = p.parse_args()
    device = torch.device(args.device)
    threads = _timing.setup(args.threads)
    precision = args.precision or ("amp_bf16" if device.type == "cuda" else "fp32")
    dtype = {"amp": torch.float16, "amp_bf16": torch.bfloat16}.get(precision)
    sides = ["clip"] + [s for s in args.sides if s != "clip"]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    print(f"bench/loss_step.py on {_timing.describe(device, threads)}, precision {precision}, "
          f"median [min-max] of {args.reps} ABBA repeats")
    print(f"{'model':<15}{'batch':>6} {'texts':<11}{'step':<12}{'ms':>9}   x clip")
    for name in args.models:
        batch_size = args.batch_size or (256 if device.type == "cuda" else 32 if name == "ALIP-tiny" else 8)
        torch.manual_seed(0)
        model = open_clip.create_model(name).to(device)
        gen = torch.Generator().manual_seed(0)
        image_size = model.visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        fns, gates = {}, {}
        for regime in ("full", "realistic"):
            steps, gates[regime] = build_steps(model, make_batch(batch_size, image_size, regime, gen),
                                               device, autocast)
            fns.update({f"{regime}/{k}": steps[k] for k in sides})
        times = _timing.abba(fns, args.reps, device, label=name)
        for regime in ("full", "realistic"):
            t = {k.split("/")[1]: v for k, v in times.items() if k.startswith(regime + "/")}
            g = _timing.abba({"gates": gates[regime]}, 10, device, label=f"{name} gates")["gates"]
            for step in sides:
                print(f"{name:<15}{batch_size:>6} {regime:<11}{step:<12}"
                      f"{1e3 * _timing.stats(t[step])[0]:9.1f}   {_timing.fmt(_timing.ratio(t, step, 'clip'))}")
            if "alip" in t:
                share = 100 * _timing.stats(g)[0] / _timing.stats(t["alip"])[0]
                print(f"{name:<15}{batch_size:>6} {regime:<11}{'gates':<12}{1e3 * _timing.stats(g)[0]:9.2f}"
                      f"   = {share:.2f}% of the alip step", flush=True)


if __name__ == "__main__":
    main()
