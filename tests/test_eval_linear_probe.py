"""Linear probe: regularisation chosen on held-out train, refit on all of train, scored on test."""
import os

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from torchvision import transforms

from alip.eval.linear_probe import C_GRID, _split, evaluate_linear_probe, fit_linear_probe, select_C
from eval_fakes import TableModel, write_id_image


def blobs(n_per_class, classes=4, dims=8, spread=1.5, seed=0, noise_seed=None):
    centres = np.random.default_rng(seed).normal(size=(classes, dims))
    y = np.repeat(np.arange(classes), n_per_class)
    noise = np.random.default_rng(seed if noise_seed is None else noise_seed).normal(size=(len(y), dims))
    return centres[y] + spread * noise, y


def test_select_C_is_the_held_out_argmax():
    x, y = blobs(30)
    best, accs = select_C(x, y, val_fraction=0.25, seed=0, max_iter=200)
    keep, held = _split(len(y), y, 0.25, 0)
    # the returned accuracies are real held-out accuracies ...
    for C in (best, min(accs)):
        clf = LogisticRegression(C=C, max_iter=200).fit(x[keep], y[keep])
        assert accs[C] == pytest.approx((clf.predict(x[held]) == y[held]).mean())
    # ... the best is their maximum, and the sweep was coarse (every 16th grid value) then refined
    assert accs[best] == max(accs.values())
    assert {float(C_GRID[i]) for i in range(0, 97, 16)} <= set(accs) and 7 < len(accs) < 97
    assert accs[float(C_GRID[0])] < accs[best]  # C = 1e-6 (lambda = 1e6) underfits


def test_refit_on_all_train_scores_test():
    x, y = blobs(40, spread=3.0, seed=1)
    tx, ty = blobs(100, spread=3.0, seed=1, noise_seed=2)  # same classes, fresh samples
    m = fit_linear_probe(x, y, tx, ty, max_iter=200)
    clf = LogisticRegression(C=m["C"], max_iter=200).fit(x, y)
    assert m["top1"] == pytest.approx(100 * clf.score(tx, ty))
    assert 40 < m["top1"] < 95
    fixed = fit_linear_probe(x, y, tx, ty, C=10.0, max_iter=200)
    assert fixed["C"] == 10.0
    assert fixed["top1"] == pytest.approx(100 * LogisticRegression(C=10.0, max_iter=200).fit(x, y).score(tx, ty))


def test_imagefolder_probe_end_to_end(tmp_path):
    """ImageFolder train/ and val/ with a hand-built encoder: class c sits at direction e_c + noise."""
    rng = np.random.default_rng(0)
    emb, i = [], 0
    for split, n in (("train", 6), ("val", 3)):
        for c in range(3):
            for _ in range(n):
                write_id_image(os.path.join(tmp_path, split, f"k{c}", f"{i:03d}.png"), i)
                emb.append(np.eye(4)[c] + 0.3 * rng.normal(size=4))
                i += 1
    model = TableModel(emb, [[1.0, 0, 0, 0]])
    m = evaluate_linear_probe(model, transforms.ToTensor(), "imagefolder", str(tmp_path), batch_size=5,
                              val_fraction=0.34, max_iter=200)
    assert m["top1"] == 100.0 and m["mean_per_class"] == 100.0 and m["top5"] != m["top5"]
    assert m["C"] in set(C_GRID.tolist())
