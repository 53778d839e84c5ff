"""Helpers for the tests/test_eval_*.py files: a hand-built encoder with known embeddings and
writers for small datasets in the real on-disk layouts (Karpathy json, ImageFolder, CIFAR pickles)."""
import json
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class TableModel(torch.nn.Module):
    """Image i (red channel of pixel (0,0) == i / 255, see ``write_id_image``) -> image_emb[i];
    a text tokenised by ``TableTokenizer`` to id t -> text_emb[t]."""

    def __init__(self, image_emb, text_emb):
        super().__init__()
        self.register_buffer("image_emb", torch.tensor(torch.as_tensor(list(map(list, image_emb))).tolist()))
        self.register_buffer("text_emb", torch.tensor(torch.as_tensor(list(map(list, text_emb))).tolist()))

    def encode_image(self, images, normalize=False):
        ids = (images[:, 0, 0, 0] * 255).round().long()
        f = self.image_emb[ids]
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens, normalize=False):
        f = self.text_emb[tokens[:, 0]]
        return F.normalize(f, dim=-1) if normalize else f


class TableTokenizer:
    """Maps each known string to its row in ``TableModel.text_emb``; records what it was fed."""

    def __init__(self, vocab):
        self.index = {}
        for i, words in enumerate(vocab):
            for w in ([words] if isinstance(words, str) else words):
                self.index[w] = i
        self.seen = []

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        self.seen += texts
        return torch.tensor([[self.index[t]] for t in texts])


def write_id_image(path, image_id, size=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.zeros((size, size, 3), dtype=np.uint8)
    a[..., 0] = image_id
    Image.fromarray(a).save(path)  # PNG: lossless, so the id survives


def write_karpathy(path, entries, dataset="coco"):
    """entries: (filepath, filename, split, [captions]) -> dataset_coco.json layout."""
    images = [{"filepath": fp, "filename": fn, "split": split, "imgid": i, "cocoid": i,
               "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": i} for c in caps]}
              for i, (fp, fn, split, caps) in enumerate(entries)]
    with open(path, "w") as f:
        json.dump({"images": images, "dataset": dataset}, f)


def write_cifar10(root, test_labels, train_per_batch=2, seed=0):
    """torchvision's cifar-10-batches-py layout with random pixels; returns the folder."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)

    def batch(name, labels):
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"batch_label": name, "labels": list(labels), "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(len(labels))]}, f)

    for i in range(1, 6):
        batch(f"data_batch_{i}", rng.integers(0, 10, train_per_batch).tolist())
    batch("test_batch", test_labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CIFAR10_NAMES, "num_cases_per_batch": 10000, "num_vis": 3072}, f)
    return folder
