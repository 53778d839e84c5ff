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
    """Linear probe of ``model``'s image tower on ``dataset`` (names as evaluate_zeroshot)."""
    name = canonical_name(dataset)
    model = unwrap(model)

    def features(split):
        data = build_dataset(name, root, preprocess, split=split)
        f, y = image_features(model, make_loader(data.dataset, batch_size, workers, device),
                              device=device, precision=precision)
        return f.cpu().numpy(), y.numpy(), len(data.classnames)

    with eval_mode(model):
        if name in NO_SPLIT:
            x, y, num_classes = features(None)
            tr, te = _split(len(y), y, 0.5, seed)
            train_x, train_y, test_x, test_y = x[tr], y[tr], x[te], y[te]
        else:
            test_split, train_split = SPLITS[name]
            train_x, train_y, num_classes = features(train_split)
            test_x, test_y, _ = features(test_split)
    metrics = fit_linear_probe(train_x, train_y, test_x, test_y, num_classes, val_fraction, seed, max_iter)
    metrics["uses_mean_per_class"] = float(name in MEAN_PER_CLASS)
    return metrics
