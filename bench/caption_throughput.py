"""Images/s of caption.py's backends on the same images and settings, and CoCa's data-path overhead.

    .venv/bin/python bench/caption_throughput.py                          # CPU: tiny random-init CoCa + BLIP
    .venv/bin/python bench/caption_throughput.py --device cuda --num-images 4096 --batch-size 256 \
        --workers 8 --coca coca_ViT-L-14 --pretrained FILE --hf Salesforce/blip-image-captioning-base \
        --vllm Qwen/Qwen2.5-VL-3B-Instruct                                 # one GPU

Variants (each timed from a built captioner; model loading is not counted):
  <backend> e2e     alip.caption.run.caption_dataset over a manifest of JPEG files: read, decode and
                    preprocess in DataLoader workers, generate, write chunks, assemble
  coca model        CoCa generate alone on the same images already decoded and preprocessed, in
                    memory (the model's own speed; the e2e/model time ratio is what the data path costs)
Timed in alternating order (A B C .. C B A ..) for --repeats rounds after a warm-up round; prints
the median, min and max images/s of each variant and the CoCa time ratio e2e / model.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alip.caption.backends import GenSettings, build_captioner  # noqa: E402
from alip.caption.run import caption_dataset, decode_image  # noqa: E402
from alip.caption.sources import ManifestRows  # noqa: E402
from alip.caption.tiny import save_tiny_blip, save_tiny_coca  # noqa: E402


def make_images(root, n, size):
    """n photo-sized JPEGs (smooth noise, so they decode like photos) and a manifest."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(
            os.path.join(root, "images", f"{i}.jpg"), quality=90)
        lines.append(f'{{"image": "images/{i}.jpg", "text": "t"}}\n')
    path = os.path.join(root, "rows.jsonl")
    with open(path, "w") as f:
        f.writelines(lines)
    return path


def e2e_runner(name, captioner, gen, source, args, tmp):
    count = [0]

    def run():
        count[0] += 1
        out = os.path.join(tmp, f"{name}-{count[0]}")
        caption_dataset(source, captioner, gen, out, batch_size=args.batch_size, chunk_size=args.chunk_size,
                        workers=args.workers, progress=False)
    return run


def model_runner(captioner, source, args):
    items = [captioner.preprocess(decode_image(source.image_bytes(i))) for i in range(len(source))]
    batches = [captioner.collate(items[b:b + args.batch_size]) for b in range(0, len(items), args.batch_size)]
    if captioner.device.type == "cuda":
        batches = [b.to(captioner.device) for b in batches]

    def run():
        for b in batches:
            captioner(b)
    return run


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--num-images", type=int, default=96)
    p.add_argument("--image-size", type=int, nargs=2, default=(320, 240))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--coca", default="", help="open_clip CoCa name or local-dir: (default: tiny random-init)")
    p.add_argument("--pretrained", default="")
    p.add_argument("--hf", default="", help="transformers captioner (default: tiny random-init BLIP; 'none' skips)")
    p.add_argument("--vllm", default="", help="vLLM chat VLM (skipped unless given)")
    p.add_argument("--decoding", default="greedy", choices=["greedy", "beam", "sample"])
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--min-new-tokens", type=int, default=5)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    gen = GenSettings(decoding=args.decoding, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                      min_new_tokens=args.min_new_tokens)
    tmp = tempfile.mkdtemp(prefix="caption_bench_")
    source = ManifestRows(make_images(os.path.join(tmp, "in"), args.num_images, tuple(args.image_size)),
                          os.path.join(tmp, "in"))
    coca = args.coca or save_tiny_coca(os.path.join(tmp, "coca"))
    variants = {}
    random_init = bool(args.coca) and not args.pretrained and not args.coca.startswith(("local-dir:", "hf-hub:"))
    cap = build_captioner("open_clip", coca, args.pretrained, gen, args.device, precision,
                          random_init=random_init)
    if random_init:
        # random init (throughput only): open_clip leaves the decoder's output projection
        # uninitialised, so give it values or every logit ties
        torch.nn.init.normal_(cap.model.text_decoder.text_projection, std=cap.model.text_decoder.width ** -0.5)
    variants["coca e2e"] = e2e_runner("coca", cap, gen, source, args, tmp)
    variants["coca model"] = model_runner(cap, source, args)
    if args.hf != "none":
        hf = args.hf or save_tiny_blip(os.path.join(tmp, "blip"))
        hcap = build_captioner("hf", hf, "", gen, args.device, precision)
        variants["hf e2e"] = e2e_runner("hf", hcap, gen, source, args, tmp)
    if args.vllm:
        vgen = GenSettings(decoding="greedy" if args.decoding == "beam" else args.decoding,
                           max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens)
        vcap = build_captioner("vllm", args.vllm, "", vgen, args.device, precision)
        variants["vllm e2e"] = e2e_runner("vllm", vcap, vgen, source, args, tmp)
    names = list(variants)
    for name in names:  # warm-up: allocator, kernels, worker start-up paths, file cache
        variants[name]()
    times = {n: [] for n in names}
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timed(variants[name], args.device))
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
          f"{args.num_images} images {args.image_size[0]}x{args.image_size[1]} JPEG, batch {args.batch_size}, "
          f"workers {args.workers}, {precision}, {args.decoding}, max {args.max_new_tokens} new tokens, "
          f"coca {coca.split('/')[-1] if not args.coca else args.coca}, {args.repeats} rounds")
    print(f"{'variant':<12} {'median img/s':>12} {'min':>8} {'max':>8}")
    for name in names:
        ips = sorted(args.num_images / t for t in times[name])
        print(f"{name:<12} {statistics.median(ips):>12.3g} {ips[0]:>8.3g} {ips[-1]:>8.3g}")
    ratio = statistics.median(times["coca e2e"]) / statistics.median(times["coca model"])
    print(f"coca e2e / model time: {ratio:.3f} (target <= 1.2 on a GPU: the data path must not be the bottleneck)")


if __name__ == "__main__":
    main()
