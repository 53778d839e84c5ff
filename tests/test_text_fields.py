"""Records with any number of text fields: data2rec --text-fields, readers returning fields by
name (torch and DALI on CPU), the layout from manifest.json or from the label length, errors."""
import glob
import json
import os
import struct

import numpy as np
import pytest
import torch

from alip.data.fields import resolve
from alip.data.loader import build_train_loader
from alip.data.recordio import IR_FORMAT, RecordReader, RecordWriter, frame, pack_fields, unpack
from alip.data.spec import DataSpec, TextView
from alip.data.verify import check_shard
from data_fixtures import caption_of, image, jpeg_bytes, make_manifest_dataset, make_wds_dataset, text_of, tokenize, \
    write_manifest, run_data2rec as run, shard_files

N = 12
SIZE = 16
BACKENDS = ["torch", "dali"]


def generated_of(i):
    return f"a generated long description {i} of the scene"


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """A manifest with a `generated` column, packed with --text-fields raw,caption,generated."""
    root = str(tmp_path_factory.mktemp("in"))
    make_manifest_dataset(root, N)
    rows = [{"image": f"images/{i:04d}.jpg", "text": text_of(i), "caption": caption_of(i),
             "generated": generated_of(i)} for i in range(N)]
    manifest = write_manifest(root, rows, "jsonl", name="three")
    out = str(tmp_path_factory.mktemp("rec3"))
    assert run("--manifest", manifest, "--image-root", root, "--output-dir", out, "--shard-size", "5",
               "--text-fields", "raw,caption,generated") == 0
    return root, manifest, out


def epoch(loader):
    loader.set_epoch(0)
    return list(loader)


def tokens_by_raw(batches, field):
    """{raw tokens: that row's `field` tokens} over every batch (raw texts are unique)."""
    out = {}
    for b in batches:
        for raw, f in zip(b["raw"], b[field]):
            assert tuple(raw.tolist()) not in out
            out[tuple(raw.tolist())] = tuple(f.tolist())
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_field_shards_round_trip_through_both_readers(three, backend):
    _, _, out = three
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["text_fields"] == ["raw", "caption", "generated"] and m["total_records"] == N
    r = RecordReader(glob.glob(os.path.join(out, "train-*.rec"))[0])
    assert r[0].tokens.shape == (3, 77)
    assert struct.unpack_from(IR_FORMAT, r.read_payload(0))[0] == 231

    loader = build_train_loader(out, backend=backend, batch_size=5, image_size=SIZE, workers=1,
                                drop_last=False, augment=False, spec=DataSpec(text_fields=("raw", "generated")))
    batches = epoch(loader)
    assert all(list(b) == ["image", "raw", "generated"] for b in batches)
    raw, gen = tokenize([text_of(i) for i in range(N)]), tokenize([generated_of(i) for i in range(N)])
    assert tokens_by_raw(batches, "generated") == {tuple(raw[i]): tuple(gen[i]) for i in range(N)}
    assert all(b["generated"].dtype == torch.int64 and b["generated"].is_contiguous() for b in batches)

    # the default spec (ALIP_DATA) yields image, raw, caption from a 3-field shard
    cap = tokenize([caption_of(i) for i in range(N)])
    default = epoch(build_train_loader(out, backend=backend, batch_size=5, image_size=SIZE, workers=1,
                                       drop_last=False, augment=False))
    assert all(list(b) == ["image", "raw", "caption"] for b in default)
    assert tokens_by_raw(default, "caption") == {tuple(raw[i]): tuple(cap[i]) for i in range(N)}


def test_two_field_output_is_byte_identical_to_todays(three, tmp_path):
    root, manifest, _ = three
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run("--manifest", manifest, "--image-root", root, "--output-dir", a, "--shard-size", "5") == 0
    assert run("--manifest", manifest, "--image-root", root, "--output-dir", b, "--shard-size", "5",
               "--text-fields", "raw,caption") == 0
    files = shard_files(a)
    assert len(files) == 6
    assert [open(p, "rb").read() for p in files] == [open(p, "rb").read() for p in shard_files(b)]
    assert json.load(open(os.path.join(a, "plan.json"))) == json.load(open(os.path.join(b, "plan.json")))
    # and it is ALIP's layout, record for record: mx.recordio.pack(IRHeader(0, label[154], key, 0), jpeg)
    for rec in glob.glob(os.path.join(b, "train-*.rec")):
        want = b"".join(frame(struct.pack("<IfQQ", 154, 0.0, x.key, 0)
                              + np.concatenate([x.raw_tokens, x.caption_tokens]).astype("<f4").tobytes() + x.jpeg)
                        for x in RecordReader(rec))
        assert open(rec, "rb").read() == want
    assert json.load(open(os.path.join(b, "manifest.json")))["text_fields"] == ["raw", "caption"]


def write_shard(d, n_fields, n=7):
    """A shard with no manifest.json: record i's field k is the text f'field {k} of record {i}'."""
    toks = [tokenize([f"field {k} of record {i}" for k in range(n_fields)]) for i in range(n)]
    with RecordWriter(os.path.join(d, "train-00000.rec"), os.path.join(d, "train-00000.idx")) as w:
        for i in range(n):
            w.write_payload(i, pack_fields(i, toks[i], jpeg_bytes(image(i))))
    return toks


@pytest.mark.parametrize("backend", BACKENDS)
def test_231_float_records_without_manifest_read_as_raw_caption_generated(tmp_path, backend):
    toks = write_shard(str(tmp_path), 3)
    assert not os.path.exists(tmp_path / "manifest.json")
    spec = DataSpec(text_fields=("raw", "caption", "generated"))
    batches = epoch(build_train_loader(str(tmp_path), backend=backend, batch_size=3, image_size=SIZE,
                                       workers=1, drop_last=False, spec=spec))
    got = sorted(tuple(tuple(b[f][j].tolist()) for f in spec.text_fields)
                 for b in batches for j in range(len(b["raw"])))
    assert got == sorted(tuple(tuple(t[k]) for k in range(3)) for t in toks)


def test_other_label_lengths_without_manifest_are_an_error_naming_the_shard(tmp_path):
    write_shard(str(tmp_path), 4)
    shard = str(tmp_path / "train-00000.rec")
    with pytest.raises(Exception, match=f"^{shard}: labels of 308 floats and no manifest.json") as e:
        build_train_loader(str(tmp_path), backend="torch", batch_size=3, image_size=SIZE, workers=0)
    assert "\n" not in str(e.value)
    # with a manifest.json naming 4 fields they read
    json.dump({"text_fields": ["raw", "caption", "a", "b"], "shards": []}, open(tmp_path / "manifest.json", "w"))
    assert resolve([shard], ("b", "raw"))[0] == {"b": 3, "raw": 0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_asking_for_a_field_the_shards_lack_is_a_one_line_error(three, tmp_path, backend):
    _, _, out = three
    d = str(tmp_path)
    write_shard(d, 2)
    for spec in (DataSpec(text_fields=("raw", "generated")),
                 DataSpec(text_fields=("raw",), text_views=(TextView("g", "generated"),))):
        with pytest.raises(ValueError) as e:
            build_train_loader(d, backend=backend, batch_size=3, image_size=SIZE, workers=1, spec=spec)
        msg = str(e.value)
        assert msg == (f"text field 'generated' is not in the shards {d}/train-00000.rec: "
                       "they have ['raw', 'caption']")
    with pytest.raises(ValueError, match=r"text field 'summary' is not in the shards .*train-00000.rec \.\. "
                                         r".*train-00002.rec \(3 shards\): they have \['raw', 'caption', 'generated'\]"):
        build_train_loader(out, backend=backend, batch_size=3, image_size=SIZE, workers=1,
                           spec=DataSpec(text_fields=("summary",)))


def test_mixed_layouts_are_an_error(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_shard(str(a), 2)
    write_shard(str(b), 3)
    paths = [str(a / "train-00000.rec"), str(b / "train-00000.rec")]
    with pytest.raises(Exception, match="has text fields .*'generated'.* but .* has \\['raw', 'caption'\\]"):
        resolve(paths, ("raw",))


def test_missing_or_empty_extra_fields_are_rejects(three, tmp_path, capsys):
    root, _, _ = three
    rows = [{"image": f"images/{i:04d}.jpg", "text": text_of(i), "caption": caption_of(i),
             "generated": generated_of(i)} for i in range(6)]
    del rows[1]["generated"]
    rows[2]["generated"] = "  \u200b "
    rows[3]["generated"] = ["not", "a", "string"]
    manifest = write_manifest(str(tmp_path), rows, "jsonl")
    out = str(tmp_path / "out")
    assert run("--manifest", manifest, "--image-root", root, "--output-dir", out,
               "--text-fields", "raw,caption,generated") == 0
    assert "rows in 6 = written 3 + rejected 3" in capsys.readouterr().out
    rejects = {r["key"]: r["reason"] for r in map(json.loads, open(os.path.join(out, "rejects.jsonl")))}
    assert rejects == {1: "missing generated (no value in column 'generated')", 2: "empty generated",
                       3: "column 'generated' is a JSON list, not a string"}
    # a column no row has (a typo) stops before any work, naming it
    assert run("--manifest", manifest, "--image-root", root, "--output-dir", str(tmp_path / "o2"),
               "--text-fields", "raw,caption,generatd") == 1
    assert "no row has a value in column 'generatd'" in capsys.readouterr().err
    assert not glob.glob(str(tmp_path / "o2" / "train-*"))
    # bad flag values are one-line usage errors
    for bad in ("raw,generated", "raw,caption,raw", "raw,caption,a-b"):
        assert run("--manifest", manifest, "--output-dir", str(tmp_path / "o3"), "--text-fields", bad) == 2
        assert "--text-fields" in capsys.readouterr().err


def test_csv_manifest_and_wds_captions_extra_columns(tmp_path, capsys):
    import csv
    root = str(tmp_path)
    make_manifest_dataset(root, 4)
    path = os.path.join(root, "m.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "text", "caption", "generated"])
        w.writerows([f"images/{i:04d}.jpg", text_of(i), caption_of(i), generated_of(i) if i != 2 else ""]
                    for i in range(4))
    out = str(tmp_path / "csv")
    assert run("--manifest", path, "--image-root", root, "--output-dir", out, "--no-shuffle",
               "--text-fields", "raw,generated,caption") == 0
    recs = {r.key: r for p in sorted(glob.glob(os.path.join(out, "train-*.rec"))) for r in RecordReader(p)}
    assert sorted(recs) == [0, 1, 3]
    for i, r in recs.items():  # the given order: raw | generated | caption
        assert (r.tokens == tokenize([text_of(i), generated_of(i), caption_of(i)])).all()
    assert json.load(open(os.path.join(out, "manifest.json")))["text_fields"] == ["raw", "generated", "caption"]
    assert run("--manifest", path, "--image-root", root, "--output-dir", str(tmp_path / "x"),
               "--text-fields", "raw,caption,other") == 1
    assert "has no column 'other' (named by --text-fields)" in capsys.readouterr().err

    pattern, caps = make_wds_dataset(os.path.join(root, "w"), 4)
    lines = [json.loads(x) for x in open(caps)]
    with open(caps, "w") as f:
        for i, row in enumerate(lines):
            f.write(json.dumps({**row, **({"generated": generated_of(i)} if i != 1 else {})}) + "\n")
    out = str(tmp_path / "wds")
    assert run("--wds", pattern, "--captions", caps, "--output-dir", out, "--no-shuffle",
               "--text-fields", "raw,caption,generated") == 0
    recs = {r.key: r for p in sorted(glob.glob(os.path.join(out, "train-*.rec"))) for r in RecordReader(p)}
    assert sorted(recs) == [0, 2, 3]
    for i, r in recs.items():
        assert (r.tokens == tokenize([text_of(i), caption_of(i), generated_of(i)])).all()


def test_verify_checks_labels_against_manifest_text_fields(three, tmp_path):
    _, _, out = three
    d = str(tmp_path)
    for p in shard_files(out):
        open(os.path.join(d, os.path.basename(p)), "wb").write(open(p, "rb").read())
    m = json.load(open(os.path.join(out, "manifest.json")))
    json.dump(m, open(os.path.join(d, "manifest.json"), "w"))
    rec = os.path.join(d, "train-00000.rec")
    assert check_shard(rec) == (5, [])
    m["text_fields"] = ["raw", "caption"]
    del m["text_context"]  # a manifest of a data2rec before per-field widths: 77 each
    json.dump(m, open(os.path.join(d, "manifest.json"), "w"))
    n, problems = check_shard(rec)
    assert len(problems) == 5 and "IRHeader flag is 231, expected 154 (2 text fields x 77 tokens)" in problems[0]
    # without a manifest: any 77*N, the same N in every record of the shard
    os.remove(os.path.join(d, "manifest.json"))
    assert check_shard(rec) == (5, [])
    r = RecordReader(rec)
    two = [unpack(r.read_payload(i)) for i in range(len(r))]
    with RecordWriter(rec, os.path.join(d, "train-00000.idx")) as w:
        for i, x in enumerate(two):
            w.write_payload(x.key, pack_fields(x.key, x.tokens[:2] if i == 3 else x.tokens, x.jpeg))
    n, problems = check_shard(rec)
    assert len(problems) == 1 and "IRHeader flag is 154, expected 231" in problems[0]
