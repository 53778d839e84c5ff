"""Training-step throughput: our ALIP step vs our CLIP step vs a reference-style ALIP step.

    .venv/bin/python bench/train_throughput.py                          # CPU defaults
    .venv/bin/python bench/train_throughput.py --models ALIP-ViT-B-32 --batch-size 256  # GPU

A full optimizer step each (forward, loss, backward, grad clip 1.0, AdamW, logit_scale clamp),
timed interleaved on the same model and batch, in one process:
  clip       ours: alip.training.step.train_step, --method clip (ClipLoss on raw text,
             trimmed text pass)
  alip       ours: train_step, --method alip (TripletEncoder: two trimmed text passes;
             ALIPLoss: one gather reused by gates and both paths; no checkpointing)
  alip-ref   as deepglint/ALIP does it (train.py:106-168, loss.py:84-121): gradient
             checkpointing always on, two untrimmed 77-token text passes, gates with their
             own gathers of v/t_raw/t_cap plus a gather per path in the loss
             (at world size 1 the gathers cost nothing), per-sample weighted CE
Prints samples/s and the ratios alip/clip step time (target <= 1.42) and alip-ref/alip
(target >= 1.15). Texts: "realistic" (web text 5-40 tokens, captions 10-25) and "full" (77).
"""
import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import alip  # noqa: E402,F401
from alip.loss import ALIPLoss, gather_features  # noqa: E402
from alip.model import TripletEncoder  # noqa: E402
from alip.training.distributed import DistInfo  # noqa: E402
from alip.training.step import StepContext, train_step  # noqa: E402
from alip.training.synthetic import EOT, SOT  # noqa: E402


def tokens(lengths, gen):
    rows = torch.zeros(len(lengths), 77, dtype=torch.long)
    for i, n in enumerate(lengths):
        rows[i, 0], rows[i, n - 1] = SOT, EOT
        rows[i, 1:n - 1] = torch.randint(1, 49000, (n - 2,), generator=gen)
    return rows


def make_batch(b, size, regime, gen):
    if regime == "full":
        raw_len = cap_len = [77] * b
    else:
        raw_len = torch.randint(5, 41, (b,), generator=gen).tolist()
        cap_len = torch.randint(10, 26, (b,), generator=gen).tolist()
    return torch.randn(b, 3, size, size, generator=gen), tokens(raw_len, gen), tokens(cap_len, gen)


class ReferenceALIPStep:
    """A replica of the reference's training step (world size 1 here)."""

    def __init__(self, model, optimizer, autocast, rank=0, world_size=1):
        self.model, self.opt, self.autocast = model, optimizer, autocast
        self.rank, self.world_size = rank, world_size
        self.h_raw = self.h_cap = self.h = 1  # python numbers, as the reference

    def _weighted_clip(self, v, t, scale, w):
        all_v = gather_features(v, self.rank, self.world_size)   # gather per path (x2)
        all_t = gather_features(t, self.rank, self.world_size)
        logits = scale * all_v @ all_t.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        ce = (F.cross_entropy(logits, labels, reduction="none")
              + F.cross_entropy(logits.T, labels, reduction="none")) / 2
        return (w * ce).mean()

    def __call__(self, images, raw, cap):
        self.model.set_grad_checkpointing(True)  # forced on every forward
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            v = self.model.encode_image(images, normalize=True)
            t_raw = self.model.encode_text(raw, normalize=True)  # untrimmed, 77 positions
            t_cap = self.model.encode_text(cap, normalize=True)
            scale = self.model.logit_scale.exp()
            with torch.no_grad():
                g_raw, g_cap, g_v = (gather_features(x.detach(), self.rank, self.world_size)
                                     for x in (t_raw, t_cap, v))
                s_tc, s_it, s_ic = ((g_raw * g_cap).sum(-1), (g_raw * g_v).sum(-1),
                                    (g_cap * g_v).sum(-1))
                self.h_raw = 0.99 * self.h_raw + 0.01 * s_tc.mean()
                self.h = 0.99 * self.h + 0.01 * s_it.mean()
                self.h_cap = 0.99 * self.h_cap + 0.01 * s_ic.mean()
                w_hat = torch.exp(s_tc - self.h_raw) ** 2
                flag = w_hat < 1
                w_s = torch.where(flag, w_hat, torch.ones_like(w_hat))
                w_t = torch.where(flag, torch.exp(s_it - self.h) ** 2, torch.ones_like(w_hat))
                w_c = torch.where(flag, torch.exp(s_ic - self.h_cap) ** 2, torch.ones_like(w_hat))
            loss = (self._weighted_clip(v, t_raw, scale, w_s * w_t)
                    + self._weighted_clip(v, t_cap, scale, w_s * w_c))
        loss.backward()
        loss.item()  # the reference logs the loss every step
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        self.model.set_grad_checkpointing(False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name, batch_size, device, precision, reps, regimes):
    model = open_clip.create_model(name).to(device)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.98), weight_decay=0.2)
    dtype = {"amp": torch.float16, "amp_bf16": torch.bfloat16}.get(precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    scaler = torch.amp.GradScaler("cuda") if precision == "amp" and device.type == "cuda" else None
    info = DistInfo(0, 0, 1, False, device)
    enc = TripletEncoder(model, "separate")
    ctxs = {m: StepContext(model=enc, clip_model=model, loss_fn=loss, optimizer=opt, info=info,
                           method=m, grad_clip_norm=1.0, scaler=scaler, autocast=autocast)
            for m, loss in (("clip", ClipLoss()), ("alip", ALIPLoss()))}
    ref = ReferenceALIPStep(model, opt, autocast)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for regime in regimes:
        batch = tuple(t.to(device) for t in make_batch(batch_size, size, regime, gen))
        steps = {"clip": lambda: train_step(ctxs["clip"], [batch]),
                 "alip": lambda: train_step(ctxs["alip"], [batch]),
                 "alip-ref": lambda: ref(*batch)}
        times = {k: [] for k in steps}
        for rep in range(reps + 1):
            for k, fn in steps.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                if rep:  # first round is warm-up
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((name, regime, med))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    on_gpu = torch.cuda.is_available()
    p.add_argument("--models", nargs="+",
                   default=["ALIP-ViT-B-32"] if on_gpu else ["ALIP-demo", "ALIP-ViT-B-32"])
    p.add_argument("--batch-size", type=int, default=256 if on_gpu else 32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--precision", choices=["fp32", "amp", "amp_bf16"],
                   default="amp" if on_gpu else "fp32")
    p.add_argument("--texts", nargs="+", choices=["realistic", "full"],
                   default=["realistic", "full"])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} CPU threads")
    print(f"device {device} ({where}), batch {args.batch_size}, precision {args.precision}, "
          f"median of {args.reps}")
    print(f"{'model':<15}{'texts':<11}{'clip s/s':>10}{'alip s/s':>10}{'ref s/s':>10}"
          f"{'alip/clip':>11}{'ref/alip':>10}")
    for name in args.models:
        for name, regime, med in bench_model(name, args.batch_size, device, args.precision,
                                             args.reps, args.texts):
            sps = {k: args.batch_size / v for k, v in med.items()}
            print(f"{name:<15}{regime:<11}{sps['clip']:10.1f}{sps['alip']:10.1f}"
                  f"{sps['alip-ref']:10.1f}{med['alip'] / med['clip']:11.2f}"
                  f"{med['alip-ref'] / med['alip']:10.2f}", flush=True)


if __name__ == "__main__":
    main()
