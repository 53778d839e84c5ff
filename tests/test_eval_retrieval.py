"""Retrieval evaluation: hand-computed R@K, caption prefix, Karpathy parsing errors, clip_benchmark parity."""
import json
import math
import os

import pytest
import torch
from torchvision import transforms

from alip.eval.retrieval import evaluate_retrieval, load_annotation
from eval_fakes import TableModel, TableTokenizer, write_id_image, write_karpathy

# 4 test images on the unit circle and 8 captions (2 per image); score = cos(angle difference).
IMAGE_DEG = [0, 90, 180, 270, 4]          # image 4 is in the train split: it must be ignored
CAPTION_DEG = [5, 130, 60, 250, 200, 300, 100, 40]
CAPTIONS = [f"caption {i}" for i in range(8)]
# By hand: text->image rank of the true image per caption = [1, 3, 1, 4, 1, 3, 4, 3];
# image->text best rank of an own caption per image = [1, 2, 1, 5].
EXPECTED_135 = {"i2t_R@1": 50.0, "i2t_R@3": 75.0, "i2t_R@5": 100.0,
                "t2i_R@1": 37.5, "t2i_R@3": 75.0, "t2i_R@5": 100.0}


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


@pytest.fixture
def world(tmp_path):
    for i in range(5):
        write_id_image(str(tmp_path / "img" / "val2014" / f"{i}.png"), i)
    entries = [("val2014", f"{i}.png", "test", CAPTIONS[2 * i:2 * i + 2]) for i in range(4)]
    entries.insert(2, ("val2014", "4.png", "train", ["a train caption"]))
    write_karpathy(str(tmp_path / "dataset_coco.json"), entries)
    model = TableModel([unit(d) for d in IMAGE_DEG], [unit(d) for d in CAPTION_DEG] + [unit(4)])
    return tmp_path, model


def run(world, tokenizer=None, **kw):
    root, model = world
    tokenizer = tokenizer or TableTokenizer(CAPTIONS + ["a train caption"])
    return evaluate_retrieval(model, transforms.ToTensor(), tokenizer, str(root / "dataset_coco.json"),
                              str(root / "img"), batch_size=3, **kw)


def test_hand_computed_recall(world):
    assert run(world, recall_k=(1, 3, 5)) == pytest.approx({**EXPECTED_135, "rsum": 437.5})


def test_default_keys_and_k_beyond_candidates(world):
    # 4 images / 8 texts: R@10 counts every query (K is capped at the number of candidates).
    assert run(world) == pytest.approx({"i2t_R@1": 50.0, "i2t_R@5": 100.0, "i2t_R@10": 100.0,
                                        "t2i_R@1": 37.5, "t2i_R@5": 100.0, "t2i_R@10": 100.0,
                                        "rsum": 487.5})


def test_caption_prefix_reaches_the_tokenizer(world):
    prefix = "a photo of "
    tok = TableTokenizer([[c, prefix + c] for c in CAPTIONS])
    metrics = run(world, tokenizer=tok, caption_prefix=prefix, recall_k=(1, 3, 5))
    assert tok.seen == [prefix + c for c in CAPTIONS]
    assert metrics == pytest.approx({**EXPECTED_135, "rsum": 437.5})
    plain = TableTokenizer([[c, prefix + c] for c in CAPTIONS])
    run(world, tokenizer=plain)
    assert plain.seen == CAPTIONS


def test_karpathy_parsing(world):
    root, _ = world
    paths, captions, t2i = load_annotation(str(root / "dataset_coco.json"), str(root / "img"))
    assert [os.path.basename(p) for p in paths] == ["0.png", "1.png", "2.png", "3.png"]
    assert paths[0] == os.path.join(str(root / "img"), "val2014", "0.png")
    assert captions == CAPTIONS and t2i.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # flickr30k layout: no filepath, images directly under the root
    data = json.load(open(root / "dataset_coco.json"))
    for e in data["images"]:
        del e["filepath"]
    (root / "dataset_flickr30k.json").write_text(json.dumps(data))
    paths, _, _ = load_annotation(str(root / "dataset_flickr30k.json"), str(root / "img" / "val2014"))
    assert paths[3] == os.path.join(str(root / "img" / "val2014"), "3.png")


def test_missing_and_malformed_annotation(world, tmp_path):
    root, _ = world
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        load_annotation(str(root / "nope.json"), str(root / "img"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid json"):
        load_annotation(str(tmp_path / "bad.json"), str(root / "img"))
    data = json.load(open(root / "dataset_coco.json"))
    del data["images"][1]["sentences"]
    (tmp_path / "nosent.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"nosent.json: images\[1\] \(1.png\) has no 'sentences'"):
        load_annotation(str(tmp_path / "nosent.json"), str(root / "img"))
    (tmp_path / "other.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="expected a Karpathy split json"):
        load_annotation(str(tmp_path / "other.json"), str(root / "img"))
    with pytest.raises(ValueError, match="no images with split 'val'"):
        load_annotation(str(root / "dataset_coco.json"), str(root / "img"), split="val")


def test_missing_image_is_named(world):
    root, _ = world
    os.remove(root / "img" / "val2014" / "3.png")
    with pytest.raises(FileNotFoundError, match=r"1 of 4 images .* missing .*val2014/3.png"):
        load_annotation(str(root / "dataset_coco.json"), str(root / "img"))


def test_equals_clip_benchmark(world):
    """Same tiny random-init open_clip model and data: our R@K == clip_benchmark's (x100)."""
    import open_clip
    from clip_benchmark.metrics import zeroshot_retrieval
    from PIL import Image

    from alip.eval.load import load_model
    from alip.eval.retrieval import ImageFiles
    root, _ = world
    torch.manual_seed(0)
    model, preprocess, tokenizer = load_model("ALIP-tiny")
    ours = evaluate_retrieval(model, preprocess, tokenizer, str(root / "dataset_coco.json"), str(root / "img"),
                              recall_k=(1, 2, 3))

    paths, captions, t2i = load_annotation(str(root / "dataset_coco.json"), str(root / "img"))
    per_image = [[c for c, j in zip(captions, t2i.tolist()) if j == i] for i in range(len(paths))]
    items = [(preprocess(Image.open(p).convert("RGB")), caps) for p, caps in zip(paths, per_image)]
    loader = torch.utils.data.DataLoader(items, batch_size=3, collate_fn=lambda b: (
        torch.stack([x for x, _ in b]), [c for _, c in b]))
    theirs = zeroshot_retrieval.evaluate(model, loader, open_clip.get_tokenizer("ALIP-tiny"), "cpu",
                                         amp=False, recall_k_list=[1, 2, 3])
    for k in (1, 2, 3):
        assert ours[f"i2t_R@{k}"] == pytest.approx(100 * theirs[f"text_retrieval_recall@{k}"])
        assert ours[f"t2i_R@{k}"] == pytest.approx(100 * theirs[f"image_retrieval_recall@{k}"])
    assert ImageFiles  # the image dataset class is public for callers that build their own loaders


def test_undecodable_image_is_named(world):
    root, _ = world
    (root / "img" / "val2014" / "2.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"image .*val2014/2.png cannot be decoded"):
        run(world)


def test_ties_follow_clip_benchmark():
    """Exact ties (repeated caption strings, duplicated images, as in COCO and web data): one
    topk(K) per K, as clip_benchmark; a single topk(max K) sliced to K can pick other tied
    candidates and differ by points."""
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

    from alip.eval.retrieval import retrieval_metrics
    gen = torch.Generator().manual_seed(0)
    # 60 images from 12 distinct ones, 5 captions each drawn from 20 distinct strings: many ties
    images = torch.nn.functional.normalize(torch.randn(12, 8, generator=gen), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(20, 8, generator=gen), dim=-1)
    image_feats = images[torch.randint(0, 12, (60,), generator=gen)]
    text_feats = texts[torch.randint(0, 20, (300,), generator=gen)]
    text_to_image = torch.arange(60).repeat_interleave(5)
    ours = retrieval_metrics(image_feats, text_feats, text_to_image, recall_k=(1, 5, 10))
    scores = text_feats @ image_feats.T
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(300), text_to_image] = True
    for k in (1, 5, 10):
        t2i = (recall_at_k(scores, positives, k) > 0).float().mean().item()
        i2t = (recall_at_k(scores.T, positives.T, k) > 0).float().mean().item()
        assert ours[f"t2i_R@{k}"] == pytest.approx(100 * t2i)
        assert ours[f"i2t_R@{k}"] == pytest.approx(100 * i2t)
