"""Zero-shot classification: the CLIP protocol, with the reference evaluator's integer-logit bug fixed.

Classifier: ``open_clip.build_zero_shot_classifier`` (mean of the normalised template embeddings
per class, renormalised). Logits ``100 * image_features @ classifier`` stay float32 (the ALIP
reference stores them in a ``torch.long`` tensor, truncating before top-1). Top-k accuracy is
clip_benchmark's (``logits.topk`` hits, same tie order) and mean-per-class accuracy is sklearn's
``balanced_accuracy_score``, the function clip_benchmark calls, so our numbers equal
clip_benchmark's on the same model and data (x100: we report percentages). clip_benchmark's own
``accuracy`` (and open_clip_train's copy) cannot be called: ``float()`` of a 1-element array is a
TypeError under numpy >= 2.3.
"""
import open_clip
import torch
from sklearn.metrics import balanced_accuracy_score

from .datasets import build_dataset
from .features import eval_mode, image_features, make_loader, precision_context, unwrap


def zeroshot_classifier(model, tokenizer, classnames, templates, device="cpu", precision="fp32"):
    """-> float32 [D, C] classifier (columns are unit class embeddings)."""
    autocast, _ = precision_context(precision, device)
    with torch.inference_mode(), autocast():
        weights = open_clip.build_zero_shot_classifier(
            model, tokenizer=tokenizer, classnames=classnames, templates=templates,
            num_classes_per_batch=10, device=device)
    return weights.float()


def topk_accuracy(logits, targets, ks=(1, 5)):
    """Fraction of rows whose target is among the k highest logits, for each k."""
    hits = logits.topk(max(ks), dim=1).indices == targets[:, None]
    return [hits[:, :k].sum().item() / len(targets) for k in ks]


def classification_metrics(logits, targets):
    """-> {"top1", "top5", "mean_per_class"} in percent; top5 is NaN below 5 classes (as
    clip_benchmark)."""
    logits, targets = logits.float().cpu(), targets.cpu()
    if logits.shape[1] >= 5:
        top1, top5 = topk_accuracy(logits, targets, (1, 5))
    else:
        (top1,), top5 = topk_accuracy(logits, targets, (1,)), float("nan")
    mean_per_class = balanced_accuracy_score(targets.numpy(), logits.argmax(dim=1).numpy())
    return {"top1": 100 * top1, "top5": 100 * top5, "mean_per_class": 100 * float(mean_per_class)}


def evaluate_zeroshot(model, preprocess, tokenizer, dataset, root, batch_size=64, device="cpu",
                      workers=0, precision="fp32", classnames=None, templates=None, split=None,
                      distributed=False, dense_head=None):
    """Zero-shot classification of ``dataset`` (a name in alip.eval.datasets.DATASETS) under ``root``.

    ``classnames`` / ``templates``: lists or files (one entry per line, templates with ``{}``);
    default: the CLIP paper's for named datasets, folder names and the 80 ImageNet templates for
    ``imagefolder``. -> {"top1", "top5", "mean_per_class", "uses_mean_per_class", "num_images"}
    (percentages; ``uses_mean_per_class`` is 1.0 for Pets, Flowers, Caltech101 and Aircraft,
    whose headline number is mean_per_class, else 0.0). ``distributed=True``: every rank of the
    initialised process group calls this; each encodes 1/world of the images; all get the result.
    ``dense_head`` (a FILIPHead): FILIP's token-wise zero-shot (class = prompt-averaged token
    matrix, Frobenius-normalised; score = mean over patches of max over class tokens).
    """
    data = build_dataset(dataset, root, preprocess, split=split, classnames=classnames,
                         templates=templates)
    model = unwrap(model)
    with eval_mode(model):
        if dense_head is not None:
            from .dense import DenseView
            model = DenseView(model, dense_head.to(device))
        loader = make_loader(data.dataset, batch_size, workers, device, distributed=distributed)
        features, targets = image_features(model, loader, device=device, precision=precision,
                                           distributed=distributed)
        if dense_head is not None:
            from .dense import dense_zeroshot_classifier, dense_zeroshot_logits
            with torch.inference_mode():
                classes, mask = dense_zeroshot_classifier(model.model, model.head, tokenizer,
                                                          data.classnames, data.templates, device)
            logits = dense_zeroshot_logits(model.unflatten(features)[0], classes.to(features),
                                           mask.to(features.device))
        else:
            classifier = zeroshot_classifier(model, tokenizer, data.classnames, data.templates,
                                             device=device, precision=precision)
            logits = 100.0 * features @ classifier.to(features.device)
    metrics = classification_metrics(logits, targets)
    metrics["uses_mean_per_class"] = float(data.mean_per_class)
    metrics["num_images"] = float(len(targets))
    return metrics
