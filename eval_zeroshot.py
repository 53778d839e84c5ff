#!/usr/bin/env python
"""Zero-shot classification: one dataset, a comma list, or `all` (the ALIP README's 11-dataset table).

  python eval_zeroshot.py --checkpoint ckpt.pt --dataset all --root "data/{dataset}" --imagenet-root data/imagenet
  python eval_zeroshot.py --checkpoint ckpt.pt --dataset imagefolder --root demo/classify \
      --classnames demo/classify/classnames.txt --templates demo/classify/templates.txt
"""
import argparse
import sys

from alip.eval.cli import check_args, run_cli
from alip.eval.datasets import (ALIP_TABLE, as_classnames, as_templates, canonical_name,
                                check_present, dataset_root)
from alip.eval.load import add_model_args, dense_head_from_args, load_model_from_args
from alip.eval.report import table, write_json
from alip.eval.zeroshot import evaluate_zeroshot


def main(argv=None):
    p = add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--dataset", required=True,
                   help=f"all, or a comma list of: {', '.join(ALIP_TABLE)}, imagefolder")
    p.add_argument("--root", required=True,
                   help="dataset root; may contain {dataset} (e.g. data/{dataset}) for several datasets")
    p.add_argument("--imagenet-root", default=None, help="ImageNet root (holding val/), overrides --root")
    p.add_argument("--split", default=None, help="default: the protocol's test split")
    p.add_argument("--classnames", default=None, help="file, one class name per line (ImageFolder order)")
    p.add_argument("--templates", default=None, help="file, one template per line with {}")
    p.add_argument("--skip-missing", action="store_true",
                   help="report a dataset that is not on disk and go on with the others")
    p.add_argument("--output", default=None,
                   help="write the metrics (and the settings) as JSON here (its folder is made); "
                        "rewritten after every dataset, with \"complete\": false until the last")
    args = p.parse_args(argv)
    names = list(ALIP_TABLE) if args.dataset == "all" else list(dict.fromkeys(
        canonical_name(n) for n in args.dataset.split(",")))
    if len(names) > 1 and (args.classnames or args.templates):
        p.error("--classnames / --templates apply to a single dataset")
    # everything that can be checked without the model, before anything is evaluated
    check_args(args)
    if args.classnames:
        as_classnames(args.classnames)
    if args.templates:
        as_templates(args.templates)
    missing = {}
    for name in names:
        try:
            check_present(name, dataset_root(args.root, name, args.imagenet_root), args.split)
        except FileNotFoundError as e:
            missing[name] = e
    if missing and not args.skip_missing:
        first, *others = missing
        also = f" (also missing: {', '.join(others)})" if others else ""
        raise FileNotFoundError(f"{missing[first]}{also}")
    if len(missing) == len(names):
        raise FileNotFoundError(f"nothing to evaluate: every dataset asked for is missing "
                                f"({', '.join(names)}); first: {missing[names[0]]}")
    skipped = {}
    for name, e in missing.items():
        skipped[name] = str(e)
        print(f"SKIPPED {name}: {e}", file=sys.stderr, flush=True)
    model, preprocess, tokenizer = load_model_from_args(args)
    dense_head = dense_head_from_args(args)
    results = {}
    for name in names:
        if name in skipped:
            continue
        try:
            m = evaluate_zeroshot(model, preprocess, tokenizer, name,
                                  dataset_root(args.root, name, args.imagenet_root),
                                  batch_size=args.batch_size, device=args.device, workers=args.workers,
                                  precision=args.precision, classnames=args.classnames,
                                  templates=args.templates, split=args.split,
                                  dense_head=dense_head)
        except FileNotFoundError as e:  # a layout problem check_present does not look for
            if not args.skip_missing:
                raise
            skipped[name] = str(e)
            print(f"SKIPPED {name}: {e}", file=sys.stderr, flush=True)
            continue
        results[name] = m
        print(f"{name}: top1 {m['top1']:.2f}  top5 {m['top5']:.2f}  mean-per-class "
              f"{m['mean_per_class']:.2f}  ({int(m['num_images'])} images)", flush=True)
        if args.output:  # kept after every dataset: a later failure loses nothing done
            write_json(args.output, metrics=results, skipped=skipped, settings=vars(args), complete=False)
    if not results:
        raise FileNotFoundError(f"nothing was evaluated: every dataset asked for is missing "
                                f"({'; '.join(skipped.values())})")
    text, mean = table(results)
    print(text)
    if skipped:
        print(f"not evaluated (missing): {', '.join(skipped)}")
    if args.output:
        write_json(args.output, metrics=results, mean=mean, skipped=skipped, settings=vars(args),
                   complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "eval_zeroshot.py"))
