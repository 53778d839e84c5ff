"""data2rec.py: inputs, rejects, image handling, resumable and byte-identical output."""
import glob
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

import data2rec
from alip.data.recordio import RecordReader
from data_fixtures import (caption_of, image, jpeg_bytes, make_manifest_dataset, make_wds_dataset, text_of,
                           tokenize, write_manifest)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(out):
    recs = {}
    for path in sorted(glob.glob(os.path.join(out, "train-*.rec"))):
        for r in RecordReader(path):
            assert r.key not in recs
            recs[r.key] = r
    return recs


def shard_bytes(out):
    return {os.path.basename(p): open(p, "rb").read()
            for p in sorted(glob.glob(os.path.join(out, "train-*.rec")) + glob.glob(os.path.join(out, "train-*.idx")))}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("in")
    return str(root), make_manifest_dataset(str(root), 23)


def test_manifest_round_trip(ds, tmp_path, capsys):
    root, manifest = ds
    out = str(tmp_path / "out")
    assert data2rec.main(["--manifest", manifest, "--image-root", root, "--output-dir", out,
                          "--shard-size", "10", "--no-progress"]) == 0
    assert "rows in 23 = written 23 + rejected 0" in capsys.readouterr().out
    recs = records(out)
    assert sorted(recs) == list(range(23))
    tok = tokenize([text_of(i) for i in range(23)] + [caption_of(i) for i in range(23)])
    for k, r in recs.items():
        assert (r.raw_tokens == tok[k]).all() and (r.caption_tokens == tok[23 + k]).all()
        got = np.asarray(Image.open(io.BytesIO(r.jpeg)), np.float32)
        want = np.asarray(image(k), np.float32)
        assert got.shape == want.shape and np.abs(got - want).mean() < 5  # two q95 4:2:0 generations
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["total_records"] == 23 and m["rows_in"] == 23 and m["rejected"] == 0
    assert [s["records"] for s in m["shards"]] == [10, 10, 3]
    assert m["shards"][0]["bytes"] == os.path.getsize(os.path.join(out, "train-00000.rec"))
    assert m["context_length"] == 77 and "ALIP-ViT-B-32" in m["tokenizer"]
    assert m["command"].startswith("data2rec.py --manifest") and m["flags"]["quality"] == 95
    # global shuffle: shard 0 is not rows 0..9; --no-shuffle keeps input order
    assert list(RecordReader(os.path.join(out, "train-00000.rec")).keys) != list(range(10))
    out2 = str(tmp_path / "ordered")
    data2rec.main(["--manifest", manifest, "--image-root", root, "--output-dir", out2, "--shard-size", "10",
                   "--no-shuffle", "--no-progress"])
    assert list(RecordReader(os.path.join(out2, "train-00000.rec")).keys) == list(range(10))


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_csv_tsv_with_custom_columns(ds, tmp_path, fmt):
    root, _ = ds
    rows = [{"image": f"images/{i:04d}.jpg", "text": text_of(i) + ', "quoted"', "caption": caption_of(i)}
            for i in range(4)]
    path = write_manifest(root, rows, fmt, name=f"m_{fmt}")
    lines = open(path).read().replace("image", "url", 1).replace("text", "alt", 1)
    open(path, "w").write(lines)
    out = str(tmp_path / "out")
    assert data2rec.main(["--manifest", path, "--image-root", root, "--output-dir", out, "--image-col", "url",
                          "--text-col", "alt", "--no-progress"]) == 0
    recs = records(out)
    assert sorted(recs) == [0, 1, 2, 3]
    assert (recs[2].raw_tokens == tokenize([text_of(2) + ', "quoted"'])[0]).all()
    # a column that is not in the header is an error naming the file
    assert data2rec.main(["--manifest", path, "--image-root", root, "--output-dir", str(tmp_path / "x"),
                          "--no-progress"]) == 1


@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_rows_are_rejected_with_reasons(tmp_path, capsys, workers):
    root = str(tmp_path)
    make_manifest_dataset(root, 3)
    png = image(10).save(os.path.join(root, "images/png.png")) or "images/png.png"
    image(11, mode="CMYK").save(os.path.join(root, "images/cmyk.jpg"))
    open(os.path.join(root, "images/trunc.jpg"), "wb").write(jpeg_bytes(image(12, (64, 64)))[:400])
    open(os.path.join(root, "images/junk.jpg"), "wb").write(b"not an image at all")
    good = lambda i: json.dumps({"image": f"images/{i:04d}.jpg", "text": text_of(i), "caption": caption_of(i)})  # noqa
    lines = [good(0).encode(),
             json.dumps({"image": "images/missing.jpg", "text": "t", "caption": "c"}).encode(),
             json.dumps({"image": "images/trunc.jpg", "text": "t", "caption": "c"}).encode(),
             json.dumps({"image": png, "text": "a png", "caption": "c"}).encode(),
             json.dumps({"image": "images/cmyk.jpg", "text": "a cmyk jpeg", "caption": "c"}).encode(),
             b'{"image": "images/0001.jpg", "text": "caf\xe9 latin-1", "caption": "c"}',
             json.dumps({"image": "images/0001.jpg", "text": "t", "caption": "  "}).encode(),
             json.dumps({"image": "images/0001.jpg", "caption": "c"}).encode(),
             json.dumps({"image": "images/0002.jpg", "text": "", "caption": "c"}).encode(),
             json.dumps({"image": "images/junk.jpg", "text": "t", "caption": "c"}).encode(),
             b"{not json",
             good(2).encode()]
    path = os.path.join(root, "bad.jsonl")
    open(path, "wb").write(b"\n".join(lines) + b"\n")
    out = str(tmp_path / "out")
    assert data2rec.main(["--manifest", path, "--image-root", root, "--output-dir", out, "--shard-size", "5",
                          "--workers", workers, "--no-progress"]) == 0
    assert "rows in 12 = written 4 + rejected 8" in capsys.readouterr().out
    rejects = {r["row"]: r["reason"] for r in map(json.loads, open(os.path.join(out, "rejects.jsonl")))}
    assert sorted(records(out)) == [0, 3, 4, 11]  # PNG and CMYK are converted to RGB JPEG
    assert rejects[1].startswith("missing image file") and "missing.jpg" in rejects[1]
    assert rejects[2].startswith("undecodable image") and "truncated" in rejects[2].lower()
    assert rejects[5].startswith("non-UTF-8 text")
    assert rejects[6] == "empty caption"
    assert rejects[7] == "missing column 'text'"
    assert rejects[8] == "empty text"
    assert rejects[9].startswith("undecodable image")
    assert rejects[10].startswith("malformed JSON")
    assert len(rejects) == 8
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert (m["rows_in"], m["total_records"], m["rejected"]) == (12, 4, 8)
    cmyk = Image.open(io.BytesIO(records(out)[4].jpeg))
    assert cmyk.mode == "RGB" and cmyk.format == "JPEG"


def test_missing_caption_is_an_error_unless_fallback(tmp_path, capsys):
    root = str(tmp_path)
    make_manifest_dataset(root, 2)
    path = write_manifest(root, [{"image": "images/0000.jpg", "text": "t0", "caption": "c0"},
                                 {"image": "images/0001.jpg", "text": "t1"}], name="nocap")
    with open(path, "w") as f:
        f.write(json.dumps({"image": "images/0000.jpg", "text": "t0", "caption": "c0"}) + "\n")
        f.write(json.dumps({"image": "images/0001.jpg", "text": "t1"}) + "\n")
    out = str(tmp_path / "out")
    assert data2rec.main(["--manifest", path, "--image-root", root, "--output-dir", out, "--no-progress"]) == 1
    assert "nocap.jsonl row 1: no caption" in capsys.readouterr().err
    assert not glob.glob(os.path.join(out, "*.rec"))
    assert data2rec.main(["--manifest", path, "--image-root", root, "--output-dir", out, "--no-progress",
                          "--caption-fallback", "raw"]) == 0
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["caption_fallbacks"] == 1 and m["total_records"] == 2
    r = records(out)[1]
    assert (r.caption_tokens == r.raw_tokens).all()


def test_webdataset_input(tmp_path, capsys):
    pattern, captions = make_wds_dataset(str(tmp_path), 12, per_tar=5)
    out = str(tmp_path / "out")
    assert data2rec.main(["--wds", pattern, "--captions", captions, "--output-dir", out, "--shard-size", "5",
                          "--no-progress"]) == 0
    recs = records(out)
    assert sorted(recs) == list(range(12))  # keys number the samples in sorted tar order
    assert (recs[7].raw_tokens == tokenize([text_of(7)])[0]).all()
    assert (recs[7].caption_tokens == tokenize([caption_of(7)])[0]).all()
    # a captions file without some KEYs stops the run, naming it
    lines = open(captions).read().splitlines()
    open(captions, "w").write("\n".join(lines[:-2]) + "\n")
    assert data2rec.main(["--wds", pattern, "--captions", captions, "--output-dir", str(tmp_path / "o2"),
                          "--no-progress"]) == 1
    assert "no caption for 2 of 12 samples" in capsys.readouterr().err
    assert data2rec.main(["--wds", pattern, "--captions", captions, "--output-dir", str(tmp_path / "o2"),
                          "--no-progress", "--caption-fallback", "raw"]) == 0
    assert json.load(open(tmp_path / "o2" / "manifest.json"))["caption_fallbacks"] == 2


def test_max_size_and_copy_jpeg(tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "images"))
    image(0, (100, 60)).save(os.path.join(root, "images/big.jpg"), quality=90)
    image(1, (20, 16)).save(os.path.join(root, "images/small.jpg"), quality=90)
    path = write_manifest(root, [{"image": "images/big.jpg", "text": "a", "caption": "b"},
                                 {"image": "images/small.jpg", "text": "a", "caption": "b"}])
    out = str(tmp_path / "out")
    data2rec.main(["--manifest", path, "--image-root", root, "--output-dir", out, "--max-size", "30",
                   "--copy-jpeg", "--no-progress"])
    recs = records(out)
    assert Image.open(io.BytesIO(recs[0].jpeg)).size == (50, 30)  # shorter side capped, aspect kept
    assert recs[1].jpeg == open(os.path.join(root, "images/small.jpg"), "rb").read()  # copied byte-for-byte
    out2 = str(tmp_path / "out2")
    data2rec.main(["--manifest", path, "--image-root", root, "--output-dir", out2, "--max-size", "30",
                   "--quality", "50", "--no-progress"])
    small = records(out2)[1].jpeg
    assert small != recs[1].jpeg and Image.open(io.BytesIO(small)).size == (20, 16)  # re-encoded, not resized


def test_exif_orientation_and_grayscale(tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "images"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees (a phone photo)
    image(0, (40, 20)).save(os.path.join(root, "images/rot.jpg"), quality=95, exif=exif.tobytes())
    image(1, (24, 16), mode="L").save(os.path.join(root, "images/gray.jpg"), quality=95)
    path = write_manifest(root, [{"image": "images/rot.jpg", "text": "a", "caption": "b"},
                                 {"image": "images/gray.jpg", "text": "a", "caption": "b"}])
    out = str(tmp_path / "out")
    assert data2rec.main(["--manifest", path, "--image-root", root, "--output-dir", out, "--copy-jpeg",
                          "--no-progress"]) == 0
    recs = records(out)
    rot = Image.open(io.BytesIO(recs[0].jpeg))
    assert rot.size == (20, 40) and rot.getexif().get(0x0112, 1) == 1  # upright, as cv2.imread gives it
    gray = Image.open(io.BytesIO(recs[1].jpeg))
    assert gray.mode == "RGB" and gray.size == (24, 16)  # re-encoded as RGB, not copied


def test_rerun_is_byte_identical_and_never_duplicates(ds, tmp_path, capsys):
    root, manifest = ds
    args = ["--manifest", manifest, "--image-root", root, "--shard-size", "6", "--no-progress"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert data2rec.main(args + ["--output-dir", a]) == 0
    assert data2rec.main(args + ["--output-dir", b, "--workers", "2"]) == 0
    assert shard_bytes(a) == shard_bytes(b) and len(shard_bytes(a)) == 8
    # rerun into a finished dir: nothing rewritten, same counts
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(a, "train-*"))}
    assert data2rec.main(args + ["--output-dir", a]) == 0
    assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(a, "train-*"))} == mtimes
    assert "rows in 23 = written 23 + rejected 0" in capsys.readouterr().out.splitlines()[-1]
    # a lost shard is rebuilt identically
    os.remove(os.path.join(a, "train-00002.done.json"))
    os.remove(os.path.join(a, "train-00002.rec"))
    assert data2rec.main(args + ["--output-dir", a]) == 0
    assert shard_bytes(a) == shard_bytes(b)
    # other flags into the same dir: refused
    assert data2rec.main(args + ["--output-dir", a, "--quality", "80"]) == 1
    assert "different input or flags" in capsys.readouterr().err


def test_parts_on_several_machines_make_the_same_shards(ds, tmp_path, capsys):
    root, manifest = ds
    args = ["--manifest", manifest, "--image-root", root, "--shard-size", "6", "--no-progress"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert data2rec.main(args + ["--output-dir", whole]) == 0
    assert data2rec.main(args + ["--output-dir", parts, "--part", "1/2"]) == 0
    assert "part 1/2 done" in capsys.readouterr().out
    assert sorted(shard_bytes(parts)) == ["train-00001.idx", "train-00001.rec", "train-00003.idx", "train-00003.rec"]
    assert not os.path.exists(os.path.join(parts, "manifest.json"))
    assert data2rec.main(args + ["--output-dir", parts, "--part", "0/2"]) == 0
    assert "rows in 23 = written 23 + rejected 0" in capsys.readouterr().out
    assert shard_bytes(parts) == shard_bytes(whole)
    assert data2rec.main(args + ["--output-dir", parts, "--part", "2/2"]) == 2


def test_killed_midway_then_rerun_is_byte_identical(tmp_path):
    root = str(tmp_path / "in")
    os.makedirs(os.path.join(root, "images"))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):  # noise images: slow enough to encode that the kill lands midway
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
            os.path.join(root, f"images/{i}.png"))
        rows.append({"image": f"images/{i}.png", "text": text_of(i), "caption": caption_of(i)})
    manifest = write_manifest(root, rows)
    args = [sys.executable, os.path.join(REPO, "data2rec.py"), "--manifest", manifest, "--image-root", root,
            "--shard-size", "4", "--no-progress"]
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(args + ["--output-dir", killed], cwd=REPO)
    deadline = time.time() + 120
    while not glob.glob(os.path.join(killed, "train-00001.done.json")) and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(glob.glob(os.path.join(killed, "*.done.json")))
    assert 0 < done < 12, f"the kill did not land midway ({done} of 12 shards done)"
    assert not os.path.exists(os.path.join(killed, "manifest.json"))
    assert data2rec.main(args[2:] + ["--output-dir", killed]) == 0
    clean = str(tmp_path / "clean")
    assert data2rec.main(args[2:] + ["--output-dir", clean]) == 0
    assert shard_bytes(killed) == shard_bytes(clean) and len(shard_bytes(clean)) == 24
    assert not glob.glob(os.path.join(killed, "*.partial"))


@pytest.mark.parametrize("flag,col", [("--text-col", "txt"), ("--image-col", "img"), ("--caption-col", "cap")])
def test_jsonl_column_in_no_row_stops_before_any_work(ds, tmp_path, capsys, flag, col):
    root, manifest = ds
    out = tmp_path / "out"
    assert data2rec.main(["--manifest", manifest, "--image-root", root, "--output-dir", str(out), flag, col,
                          "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("data2rec: error: ") and len(err.splitlines()) == 1
    assert manifest in err and repr(col) in err and flag in err
    assert not out.exists()  # stopped at the manifest scan, before the output dir and any image


def test_missing_image_root_and_empty_inputs_are_errors(ds, tmp_path, capsys):
    root, manifest = ds
    out = tmp_path / "out"
    args = ["--output-dir", str(out), "--no-progress"]
    assert data2rec.main(["--manifest", manifest, "--image-root", str(tmp_path / "nope")] + args) == 1
    err = capsys.readouterr().err
    assert "--image-root" in err and "nope: no such directory" in err and len(err.splitlines()) == 1
    empty_jsonl, header_only = tmp_path / "empty.jsonl", tmp_path / "empty.csv"
    empty_jsonl.write_text("\n")
    header_only.write_text("image,text,caption\n")
    for path in (empty_jsonl, header_only):
        assert data2rec.main(["--manifest", str(path), "--image-root", root] + args) == 1
        err = capsys.readouterr().err
        assert f"{path}: no rows" in err and len(err.splitlines()) == 1
    _, captions = make_wds_dataset(str(tmp_path), 1)
    tarfile.open(tmp_path / "empty.tar", "w").close()  # a whole tar, end marker and all: no samples
    assert data2rec.main(["--wds", str(tmp_path / "empty.tar"), "--captions", captions] + args) == 1
    err = capsys.readouterr().err
    assert "empty.tar" in err and "no samples" in err and len(err.splitlines()) == 1
    assert not out.exists()  # not one 0-record shard


def test_a_run_that_writes_nothing_exits_non_zero(tmp_path, capsys):
    root = str(tmp_path)
    make_manifest_dataset(root, 1)
    path = write_manifest(root, [{"image": f"images/gone{i}.jpg", "text": "t", "caption": "c"} for i in range(3)])
    out = str(tmp_path / "out")
    assert data2rec.main(["--manifest", path, "--image-root", root, "--output-dir", out, "--no-progress"]) == 1
    cap = capsys.readouterr()
    assert "rows in 3 = written 0 + rejected 3: nothing was written" in cap.err and len(cap.err.splitlines()) == 1
    assert os.path.join(out, "rejects.jsonl") in cap.err and "written 0" not in cap.out
    assert len(open(os.path.join(out, "rejects.jsonl")).readlines()) == 3  # the reasons stay listed


def tar_cuts(path):
    """Where a 2-sample tar can be cut so that tarfile lists it without an error: at the member
    boundary between the samples, inside that member's header, and after the last member's data
    (only the end-of-archive marker lost)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        end = tar.offset
    second = next(m for m in members if m.name.startswith("000000001"))
    return {"member boundary": second.offset, "inside a header": second.offset + 440, "no end marker": end}


@pytest.mark.parametrize("cut", ["member boundary", "inside a header", "no end marker"])
def test_truncated_tar_is_an_error_naming_it(tmp_path, capsys, cut):
    pattern, captions = make_wds_dataset(str(tmp_path), 2, per_tar=2)
    tar = str(tmp_path / "wds" / "00000.tar")
    data = open(tar, "rb").read()
    at = tar_cuts(tar)[cut]
    open(tar, "wb").write(data[:at])
    out = tmp_path / "out"
    args = ["--wds", pattern, "--captions", captions, "--output-dir", str(out), "--no-progress"]
    assert data2rec.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"data2rec: error: {tar}: not a readable tar (") and len(err.splitlines()) == 1
    assert not out.exists()
    if cut == "no end marker":  # GNU tar writes two zero blocks after the last member, accepts one: so do we
        assert len(data) >= at + 1024 and not any(data[at:])
        open(tar, "wb").write(data[:at + 512])
        assert data2rec.main(args) == 0
        assert "rows in 2 = written 2 + rejected 0" in capsys.readouterr().out


def test_unknown_tokenizer_is_an_error_before_any_work(ds, tmp_path, capsys):
    root, manifest = ds
    out = tmp_path / "out"
    assert data2rec.main(["--manifest", manifest, "--image-root", root, "--output-dir", str(out),
                          "--tokenizer", "nope-model", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: --tokenizer 'nope-model': not an open_clip model name" in err
    assert not out.exists()
    # a known tokenizer of another context length: each text field is stored that wide
    assert data2rec.main(["--manifest", manifest, "--image-root", root, "--output-dir", str(out),
                          "--tokenizer", "coca_ViT-B-32", "--no-progress"]) == 0
    assert json.load(open(out / "manifest.json"))["text_context"] == {"raw": 76, "caption": 76}
