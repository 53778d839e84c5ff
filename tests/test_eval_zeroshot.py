"""Zero-shot evaluation: hand-computed top-1/top-5/mean-per-class, float logits, datasets and their
errors, clip_benchmark parity, the CLI."""
import json
import os

import pytest
import torch
from torchvision import transforms

from alip.eval.datasets import build_dataset, default_templates
from alip.eval.zeroshot import evaluate_zeroshot, zeroshot_classifier
from eval_fakes import CIFAR10_NAMES, TableModel, TableTokenizer, write_cifar10, write_id_image

CLASSES = [f"c{i}" for i in range(6)]
# (true class, class order by score) per image; image id == position in this list.
IMAGES = [(0, [0, 1, 2, 3, 4, 5])] * 4 + [(0, [1, 0, 2, 3, 4, 5]),   # class 0: 4 of 5 right
          (1, [0, 1, 2, 3, 4, 5]),   # wrong, true class 2nd  -> in top-5
          (2, [2, 0, 1, 3, 4, 5]),   # right
          (3, [0, 1, 2, 4, 5, 3]),   # wrong, true class last -> not in top-5
          (4, [4, 0, 1, 2, 3, 5]),   # right
          (5, [0, 1, 5, 2, 3, 4])]   # wrong, true class 3rd
# By hand: top-1 6/10, top-5 9/10, mean-per-class (4/5 + 0 + 1 + 0 + 1 + 0) / 6.
EXPECTED = {"top1": 60.0, "top5": 90.0, "mean_per_class": 100 * 2.8 / 6}


def score_vector(order, dims=7):
    v = torch.zeros(dims)
    for rank, c in enumerate(order):
        v[c] = 6 - rank
    return v


def one_hot(i, dims=7):
    v = torch.zeros(dims)
    v[i] = 1
    return v


def image_folder(root, images):
    for i, (label, _) in enumerate(images):
        write_id_image(os.path.join(root, f"c{label}", f"{i:03d}.png"), i)


@pytest.fixture
def imbalanced(tmp_path):
    image_folder(tmp_path / "val", IMAGES)
    model = TableModel([score_vector(order) for _, order in IMAGES], [one_hot(i) for i in range(6)])
    return tmp_path, model


def test_hand_computed_accuracies(imbalanced):
    root, model = imbalanced
    m = evaluate_zeroshot(model, transforms.ToTensor(), TableTokenizer(CLASSES), "imagefolder", str(root),
                          batch_size=4, templates=["{}"])
    assert {k: m[k] for k in EXPECTED} == pytest.approx(EXPECTED)
    assert m["num_images"] == 10 and m["uses_mean_per_class"] == 0.0


def test_classnames_and_templates_files(imbalanced):
    root, model = imbalanced
    (root / "names.txt").write_text("\n".join(f"a {c}" for c in CLASSES) + "\n")
    (root / "templates.txt").write_text("{}!\n")
    tok = TableTokenizer([f"a {c}!" for c in CLASSES])
    m = evaluate_zeroshot(model, transforms.ToTensor(), tok, "imagefolder", str(root / "val"),
                          classnames=str(root / "names.txt"), templates=str(root / "templates.txt"))
    assert tok.seen == [f"a {c}!" for c in CLASSES]
    assert m["top1"] == pytest.approx(60.0)


def test_logits_stay_float(tmp_path):
    """Scores 50.2 vs 50.9: integer logits (the reference's torch.long) would tie and pick class 0."""
    write_id_image(str(tmp_path / "c0" / "x.png"), 0)  # class c0 needs a folder; image 0 is c0's
    write_id_image(str(tmp_path / "c1" / "y.png"), 1)
    model = TableModel([[0.9, 0.1, 0.0], [0.502, 0.509, (1 - 0.502 ** 2 - 0.509 ** 2) ** 0.5]],
                       [[1.0, 0, 0], [0, 1.0, 0]])
    m = evaluate_zeroshot(model, transforms.ToTensor(), TableTokenizer(["c0", "c1"]), "imagefolder",
                          str(tmp_path), templates=["{}"])
    assert m["top1"] == 100.0 and m["mean_per_class"] == 100.0
    assert m["top5"] != m["top5"]  # NaN below 5 classes, as clip_benchmark


def test_classifier_is_renormalised_template_mean():
    model = TableModel([[1.0, 0]], [[1.0, 0.0], [0.0, 3.0]])
    w = zeroshot_classifier(model, TableTokenizer([["a x"], ["the x"]]), ["x"], ["a {}", "the {}"])
    assert w.dtype == torch.float32
    assert w[:, 0].tolist() == pytest.approx([2 ** -0.5, 2 ** -0.5])


def test_cifar10_pickles_and_clip_benchmark_parity(tmp_path, monkeypatch):
    """Tiny random-init model on generated CIFAR10 batches: our numbers == clip_benchmark's (x100)."""
    from clip_benchmark.metrics import zeroshot_classification

    def accuracy(output, target, topk=(1,)):  # clip_benchmark's, with .item() (numpy >= 2.3 fix)
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]
    monkeypatch.setattr(zeroshot_classification, "accuracy", accuracy)

    from alip.eval.load import load_model
    labels = [i % 10 for i in range(23)] + [3] * 7
    write_cifar10(str(tmp_path), labels)
    torch.manual_seed(0)
    model, preprocess, tokenizer = load_model("ALIP-tiny")
    ours = evaluate_zeroshot(model, preprocess, tokenizer, "cifar10", str(tmp_path), batch_size=8)
    data = build_dataset("cifar10", str(tmp_path), preprocess)
    assert data.classnames == CIFAR10_NAMES and len(data.templates) == 18
    assert [data.dataset[i][1] for i in range(len(labels))] == labels
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=8)
    theirs = zeroshot_classification.evaluate(
        model, loader, tokenizer, data.classnames, [t.replace("{}", "{c}") for t in data.templates],
        "cpu", amp=False)
    assert ours["top1"] == pytest.approx(100 * theirs["acc1"])
    assert ours["top5"] == pytest.approx(100 * theirs["acc5"])
    assert ours["mean_per_class"] == pytest.approx(100 * theirs["mean_per_class_recall"])


def test_templates_come_from_the_packages():
    import open_clip
    assert default_templates("imagenet1k") == list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    assert default_templates("food101") == ["a photo of {}, a type of food."]
    assert len(default_templates("cifar100")) == 18


def test_missing_dataset_errors_name_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar10: dataset root .*nowhere does not exist; "
                                                r"expected .*cifar-10-batches-py"):
        build_dataset("cifar10", str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()  # nothing created, nothing downloaded
    folder = write_cifar10(str(tmp_path), [0, 1, 2])
    os.remove(os.path.join(folder, "test_batch"))
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/test_batch is missing"):
        build_dataset("cifar10", str(tmp_path))
    for name in ("food101", "pets", "flowers", "sun397", "cars", "dtd", "caltech101", "fgvc_aircraft"):
        with pytest.raises(FileNotFoundError, match=f"{name}: .* is missing; expected"):
            build_dataset(name, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="imagefolder: dataset root"):
        build_dataset("imagefolder", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_dataset("mnist", str(tmp_path))


def test_malformed_dataset_errors(tmp_path):
    folder = write_cifar10(str(tmp_path), [0, 1, 2])
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        f.write(b"this is not a pickle")
    with pytest.raises(ValueError, match=r"cifar10: cannot read .*test_batch: UnpicklingError"):
        build_dataset("cifar10", str(tmp_path))
    image_folder(tmp_path / "inet" / "val", IMAGES[:6])
    with pytest.raises(ValueError, match="has 2 class folders, expected the 1000"):
        build_dataset("imagenet1k", str(tmp_path / "inet"))
    with pytest.raises(ValueError, match="3 class names for the 2 classes"):
        build_dataset("imagefolder", str(tmp_path / "inet"), classnames=["a", "b", "c"])
    (tmp_path / "t.txt").write_text("a photo of a\n")
    with pytest.raises(ValueError, match=r"t.txt: template 1 'a photo of a' has no \{\}"):
        build_dataset("imagefolder", str(tmp_path / "inet"), templates=str(tmp_path / "t.txt"))


def test_cli_with_train_checkpoint(tmp_path, capsys):
    import eval_zeroshot

    from alip.eval.load import load_model
    image_folder(tmp_path / "classify" / "val", [(i % 3, None) for i in range(6)])
    (tmp_path / "names.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na {} shape.\n")
    model, preprocess, tokenizer = load_model("ALIP-tiny")
    torch.save({"state_dict": model.state_dict(), "model": "ALIP-tiny", "epoch": 2, "step": 7},
               tmp_path / "epoch_2.pt")
    out = tmp_path / "zs.json"
    assert eval_zeroshot.main(["--checkpoint", str(tmp_path / "epoch_2.pt"), "--dataset", "imagefolder",
                               "--root", str(tmp_path / "classify"), "--classnames", str(tmp_path / "names.txt"),
                               "--templates", str(tmp_path / "templates.txt"), "--workers", "0",
                               "--device", "cpu", "--output", str(out)]) == 0
    saved = json.loads(out.read_text())
    direct = evaluate_zeroshot(model, preprocess, tokenizer, "imagefolder", str(tmp_path / "classify"),
                               classnames=["red", "green", "blue"],
                               templates=["a photo of a {}.", "a {} shape."])
    assert saved["metrics"]["imagefolder"]["top1"] == pytest.approx(direct["top1"])
    assert saved["metrics"]["imagefolder"]["top5"] is None  # 3 classes: NaN -> null
    assert "ImageFolder" in capsys.readouterr().out


def _jpg(path, value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from PIL import Image
    Image.new("RGB", (8, 8), (value, 0, 0)).save(path)


def test_torchvision_layouts_and_class_names(tmp_path):
    """Generated data in each dataset's real layout reads through torchvision with the class names
    clip_benchmark gives (Flowers102 and Stanford Cars need md5-checked / struct .mat files: not here)."""
    r = str(tmp_path)
    # Food101: meta/{split}.json, images/<class>/<id>.jpg; names without "_"
    meta = {"apple_pie": ["apple_pie/1"], "baby_back_ribs": ["baby_back_ribs/2", "baby_back_ribs/3"]}
    for ids in meta.values():
        for i in ids:
            _jpg(f"{r}/food-101/images/{i}.jpg")
    os.makedirs(f"{r}/food-101/meta", exist_ok=True)
    for split in ("train", "test"):
        (tmp_path / "food-101" / "meta" / f"{split}.json").write_text(json.dumps(meta))
    d = build_dataset("food101", r)
    assert d.classnames == ["apple pie", "baby back ribs"] and [y for _, y in d.dataset] == [0, 1, 1]
    assert d.templates == ["a photo of {}, a type of food."] and not d.mean_per_class
    # Oxford-IIIT Pets: annotations/test.txt "<id> <class 1-based> <species> <breed>"
    os.makedirs(f"{r}/oxford-iiit-pet/annotations", exist_ok=True)
    (tmp_path / "oxford-iiit-pet/annotations/test.txt").write_text("Abyssinian_1 1 1 1\nbasset_hound_2 2 2 1\n")
    for i in ("Abyssinian_1", "basset_hound_2"):
        _jpg(f"{r}/oxford-iiit-pet/images/{i}.jpg")
    d = build_dataset("pets", r)
    assert d.classnames == ["Abyssinian", "Basset Hound"] and d.mean_per_class
    # DTD: dtd/dtd/labels/test1.txt "<class>/<file>"
    os.makedirs(f"{r}/dtd/dtd/labels", exist_ok=True)
    (tmp_path / "dtd/dtd/labels/test1.txt").write_text("banded/banded_1.jpg\nzigzagged/z_2.jpg\n")
    _jpg(f"{r}/dtd/dtd/images/banded/banded_1.jpg"), _jpg(f"{r}/dtd/dtd/images/zigzagged/z_2.jpg")
    d = build_dataset("dtd", r)
    assert d.classnames == ["banded", "zigzagged"] and d.templates[0] == "a photo of a {} texture."
    # FGVC-Aircraft (variant level): variants.txt, images_variant_test.txt "<id> <variant>"
    base = f"{r}/fgvc-aircraft-2013b/data"
    _jpg(f"{base}/images/0001.jpg"), _jpg(f"{base}/images/0002.jpg")
    (tmp_path / "fgvc-aircraft-2013b/data/variants.txt").write_text("707-320\nA300B4\n")
    (tmp_path / "fgvc-aircraft-2013b/data/images_variant_test.txt").write_text("0001 A300B4\n0002 707-320\n")
    d = build_dataset("aircraft", r)
    assert d.name == "fgvc_aircraft" and [y for _, y in d.dataset] == [1, 0] and d.mean_per_class
    # SUN397 (no split: every image, in sorted order): ClassName.txt "/a/abbey", images sun_*.jpg
    os.makedirs(f"{r}/SUN397", exist_ok=True)
    (tmp_path / "SUN397/ClassName.txt").write_text("/a/abbey\n/b/bakery/shop\n")
    _jpg(f"{r}/SUN397/b/bakery/shop/sun_b.jpg", 1), _jpg(f"{r}/SUN397/a/abbey/sun_a.jpg", 2)
    d = build_dataset("sun397", r)
    assert d.classnames == ["abbey", "bakery shop"] and [y for _, y in d.dataset] == [0, 1]
    # Caltech101 (clip_benchmark's reader, background class kept: 102 classes, names from its json)
    for i in range(102):
        _jpg(f"{r}/caltech101/101_ObjectCategories/cat{i:03d}/image_0001.jpg")
    d = build_dataset("caltech101", r)
    assert len(d.dataset) == 102 and d.classnames[:2] == ["background", "off-center face"]
    assert len(d.templates) == 34 and d.mean_per_class


def test_alip_table_and_average():
    """The CLIP row of the ALIP README: its "Average" 31.8 is the mean of all 11 columns."""
    from alip.eval.report import table
    clip_row = {"cifar10": 63.7, "cifar100": 33.2, "food101": 34.6, "pets": 20.1, "flowers": 50.1,
                "sun397": 35.7, "cars": 2.6, "dtd": 15.5, "caltech101": 59.9, "fgvc_aircraft": 1.2,
                "imagenet1k": 32.8}
    mpc = ("pets", "flowers", "caltech101", "fgvc_aircraft")  # headline = mean-per-class there
    results = {n: {"top1": -1.0 if n in mpc else v, "mean_per_class": v if n in mpc else -1.0,
                   "uses_mean_per_class": float(n in mpc)} for n, v in reversed(clip_row.items())}
    text, mean = table(results)
    assert mean == pytest.approx(349.4 / 11) and text.splitlines()[2].split("|")[-2].strip() == "31.8"
    assert text.splitlines()[0].split("|")[1].strip() == "CIFAR10" and "Average" in text
    text, mean = table({"cifar10": results["cifar10"], "pets": results["pets"]})
    assert mean == pytest.approx((63.7 + 20.1) / 2) and "Mean of 2" in text


def test_cli_skip_missing(tmp_path, capsys):
    import eval_zeroshot
    write_cifar10(str(tmp_path / "cifar10"), [0, 1, 2, 3, 4, 5])
    args = ["--model", "ALIP-tiny", "--dataset", "cifar10,dtd", "--root", str(tmp_path / "{dataset}"),
            "--device", "cpu", "--workers", "0", "--output", str(tmp_path / "o.json")]
    with pytest.raises(FileNotFoundError, match="dtd: dataset root .*dtd does not exist"):
        eval_zeroshot.main(args)
    assert eval_zeroshot.main(args + ["--skip-missing"]) == 0
    out = json.loads((tmp_path / "o.json").read_text())
    assert set(out["metrics"]) == {"cifar10"} and set(out["skipped"]) == {"dtd"}
    assert "not evaluated (missing): dtd" in capsys.readouterr().out


def test_imagenet_folder_resolution(tmp_path):
    """ImageNet: ROOT/val/<wnid>/ or ROOT itself with the 1000 wnid folders; CLIP names, 80 templates."""
    import open_clip
    for i in range(1000):
        write_id_image(str(tmp_path / "imagenet" / "val" / f"n{i:08d}" / "a.png"), i % 256, size=2)
    for root in (tmp_path / "imagenet", tmp_path / "imagenet" / "val"):
        d = build_dataset("imagenet", str(root))
        assert d.name == "imagenet1k" and len(d.dataset) == 1000 and d.dataset[999][1] == 999
        assert d.classnames == list(open_clip.IMAGENET_CLASSNAMES) and len(d.templates) == 80
    with pytest.raises(FileNotFoundError, match=r"imagenet1k: .*imagenet/train is missing"):
        build_dataset("imagenet1k", str(tmp_path / "imagenet"), split="train")
