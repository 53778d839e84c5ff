"""Dense (FILIP) scoring through the evaluators: the batched/gathered path (DenseView) equals
the token-wise scores computed directly, a FILIP checkpoint carries its dense head and --scoring
auto picks it, and a global checkpoint refuses --scoring dense."""
import os

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import alip  # noqa: F401
from alip.eval.dense import dense_scores, dense_zeroshot_classifier, dense_zeroshot_logits
from alip.eval.load import add_model_args, dense_head_from_args
from alip.eval.retrieval import evaluate_retrieval, load_annotation, recall_at_k
from alip.eval.zeroshot import classification_metrics, evaluate_zeroshot
from alip.methods.filip import FILIPHead, dense_image_tokens, dense_text_tokens
from eval_fakes import write_karpathy

CAPTIONS = ["a red circle", "two blue squares at the top", "a star", "green", "a large cross",
            "yellow diamonds next to a circle", "black", "three white stars on gray"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ALIP-tiny")
    head = FILIPHead(model.visual.transformer.width, model.transformer.width, 16)
    return model.eval(), preprocess, open_clip.get_tokenizer("ALIP-tiny"), head.eval()


def _images(root, n, rng):
    for i in range(n):
        os.makedirs(root, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")


def test_dense_retrieval_equals_direct_token_scores(tmp_path, tiny):
    model, preprocess, tok, head = tiny
    _images(tmp_path / "img", 4, np.random.default_rng(0))
    write_karpathy(str(tmp_path / "ann.json"),
                   [("", f"{i}.png", "test", CAPTIONS[2 * i:2 * i + 2]) for i in range(4)])
    ours = evaluate_retrieval(model, preprocess, tok, str(tmp_path / "ann.json"),
                              str(tmp_path / "img"), batch_size=3, recall_k=(1, 2, 3),
                              dense_head=head)
    paths, captions, t2i = load_annotation(str(tmp_path / "ann.json"), str(tmp_path / "img"))
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
        img = F.normalize(head.image_proj(dense_image_tokens(model, images)[0]), dim=-1)
        tokens, mask, _ = dense_text_tokens(model, tok(captions))
        txt = F.normalize(head.text_proj(tokens), dim=-1)
    expected = recall_at_k(dense_scores(img, txt, None, mask), dense_scores(txt, img, mask, None),
                           t2i, (1, 2, 3))
    assert ours == pytest.approx(expected)
    glob = evaluate_retrieval(model, preprocess, tok, str(tmp_path / "ann.json"),
                              str(tmp_path / "img"), recall_k=(1, 2, 3))
    assert glob.keys() == ours.keys()  # global scoring of the same model still works


def test_dense_zeroshot_equals_direct_token_scores(tmp_path, tiny):
    model, preprocess, tok, head = tiny
    rng = np.random.default_rng(1)
    for c in ("circle", "square", "star"):
        _images(tmp_path / "val" / c, 3, rng)
    templates = ["a photo of a {}.", "{}"]
    ours = evaluate_zeroshot(model, preprocess, tok, "imagefolder", str(tmp_path / "val"),
                             templates=templates, dense_head=head, batch_size=4)
    from torchvision.datasets import ImageFolder
    data = ImageFolder(str(tmp_path / "val"), transform=preprocess)
    with torch.no_grad():
        images = torch.stack([x for x, _ in data])
        img = F.normalize(head.image_proj(dense_image_tokens(model, images)[0]), dim=-1)
        classes, cmask = dense_zeroshot_classifier(model, head, tok, data.classes, templates)
    logits = dense_zeroshot_logits(img, classes, cmask)
    expected = classification_metrics(logits, torch.tensor(data.targets))
    assert {k: ours[k] for k in ("top1", "mean_per_class")} == pytest.approx(
        {k: expected[k] for k in ("top1", "mean_per_class")})


def test_filip_checkpoint_carries_its_dense_head_and_auto_scoring_uses_it(tmp_path):
    import argparse

    from test_train_helpers import run_single, tiny_argv
    run_single(tiny_argv(tmp_path, "f", "--method", "filip", samples=16, batch=8))
    run_single(tiny_argv(tmp_path, "a", "--method", "alip", samples=16, batch=8))
    parse = lambda *a: add_model_args(argparse.ArgumentParser()).parse_args(  # noqa: E731
        ["--device", "cpu", *a])
    f_ckpt = str(tmp_path / "f/checkpoints/epoch_1.pt")
    saved = torch.load(f_ckpt, weights_only=True)
    assert saved["method"] == "filip" and "dense" in saved["eval_heads"]
    head = dense_head_from_args(parse("--checkpoint", f_ckpt))
    assert isinstance(head, FILIPHead)
    torch.testing.assert_close(head.image_proj.weight, saved["eval_heads"]["dense"]["image_proj.weight"])
    assert dense_head_from_args(parse("--checkpoint", f_ckpt, "--scoring", "global")) is None
    a_ckpt = str(tmp_path / "a/checkpoints/epoch_1.pt")
    assert dense_head_from_args(parse("--checkpoint", a_ckpt)) is None
    with pytest.raises(ValueError, match="carries no dense head"):
        dense_head_from_args(parse("--checkpoint", a_ckpt, "--scoring", "dense"))
    open_clip.create_model("ALIP-tiny", pretrained=f_ckpt)  # still a plain open_clip file
