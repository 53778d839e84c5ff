"""caption.py inputs: 16-bit images seen as data2rec stores them; a manifest without raw text."""
import io
import os

import numpy as np
import pytest
from PIL import Image

import caption
from alip.caption import run as caption_run
from alip.caption.backends import GenSettings
from alip.caption.sources import DataError, ManifestRows
from alip.data.pack import encode_image
from test_caption import FakeCaptioner


def png16(path, value=30000):
    """A 16-bit grayscale PNG: a gradient around value (Pillow reads it as mode I;16)."""
    a = (np.full((16, 24), value) + np.arange(24)[None, :] * 100).astype(np.uint16)
    Image.fromarray(a).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    return a


def test_16bit_grayscale_is_scaled_as_data2rec_stores_it(tmp_path):
    """Pillow's convert("RGB") clips 16-bit values at 255 (an almost white image); the captioner
    now sees data2rec's 0..65535 -> 0..255 scaling."""
    path = str(tmp_path / "g16.png")
    a = png16(path)
    data = open(path, "rb").read()
    img = caption_run.decode_image(data)
    assert img.mode == "RGB" and img.size == (24, 16)
    got = np.asarray(img)
    want = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
    assert (got == want[..., None]).all() and got.max() < 200
    stored = np.asarray(Image.open(io.BytesIO(encode_image(data))).convert("RGB")).astype(int)  # data2rec's JPEG
    assert np.abs(stored - got.astype(int)).max() <= 3


def test_16bit_png_through_the_pipeline(tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "images"))
    png16(os.path.join(root, "images", "g16.png"), value=30000)
    path = os.path.join(root, "rows.jsonl")
    with open(path, "w") as f:
        f.write('{"image": "images/g16.png", "text": "a grey card"}\n')
    s = caption_run.caption_dataset(ManifestRows(path, root), FakeCaptioner("pixel", lambda v: f"grey {int(v[0])} {int(v[1])} {int(v[2])}"), GenSettings(), str(tmp_path / "out"),
                                    workers=0, progress=False)
    assert s["captioned"] == 1
    import json
    (row,) = [json.loads(line) for line in open(tmp_path / "out" / "captions.jsonl")]
    assert row["caption"] == "grey 117 117 117"  # round(30000 / 257), not 255


@pytest.mark.parametrize("fmt", ["jsonl", "tsv"])
def test_a_manifest_without_raw_text_is_refused_saying_why(tmp_path, capsys, fmt):
    """Captioning needs only images, but data2rec (which reads captioned.<ext>) packs each row's raw
    text with its caption: an image-only manifest stays refused, and the line now says why."""
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "images"))
    path = os.path.join(root, f"rows.{fmt}")
    with open(path, "w") as f:
        f.write('{"image": "images/a.jpg"}\n' if fmt == "jsonl" else "image\nimages/a.jpg\n")
    with pytest.raises(DataError, match="data2rec, which reads this run's captioned manifest, stores each row's raw"):
        ManifestRows(path, root)
    out = tmp_path / "caps"
    assert caption.main(["--manifest", path, "--image-root", root, "--output-dir", str(out), "--model", "x",
                         "--pretrained", "y"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and path in err and "'text'" in err and "--text-col" in err
    assert "raw text" in err and not out.exists()
