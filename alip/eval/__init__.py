"""Evaluation: the published protocols for our checkpoints and any open_clip model.

load.py          load_model: open_clip names/tags/files, train.py checkpoints, ALIP-released weights
features.py      normalised image / text features (precision, optional distributed sharding)
datasets.py      the 11 zero-shot datasets + ImageFolder, never downloaded, CLIP class names/templates
zeroshot.py      evaluate_zeroshot: top-1 / top-5 / mean-per-class with float logits
retrieval.py     evaluate_retrieval: Karpathy-split R@1/5/10 both ways and rsum
linear_probe.py  evaluate_linear_probe: L2 logistic regression, C chosen on held-out train
report.py        the ALIP README's zero-shot table, JSON output
cli.py           the CLIs' top level: flag, device, --output checks before loading; one-line errors
"""
