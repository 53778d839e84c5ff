"""Linear probe: L2-regularised logistic regression on frozen, normalised image features.

The CLIP paper's protocol (A.3): sklearn's L-BFGS logistic regression; the regularisation strength
is chosen on a held-out part of the train split (``val_fraction``, stratified, seeded) by a sweep
over C = 1/lambda in [1e-6, 1e6] (97 log-spaced values: 7 coarse points, then a search narrowing
around the best, as clip_benchmark's sweep), then refit on the whole train split and scored on
test. SUN397 and Caltech101 have no official split: their images are split 50/50, stratified and
seeded (``seed``). clip_benchmark's own probe trains with AdamW on CUDA only, so it is not called.
"""
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from .datasets import MEAN_PER_CLASS, NO_SPLIT, SPLITS, build_dataset, canonical_name
from .features import eval_mode, image_features, make_loader, unwrap
from .zeroshot import classification_metrics

C_GRID = np.logspace(-6, 6, 97)


def _split(n, labels, fraction, seed):
    """Indices (keep, held_out), stratified where every class has >= 2 examples."""
    idx = np.arange(n)
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    return train_test_split(idx, test_size=fraction, random_state=seed, stratify=stratify)


def labels_of(ds):
    """A dataset's labels in index order, read from its index (no image is decoded), or None for
    a class that keeps them elsewhere. ImageFolder and CIFAR: ``targets``; most torchvision sets:
    ``_labels``; StanfordCars: ``_samples``; clip_benchmark's Caltech101: ``y``."""
    for attr in ("targets", "_labels", "y"):
        labels = getattr(ds, attr, None)
        if labels is not None:
            return np.asarray(labels)
    samples = getattr(ds, "_samples", None)
    return None if samples is None else np.asarray([label for _, label in samples])


def _split_error(name, y, fraction):
    """Why ``_split`` cannot split ``y`` at ``fraction``, in the user's terms (a stratified split
    needs one image of every class on each side; any split needs an image on each side)."""
    n, classes = len(y), len(np.unique(y))
    held = int(np.ceil(fraction * n))
    if held >= n:
        return f"{name}: --val-fraction {fraction} holds out all {n} train images, leaving none to fit on"
    side = f"holds out {held}" if held < classes else f"keeps {n - held}"
    return (f"{name}: --val-fraction {fraction} {side} of the {n} train images, fewer than their "
            f"{classes} classes (the split is stratified: one image per class on each side); "
            f"use a --val-fraction between {classes}/{n} and {n - classes}/{n}")


def check_splits(name, labels, val_fraction=0.2, seed=0):
    """Raise ValueError, naming the dataset and the flag, when the probe's stratified splits of
    ``labels`` (the train split's, or all of a NO_SPLIT dataset's) cannot be made: sklearn would
    refuse only after every feature was extracted."""
    labels = np.asarray(labels)
    if name in NO_SPLIT:
        try:
            train, _ = _split(len(labels), labels, 0.5, seed)
        except ValueError:
            raise ValueError(f"{name}: {len(labels)} image(s) are too few for the protocol's 50/50 "
                             f"train/test split") from None
        labels = labels[train]
    try:
        _split(len(labels), labels, val_fraction, seed)
    except ValueError:
        raise ValueError(_split_error(name, labels, val_fraction)) from None


def _fit(x, y, C, max_iter):
    return LogisticRegression(C=C, max_iter=max_iter).fit(x, y)


def _scores(clf, x, num_classes):
    """[N, num_classes] class scores (log-probabilities; -inf for classes absent from train)."""
    out = np.full((len(x), num_classes), -np.inf)
    out[:, clf.classes_] = clf.predict_log_proba(x)
    return torch.from_numpy(out)


def select_C(x, y, val_fraction=0.2, seed=0, max_iter=1000, grid=C_GRID):
    """-> (best C, {C: held-out top-1}) from the coarse-then-narrowing sweep on a held-out part."""
    keep, held = _split(len(y), y, val_fraction, seed)
    accs = {}

    def acc(i):
        if i not in accs:
            clf = _fit(x[keep], y[keep], grid[i], max_iter)
            accs[i] = float((clf.predict(x[held]) == y[held]).mean())
        return accs[i]

    best = max(range(0, len(grid), 16), key=lambda i: (acc(i), -i))  # ties -> stronger regularisation
    span = 8
    while span > 0:
        best = max((max(best - span, 0), best, min(best + span, len(grid) - 1)), key=lambda i: (acc(i), -i))
        span //= 2
    return float(grid[best]), {float(grid[i]): a for i, a in sorted(accs.items())}


def fit_linear_probe(train_x, train_y, test_x, test_y, num_classes=None, val_fraction=0.2, seed=0,
                     max_iter=1000, C=None):
    """-> {"top1", "top5", "mean_per_class" (percent), "C"}; C is selected when not given."""
    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    if C is None:
        C, _ = select_C(train_x, train_y, val_fraction, seed, max_iter)
    clf = _fit(train_x, train_y, C, max_iter)
    metrics = classification_metrics(_scores(clf, test_x, num_classes), torch.from_numpy(test_y))
    metrics["C"] = C
    return metrics


def evaluate_linear_probe(model, preprocess, dataset, root, batch_size=64, device="cpu", workers=0,
                          precision="fp32", val_fraction=0.2, seed=0, max_iter=1000):
    """Linear probe of ``model``'s image tower on ``dataset`` (names as evaluate_zeroshot). The
    splits are checked (``check_splits``) before any feature is extracted."""
    name = canonical_name(dataset)
    model = unwrap(model)
    splits = (None,) if name in NO_SPLIT else SPLITS[name][::-1]  # (train, test)
    sets = [build_dataset(name, root, preprocess, split=split) for split in splits]
    early = labels_of(sets[0].dataset)
    if early is not None:
        check_splits(name, early, val_fraction, seed)

    def features(data):
        f, y = image_features(model, make_loader(data.dataset, batch_size, workers, device),
                              device=device, precision=precision)
        return f.cpu().numpy(), y.numpy()

    num_classes = len(sets[0].classnames)
    with eval_mode(model):
        x, y = features(sets[0])
        if early is None:
            check_splits(name, y, val_fraction, seed)
        if name in NO_SPLIT:
            tr, te = _split(len(y), y, 0.5, seed)
            train_x, train_y, test_x, test_y = x[tr], y[tr], x[te], y[te]
        else:
            train_x, train_y = x, y
            test_x, test_y = features(sets[1])
    metrics = fit_linear_probe(train_x, train_y, test_x, test_y, num_classes, val_fraction, seed, max_iter)
    metrics["uses_mean_per_class"] = float(name in MEAN_PER_CLASS)
    return metrics
