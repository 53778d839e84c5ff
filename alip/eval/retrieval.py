"""Zero-shot image-text retrieval on a Karpathy split (MSCOCO 5k test, Flickr30k 1k test).

Every caption of every image of ``split`` is a query / candidate (the open_clip / clip_benchmark
protocol). Image->text R@K: an image counts if any of its captions is among its K best texts;
text->image R@K: a text counts if its image is among its K best images -- clip_benchmark's
definition and tie order (``topk``), so the numbers equal clip_benchmark's (a test checks).
``caption_prefix="a photo of "`` reproduces the ALIP evaluator, which prepends it to every caption.

Annotation layouts read:
* Karpathy ``dataset_coco.json`` / ``dataset_flickr30k.json``: ``{"images": [{"filename",
  "filepath" (COCO only), "split", "sentences": [{"raw": ...}, ...]}, ...]}``; an image is at
  ``image_root/filepath/filename`` (``image_root/filename`` without filepath);
* the ALBEF / BLIP test json the ALIP evaluator reads (``[{"image": "val2014/x.jpg",
  "caption": [...]}, ...]``, all entries are the split): ``image_root/image``.
"""
import json
import os

import torch
from PIL import Image
from torch.utils.data import Dataset

from .features import eval_mode, image_features, make_loader, text_features, unwrap
from .recall import RECALL_K, recall_at_k  # noqa: F401  (recall_at_k: tests import it here)
from .truncation import log_truncation, tokenizer_context, truncation_report



class ImageFiles(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = Image.open(self.paths[i]).convert("RGB")
        except Exception as e:
            raise ValueError(f"image {self.paths[i]} cannot be decoded: {e}") from e
        return self.transform(image), i


def load_annotation(annotation, image_root, split="test"):
    """-> (image paths, captions, text_to_image index per caption). Errors name the file and entry."""
    if not os.path.isfile(annotation):
        raise FileNotFoundError(f"retrieval annotation {annotation} does not exist; expected a Karpathy "
                                "split json (dataset_coco.json / dataset_flickr30k.json layout)")
    try:
        with open(annotation, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"retrieval annotation {annotation} is not valid json: {e}") from e
    paths, captions, text_to_image = [], [], []
    if isinstance(data, dict) and isinstance(data.get("images"), list):  # Karpathy
        for n, entry in enumerate(data["images"]):
            where = f"{annotation}: images[{n}]"
            if not isinstance(entry, dict) or "filename" not in entry or "split" not in entry:
                raise ValueError(f"{where} lacks 'filename' or 'split' (Karpathy layout)")
            if entry["split"] != split:
                continue
            sentences = entry.get("sentences")
            if not isinstance(sentences, list) or not sentences:
                raise ValueError(f"{where} ({entry['filename']}) has no 'sentences' list")
            texts = []
            for s in sentences:
                if not isinstance(s, dict) or not isinstance(s.get("raw"), str):
                    raise ValueError(f"{where} ({entry['filename']}): a sentence lacks its 'raw' text")
                texts.append(s["raw"].strip())
            paths.append(os.path.join(image_root, entry.get("filepath", ""), entry["filename"]))
            captions += texts
            text_to_image += [len(paths) - 1] * len(texts)
    elif isinstance(data, list):  # ALBEF / BLIP test json (what the ALIP evaluator reads)
        for n, entry in enumerate(data):
            where = f"{annotation}: [{n}]"
            if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
                raise ValueError(f"{where} lacks 'image' or 'caption'")
            texts = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"{where} ({entry['image']}) has no caption strings")
            paths.append(os.path.join(image_root, entry["image"]))
            captions += [t.strip() for t in texts]
            text_to_image += [len(paths) - 1] * len(texts)
    else:
        raise ValueError(f"retrieval annotation {annotation}: expected a Karpathy split json "
                         "({'images': [{'filename', 'filepath', 'split', 'sentences': [{'raw'}]}]})")
    if not paths:
        raise ValueError(f"retrieval annotation {annotation} has no images with split {split!r}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images of {annotation} (split {split!r}) are missing under "
            f"image root {image_root}, e.g. {missing[0]} (expected IMAGE_ROOT/filepath/filename)")
    return paths, captions, torch.tensor(text_to_image)


def retrieval_metrics(image_feats, text_feats, text_to_image, recall_k=RECALL_K):
    """R@K in percent both ways from normalised features; ``text_to_image[t]`` is text t's image.

    A query counts at K if any of its positives is among its K highest-scoring candidates:
    clip_benchmark's ``recall_at_k(...) > 0``, with one ``topk(K)`` per K as it does (with exact
    ties -- repeated captions, duplicated images -- ``topk(10)[:1]`` and ``topk(1)`` may pick
    different tied candidates), without the [rows, K, candidates] one-hot it builds (minutes on
    CPU for COCO's 25k x 5k; this takes well under a second).
    """
    scores = text_feats @ image_feats.T
    return recall_at_k(scores.T, scores, text_to_image, recall_k)


def evaluate_retrieval(model, preprocess, tokenizer, annotation, image_root, split="test",
                       caption_prefix="", batch_size=64, device="cpu", workers=0, precision="fp32",
                       recall_k=RECALL_K, distributed=False, dense_head=None, loaded=None,
                       details=None):
    """-> {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"} (percent).

    ``distributed=True``: every rank of the initialised process group calls this; each encodes
    1/world of the images and captions; all ranks get the result. ``dense_head`` (a FILIPHead):
    FILIP's token-wise scores (alip.eval.dense) instead of global embeddings. ``loaded``: what
    ``load_annotation(annotation, image_root, split)`` returned (a caller that checked the
    annotation already), so it is not read twice. Captions longer than the tokenizer's context
    (long-text retrieval with a shorter model) are truncated and logged as such
    (``alip.eval.truncation``); a ``details`` dict gets that report as ``details["truncation"]``
    (None where the tokenizer cannot count)."""
    paths, captions, text_to_image = loaded or load_annotation(annotation, image_root, split)
    model = unwrap(model)
    texts = [caption_prefix + c for c in captions]
    report = truncation_report(tokenizer, texts, tokenizer_context(tokenizer, model))
    log_truncation(report, "captions")
    if details is not None:
        details["truncation"] = report
    if dense_head is not None:
        from .dense import DenseView
        model = DenseView(model, dense_head.to(device))
    with eval_mode(model):
        loader = make_loader(ImageFiles(paths, preprocess), batch_size, workers, device,
                             distributed=distributed)
        images, _ = image_features(model, loader, device=device, precision=precision,
                                   distributed=distributed)
        texts = text_features(model, tokenizer, texts,
                              batch_size=max(batch_size, 256), device=device, precision=precision,
                              distributed=distributed)
    if dense_head is not None:
        from .dense import dense_scores
        (img, _), (txt, mask) = model.unflatten(images), model.unflatten(texts)
        return recall_at_k(dense_scores(img, txt, None, mask), dense_scores(txt, img, mask, None),
                           text_to_image, recall_k)
    return retrieval_metrics(images, texts, text_to_image, recall_k)
