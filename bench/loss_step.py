"""Time one training step (towers + loss, forward + backward): open_clip CLIP vs ALIP.

    .venv/bin/python bench/loss_step.py                       # tiny + ViT-B/32, CPU or CUDA
    .venv/bin/python bench/loss_step.py --models ALIP-ViT-B-32 --batch-size 256   # on a GPU

Per model and text-length regime it times, interleaved in the same process on the same
model and batch:
  clip          open_clip's own step: model(images, raw_text) + open_clip.loss.ClipLoss
  alip          ours: TripletEncoder (text_mode separate, trimmed) + ALIPLoss
  alip-joint    ours with raw text and caption as one 2B trimmed pass
  alip-naive    two untrimmed 77-token text passes + ALIPLoss (how deepglint/ALIP does it,
                checkpointing aside)
and prints each step time, the ratio to clip, and the share of the alip step spent in the
gates (similarities, EMA update, weights). Regimes: "full" (every text 77 tokens) and
"realistic" (web text as it comes: mostly short, some long; captions 10-25 tokens).
"""
import argparse
import statistics
import time

import open_clip
import torch
from open_clip.loss import ClipLoss

import alip  # noqa: F401
from alip.loss import ALIPLoss
from alip.model import TripletEncoder

SOT, EOT = 49406, 49407


def fake_tokens(lengths, gen):
    """[B, 77] token rows with SOT, random BPE ids, EOT at length-1 and zero padding."""
    rows = torch.zeros(len(lengths), 77, dtype=torch.long)
    for i, n in enumerate(lengths):
        rows[i, 0] = SOT
        rows[i, 1:n - 1] = torch.randint(1, 49000, (n - 2,), generator=gen)
        rows[i, n - 1] = EOT
    return rows


def make_batch(batch_size, image_size, regime, gen):
    if regime == "full":
        raw_len = cap_len = [77] * batch_size
    else:
        # Web alt-text/titles: 70% short (5-20 tokens), 30% long descriptions (20-77);
        # OFA captions: 10-25 tokens.
        raw_len = [int(torch.randint(5, 21, (1,), generator=gen)) if torch.rand(1, generator=gen) < 0.7
                   else int(torch.randint(20, 78, (1,), generator=gen)) for _ in range(batch_size)]
        cap_len = torch.randint(10, 26, (batch_size,), generator=gen).tolist()
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    return images, fake_tokens(raw_len, gen), fake_tokens(cap_len, gen)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_steps(model, batch, device, autocast):
    images, raw, cap = (t.to(device) for t in batch)
    clip_loss, alip_loss = ClipLoss(), ALIPLoss()
    encoders = {"alip": TripletEncoder(model, "separate"),
                "alip-joint": TripletEncoder(model, "joint"),
                "alip-naive": TripletEncoder(model, "separate", trim_text=False)}

    def clip_step():
        with autocast():
            loss = clip_loss(*model(images, raw)[:3])
        loss.backward()

    def alip_step(name):
        def step():
            with autocast():
                loss = alip_loss(*encoders[name](images, raw, cap))["loss"]
            loss.backward()
        return step

    with torch.no_grad(), autocast():
        feats = encoders["alip"](images, raw, cap)[:3]

    def gates_only():
        alip_loss.gates(*feats)

    steps = {"clip": clip_step}
    steps.update({name: alip_step(name) for name in encoders})
    return steps, gates_only


def time_interleaved(fns, device, reps, warmup=1):
    times = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ALIP-tiny", "ALIP-ViT-B-32"])
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: 32 on CPU, 256 on CUDA")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "amp", "amp_bf16"], default=None,
                   help="default: amp_bf16 on CUDA, fp32 on CPU")
    args = p.parse_args()
    device = torch.device(args.device)
    batch_size = args.batch_size or (256 if device.type == "cuda" else 32)
    precision = args.precision or ("amp_bf16" if device.type == "cuda" else "fp32")
    dtype = {"amp": torch.float16, "amp_bf16": torch.bfloat16}.get(precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}) "
          f"batch={batch_size} precision={precision} reps={args.reps} (median)")
    print(f"{'model':<15}{'texts':<11}{'step':<12}{'ms':>9}{'x clip':>9}")
    for name in args.models:
        model = open_clip.create_model(name).to(device)
        gen = torch.Generator().manual_seed(0)
        image_size = model.visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        for regime in ("full", "realistic"):
            steps, gates_only = build_steps(model, make_batch(batch_size, image_size, regime, gen),
                                            device, autocast)
            med = time_interleaved(steps, device, args.reps)
            gates = time_interleaved({"gates": gates_only}, device, 20)["gates"]
            for step, t in med.items():
                print(f"{name:<15}{regime:<11}{step:<12}{1e3 * t:9.1f}{t / med['clip']:9.2f}")
            print(f"{name:<15}{regime:<11}{'gates':<12}{1e3 * gates:9.2f}"
                  f"{'':>9}  = {100 * gates / med['alip']:.2f}% of the alip step")
            model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
