"""The ALIP training step with 256-token captions vs the same captions cut at 77 (issue #26).

    .venv/bin/python bench/alip_long_step.py                  # CPU defaults: ViT-B/32, batch 64, ~6 min
    .venv/bin/python bench/alip_long_step.py --batch 256      # on a GPU (the default there)

Two sides, each the real ALIP step as train.py runs it (bench/_steps.py): the method object of
``train.py --method alip --model MODEL [--text-context 256]`` (alip/methods/alip.py), the open_clip
model built by train.py's ``build_model`` (alip.long_context, the method's ``model_kwargs()``),
and ``alip.training.step.train_step`` over its encoder and criterion: both towers forward
(raw text and caption through the one text tower, length-aware: grouped on CPU, packed on
CUDA, ``--text-mode auto``), ALIPLoss with its gates, backward, grad clip, train.py's AdamW
step, the logit-scale clamp; the batch moved as the training loop moves it.

  long    ``--text-context 256``: the tower at 256 positions; raw text of YFCC-like lengths
          (rows 77 wide, as data2rec writes a 77-token raw field) and captions of 60-200 tokens
          (median ~100, bench/_texts.py ``long``) in 256-wide rows
  cut77   the tower at its config's 77: the same raw text, the same captions cut at 77 as the
          tokenizer cuts them (first 76 ids + EOT)

Same images, same seed. The sides are ABBA-interleaved over --repeats after one warm-up round
at full size; prints each side's median step, the ratio long / cut77 as median [min-max] of
the per-repeat ratios (goal: <= 1.5 at ViT-B/32, batch 256), the process CPU time beside it on
a CPU, and the caption tokens each side's text passes run.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _steps  # noqa: E402
import _texts  # noqa: E402
import _timing  # noqa: E402
from alip.model import length_groups, text_lengths  # noqa: E402
from alip.training.loop import image_size_of  # noqa: E402


def host_batches(batch, image_size, context, gen):
    """(images, raw, captions) for each side on the host: captions ``context`` wide (long)
    and the same captions cut at 77 (cut77)."""
    images = torch.randn(batch, 3, image_size, image_size, generator=gen)
    raw = _texts.batch("yfcc", batch, gen)
    captions = _texts.batch("long", batch, gen, context)
    return {"long": (images, raw, captions), "cut77": (images, raw, _texts.cut(captions))}


def pass_tokens(rows, path, max_groups=4):
    """Tokens the length-aware pass runs over ``rows``: the grouped plan's (rows x group
    length) on the CPU, the sum of the lengths packed."""
    lens = text_lengths(rows)
    if path == "grouped":
        return sum(len(r) * n for r, n in length_groups(lens, max_groups))
    return int(lens.sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--model", default="ALIP-ViT-B-32", help="open_clip model name (the project's configs)")
    p.add_argument("--batch", type=int, default=None,
                   help="samples per step (default: 256 on CUDA; 64 on CPU, where a ViT-B/32 step "
                        "of 256 takes minutes of CPU and more memory than a 23 GB machine has)")
    p.add_argument("--text-context", type=int, default=256, help="the long side's tower context")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--precision", choices=["fp32", "amp", "amp_bf16"], default=None,
                   help="default: amp_bf16 on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="default: 10 on CUDA, 3 on CPU")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch = args.batch or (256 if on_gpu else 64)
    repeats = args.repeats or (10 if on_gpu else 3)
    precision = args.precision or ("amp_bf16" if on_gpu else "fp32")
    for flag, value, low in (("--batch", batch, 2), ("--repeats", repeats, 1),
                             ("--text-context", args.text_context, 78)):
        if value < low:
            p.error(f"{flag} {value}: give a number >= {low}")
    threads = _timing.setup(args.threads)
    flags = {"long": ["--text-context", str(args.text_context)], "cut77": []}
    sides, tokens, contexts, gen = {}, {}, {}, torch.Generator().manual_seed(0)
    host = None
    path = "packed" if on_gpu else "grouped"
    for side, extra in flags.items():
        ctx, method, model = _steps.method_step(
            ["--method", "alip", "--model", args.model, "--batch-size", str(batch), *extra],
            device, precision, threads)
        host = host or host_batches(batch, image_size_of(model), args.text_context, gen)
        sides[side] = _steps.step_fn(ctx, method.data, host[side], gen, device)
        tokens[side] = pass_tokens(host[side][2], path)
        contexts[side] = model.context_length
    print(f"bench/alip_long_step.py on {_timing.describe(device, threads)}, precision {precision}: "
          f"{args.model}, batch {batch}, the ALIP step (train_step: forward, loss, backward, "
          f"AdamW) with captions at {args.text_context} vs cut at 77")
    cpu = {} if not on_gpu else None
    times = _timing.abba(sides, repeats, device, warmup=1, label="alip step", cpu_times=cpu)
    caps = text_lengths(host["long"][2])
    print(f"\ncaptions {int(caps.min())}-{int(caps.max())} tokens (median {int(caps.median())}, "
          f"{int((caps > 77).sum())} of {batch} longer than 77); raw text YFCC-like, the same on "
          f"both sides; median [min-max] over {repeats} ABBA repeats")
    for side in sides:
        print(f"  {side:<6} tower context {contexts[side]:>3}, step {_timing.stats(times[side])[0]:8.3f} s   "
              f"caption tokens run "
              f"({path}) {tokens[side]:>7} = {tokens[side] / batch:.1f} per caption")
    if cpu:  # before the figure line (bench/gpu_check.sh reads the last line)
        print(f"  process CPU time long / cut77: {_timing.fmt(_timing.ratio(cpu, 'long', 'cut77'))}")
    print(f"  step long / cut77: {_timing.fmt(_timing.ratio(times, 'long', 'cut77'))}   "
          f"(caption tokens {tokens['long'] / tokens['cut77']:.2f}x)")
    return times


if __name__ == "__main__":
    main()
