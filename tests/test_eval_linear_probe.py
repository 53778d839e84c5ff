"""Linear probe: regularisation chosen on held-out train, refit on all of train, scored on test."""
import os

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from torchvision import transforms

from alip.eval.datasets import build_dataset
from alip.eval.linear_probe import (C_GRID, _split, check_splits, evaluate_linear_probe,
                                     fit_linear_probe, labels_of, select_C)
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


class NoImages(TableModel):
    def encode_image(self, images, normalize=False):
        pytest.fail("a feature was extracted before the impossible split was reported")


def test_impossible_held_out_split_is_named_before_any_feature(tmp_path):
    """9 train images of 3 classes: --val-fraction 0.2 holds out 2 (< 3 classes), 0.8 keeps 1;
    sklearn would refuse only after the features of train and test were extracted."""
    for split in ("train", "val"):
        for i in range(9):
            write_id_image(os.path.join(tmp_path, split, f"k{i % 3}", f"{i}.png"), i)
    model = NoImages([[1.0]] * 9, [[1.0]])
    with pytest.raises(ValueError, match=r"^imagefolder: --val-fraction 0.2 holds out 2 of the 9 train "
                                         r"images, fewer than their 3 classes .* between 3/9 and 6/9$"):
        evaluate_linear_probe(model, transforms.ToTensor(), "imagefolder", str(tmp_path), val_fraction=0.2)
    with pytest.raises(ValueError, match=r"--val-fraction 0.8 keeps 1 of the 9 train images"):
        evaluate_linear_probe(model, transforms.ToTensor(), "imagefolder", str(tmp_path), val_fraction=0.8)
    # the bounds it names are feasible: 3/9 and 6/9 split
    for fraction in (3 / 9, 6 / 9):
        check_splits("imagefolder", labels_of(build_dataset("imagefolder", str(tmp_path), None,
                                                            "train").dataset), fraction)


def test_split_check_agrees_with_sklearn():
    """check_splits refuses exactly what the probe's own splits would refuse."""
    y = np.repeat(np.arange(5), 3)  # 15 images, 5 classes
    for fraction in np.linspace(0.05, 0.95, 19):
        try:
            _split(len(y), y, fraction, 0)
            feasible = True
        except ValueError:
            feasible = False
        if feasible:
            check_splits("cifar10", y, fraction)
        else:
            with pytest.raises(ValueError, match="cifar10: --val-fraction"):
                check_splits("cifar10", y, fraction)
    # every class once: not stratified; only an empty side is refused
    with pytest.raises(ValueError, match=r"^dtd: --val-fraction 0.9 holds out all 5 train images"):
        check_splits("dtd", np.arange(5), 0.9)
    check_splits("dtd", np.arange(5), 0.5)
    # SUN397 / Caltech101: the protocol's 50/50 split first, then --val-fraction of its train half
    with pytest.raises(ValueError, match=r"^sun397: 1 image\(s\) are too few for the protocol's 50/50"):
        check_splits("sun397", np.array([3]), 0.2)
    with pytest.raises(ValueError, match=r"^caltech101: --val-fraction 0.2 holds out 2 of the 10 train "
                                         r"images, fewer than their 5 classes"):
        check_splits("caltech101", np.repeat(np.arange(5), 4), 0.2)
    check_splits("caltech101", np.repeat(np.arange(5), 4), 0.5)
    assert labels_of(object()) is None
