#!/usr/bin/env python
"""Linear probe (the CLIP paper's protocol) on frozen image features of one or more datasets.

  python eval_linear_probe.py --checkpoint ckpt.pt --dataset cifar10,cifar100 --root "data/{dataset}"
  python eval_linear_probe.py --checkpoint ckpt.pt --dataset imagefolder --root demo/classify
"""
import argparse
import sys

from alip.eval.cli import check_args, run_cli
from alip.eval.datasets import ALIP_TABLE, NO_SPLIT, SPLITS, canonical_name, check_present, dataset_root
from alip.eval.linear_probe import evaluate_linear_probe
from alip.eval.load import add_model_args, load_model_from_args
from alip.eval.report import table, write_json


def main(argv=None):
    p = add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--dataset", required=True,
                   help=f"all, or a comma list of: {', '.join(ALIP_TABLE)}, imagefolder")
    p.add_argument("--root", required=True, help="dataset root; may contain {dataset}")
    p.add_argument("--imagenet-root", default=None, help="ImageNet root (holding train/ and val/)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="part of train held out to choose the regularisation strength, in (0, 1)")
    p.add_argument("--seed", type=int, default=0, help="split seed, in [0, 2**32 - 1]")
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit (>= 1)")
    p.add_argument("--output", default=None,
                   help="write the metrics (and the settings) as JSON here (its folder is made); "
                        "rewritten after every dataset, with \"complete\": false until the last")
    args = p.parse_args(argv)
    names = list(ALIP_TABLE) if args.dataset == "all" else list(dict.fromkeys(
        canonical_name(n) for n in args.dataset.split(",")))
    # everything that can be checked without the model, before anything is evaluated: the flags,
    # and every dataset's train and test split on disk
    check_args(args)
    for name in names:
        root = dataset_root(args.root, name, args.imagenet_root)
        for split in ((None,) if name in NO_SPLIT else SPLITS[name]):
            check_present(name, root, split)
    model, preprocess, _ = load_model_from_args(args)
    results = {}
    for name in names:
        m = evaluate_linear_probe(model, preprocess, name, dataset_root(args.root, name, args.imagenet_root),
                                  batch_size=args.batch_size, device=args.device, workers=args.workers,
                                  precision=args.precision, val_fraction=args.val_fraction,
                                  seed=args.seed, max_iter=args.max_iter)
        results[name] = m
        print(f"{name}: top1 {m['top1']:.2f}  top5 {m['top5']:.2f}  mean-per-class "
              f"{m['mean_per_class']:.2f}  (C = {m['C']:.3g})", flush=True)
        if args.output:  # kept after every dataset: a later failure loses nothing done
            write_json(args.output, metrics=results, settings=vars(args), complete=False)
    text, mean = table(results)
    print(text)
    if args.output:
        write_json(args.output, metrics=results, mean=mean, settings=vars(args), complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "eval_linear_probe.py"))
