"""Images/s of zero-shot evaluation: eval_zeroshot.py's loop vs open_clip_train's, same run.

    .venv/bin/python bench/eval_throughput.py                                  # CPU: ALIP-tiny
    .venv/bin/python bench/eval_throughput.py --model ALIP-ViT-B-32 --device cuda \
        --batch-size 256 --num-images 10000 --workers 8 --precision amp         # on a GPU

Both loops get the same model, the same classifier (open_clip.build_zero_shot_classifier), the
same DataLoader and batch size, and are timed ABBA-interleaved (ours, peer, peer, ours, ...)
for --repeats rounds after a warm-up (torch threads pinned, --threads); reported: the median
images/s per loop and median [min-max] of the per-round ratio ours/peer. Two inputs:
  files    a generated ImageFolder of JPEGs (decode + preprocess in DataLoader workers: what a
           real run does)
  tensors  the same images already preprocessed, in memory (the loop itself: model + metrics)
  ours     alip.eval.features.image_features + logits + alip.eval.zeroshot.classification_metrics
  peer     open_clip_train.zero_shot.run (its per-batch accuracy uses float() of a 1-element
           array, a TypeError under numpy >= 2.3; the bench patches in the same computation
           with .item() so the peer can run)
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import open_clip_train.zero_shot as oct_zero_shot
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _timing  # noqa: E402
import alip  # noqa: E402,F401
from alip.eval.features import image_features  # noqa: E402
from alip.eval.zeroshot import classification_metrics, zeroshot_classifier  # noqa: E402


def _accuracy_numpy2(output, target, topk=(1,)):  # open_clip_train's accuracy, float() -> .item()
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() for k in topk]


def make_image_folder(root, num_images, classes, size, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        d = os.path.join(root, f"class_{i % classes:02d}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(d, f"{i:06d}.jpg"), quality=90)


def ours(model, classifier, loader, args):
    feats, targets = image_features(model, loader, device=args.device, precision=args.precision)
    return classification_metrics(100.0 * feats @ classifier, targets)


def peer(model, classifier, loader, args):
    return oct_zero_shot.run(model, classifier, loader, args)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ALIP-tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-images", type=int, default=1024)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=64, help="side of the generated JPEGs")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inputs", default="files,tensors")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    threads = _timing.setup(args.threads)
    oct_zero_shot.accuracy = _accuracy_numpy2
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, precision=args.precision,
                                                                 device=args.device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    classnames = [f"class {i}" for i in range(args.classes)]
    classifier = zeroshot_classifier(model, tokenizer, classnames, ["a photo of a {}."],
                                     device=args.device, precision=args.precision)
    peer_args = SimpleNamespace(device=args.device, precision=args.precision, batch_size=args.batch_size)
    print(f"model {args.model}, device {args.device}, precision {args.precision}, batch {args.batch_size}, "
          f"{args.num_images} images, workers {args.workers}, {_timing.describe(args.device, threads)}")
    with tempfile.TemporaryDirectory() as tmp:
        make_image_folder(tmp, args.num_images, args.classes, args.image_size)
        folder = ImageFolder(tmp, transform=preprocess)
        pin = torch.device(args.device).type == "cuda"
        for kind in args.inputs.split(","):
            if kind == "files":
                loader = DataLoader(folder, batch_size=args.batch_size, num_workers=args.workers,
                                    pin_memory=pin, persistent_workers=args.workers > 0)
            else:
                x = torch.stack([folder[i][0] for i in range(len(folder))])
                y = torch.tensor(folder.targets)
                loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, pin_memory=pin)
            # same numbers from both loops: exactly in fp32; under AMP the two loops round the
            # logits differently (ours normalises in fp32), so a near-tie of a random model may
            # flip: a few images, at most 0.5% of them
            a, (top1, top5) = ours(model, classifier, loader, args), peer(model, classifier, loader, peer_args)
            tol = 1e-6 if args.precision == "fp32" else 0.5
            assert abs(a["top1"] - 100 * top1) <= tol and abs(a["top5"] - 100 * top5) <= tol, (a, top1, top5)
            print(f"{kind:8s} top-1 ours {a['top1']:.3f}%, open_clip_train {100 * top1:.3f}%", flush=True)
            times = _timing.abba({"ours": lambda: ours(model, classifier, loader, args),
                                  "peer": lambda: peer(model, classifier, loader, peer_args)},
                                 args.repeats, args.device, label=kind)
            ips = {k: args.num_images / _timing.stats(v)[0] for k, v in times.items()}
            print(f"{kind:8s} ours {ips['ours']:9.1f} img/s   open_clip_train {ips['peer']:9.1f} img/s   "
                  f"ratio ours/peer {_timing.fmt(_timing.ratio(times, 'peer', 'ours'), 3)}", flush=True)

if __name__ == "__main__":
    main()
