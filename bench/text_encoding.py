"""Length-aware text encoding: the text tower's passes and the ALIP step vs open_clip's CLIP step.

    .venv/bin/python bench/text_encoding.py                  # CPU defaults, ~3 min on 2 idle cores
    .venv/bin/python bench/text_encoding.py                  # on a GPU: text batch 1024, step batch 512

Texts: raw web text with YFCC-like lengths (lognormal, median 15 tokens, 0.9% at 77) and
synthetic captions of 10-25 tokens (bench/_texts.py). Two parts, each ABBA-interleaved over
--repeats (median [min-max] of the per-repeat ratios):

1. text tower passes at --text-batch (forward; --backward adds the backward pass):
     padded       open_clip's model.encode_text, every row 77 tokens
     trim         one pass trimmed to the batch's longest text (alip before issue #15)
     grouped      rows sorted into <= --max-groups length groups, each trimmed to its longest
     packed       one packed sequence, per-sequence causal varlen_attn (CUDA); on CPU the
                  reference attention loop stands in (same math, not the kernel's speed)
   for raw text and captions, with the tokens each processes / the padded pass's beside the
   time ratio (and the tokens ratio over 1000 random batches of the same mix);
2. one training step (forward + backward, towers + loss) at --step-batch: open_clip's CLIP
   (model(images, raw) + open_clip.loss.ClipLoss: one padded 77-token text pass) vs ALIP
   (ALIPEncoder: raw text and caption, length-aware; ALIPLoss with its gates).
3. ``--parts long``: the text tower built at --long-context (256) tokens, --long-batch (256)
   long captions of 60-200 tokens (median ~100), forward + backward: the length-aware path
   (grouped on CPU, packed on CUDA) vs the padded 256-token pass, time ratio beside tokens ratio.
   On CPU the batch runs as micro-batches of --long-micro-batch (32) rows on both sides,
   gradients accumulated (the tower's cost is per sample); the grouped side keeps the whole
   batch's length-group plan, each group run in chunks at its own length, so it processes the
   batch-256 plan's tokens. Warm-up: each side's largest pass; CPU seconds printed beside.

    .venv/bin/python bench/text_encoding.py --parts long --repeats 2   # CPU: batch 256, ~11 min quiet
    .venv/bin/python bench/text_encoding.py --parts long               # CUDA: batch 256 in one pass, packed
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
from alip.model import (_encode_trimmed, _project, _text_tower, encode_text,  # noqa: E402
                        host_tokens, length_groups, reference_varlen_attn, text_lengths,
                        to_device_keeping_host_tokens)


def tokens_processed(path, lengths, max_groups):
    if path == "padded":
        return len(lengths) * 77
    if path == "trim":
        return len(lengths) * int(lengths.max())
    if path == "grouped":
        return sum(len(rows) * n for rows, n in length_groups(lengths, max_groups))
    return int(lengths.sum())


def mean_tokens_ratio(kind, batch, path, max_groups, batches=1000):
    gen = torch.Generator().manual_seed(1)
    ratios = [tokens_processed(path, _texts.lengths(kind, batch, gen), max_groups) / (batch * 77)
              for _ in range(batches)]
    return sum(ratios) / len(ratios)


def text_part(model, args, device, autocast):
    gen = torch.Generator().manual_seed(0)
    # as the training loop moves tokens: with their host copy (the plans are made on the host)
    texts = {"raw": to_device_keeping_host_tokens(_texts.batch("yfcc", args.text_batch, gen), device),
             "caption": to_device_keeping_host_tokens(_texts.batch("caption", args.text_batch, gen),
                                                      device)}
    attn_fn = None if device.type == "cuda" else reference_varlen_attn

    def run(path, text):
        def fn():
            with torch.set_grad_enabled(args.backward), autocast():
                if path == "padded":
                    f = model.encode_text(text, normalize=True)
                else:
                    f = encode_text(model, text, path=path, max_groups=args.max_groups, attn_fn=attn_fn)
            if args.backward:
                f.float().sum().backward()
                model.zero_grad(set_to_none=True)
        return fn

    sides = {"padded": run("padded", texts["raw"])}  # same shape for captions: timed once
    for path in args.paths:
        if path != "padded":
            for kind, text in texts.items():
                sides[f"{kind} {path}"] = run(path, text)
    for name, fn in sides.items():  # warm-up on 4 rows of the same texts
        kind, _, path = name.rpartition(" ")
        run(path, texts[kind or "raw"][:4])()
    times = _timing.abba({n: _timing.n_times(fn, args.inner) for n, fn in sides.items()},
                         args.repeats, device, warmup=0, label="text passes")
    times = {n: [t / args.inner for t in ts] for n, ts in times.items()}
    print(f"\ntext tower of {args.model}, batch {args.text_batch}, "
          f"{'forward + backward' if args.backward else 'forward'}; median [min-max] over "
          f"{args.repeats} ABBA repeats of {args.inner} call(s); tokens: this batch (mean over 1000 batches)")
    print(f"  {'pass':<18}{'s':>9}   {'time / padded':<22}{'tokens / padded':<18}")
    for name in sides:
        kind, _, path = name.rpartition(" ")
        kind = kind or "raw"
        lens = text_lengths(texts[kind]).cpu()
        tok = tokens_processed(path, lens, args.max_groups) / (len(lens) * 77)
        mean = mean_tokens_ratio("yfcc" if kind == "raw" else "caption", args.text_batch, path,
                                 args.max_groups)
        print(f"  {name:<18}{_timing.stats(times[name])[0]:9.4f}   "
              f"{_timing.fmt(_timing.ratio(times, name, 'padded')):<22}{tok:.3f} ({mean:.3f})")


def step_part(model, args, device, autocast):
    gen = torch.Generator().manual_seed(2)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(args.step_batch, 3, size, size, generator=gen).to(device)
    raw = to_device_keeping_host_tokens(_texts.batch("yfcc", args.step_batch, gen), device)
    cap = to_device_keeping_host_tokens(_texts.batch("caption", args.step_batch, gen), device)
    clip_loss, alip_loss, enc = ClipLoss(), ALIPLoss().to(device), ALIPEncoder(model, "separate")
    batch = {"image": images, "raw": raw, "caption": cap}

    def clip():
        with autocast():
            loss = clip_loss(*model(images, raw)[:3])
        loss.backward()
        model.zero_grad(set_to_none=True)

    def alip_step():
        with autocast():
            f = enc(batch)
            loss = alip_loss(f["image"], f["raw"], f["caption"], f["logit_scale"])["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)

    times = _timing.abba({"clip": _timing.n_times(clip, args.inner),
                          "alip": _timing.n_times(alip_step, args.inner)},
                         args.repeats, device, label="step")
    times = {n: [t / args.inner for t in ts] for n, ts in times.items()}
    lens_raw, lens_cap = text_lengths(raw).cpu(), text_lengths(cap).cpu()
    path = "packed" if device.type == "cuda" else "grouped"
    text_tokens = (tokens_processed(path, lens_raw, args.max_groups)
                   + tokens_processed(path, lens_cap, args.max_groups)) / (args.step_batch * 77)
    print(f"\ntraining step of {args.model} (forward + backward), batch {args.step_batch}: "
          f"open_clip CLIP {_timing.stats(times['clip'])[0]:.4f} s, ALIP {_timing.stats(times['alip'])[0]:.4f} s")
    print(f"  ALIP step / CLIP step: {_timing.fmt(_timing.ratio(times, 'alip', 'clip'))}   "
          f"(ALIP's two {path} text passes process {text_tokens:.3f}x the tokens of CLIP's padded one)")


def long_passes(lens, path, micro, max_groups, context):
    """The passes of one long-caption batch as ``[(row indices, length)]``, each at most
    ``micro`` rows (None: no limit). ``grouped``: the WHOLE batch's length groups
    (``length_groups``, <= ``max_groups``), each group's rows cut into chunks run at the
    group's length, so the tokens are the batch plan's whatever ``micro``; ``padded``: chunks
    at ``context``; ``packed``: chunks packed (length None: each chunk's own sum of lengths)."""
    if path == "grouped":
        groups = length_groups(lens, max_groups)
    else:
        groups = [(torch.arange(len(lens)), context if path == "padded" else None)]
    micro = micro or len(lens)
    return [(chunk, n) for rows, n in groups for chunk in rows.split(micro)]


def long_side(model, text, passes, path, autocast, attn_fn=None):
    """A callable that runs ``passes`` over ``text`` (on its device, with a host copy), forward +
    backward one pass at a time, the gradients accumulating in the model's ``.grad`` (the
    tower's cost is per sample: the sum of the passes' gradients is the whole batch's).
    ``attn_fn``: the packed path's attention (default: varlen_attn, CUDA)."""
    tower, device = _text_tower(model), text.device
    host = host_tokens(text) if host_tokens(text) is not None else text.cpu()
    lens = text_lengths(host)
    chunks = [(to_device_keeping_host_tokens(host[rows], device), lens[rows].to(device), n)
              for rows, n in passes]

    def fn():
        for rows, rows_lens, n in chunks:
            with autocast():
                if path == "padded":
                    f = model.encode_text(rows, normalize=True)
                elif path == "grouped":  # one trimmed pass at the group's length
                    f = _project(tower, _encode_trimmed(tower, rows, rows_lens, n), True)
                else:
                    f = encode_text(model, rows, path=path, attn_fn=attn_fn)
            f.float().sum().backward()
    return fn


def long_part(args, device, autocast):
    """Long captions in a --long-context tower: length-aware forward+backward vs padded, the
    batch run as micro-batches of --long-micro-batch rows on both sides."""
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, force_context_length=args.long_context).to(device)
    model.set_grad_checkpointing(args.long_checkpointing)  # both sides alike
    n = args.long_context
    gen = torch.Generator().manual_seed(3)
    text = to_device_keeping_host_tokens(_texts.batch("long", args.long_batch, gen, n), device)
    path = "packed" if device.type == "cuda" else "grouped"
    lens = text_lengths(text).cpu()
    plans = {w: long_passes(lens, w, args.long_micro_batch, args.max_groups, n)
             for w in ("padded", path)}
    sides = {w: long_side(model, text, plans[w], w, autocast) for w in plans}

    def timed(w):
        def fn():
            sides[w]()
            model.zero_grad(set_to_none=True)
        return fn

    for w, plan in plans.items():  # warm-up: each side's largest pass (the first call of a size is slower)
        rows, m = max(plan, key=lambda p: len(p[0]) * (p[1] or int(lens[p[0]].sum())))
        long_side(model, text, [(rows, m)], w, autocast)()
        model.zero_grad(set_to_none=True)
    cpu = {} if device.type == "cpu" else None
    times = _timing.abba({w: timed(w) for w in sides}, args.repeats, device, warmup=0,
                         label="long captions", cpu_times=cpu)
    tok = sum(len(r) * (m or int(lens[r].sum())) for r, m in plans[path])
    micro = args.long_micro_batch
    how = (f"as {len(plans['padded'])} micro-batches of <= {micro} rows (padded) / "
           f"{len(plans[path])} passes of <= {micro} rows ({path}: the batch's {args.max_groups}-group "
           f"plan, chunked), gradients accumulated" if micro and micro < args.long_batch
           else "in one batch")
    print(f"\ntext tower of {args.model} at context {n}, batch {args.long_batch} captions of "
          f"{int(lens.min())}-{int(lens.max())} tokens (median {int(lens.median())}), forward + "
          f"backward{' (grad checkpointing)' if args.long_checkpointing else ''} {how}; median "
          f"[min-max] over {args.repeats} ABBA repeats")
    if cpu:  # before the figure line (bench/gpu_check.sh reads the last line)
        print(f"  process CPU time: padded {_timing.stats(cpu['padded'])[0]:.3f} s   {path}: "
              f"{_timing.stats(cpu[path])[0]:.3f} s   ratio {_timing.fmt(_timing.ratio(cpu, path, 'padded'))}")
    print(f"  padded {n}: {_timing.stats(times['padded'])[0]:.3f} s   {path}: "
          f"{_timing.stats(times[path])[0]:.3f} s   time {path}/padded "
          f"{_timing.fmt(_timing.ratio(times, path, 'padded'))}   tokens {path}/padded "
          f"{tok / (len(lens) * n):.3f}")
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--model", default="ALIP-ViT-B-32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--precision", choices=["fp32", "amp", "amp_bf16"], default=None,
                   help="default: amp_bf16 on CUDA, fp32 on CPU")
    p.add_argument("--text-batch", type=int, default=None, help="default: 1024 on CUDA, 256 on CPU")
    p.add_argument("--step-batch", type=int, default=None, help="default: 512 on CUDA, 16 on CPU")
    p.add_argument("--backward", action="store_true", default=None,
                   help="time text passes with backward (default on CUDA)")
    p.add_argument("--paths", nargs="+", choices=["padded", "trim", "grouped", "packed"], default=None,
                   help="default: all on CUDA, grouped on CPU")
    p.add_argument("--max-groups", type=int, default=4)
    p.add_argument("--repeats", type=int, default=None, help="default: 10 on CUDA, 3 on CPU")
    p.add_argument("--inner", type=int, default=None,
                   help="calls per timed sample (default: 5 on CUDA, where one pass is milliseconds; 1 on CPU)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parts", nargs="+", choices=["text", "step", "long"], default=["text", "step"])
    p.add_argument("--long-context", type=int, default=256, help="context of the long part's tower")
    p.add_argument("--long-batch", type=int, default=256, help="captions in the long part's batch")
    p.add_argument("--long-micro-batch", type=int, default=None,
                   help="run the long part's batch as micro-batches of at most this many rows, "
                        "forward + backward each, gradients accumulated, on both sides (the "
                        "grouped side's length groups planned over the whole batch). Default: 32 "
                        "on CPU (the padded 256 x 256 pass in one batch took > 12.8 GB and was "
                        "OOM-killed on a 23 GB machine), the whole batch on CUDA")
    p.add_argument("--long-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="gradient checkpointing in the long part, both sides (another way to fit "
                        "the memory; it adds a forward recompute to both)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.text_batch = args.text_batch or (1024 if on_gpu else 256)
    args.step_batch = args.step_batch or (512 if on_gpu else 16)
    args.repeats = args.repeats or (10 if on_gpu else 3)
    args.inner = args.inner or (5 if on_gpu else 1)
    args.backward = on_gpu if args.backward is None else args.backward
    args.paths = args.paths or (["trim", "grouped", "packed"] if on_gpu else ["grouped"])
    args.precision = args.precision or ("amp_bf16" if on_gpu else "fp32")
    if args.long_micro_batch is None and not on_gpu:
        args.long_micro_batch = 32
    if args.long_micro_batch is not None and args.long_micro_batch < 1:
        p.error(f"--long-micro-batch {args.long_micro_batch}: give a number of rows >= 1")
    threads = _timing.setup(args.threads)
    dtype = {"amp": torch.float16, "amp_bf16": torch.bfloat16}.get(args.precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    print(f"bench/text_encoding.py on {_timing.describe(device, threads)}, precision {args.precision}")
    if "long" in args.parts:
        long_part(args, device, autocast)
    if not {"text", "step"} & set(args.parts):
        return
    torch.manual_seed(0)
    model = open_clip.create_model(args.model).to(device)
    if "text" in args.parts:
        text_part(model, args, device, autocast)
    if "step" in args.parts:
        step_part(model, args, device, autocast)


if __name__ == "__main__":
    main()
