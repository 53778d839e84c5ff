"""The demo world: determinism, on-disk layouts, noise bookkeeping, held-out splits."""
import functools
import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torchvision
from PIL import Image

from alip.data import demo_detailed as dd
from alip.data import demo_world as dw
from alip.data.recordio import RecordReader
from alip.eval.retrieval import load_annotation
from alip.text_views import reduce_row

import make_demo_data

SMALL = dict(num_train=60, num_test=12, classify_train_per_class=3, classify_val_per_class=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    summary = dw.generate(out, seed=3, shard_size=25, progress=False, **SMALL)
    return out, summary


# data2rec records its command line (with the output path) in these two
PATH_BEARING = {"shards/manifest.json", "shards/plan.json"}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _rows(out):
    return [json.loads(line) for line in open(out / "raw" / "train.jsonl")]


def _norm(text):
    """Web text as plain lowercase words (undo Title Case, file-name and CSV styles)."""
    text = re.sub(r"\.(jpg|jpeg|png)\b", " ", text.lower())
    return " " + " ".join(re.sub(r"[_,]", " ", text).split()) + " "


def _pairs(scene):
    return {f"{o['colour']} {o['shape']}" for o in scene["objects"]}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path, world):
    out, _ = world
    again = tmp_path / "again"
    dw.generate(again, seed=3, shard_size=25, progress=False, **SMALL)
    a, b = _files(out), _files(again)
    assert sorted(a) == sorted(b)
    assert "shards/train-00002.rec" in a
    assert [k for k in a if a[k] != b[k]] == sorted(PATH_BEARING)
    other = tmp_path / "other"
    dw.generate(other, seed=4, shards=False, **SMALL)
    c = _files(other)
    assert c["raw/train.jsonl"] != a["raw/train.jsonl"]
    assert c["raw/images/000000.jpg"] != a["raw/images/000000.jpg"]


def test_manifest_rows_match_image_files(world):
    out, summary = world
    rows = _rows(out)
    assert len(rows) == SMALL["num_train"] == summary["num_train"]
    on_disk = {p.relative_to(out / "raw").as_posix() for p in (out / "raw" / "images").iterdir()}
    assert {r["image"] for r in rows} == on_disk
    assert len({r["key"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) >= {"image", "text", "caption", "noise", "noise_detail", "filler", "scene"}
        assert r["text"].strip() and r["caption"].strip()
        with Image.open(out / "raw" / r["image"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 64)


def test_shards_hold_every_row_keyed_by_manifest_line(world):
    out, summary = world
    rows = _rows(out)
    tokenizer = open_clip.get_tokenizer("ALIP-tiny")
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["text_context"] == {"raw": 77, "caption": 77, "detailed": 256, "detailed77": 77}
    late = sum(r["detailed_late"] for r in rows)  # every late caption is longer than 75 tokens
    assert manifest["text_cut"] == {"raw": 0, "caption": 0, "detailed": 0,
                                    "detailed77": sum(_bpe(r["detailed"]) > 75 for r in rows)}
    assert manifest["text_cut"]["detailed77"] >= late > 0
    records = [rec for rec_path in sorted((out / "shards").glob("train-*.rec"))
               for rec in RecordReader(rec_path, widths=(77, 77, 256, 77))]
    assert summary["train"]["shards"] == "shards" and summary["train"]["num_shards"] == 3
    assert sorted(r.key for r in records) == list(range(len(rows)))
    assert [r.key for r in records] != list(range(len(rows)))  # data2rec shuffled them
    for rec in records:
        row = rows[rec.key]
        assert row["key"] == f"{rec.key:06d}"
        assert rec.raw_tokens.tolist() == tokenizer([row["text"]])[0].tolist()
        assert rec.caption_tokens.tolist() == tokenizer([row["caption"]])[0].tolist()
        assert rec.tokens[2].tolist() == tokenizer([row["detailed"]], context_length=256)[0].tolist()
        # detailed77: the same caption cut to a 77-token row, what --caption-view truncate
        # --caption-tokens 75 makes of the 256-wide one
        assert rec.tokens[3].tolist() == tokenizer([row["detailed"]])[0].tolist()
        cut = reduce_row(torch.from_numpy(rec.tokens[2]).long(), random.Random(0), "truncate", 75, 77)
        assert rec.tokens[3].tolist() == cut.tolist()
        assert rec.jpeg == (out / "raw" / row["image"]).read_bytes()  # --copy-jpeg


def test_captions_are_correct_and_web_texts_have_the_labelled_noise(tmp_path):
    out = tmp_path / "w"
    dw.generate(out, num_train=400, num_test=2, classify_train_per_class=0,
                classify_val_per_class=1, shards=False)
    rows = _rows(out)
    assert {r["noise"] for r in rows} == set(dw.NOISE_KINDS)
    for r in rows:
        scene, cap, text = r["scene"], _norm(r["caption"]), _norm(r["text"])
        for o in scene["objects"]:  # the synthetic caption names every object correctly
            assert f" {o['colour']} " in cap and f" {o['shape']} " in cap, r
        if " background " in cap:
            assert f" {scene['background']} background " in cap, r
        wrong_pairs = {f"{c} {s}" for c in dw.COLOURS for s in dw.SHAPES} - _pairs(scene)
        if r["noise"] == "clean":
            for o in scene["objects"]:
                assert f" {o['size']} {o['colour']} {o['shape']} " in text, r
            assert f" {scene['background']} background " in text, r
        elif r["noise"] == "partial":
            world_words = {o[k] for o in scene["objects"] for k in ("shape", "colour", "size")}
            world_words |= {scene["background"], scene["layout"], "and", "shape", "shapes"}
            named = [w for w in text.split() if w in dw.SHAPES or w in dw.COLOURS]
            assert named and set(named) <= world_words, r
            assert not any(f" {p} " in text for p in wrong_pairs), r
        elif r["noise"] == "wrong":
            assert r["noise_detail"] in ("colour", "shape")
            assert any(f" {p} " in text for p in wrong_pairs), r
        else:
            assert r["noise_detail"] in ("other_scene", "off_topic")
            assert not any(f" {p} " in text for p in _pairs(scene)), r
            if r["noise_detail"] == "off_topic":
                assert not any(f" {s} " in text for s in dw.SHAPES), r


def test_noise_rates_are_exact_counts_in_shuffled_order(tmp_path):
    out = tmp_path / "w"
    s = dw.generate(out, num_train=200, num_test=2, partial_rate=0.1, wrong_rate=0.2,
                    mismatch_rate=0.3, filler_rate=0.4, classify_train_per_class=0,
                    classify_val_per_class=1, shards=False)
    rows = _rows(out)
    counts = {k: sum(r["noise"] == k for r in rows) for k in dw.NOISE_KINDS}
    assert counts == {"clean": 80, "partial": 20, "wrong": 40, "mismatched": 60}
    assert s["noise_counts"] == counts
    assert sum(r["filler"] for r in rows) == 80 == s["filler_count"]
    assert s["noise_rates"] == pytest.approx(
        {"clean": 0.4, "partial": 0.1, "wrong": 0.2, "mismatched": 0.3})
    assert json.loads((out / "demo_world.json").read_text()) == s
    first = [r["noise"] for r in rows[:40]]
    assert len(set(first)) > 1  # not written in blocks


def test_retrieval_split_is_karpathy_layout_with_five_captions(world):
    out, summary = world
    ds = json.loads((out / "retrieval" / "dataset_demo.json").read_text())
    assert list(ds) == ["images", "dataset"] and ds["dataset"] == "demo"
    assert len(ds["images"]) == SMALL["num_test"] == summary["retrieval"]["images"]
    sentids = []
    for i, img in enumerate(ds["images"]):
        # key order of dataset_coco.json
        assert list(img) == ["filepath", "sentids", "filename", "imgid", "split", "sentences",
                             "cocoid"]
        assert img["split"] == "test" and img["imgid"] == i
        assert (out / "retrieval" / img["filepath"] / img["filename"]).is_file()
        assert len(img["sentences"]) == 5
        raws = [s["raw"] for s in img["sentences"]]
        assert len(set(raws)) == 5
        for s in img["sentences"]:
            assert list(s) == ["tokens", "raw", "imgid", "sentid"]
            assert s["imgid"] == i and s["tokens"] == s["raw"].replace(",", "").split()
        assert img["sentids"] == [s["sentid"] for s in img["sentences"]]
        sentids += img["sentids"]
    assert sentids == list(range(5 * SMALL["num_test"]))


def test_retrieval_captions_describe_their_image(tmp_path):
    # the 5 test captions are drawn from the same scene as the image: rebuild it and check
    out = tmp_path / "w"
    dw.generate(out, num_train=1, num_test=40, classify_train_per_class=0,
                classify_val_per_class=1, shards=False)
    ds = json.loads((out / "retrieval" / "dataset_demo.json").read_text())
    for i, img in enumerate(ds["images"]):
        scene = dw.sample_scene(dw._rng(0, "test", i))
        for s in img["sentences"]:
            words = f" {' '.join(s['tokens'])} "
            for o in scene.objects:
                assert f" {o.colour} {o.shape} " in words or \
                    (f" {o.shape} " in words and f" {o.colour} " in words), s
            if " background " in words:
                assert f" {scene.background} background " in words, s


def test_no_image_in_both_train_and_test(world):
    out, _ = world

    def digests(paths):
        return {hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest() for p in paths}

    train = digests(sorted((out / "raw" / "images").iterdir()))
    test = digests(sorted((out / "retrieval" / "images").iterdir()))
    classify = digests(sorted((out / "classify").rglob("*.png")))
    assert len(train) == SMALL["num_train"] and len(test) == SMALL["num_test"]
    assert not train & test and not train & classify and not test & classify


def test_classify_split_loads_as_imagefolder(world):
    out, summary = world
    names = (out / "classify" / "classnames.txt").read_text().splitlines()
    templates = (out / "classify" / "templates.txt").read_text().splitlines()
    assert names == sorted(dw.COLOURS) == summary["classify"]["classes"]
    assert templates and all(t.count("{}") == 1 for t in templates)
    for split, per_class in (("train", 3), ("val", 2)):
        ds = torchvision.datasets.ImageFolder(out / "classify" / split)
        assert ds.classes == names
        assert len(ds) == per_class * len(names)
        assert np.bincount(ds.targets).tolist() == [per_class] * len(names)
        img, label = ds[len(ds) - 1]
        assert img.size == (64, 64) and names[label] == "yellow"
        rgb = np.asarray(img).reshape(-1, 3).astype(int)  # the object's pixels are yellow's
        near = np.abs(rgb - np.array(dw.COLOURS["yellow"])).max(axis=1) <= dw.JITTER + 3 * dw.PIXEL_NOISE
        assert near.sum() > 40


def test_bad_arguments_and_non_empty_output_give_clear_errors(tmp_path, world):
    with pytest.raises(ValueError, match="sum to <= 1"):
        dw.generate(tmp_path / "a", partial_rate=0.5, wrong_rate=0.3, mismatch_rate=0.3)
    with pytest.raises(ValueError, match="--wrong-rate"):
        dw.generate(tmp_path / "b", wrong_rate=-0.1)
    with pytest.raises(ValueError, match="--num-test"):
        dw.generate(tmp_path / "c", num_test=0)
    with pytest.raises(ValueError, match="--seed"):
        dw.generate(tmp_path / "d", seed=-1)
    out, _ = world
    with pytest.raises(FileExistsError, match=str(out)):
        dw.generate(out, **SMALL)


def test_overwrite_leaves_no_stale_files(tmp_path):
    out = tmp_path / "w"
    dw.generate(out, seed=1, shards=False, **SMALL)
    dw.generate(out, seed=1, shards=False, overwrite=True,
                **dict(SMALL, num_train=10, classify_val_per_class=1))
    assert len(list((out / "raw" / "images").iterdir())) == 10
    assert len(list((out / "classify" / "val").rglob("*.png"))) == len(dw.COLOURS)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--num-train", "8", "--num-test", "3", "--seed", "2",
            "--classify-train-per-class", "1", "--classify-val-per-class", "1", "--no-shards"]
    assert make_demo_data.main(argv) == 0
    summary = json.loads((out / "demo_world.json").read_text())
    assert summary["num_train"] == 8 and summary["seed"] == 2
    assert make_demo_data.main(argv) == 2  # not empty any more
    assert "not empty" in capsys.readouterr().err
    assert make_demo_data.main(argv + ["--overwrite", "--mismatch-rate", "2"]) == 2


def test_objects_fit_the_image_and_never_overlap():
    """Every shape lies in the box of half-side r around its centre (drawing code); those boxes
    stay inside the image and two objects' boxes are disjoint, for every layout."""
    worst = 1.0
    for i in range(2000):
        rng = np.random.default_rng((7, i))
        scene = dw.sample_scene(rng)
        boxes = dw.place(scene, rng)
        for (cx, cy, r), obj in zip(boxes, scene.objects):
            assert dw.RADIUS[obj.size][0] <= r <= dw.RADIUS[obj.size][1]
            assert r <= cx <= 1 - r and r <= cy <= 1 - r, (scene, boxes)
        if len(boxes) == 2:
            (x1, y1, r1), (x2, y2, r2) = boxes
            gap = max(abs(x1 - x2), abs(y1 - y2)) - (r1 + r2)
            assert gap >= 0, (scene, boxes)
            worst = min(worst, gap)
    assert worst < 0.02  # the check reached the tight case (two large objects nearly touching)


def test_small_objects_cover_several_patches_at_32_px():
    """A small object is at least 8 px across at the demo model's 32 px (two 4-px patches)."""
    assert 2 * dw.RADIUS["small"][0] * 32 >= 8
    assert dw.RADIUS["small"][1] < dw.RADIUS["large"][0]  # "small" and "large" never overlap


def test_zero_shot_templates_ensemble_over_every_size_and_shape():
    """One caption-style prompt per (size, shape): the class embedding's mean averages them
    out, so it carries the colour alone."""
    seen = []
    for t in dw.CLASSIFY_TEMPLATES:
        m = re.fullmatch(r"a picture of a (\w+) \{\} (\w+)", t)
        assert m, t
        seen.append(m.groups())
    assert sorted(seen) == sorted((s, c) for s in dw.SIZES for c in dw.SHAPES)


def test_cli_bad_out_and_shard_size_are_one_line_errors_before_drawing(tmp_path, capsys):
    small = ["--num-train", "4", "--num-test", "2", "--classify-train-per-class", "1",
             "--classify-val-per-class", "1"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        assert make_demo_data.main(["--out", str(out)] + small) == 2
        err = capsys.readouterr().err
        assert err.startswith("make_demo_data.py: error: ") and str(out) in err and len(err.splitlines()) == 1
        assert out != a_file or f"--out {a_file} is a file, not a directory" in err
    out = tmp_path / "w"
    for flag in ("--shard-size", "--workers"):
        assert make_demo_data.main(["--out", str(out), flag, "0"] + small) == 2
        err = capsys.readouterr().err
        assert f"{flag} must be an integer >= 1, got 0" in err and len(err.splitlines()) == 1
        assert not out.exists()  # checked with the other arguments, before the world is drawn


# ------------------------------------------------------------------ version 4: detailed captions
# Computed with the version-3 code (main at a0d3c83, before the detailed captions) on the
# ``world`` fixture's arguments: adding the detailed captions changed none of these bytes.
V3_TRAIN_LINES = "a2be860af92d631377d45014f7d649ecdf96deddb1cfad4a444f66cbec4c2645"
V3_FILES = "8ea196c4e1918bcde218c63cdcce0f099682d3f220a413cc20e94ec9999d8201"
V3_RECORDS = "5332cabe58d645b39d8ac7be4ad581d2f061e473742060050ad8f156844bf7e5"
V3_ORDER = [22, 0, 3, 38, 37, 2, 17, 39, 43, 49, 25, 48]
NEW_KEYS = {"detailed", "detailed77", "detailed_late"}


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def test_images_web_texts_short_captions_and_shards_are_those_of_version_3(world):
    """The detailed captions come from their own rng streams: every image, web text, short
    caption, retrieval caption, classify image and shard record (raw and caption tokens, JPEG,
    order) is byte for byte what version 3 wrote."""
    out, _ = world
    rows = _rows(out)
    assert all(set(r) - NEW_KEYS == set(rows[0]) - NEW_KEYS and set(r) >= NEW_KEYS for r in rows)
    lines = "".join(json.dumps({k: v for k, v in r.items() if k not in NEW_KEYS}) + "\n"
                    for r in rows)
    assert _sha(lines.encode()) == V3_TRAIN_LINES
    files = sorted(p for p in out.rglob("*") if p.is_file() and (
        p.parent.name == "images" or p.suffix == ".png"
        or p.name in ("dataset_demo.json", "classnames.txt", "templates.txt")))
    assert len(files) == 60 + 12 + 1 + 7 * (3 + 2) + 2
    assert _sha(b"".join(p.relative_to(out).as_posix().encode() + b"\0" + p.read_bytes()
                         for p in files)) == V3_FILES
    shards = sorted((out / "shards").glob("train-*.rec"))
    recs = [r for p in shards for r in RecordReader(p, widths=(77, 77, 256, 77))]
    assert [r.key for r in recs][:12] == V3_ORDER
    recs.sort(key=lambda r: r.key)
    assert _sha(b"".join(np.int64(r.key).tobytes() + r.raw_tokens.astype(np.int64).tobytes()
                         + r.caption_tokens.astype(np.int64).tobytes() + r.jpeg
                         for r in recs)) == V3_RECORDS


@functools.lru_cache(maxsize=None)
def _tok(name=None):
    return open_clip.get_tokenizer(name) if name else open_clip.tokenizer.SimpleTokenizer()


def _bpe(text):
    """BPE tokens of ``text`` from open_clip's tokenizer at context 256 (SOT, EOT not counted)."""
    return int((_tok("ALIP-tiny")([text], context_length=256)[0] != 0).sum()) - 2


DETAIL_WORDS = ("background", "above", "below", "beside", "next", "underneath", "upper",
                "lower", "top", "bottom", "middle", "centred")  # none is in the framing


def _cut_text(text):
    """What a 77-token tower reads of ``text``: its first 75 BPE tokens, decoded."""
    tok = _tok()
    return " " + tok.decode(tok.encode(text)[:dd.CUT]).replace(".", " . ").replace(",", " , ") + " "


def test_detailed_captions_are_80_to_200_tokens_with_the_details_past_the_cut_in_three_of_four():
    late, n = 0, 400
    for i in range(n):
        rng = np.random.default_rng((11, i))
        scene = dw.sample_scene(rng)
        text, info = dd.detailed(scene, rng)
        tokens = _bpe(text)
        assert dd.MIN_TOKENS == 80 <= tokens <= 200 == dd.MAX_TOKENS and tokens == info["tokens"]
        words, cut = f" {' '.join(re.findall(r'[a-z]+', text.lower()))} ", _cut_text(text)
        # the whole caption: every object's size, colour and shape, and the background
        for o in scene.objects:
            assert f" {o.size} {o.colour} {o.shape} " in words, text
        assert f" {scene.background} " in words and " background " in words, text
        if len(scene.objects) == 1:
            assert any(w in words for w in {"top": (" top ", " upper "), "bottom": (
                " bottom ", " lower "), "middle": (" middle ", " centred ")}[scene.layout]), text
        # a 77-token tower sees the first object whole; the details only in an early caption
        first = [o for o in scene.objects if f" {o.size} {o.colour} {o.shape} " in cut]
        assert first, (cut, text)
        seen = [w for w in DETAIL_WORDS if f" {w} " in cut]
        if info["late"]:
            late += 1
            assert not seen and info["detail_start"] >= dd.CUT, (seen, cut)
            assert len(scene.objects) == 1 or len(first) == 1, cut  # the second one is past it
        else:
            assert " background " in cut and info["detail_end"] <= dd.CUT, cut
    assert late == 299  # LATE_SHARE 0.75 of 400 is 300; drawn per caption (sd 8.7), this seed


def test_detailed_captions_leave_the_other_streams_alone():
    """A detailed caption draws from the rng it is given only, so the scene stream is unchanged."""
    rng = np.random.default_rng(5)
    scene = dw.sample_scene(rng)
    state = rng.bit_generator.state
    a = dd.detailed(scene, np.random.default_rng((5, 4, 0)))
    assert rng.bit_generator.state == state
    assert a == dd.detailed(scene, np.random.default_rng((5, 4, 0)))


def test_long_retrieval_split_same_images_detailed_captions_loads_for_eval_retrieval(world):
    out, summary = world
    assert summary["version"] == 4
    assert summary["retrieval_long"] == {
        "annotation": "retrieval/dataset_demo_long.json", "image_root": "retrieval",
        "images": 12, "captions": 12, "chance_r1_percent": 100 / 12}
    rows = _rows(out)
    d = summary["detailed"]
    lengths = [_bpe(r["detailed"]) for r in rows]
    assert d["tokens"] == {"min": min(lengths), "median": float(np.median(lengths)),
                           "max": max(lengths)}
    assert d["late_count"] == sum(r["detailed_late"] for r in rows) and 0 < d["late_count"] < 60
    assert (d["field"], d["context"], d["cut"]) == ("detailed", 256, 75)
    short = json.loads((out / "retrieval" / "dataset_demo.json").read_text())
    long = json.loads((out / summary["retrieval_long"]["annotation"]).read_text())
    assert list(long) == ["images", "dataset"]
    for i, (a, b) in enumerate(zip(short["images"], long["images"])):
        assert {k: v for k, v in a.items() if k not in ("sentences", "sentids")} == \
            {k: v for k, v in b.items() if k not in ("sentences", "sentids")}
        scene = dw.sample_scene(dw._rng(3, "test", i))
        for s in b["sentences"]:
            assert list(s) == ["tokens", "raw", "imgid", "sentid"] and s["imgid"] == i
            assert 80 <= _bpe(s["raw"]) <= 200
            words = f" {' '.join(s['tokens']).lower()} "
            for o in scene.objects:
                assert f" {o.size} {o.colour} {o.shape} " in words, s["raw"]
            assert f" {scene.background} " in words, s["raw"]
        assert len(b["sentences"]) == 1 and b["sentids"] == [i]  # one per image (Urban1k, DCI)
    paths, captions, index = load_annotation(str(out / "retrieval" / "dataset_demo_long.json"),
                                             str(out / "retrieval"))
    assert len(paths) == 12 and len(captions) == 12 and list(index) == list(range(12))
    assert captions[0] == long["images"][0]["sentences"][0]["raw"]
