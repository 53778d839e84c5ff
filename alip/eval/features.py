"""Normalised image and text features for evaluation, with open_clip_train's precision handling.

Features stay on ``device`` until the caller needs them elsewhere (one transfer at the end, no
per-batch sync). Text goes through ``alip.model.encode_text`` (the tower run only up to the
batch's longest text: same features as ``model.encode_text``, less compute).
"""
import contextlib

import open_clip
import torch
import torch.nn.functional as F
from open_clip_train.precision import get_autocast
from torch.utils.data import DataLoader

from alip.model import encode_text


def unwrap(model):
    """The open_clip model inside DDP / ``TripletEncoder`` wrappers (train.py hands either)."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "text_mode") and hasattr(model, "model"):  # alip.model.TripletEncoder
        model = model.model
    return model


@contextlib.contextmanager
def eval_mode(model):
    """Run in eval mode and restore the previous mode (evaluation during training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def precision_context(precision, device):
    """(autocast context factory, input dtype) for an open_clip_train precision string."""
    return get_autocast(precision, device_type=torch.device(device).type), open_clip.get_input_dtype(precision)


def make_loader(dataset, batch_size=64, workers=0, device="cpu", collate_fn=None):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.device(device).type == "cuda", collate_fn=collate_fn,
                      persistent_workers=False)


@torch.inference_mode()
def image_features(model, loader, device="cpu", precision="fp32"):
    """-> (float32 [N, D] L2-normalised image features on ``device``, labels [N]) in loader order."""
    autocast, input_dtype = precision_context(precision, device)
    features, labels = [], []
    for images, target in loader:
        images = images.to(device=device, dtype=input_dtype, non_blocking=True)
        with autocast():
            f = model.encode_image(images)
        features.append(F.normalize(f.float(), dim=-1))
        labels.append(torch.as_tensor(target))
    if not features:
        raise ValueError("no images to evaluate (empty dataset)")
    return torch.cat(features), torch.cat(labels)


@torch.inference_mode()
def text_features(model, tokenizer, texts, batch_size=256, device="cpu", precision="fp32"):
    """-> float32 [len(texts), D] L2-normalised text features on ``device``."""
    autocast, _ = precision_context(precision, device)
    features = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        with autocast():
            f = encode_text(model, tokens, normalize=False)
        features.append(F.normalize(f.float(), dim=-1))
    return torch.cat(features)
