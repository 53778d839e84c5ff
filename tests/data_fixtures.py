"""Small on-disk datasets for the data tests (imported by tests, not a conftest)."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image


def image(i, size=(40, 32), mode="RGB"):
    """A deterministic image: smooth colour gradient + a block, so JPEG keeps it close."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 120 // max(w - 1, 1) + 37 * i % 120, y * 120 // max(h - 1, 1) + 91 * i % 120,
                    np.full_like(x, 20 + 53 * i % 200)], -1).astype(np.uint8)
    arr[h // 4:h // 2, w // 4:w // 2] = (255 - 17 * i % 60, 160, 100)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def jpeg_bytes(img, quality=95):
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def text_of(i):
    return f"web text number {i} about a thing"


def caption_of(i):
    return f"a synthetic caption of picture {i}"


def make_manifest_dataset(root, n, fmt="jsonl", size=(40, 32)):
    """n JPEG images under root/images and a manifest root/manifest.<fmt>; returns the manifest path."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for i in range(n):
        name = f"images/{i:04d}.jpg"
        image(i, size).save(os.path.join(root, name), quality=95)
        rows.append({"image": name, "text": text_of(i), "caption": caption_of(i)})
    return write_manifest(root, rows, fmt)


def write_manifest(root, rows, fmt="jsonl", name="manifest"):
    path = os.path.join(root, f"{name}.{fmt}")
    if fmt == "jsonl":
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    elif fmt == "csv":
        import csv
        with open(path, "w", newline="") as f:
            wr = csv.DictWriter(f, ["image", "text", "caption"])
            wr.writeheader()
            wr.writerows(rows)
    else:  # TSV as img2dataset writes it: no quoting at all
        with open(path, "w") as f:
            f.write("image\ttext\tcaption\n")
            f.writelines("\t".join((r["image"], r["text"], r["caption"])) + "\n" for r in rows)
    return path


def make_wds_dataset(root, n, per_tar=5, size=(40, 32)):
    """img2dataset-style tars root/wds/0000X.tar and root/captions.jsonl; returns (glob, captions)."""
    os.makedirs(os.path.join(root, "wds"), exist_ok=True)
    for t in range(0, n, per_tar):
        with tarfile.open(os.path.join(root, "wds", f"{t // per_tar:05d}.tar"), "w") as tar:
            for i in range(t, min(n, t + per_tar)):
                key = f"{i:09d}"
                for ext, data in (("jpg", jpeg_bytes(image(i, size))), ("txt", text_of(i).encode()),
                                  ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    cap = os.path.join(root, "captions.jsonl")
    with open(cap, "w") as f:
        for i in range(n):
            f.write(json.dumps({"key": f"{i:09d}", "caption": caption_of(i)}) + "\n")
    return os.path.join(root, "wds", "*.tar"), cap


def tokenize(texts):
    import open_clip

    import alip  # noqa: F401
    return open_clip.get_tokenizer("ALIP-ViT-B-32")(texts).numpy()


def run_data2rec(*argv):
    """data2rec.py's main on ``argv`` without its progress bar; its exit code."""
    import data2rec
    return data2rec.main([*argv, "--no-progress"])


def shard_files(out):
    """The .rec and .idx files of a data2rec output folder, sorted."""
    import glob
    return sorted(glob.glob(os.path.join(out, "train-*.rec")) + glob.glob(os.path.join(out, "train-*.idx")))


def make_rec_shards(tmp_path_factory, n, shard_size=10):
    """``n`` manifest rows (make_manifest_dataset) through data2rec.py into RecordIO shards;
    returns the shard directory."""
    import data2rec
    root = str(tmp_path_factory.mktemp("in"))
    manifest = make_manifest_dataset(root, n)
    out = str(tmp_path_factory.mktemp("rec"))
    assert data2rec.main(["--manifest", manifest, "--image-root", root, "--output-dir", out,
                          "--shard-size", str(shard_size), "--no-progress"]) == 0
    return out


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Shard caches (verify results, length indexes) under the test's tmp dir, never the
    user's: autouse in every module that imports it."""
    monkeypatch.setenv("ALIP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"
