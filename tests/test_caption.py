"""caption.py: sources, backends (tiny random-init CoCa and BLIP, saved and loaded like real ones),
failures listed and counted, kill + rerun byte-identical, ranks, caption.py -> data2rec -> train."""
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

import caption
import data2rec
from alip.caption import run as caption_run
from alip.caption.backends import GenSettings, build_captioner
from alip.caption.sources import ManifestRows
from alip.caption.tiny import save_tiny_blip, save_tiny_coca
from alip.data.recordio import RecordReader
from data_fixtures import image, jpeg_bytes, make_manifest_dataset, make_wds_dataset, text_of, write_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = 10  # good images per dataset; each dataset adds one missing and one corrupt image

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Generation is many tiny ops: on a shared 2-core box, 2 OpenMP threads run it ~40x slower than 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def coca_dir(tmp_path_factory):
    """A tiny random-init CoCa saved as an open_clip local-dir model (config + weights)."""
    return save_tiny_coca(str(tmp_path_factory.mktemp("coca")))


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    """A tiny random-init BLIP with a WordPiece tokenizer built in code, saved with its processor."""
    return save_tiny_blip(str(tmp_path_factory.mktemp("blip")))


def add_broken_rows(root, rows):
    """One missing file and one corrupt JPEG (header zeroed) appended to the manifest rows."""
    data = bytearray(jpeg_bytes(image(99)))
    data[:64] = bytes(64)
    with open(os.path.join(root, "images", "corrupt.jpg"), "wb") as f:
        f.write(data)
    return rows + [{"image": "images/missing.jpg", "text": "gone"},
                   {"image": "images/corrupt.jpg", "text": "bad bytes"}]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("man"))
    path = make_manifest_dataset(root, GOOD)
    rows = [dict(json.loads(line), caption=None) for line in open(path)]  # no captions yet
    for r in rows:
        del r["caption"]
    return root, write_manifest(root, add_broken_rows(root, rows), name="rows")


@pytest.fixture(scope="module")
def clean(manifest, coca_dir, tmp_path_factory):
    """One uninterrupted single-process run over the manifest: the reference output."""
    root, path = manifest
    out = str(tmp_path_factory.mktemp("clean"))
    assert caption.main(["--manifest", path, "--image-root", root, "--output-dir", out] + coca_args(coca_dir)) == 0
    return out


def save_tiny_clip(d):
    """A tiny CLIP (TINY_COCA without its decoder) with weights, as an open_clip local-dir: model."""
    import open_clip

    from alip.caption.tiny import TINY_COCA
    os.makedirs(d, exist_ok=True)
    cfg = {k: v for k, v in TINY_COCA.items() if k != "multimodal_cfg"}
    with open(os.path.join(d, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f)
    torch.save(open_clip.create_model(f"local-dir:{d}").state_dict(), os.path.join(d, "open_clip_pytorch_model.bin"))
    return f"local-dir:{d}"


def coca_args(coca_dir, *extra):
    return ["--model", coca_dir, "--decoding", "greedy", "--max-new-tokens", "8", "--min-new-tokens", "2",
            "--batch-size", "3", "--chunk-size", "4", "--workers", "0", "--no-progress", *extra]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def chunk_numbers(out):
    """The chunks written in out (chunks/chunk-NNNNNN.FINGERPRINT.json)."""
    return sorted(int(os.path.basename(p).split(".")[0][len("chunk-"):])
                  for p in glob.glob(os.path.join(out, "chunks", "chunk-*.json")))


def outputs(out, names=("captions.jsonl", "failed.jsonl", "captioned.jsonl")):
    return {n: open(os.path.join(out, n), "rb").read() for n in names if os.path.exists(os.path.join(out, n))}


def test_manifest_with_coca_captions_good_rows_and_lists_broken(manifest, coca_dir, clean):
    root, path = manifest
    out = clean
    caps = read_jsonl(os.path.join(out, "captions.jsonl"))
    assert [c["key"] for c in caps] == list(range(GOOD))
    assert all(isinstance(c["caption"], str) and c["caption"].strip() == c["caption"] != "" for c in caps)
    failed = read_jsonl(os.path.join(out, "failed.jsonl"))
    assert [(f["key"], f["reason"].split(" ")[0:2]) for f in failed] == [
        (GOOD, ["missing", "image"]), (GOOD + 1, ["undecodable", "image:"])]
    assert failed[0]["source"] == path and failed[0]["row"] == GOOD
    side = json.load(open(os.path.join(out, "captions.json")))
    assert (side["rows_in"], side["captioned"], side["failed"]) == (GOOD + 2, GOOD, 2)
    weights = side["captioner"].pop("weights")  # what identifies the weights: each file's size and mtime
    assert side["captioner"] == {"backend": "open_clip", "model": coca_dir, "pretrained": "", "precision": "fp32"}
    d = coca_dir[len("local-dir:"):]
    assert weights == {"files": {os.path.join(d, f): [os.stat(os.path.join(d, f)).st_size,
                                                      os.stat(os.path.join(d, f)).st_mtime_ns]
                                 for f in ("open_clip_config.json", "open_clip_pytorch_model.bin")}}
    assert side["generation"]["decoding"] == "greedy" and side["generation"]["max_new_tokens"] == 8
    copy = read_jsonl(os.path.join(out, "captioned.jsonl"))
    assert [r["caption"] for r in copy] == [c["caption"] for c in caps] + [None, None]
    assert [r["image"] for r in copy] == [json.loads(line)["image"] for line in open(path)]
    # the same model through the library gives the same captions as the CLI wrote
    gen = GenSettings(decoding="greedy", max_new_tokens=8, min_new_tokens=2)
    cap = build_captioner("open_clip", coca_dir, "", gen)
    src = ManifestRows(path, root)
    imgs = [cap.preprocess(caption_run.decode_image(src.image_bytes(i))) for i in range(3)]
    assert [caption_run.clean(t) for t in cap(cap.collate(imgs))] == [c["caption"] for c in caps[:3]]


def test_tars_with_hf_blip_keyed_by_sample_name(blip_dir, tmp_path, capsys):
    pattern, _ = make_wds_dataset(str(tmp_path), 6, per_tar=3)
    with tarfile.open(str(tmp_path / "wds" / "00002.tar"), "w") as tar:  # one sample with a broken JPEG
        for name, data in (("bad.jpg", b"\xff\xd8 not a jpeg"), ("bad.txt", b"text")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = str(tmp_path / "caps")
    argv = ["--wds", pattern, "--output-dir", out, "--backend", "hf", "--model", blip_dir, "--decoding", "beam",
            "--num-beams", "2", "--max-new-tokens", "6", "--min-new-tokens", "2", "--prompt", "a picture of",
            "--batch-size", "4", "--chunk-size", "5", "--workers", "1", "--no-progress"]
    assert caption.main(argv) == 0
    assert "rows in 7 = captioned 6 + failed 1" in capsys.readouterr().out
    caps = read_jsonl(os.path.join(out, "captions.jsonl"))
    assert [c["key"] for c in caps] == [f"{i:09d}" for i in range(6)]
    assert all(c["caption"].startswith("a picture of ") and len(c["caption"]) > 13 for c in caps)
    (bad,) = read_jsonl(os.path.join(out, "failed.jsonl"))
    assert bad["key"] == "bad" and bad["reason"].startswith("undecodable image") and bad["sample"] == "bad"
    side = json.load(open(os.path.join(out, "captions.json")))
    assert side["captioner"]["model_class"] == "BlipForConditionalGeneration"
    assert side["generation"]["prompt"] == "a picture of" and side["generation"]["num_beams"] == 2
    # -> data2rec: the failed sample has no caption, so it needs the fallback; it is then rejected
    shards = str(tmp_path / "shards")
    args = ["--wds", pattern, "--captions", os.path.join(out, "captions.jsonl"), "--output-dir", shards,
            "--no-progress"]
    assert data2rec.main(args) == 1 and "no caption for 1 of 7" in capsys.readouterr().err
    assert data2rec.main(args + ["--caption-fallback", "raw"]) == 0
    assert "written 6 + rejected 1" in capsys.readouterr().out


class FakeCaptioner:
    """A captioner stand-in: each image's first pixel (as a float64 tensor) -> ``caption_of``."""

    def __init__(self, name, caption_of):
        self.name, self.caption_of = name, caption_of
        self.preprocess = lambda img: torch.tensor(img.getpixel((0, 0)), dtype=torch.float64)

    def describe(self):
        return {"backend": self.name}

    def collate(self, items):
        return torch.stack(items)

    def __call__(self, x):
        return [self.caption_of(v) for v in x]


def echo_captioner(empty_every=3):
    """Row-dependent text with a tab and a newline in it, empty (blank) for some images."""
    return FakeCaptioner("echo", lambda v: "  " if int(v[2]) % empty_every == 0
                         else f"pixel\t{int(v[0])}\n {int(v[1])}")


def test_empty_generations_are_failures_counted_not_dropped(tmp_path):
    root = str(tmp_path)
    path = make_manifest_dataset(root, 12, fmt="tsv")
    src = ManifestRows(path, root)
    cap = echo_captioner()
    s = caption_run.caption_dataset(src, cap, GenSettings(), str(tmp_path / "out"), batch_size=5, chunk_size=7,
                                    workers=0, progress=False)
    empty = [i for i in range(12) if caption_run.decode_image(src.image_bytes(i)).getpixel((0, 0))[2] % 3 == 0]
    assert 0 < len(empty) < 12
    assert s["rows_in"] == 12 and s["failed"] == len(empty) and s["captioned"] == 12 - len(empty)
    assert s["failure_kinds"] == {"empty caption generated": len(empty)}
    caps = read_jsonl(str(tmp_path / "out" / "captions.jsonl"))
    assert all("\t" not in c["caption"] and "\n" not in c["caption"] for c in caps)  # one line, TSV-safe
    # the TSV copy: header kept, caption column filled, "" where none; data2rec reads it
    lines = open(tmp_path / "out" / "captioned.tsv").read().splitlines()
    assert lines[0] == "image\ttext\tcaption" and len(lines) == 13
    cells = [line.split("\t") for line in lines[1:]]
    assert [c[2] == "" for c in cells] == [i in empty for i in range(12)]
    assert [c[1] for c in cells] == [text_of(i) for i in range(12)]


def test_unparseable_manifest_rows_fail_and_are_copied_as_they_were(tmp_path):
    root = str(tmp_path)
    path = make_manifest_dataset(root, 4)
    lines = open(path).read().splitlines(keepends=True)
    lines[1] = '{"image": "images/0001.jpg", "text": broken\n'
    open(path, "w").writelines(lines)
    s = caption_run.caption_dataset(ManifestRows(path, root), echo_captioner(empty_every=10**6), GenSettings(),
                                    str(tmp_path / "out"), batch_size=4, workers=0, progress=False)
    assert (s["captioned"], s["failed"]) == (3, 1)
    (bad,) = read_jsonl(str(tmp_path / "out" / "failed.jsonl"))
    assert bad["key"] == 1 and bad["reason"].startswith("malformed JSON line")
    copy = open(tmp_path / "out" / "captioned.jsonl").read().splitlines(keepends=True)
    assert len(copy) == 4 and copy[1] == lines[1]
    assert [json.loads(copy[i])["caption"] for i in (0, 2, 3)] == [c["caption"] for c in
                                                                   read_jsonl(str(tmp_path / "out" / "captions.jsonl"))]


def test_rerun_with_other_settings_is_refused(manifest, coca_dir, clean, tmp_path, capsys):
    root, path = manifest
    out = str(tmp_path / "caps")
    shutil.copytree(clean, out)
    base = ["--manifest", path, "--image-root", root, "--output-dir", out]
    before = outputs(out)
    assert caption.main(base + coca_args(coca_dir, "--max-new-tokens", "9")) == 1
    err = capsys.readouterr().err
    assert "caption: error:" in err and "generation.max_new_tokens: 8 there, 9 now" in err
    assert f"delete the whole directory {out} " in err and len(err.splitlines()) == 1
    assert outputs(out) == before
    assert caption.main(base + coca_args(coca_dir)) == 0  # same settings: nothing to do, same bytes
    assert outputs(out) == before


def test_bad_flags_and_missing_vllm_are_one_line_errors(manifest, coca_dir, tmp_path, capsys):
    root, path = manifest
    base = ["--manifest", path, "--image-root", root, "--output-dir", str(tmp_path / "x")]
    assert caption.main(base + coca_args(coca_dir, "--prompt", "hi")) == 1
    assert "--prompt" in capsys.readouterr().err
    clip_dir = save_tiny_clip(str(tmp_path / "clip"))  # a CLIP with weights: no text decoder
    assert caption.main(base + ["--model", clip_dir, "--workers", "0"]) == 1
    assert "not a CoCa model" in capsys.readouterr().err
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert caption.main(base + ["--backend", "vllm", "--model", "x", "--decoding", "greedy"]) == 1
        assert "pip install vllm" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x" / "plan.json")


def test_bad_inputs_stop_before_the_model_is_loaded(tmp_path, capsys):
    """A tar cut short, a text column no row has, a missing --image-root: one line naming it, rc 1
    (the model name is nonsense: the input is checked first)."""
    from test_data2rec import tar_cuts
    pattern, _ = make_wds_dataset(str(tmp_path), 2, per_tar=2)
    tar = str(tmp_path / "wds" / "00000.tar")
    data, cut = open(tar, "rb").read(), tar_cuts(tar)["member boundary"]
    open(tar, "wb").write(data[:cut])
    root = str(tmp_path / "man")
    path = make_manifest_dataset(root, 2)
    out = tmp_path / "caps"
    weights = tmp_path / "x.pt"  # passes the weights file checks (not empty); only a load would fail
    weights.write_bytes(b"not loaded")
    for argv, names in ((["--wds", pattern], [tar, "not a readable tar"]),
                        (["--manifest", path, "--image-root", root, "--text-col", "alt"],
                         [path, "'alt'", "--text-col"]),
                        (["--manifest", path, "--image-root", root + "/nope"], ["--image-root", "no such directory"])):
        assert caption.main(argv + ["--output-dir", str(out), "--model", "no-such-model", "--pretrained", str(weights),
                                    "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("caption: error: ") and len(err.splitlines()) == 1
        assert all(n in err for n in names), err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_that_is_not_there_is_one_line(tmp_path, capsys):
    for device, message in (("cuda", "--device cuda: no CUDA GPU is visible"),
                            ("gpu", "--device must be auto, cpu, cuda or cuda:N, got 'gpu'")):
        assert caption.main(["--manifest", "none.jsonl", "--output-dir", str(tmp_path / "o"),
                             "--device", device]) == 2
        assert capsys.readouterr().err.startswith(f"caption: error: {message}")


def test_sigkill_midway_then_rerun_is_byte_identical(manifest, coca_dir, clean, tmp_path):
    root, path = manifest
    args = ["--manifest", path, "--image-root", root] + coca_args(coca_dir)
    killed = str(tmp_path / "killed")
    env = dict(os.environ, OMP_NUM_THREADS="1", **{caption_run.KILL_HOOK: "2"})
    proc = subprocess.run([sys.executable, "caption.py", *args, "--output-dir", killed], cwd=REPO, env=env,
                          timeout=300, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert len(glob.glob(os.path.join(killed, "chunks", "chunk-*.json"))) == 2  # of 3
    assert not glob.glob(os.path.join(killed, "chunks", "*.tmp")) and not outputs(killed)
    finished = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(killed, "chunks", "chunk-*.json"))}
    assert caption.main(args + ["--output-dir", killed]) == 0
    assert {p: os.stat(p).st_mtime_ns for p in finished} == finished  # finished chunks were not redone
    assert outputs(killed) == outputs(clean) and len(outputs(clean)) == 3


def _rank_main(rank, world, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert caption.main(argv) == 0


def test_ranks_and_parts_split_the_chunks_and_give_the_same_bytes(manifest, coca_dir, clean, tmp_path,
                                                                   monkeypatch, capsys):
    root, path = manifest
    args = ["--manifest", path, "--image-root", root] + coca_args(coca_dir)  # 3 chunks of 4 rows
    ranks = str(tmp_path / "ranks")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert caption.main(args + ["--output-dir", ranks]) == 0
    assert "rank 1/2 done; other processes still have chunks" in capsys.readouterr().out
    assert chunk_numbers(ranks) == [1] and not outputs(ranks)
    monkeypatch.setenv("RANK", "0")
    assert caption.main(args + ["--output-dir", ranks]) == 0
    assert outputs(ranks) == outputs(clean) and len(outputs(ranks)) == 3
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    parts = str(tmp_path / "parts")
    assert caption.main(args + ["--output-dir", parts, "--part", "1/2"]) == 0
    assert chunk_numbers(parts) == [1] and not outputs(parts)
    assert caption.main(args + ["--output-dir", parts, "--part", "0/2"]) == 0
    assert outputs(parts) == outputs(clean)


def _rank_main(rank, world, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert caption.main(argv) == 0


@pytest.mark.slow
def test_two_spawned_ranks_give_the_same_captions_as_one(manifest, coca_dir, clean, tmp_path):
    root, path = manifest
    two = str(tmp_path / "two")
    argv = ["--manifest", path, "--image-root", root, "--output-dir", two] + coca_args(coca_dir)
    torch.multiprocessing.spawn(_rank_main, args=(2, argv), nprocs=2, join=True)
    assert outputs(two) == outputs(clean) and len(outputs(two)) == 3


def test_caption_then_data2rec_then_rec_input(manifest, coca_dir, clean, tmp_path, capsys):
    root, path = manifest
    caps = clean
    shards = str(tmp_path / "shards")
    # the two failed rows have no caption: data2rec names them unless told to fall back (counted)
    assert data2rec.main(["--manifest", os.path.join(caps, "captioned.jsonl"), "--image-root", root,
                          "--output-dir", shards, "--no-progress"]) == 1
    assert "no caption" in capsys.readouterr().err
    assert data2rec.main(["--manifest", os.path.join(caps, "captioned.jsonl"), "--image-root", root,
                          "--output-dir", shards, "--no-progress", "--caption-fallback", "raw", "--copy-jpeg"]) == 0
    assert f"written {GOOD} + rejected 2" in capsys.readouterr().out
    import open_clip
    tok = open_clip.get_tokenizer("ALIP-ViT-B-32")
    want = {c["key"]: c["caption"] for c in read_jsonl(os.path.join(caps, "captions.jsonl"))}
    recs = {r.key: r for p in glob.glob(os.path.join(shards, "*.rec")) for r in RecordReader(p)}
    assert sorted(recs) == sorted(want)
    for k, r in recs.items():
        assert r.caption_tokens.tolist() == tok([want[k]])[0].tolist()
    # captioning the packed shards (--copy-jpeg: the same JPEG bytes): keyed by record key, the same
    # images in the same batches (the shards are shuffled, so batches are formed anew: 1 per batch)
    again = str(tmp_path / "again")
    assert caption.main(["--rec", shards, "--output-dir", again] + coca_args(coca_dir, "--batch-size", "1")) == 0
    got = {c["key"]: c["caption"] for c in read_jsonl(os.path.join(again, "captions.jsonl"))}
    alone = str(tmp_path / "alone")  # the manifest again, also one image per batch
    assert caption.main(["--manifest", path, "--image-root", root, "--output-dir", alone]
                        + coca_args(coca_dir, "--batch-size", "1")) == 0
    assert got == {c["key"]: c["caption"] for c in read_jsonl(os.path.join(alone, "captions.jsonl"))}
    # and back into shards: data2rec --rec repacks them with these captions, keyed by record key
    repacked = str(tmp_path / "repacked")
    assert data2rec.main(["--rec", shards, "--captions", os.path.join(again, "captions.jsonl"),
                          "--output-dir", repacked, "--no-progress", "--caption-fallback", "raw"]) == 0
    after = {r.key: r for p in glob.glob(os.path.join(repacked, "*.rec")) for r in RecordReader(p)}
    assert sorted(after) == sorted(recs)
    for k, r in after.items():
        assert r.jpeg == recs[k].jpeg and r.raw_tokens.tolist() == recs[k].raw_tokens.tolist()
        want_caption = tok([got[k]])[0] if k in got else r.raw_tokens
        assert r.caption_tokens.tolist() == want_caption.tolist()


@pytest.mark.slow
def test_wds_caption_data2rec_train_end_to_end(coca_dir, tmp_path, capsys):
    pattern, _ = make_wds_dataset(str(tmp_path / "in"), 8, per_tar=4)
    caps = str(tmp_path / "caps")
    assert caption.main(["--wds", pattern, "--output-dir", caps] + coca_args(coca_dir)) == 0
    shards = str(tmp_path / "shards")
    assert data2rec.main(["--wds", pattern, "--captions", os.path.join(caps, "captions.jsonl"),
                          "--output-dir", shards, "--no-progress"]) == 0
    assert "written 8 + rejected 0" in capsys.readouterr().out
    logs = str(tmp_path / "logs")
    proc = subprocess.run([sys.executable, "train.py", "--model", "ALIP-tiny", "--train-data", shards,
                           "--batch-size", "4", "--epochs", "1", "--max-steps", "2", "--precision", "fp32",
                           "--device", "cpu", "--workers", "0", "--logs", logs, "--name", "n", "--report-to", "",
                           "--method", "alip"], cwd=REPO, capture_output=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    steps = [json.loads(line) for line in open(os.path.join(logs, "n", "results.jsonl")) if '"loss"' in line]
    assert steps and all(s["loss"] == s["loss"] for s in steps)


def test_clips_checkpoint_trained_here_captions_through_caption_py(manifest, tmp_path):
    """The 4th backend: a --method clips model file (its decoder travels in the model file)
    captions a manifest; every row is captioned or listed as failed (a barely trained decoder may
    emit EOT at once: an empty caption is a counted failure)."""
    from test_train_helpers import run_single, tiny_argv
    run_single(tiny_argv(tmp_path, "clips", "--method", "clips", "--clips-queries", "12",
                         samples=16, batch=8))
    ckpt = str(tmp_path / "clips/checkpoints/epoch_1.pt")
    root, path = manifest
    out = str(tmp_path / "caps")
    assert caption.main(["--manifest", path, "--image-root", root, "--output-dir", out,
                         "--backend", "clips", "--model", ckpt, "--decoding", "beam",
                         "--num-beams", "2", "--max-new-tokens", "8", "--min-new-tokens", "0",
                         "--batch-size", "3", "--chunk-size", "4", "--workers", "0",
                         "--no-progress"]) == 0
    side = json.load(open(os.path.join(out, "captions.json")))
    assert side["rows_in"] == GOOD + 2 == side["captioned"] + side["failed"]
    assert side["captioner"]["backend"] == "clips"
    gen = GenSettings(decoding="greedy", max_new_tokens=8, min_new_tokens=0)
    cap = build_captioner("clips", ckpt, "", gen)
    src = ManifestRows(path, root)
    texts = cap(cap.collate([cap.preprocess(caption_run.decode_image(src.image_bytes(i)))
                             for i in range(3)]))
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    with pytest.raises(ValueError, match="not a CLIPS checkpoint"):
        from test_train_helpers import run_single as rs
        rs(tiny_argv(tmp_path, "alip", samples=16, batch=8))
        build_captioner("clips", str(tmp_path / "alip/checkpoints/epoch_1.pt"), "", gen)


def test_clips_checkpoint_at_a_long_context_writes_captions_past_75_tokens(tmp_path):
    """A CLIPS model trained with --text-context 96 loads at its recorded context, so its decoder
    may write up to context - 2 = 94 tokens (the limit was 75 whatever the context); more than
    that is refused naming the context."""
    from test_train_helpers import run_single, tiny_argv
    run_single(tiny_argv(tmp_path, "clips", "--method", "clips", "--clips-queries", "94",
                         "--text-context", "96", samples=16, batch=8))
    ckpt = str(tmp_path / "clips/checkpoints/epoch_1.pt")
    cap = build_captioner("clips", ckpt, "", GenSettings(decoding="greedy", max_new_tokens=90,
                                                         min_new_tokens=0))
    assert cap.model.context_length == 96 and cap.token_limit() == 94
    with pytest.raises(ValueError, match="--max-new-tokens 95: .* 94 queries, a 96-token context"):
        build_captioner("clips", ckpt, "", GenSettings(decoding="greedy", max_new_tokens=95,
                                                       min_new_tokens=0))
