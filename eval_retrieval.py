#!/usr/bin/env python
"""Zero-shot image-text retrieval (R@1/5/10 both ways, rsum) on a Karpathy split.

  python eval_retrieval.py --checkpoint run/checkpoints/epoch_32.pt \
      --annotation data/coco/dataset_coco.json --image-root data/coco [--caption-prefix "a photo of "]
"""
import argparse
import sys

from alip.eval.cli import check_args, run_cli
from alip.eval.load import add_model_args, dense_head_from_args, load_model_from_args
from alip.eval.report import write_json
from alip.eval.retrieval import evaluate_retrieval, load_annotation


def main(argv=None):
    p = add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--annotation", required=True,
                   help="Karpathy split json (dataset_coco.json / dataset_flickr30k.json layout)")
    p.add_argument("--image-root", required=True, help="images are at IMAGE_ROOT/filepath/filename")
    p.add_argument("--split", default="test")
    p.add_argument("--caption-prefix", default="",
                   help='prepended to every caption; "a photo of " reproduces the ALIP evaluator')
    p.add_argument("--name", default=None, help="dataset name printed in the table")
    p.add_argument("--output", default=None,
                   help="write the metrics (and the settings) as JSON here (its folder is made)")
    p.add_argument("--check-only", action="store_true",
                   help="check the flags, the annotation and that every image is there, then exit "
                        "(scripts/run_retrieval.sh checks every dataset before evaluating any)")
    args = p.parse_args(argv)
    # everything that can be checked without the model, before anything is evaluated
    check_args(args)
    loaded = load_annotation(args.annotation, args.image_root, args.split)
    if args.check_only:
        print(f"{args.name or args.annotation}: {len(loaded[0])} images, {len(loaded[1])} captions "
              f"({args.split}) under {args.image_root}")
        return 0
    model, preprocess, tokenizer = load_model_from_args(args)
    dense_head = dense_head_from_args(args)
    details = {}
    metrics = evaluate_retrieval(model, preprocess, tokenizer, args.annotation, args.image_root,
                                 split=args.split, caption_prefix=args.caption_prefix,
                                 batch_size=args.batch_size, device=args.device,
                                 workers=args.workers, precision=args.precision,
                                 dense_head=dense_head, loaded=loaded, details=details)
    name = args.name or args.annotation
    print(f"{name} ({args.split}), image->text / text->image, caption prefix {args.caption_prefix!r}")
    print("| R@1 | R@5 | R@10 | rsum |\n|---|---|---|---|")
    print("| " + " | ".join(f"{metrics[f'i2t_R@{k}']:.1f}/{metrics[f't2i_R@{k}']:.1f}" for k in (1, 5, 10))
          + f" | {metrics['rsum']:.1f} |")
    if args.output:
        write_json(args.output, metrics=metrics, settings=vars(args),
                   truncation=details.get("truncation"), complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "eval_retrieval.py"))
