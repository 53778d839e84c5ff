"""Training-step throughput: open_clip_train vs our CLIP step vs our ALIP step vs a reference-style one.

    .venv/bin/python bench/train_throughput.py              # CPU defaults, ~6 min on 2 cores
    .venv/bin/python bench/train_throughput.py --models ALIP-ViT-B-32 --batch-size 256 --texts realistic full  # GPU

A full optimizer step each (forward, loss, backward, grad clip 1.0, AdamW, logit_scale clamp),
on the same model and batch, ABBA-interleaved over --repeats (all sides and text regimes in the
same loop), in one process:
  oc-train   open_clip_train.train.train_one_epoch over a one-batch loader: open_clip's own
             CLIP training step (model forward with output_dict, ClipLoss, padded 77-token text)
  clip       ours: alip.training.step.train_step, --method clip (ClipLoss on raw text,
             length-aware text pass), with train.py's optimizer (alip.training.optim:
             fused AdamW) and its step (no read-back from the device)
  alip       ours: train_step, --method alip (ALIPEncoder: two trimmed text passes;
             ALIPLoss: one gather reused by gates and both paths; no checkpointing)
  alip-ref   as deepglint/ALIP does it (train.py:106-168, loss.py:84-121): gradient
             checkpointing always on, two untrimmed 77-token text passes, gates with their
             own gathers of v/t_raw/t_cap plus a gather per path in the loss
             (at world size 1 the gathers cost nothing), per-sample weighted CE
Prints samples/s (median) and median [min-max] of the per-repeat ratios: clip/oc-train
samples/s (target >= 1.3), alip/clip step time, alip-ref/alip step time. Texts: "realistic"
(YFCC-like raw text, bench/_texts.py; captions 10-25 tokens) and "full" (all 77).
"""
import argparse
import logging
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip_train.train import train_one_epoch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _steps  # noqa: E402
import _texts  # noqa: E402
import _timing  # noqa: E402
import alip  # noqa: E402,F401
from alip.loss import gather_features  # noqa: E402
from alip.methods import get_method, method_names  # noqa: E402
from alip.training.params import parse_args  # noqa: E402


def make_batch(b, size, regime, gen):
    raw, cap = ("full", "full") if regime == "full" else ("yfcc", "caption")
    return (torch.randn(b, 3, size, size, generator=gen), _texts.batch(raw, b, gen),
            _texts.batch(cap, b, gen))


class OpenClipTrainStep:
    """One call = open_clip_train's train_one_epoch over a loader of one batch."""

    class _Loader(list):  # what train_one_epoch reads: data["train"].dataloader & set_epoch
        num_batches = 1

        def __init__(self, batch):
            super().__init__([batch[:2]])
            self.num_samples = len(batch[0])
            self.dataloader = self

        def set_epoch(self, epoch):
            pass

    def __init__(self, model, optimizer, scaler, device, precision, batch_size):
        self.model, self.opt, self.scaler = model, optimizer, scaler
        self.loss = ClipLoss()
        self.args = SimpleNamespace(
            device=str(device), precision=precision,
            distill=False, accum_freq=1, skip_scheduler=True, horovod=False, grad_clip_norm=1.0,
            log_every_n_steps=1, rank=0, local_rank=0, world_size=1, batch_size=batch_size,
            wandb=False)

    def __call__(self, batch):
        self.model.output_dict = True
        try:
            train_one_epoch(self.model, {"train": self._Loader(batch)}, self.loss, 0, self.opt,
                            self.scaler, None, None, self.args)
        finally:
            self.model.output_dict = False


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


def bench_model(name, batch_size, device, precision, reps, regimes, methods=("clip", "alip")):
    model = open_clip.create_model(name).to(device)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.98), weight_decay=0.2)
    dtype = {"amp": torch.float16, "amp_bf16": torch.bfloat16}.get(precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    scaler = torch.amp.GradScaler("cuda") if precision == "amp" and device.type == "cuda" else None
    info = _steps.local_info(device)
    ctxs, specs = {}, {}
    for m in methods:  # each method's own encoder (heads included) and criterion, same model
        m_model, m_name = model, name
        if m in ("declip", "defilip"):  # they need the mask token: the DeCLIP-* twin config
            m_name = name.replace("ALIP-", "DeCLIP-")
            m_model = open_clip.create_model(m_name).to(device)
        bank = ["--declip-bank-size", "4096"] if m == "declip" else []
        method = get_method(m)(parse_args(["--method", m, "--model", m_name, *bank])).attach(m_model)
        ctxs[m] = _steps.step_context(method, info, autocast, scaler)  # train.py's AdamW
        specs[m] = method.data
    ref = ReferenceALIPStep(model, opt, autocast)
    oc_train = OpenClipTrainStep(model, opt, scaler, device, precision, batch_size)
    gen = torch.Generator().manual_seed(0)
    sides = {}
    for regime in regimes:
        host = make_batch(batch_size, size, regime, gen)
        batch = tuple(t.to(device) for t in host)
        sides[f"{regime}/oc-train"] = lambda batch=batch: oc_train(batch)
        for m in methods:  # moved as train.py's loop moves batches (tokens keep a host copy)
            sides[f"{regime}/{m}"] = _steps.step_fn(ctxs[m], specs[m], host, gen, device)
        sides[f"{regime}/alip-ref"] = lambda batch=batch: ref(*batch)
    times = _timing.abba(sides, reps, device, label=name)
    if device.type == "cuda":  # peak memory of one step per side (FILIP's dense logits vs CLIP)
        for key, fn in sides.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            PEAK_MEMORY[key] = torch.cuda.max_memory_allocated()
    return times


PEAK_MEMORY = {}  # side -> bytes (CUDA only)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    on_gpu = torch.cuda.is_available()
    p.add_argument("--models", nargs="+",
                   default=["ALIP-ViT-B-32"] if on_gpu else ["ALIP-demo", "ALIP-ViT-B-32"])
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: 256 on CUDA; on CPU 128 for ALIP-demo and 8 for bigger models")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--precision", choices=["fp32", "amp", "amp_bf16"],
                   default="amp" if on_gpu else "fp32")
    p.add_argument("--methods", nargs="+", default=None, choices=method_names(),
                   help="our methods to time (clip and alip always); default: all registered")
    p.add_argument("--texts", nargs="+", choices=["realistic", "full"], default=None,
                   help="default: realistic and full on CUDA, realistic on CPU")
    args = p.parse_args(argv)
    logging.getLogger().setLevel(logging.WARNING)  # open_clip_train logs every step at INFO
    device = torch.device(args.device)
    threads = _timing.setup(args.threads)
    texts = args.texts or (["realistic", "full"] if device.type == "cuda" else ["realistic"])
    print(f"bench/train_throughput.py on {_timing.describe(device, threads)}, precision "
          f"{args.precision}; median [min-max] of {args.reps} ABBA repeats")
    print(f"{'model':<15}{'batch':>6} {'texts':<10}{'oc-train':>9}{'clip':>7}{'alip':>7}{'ref':>7}"
          f"  (samples/s)  {'clip/oc-train s/s':<19}{'alip/clip time':<19}{'ref/alip time':<19}")
    for name in args.models:
        batch = args.batch_size or (256 if device.type == "cuda" else 128 if name == "ALIP-demo" else 8)
        methods = ["clip", "alip"] + [m for m in (args.methods or method_names())
                                      if m not in ("clip", "alip")]
        times = bench_model(name, batch, device, args.precision, args.reps, texts, methods)
        for regime in texts:
            t = {k.split("/")[1]: v for k, v in times.items() if k.startswith(regime + "/")}
            sps = {k: batch / _timing.stats(v)[0] for k, v in t.items()}
            print(f"{name:<15}{batch:>6} {regime:<10}{sps['oc-train']:9.1f}{sps['clip']:7.1f}"
                  f"{sps['alip']:7.1f}{sps['alip-ref']:7.1f}  {'':11}  "
                  f"{_timing.fmt(_timing.ratio(t, 'oc-train', 'clip')):<19}"
                  f"{_timing.fmt(_timing.ratio(t, 'alip', 'clip')):<19}"
                  f"{_timing.fmt(_timing.ratio(t, 'alip-ref', 'alip')):<19}", flush=True)
            for m in methods[2:]:  # the other methods: step time over our CLIP's
                mem = PEAK_MEMORY.get(f"{regime}/{m}")
                mem = (f", peak memory {mem / 2**30:.2f} GiB = "
                       f"{mem / PEAK_MEMORY[regime + '/clip']:.2f}x clip's") if mem else ""
                print(f"{'':<15}{'':>6} {regime:<10}{m:>9}: {sps[m]:.1f} samples/s, time over "
                      f"clip {_timing.fmt(_timing.ratio(t, m, 'clip'))}{mem}", flush=True)


if __name__ == "__main__":
    main()
