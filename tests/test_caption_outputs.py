"""caption.py's outputs: the captioned TSV reads back in data2rec as written (quotes are plain
characters), a failed assembly keeps the chunks, the assembly streams and gives the bytes it
gave before it streamed."""
import glob
import json
import os

import pytest

import caption
import data2rec
from alip.caption import run as caption_run
from alip.caption import writer
from alip.caption.backends import GenSettings
from alip.caption.sources import ManifestRows
from alip.data.pack import ManifestSource
from alip.data.recordio import RecordReader
from data_fixtures import image
from test_caption import coca_args, coca_dir, one_thread, outputs  # noqa: F401  (fixtures)
from test_caption import FakeCaptioner, echo_captioner  # (the golden digests below were made with echo)


def quoting_captioner():
    """Captions that hold quotes (row-dependent, never empty)."""
    return FakeCaptioner("quoting", lambda v: f'a "quoted" caption {int(v[0])}"' if int(v[0]) % 2
                         else f'"{int(v[1])} inches" tall')


QUOTED_TEXTS = ['a "quoted" word', '"starts with a quote', 'ends with a quote"', 'plain text', "it's 5'10\"",
                '""', 'x "y', 'a, b; "c"']


def quoted_tsv(root, name="rows.tsv"):
    """An img2dataset-style TSV (no quoting) whose text cells hold quotes."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    lines = ["image\ttext\n"]
    for i, text in enumerate(QUOTED_TEXTS):
        image(i).save(os.path.join(root, "images", f"{i}.jpg"), quality=95)
        lines.append(f"images/{i}.jpg\t{text}\n")
    path = os.path.join(root, name)
    with open(path, "w") as f:
        f.writelines(lines)
    return path


def test_tsv_with_quotes_round_trips_caption_py_to_data2rec(tmp_path, capsys):
    """Text cells and captions holding `"`: captioned.tsv is written (it raised _csv.Error after
    every image was captioned) and data2rec reads back every cell as it was."""
    root = str(tmp_path)
    path = quoted_tsv(root)
    out = str(tmp_path / "caps")
    s = caption_run.caption_dataset(ManifestRows(path, root), quoting_captioner(), GenSettings(), out, batch_size=3,
                                    chunk_size=4, workers=0, progress=False)
    assert (s["captioned"], s["failed"]) == (len(QUOTED_TEXTS), 0)
    want = {c["key"]: c["caption"] for c in map(json.loads, open(os.path.join(out, "captions.jsonl")))}
    assert all('"' in c for c in want.values())
    back = ManifestSource(os.path.join(out, "captioned.tsv"), root)  # data2rec's reader
    assert len(back) == len(QUOTED_TEXTS)
    assert [back.read(i)[1:] for i in range(len(back))] == [(t, want[i]) for i, t in enumerate(QUOTED_TEXTS)]
    shards = str(tmp_path / "shards")
    assert data2rec.main(["--manifest", os.path.join(out, "captioned.tsv"), "--image-root", root,
                          "--output-dir", shards, "--no-progress"]) == 0
    assert f"written {len(QUOTED_TEXTS)} + rejected 0" in capsys.readouterr().out
    import open_clip
    tok = open_clip.get_tokenizer("ALIP-ViT-B-32")
    recs = {r.key: r for p in glob.glob(os.path.join(shards, "*.rec")) for r in RecordReader(p)}
    for k, text in enumerate(QUOTED_TEXTS):
        assert recs[k].raw_tokens.tolist() == tok([text])[0].tolist()
        assert recs[k].caption_tokens.tolist() == tok([want[k]])[0].tolist()


def test_tsv_with_quotes_through_the_cli(coca_dir, tmp_path, capsys):  # noqa: F811
    """The reviewer's case: caption.py on such a TSV with CoCa ends with the closing line, rc 0."""
    root = str(tmp_path)
    path = quoted_tsv(root)
    out = str(tmp_path / "caps")
    assert caption.main(["--manifest", path, "--image-root", root, "--output-dir", out] + coca_args(coca_dir)) == 0
    assert f"rows in {len(QUOTED_TEXTS)} = captioned" in capsys.readouterr().out
    back = ManifestSource(os.path.join(out, "captioned.tsv"), root, caption_fallback="raw")
    assert [back.read(i)[1] for i in range(len(back))] == QUOTED_TEXTS


def test_a_failed_assembly_keeps_the_chunks_and_a_rerun_assembles(coca_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                   capsys):
    root = str(tmp_path)
    path = quoted_tsv(root)
    args = ["--manifest", path, "--image-root", root] + coca_args(coca_dir)
    ref = str(tmp_path / "ref")
    assert caption.main(args + ["--output-dir", ref]) == 0
    out = str(tmp_path / "caps")

    def boom(*a, **k):
        raise RuntimeError("disk\non fire")
    monkeypatch.setattr(writer, "_tsv_writer", boom)
    capsys.readouterr()
    assert caption.main(args + ["--output-dir", out]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "assembling the outputs failed (RuntimeError: disk on fire)" in err
    assert "chunk file(s)" in err and "are kept" in err and "rerun the same command" in err
    chunks = sorted(glob.glob(os.path.join(out, "chunks", "chunk-*.json")))
    assert len(chunks) == 2 and not glob.glob(os.path.join(out, "**", "*.tmp"), recursive=True)
    monkeypatch.undo()
    mtimes = {p: os.stat(p).st_mtime_ns for p in chunks}
    assert caption.main(args + ["--output-dir", out]) == 0
    assert {p: os.stat(p).st_mtime_ns for p in chunks} == mtimes  # assembled from the kept chunks
    assert outputs(out, ("captions.jsonl", "failed.jsonl", "captioned.tsv")) == \
        outputs(ref, ("captions.jsonl", "failed.jsonl", "captioned.tsv"))


# ------------------------------------------------------------------------------------------------
# the assembly: streamed, the same bytes as before, one process


def _golden_manifest(root, fmt):
    from data_fixtures import make_manifest_dataset
    path = make_manifest_dataset(root, 11, fmt=fmt)
    with open(path, "a") as f:  # a missing image and an unparseable row (copied as it was)
        if fmt == "jsonl":
            f.write('{"image": "images/missing.jpg", "text": "gone"}\n{"image": "images/0001.jpg", "text": broken\n')
        elif fmt == "csv":
            f.write('images/missing.jpg,"a ""quoted"", text",\nimages/0002.jpg,two fields\n')
        else:
            f.write("images/missing.jpg\tgone\t\nimages/0002.jpg\ttwo fields\n")
    return path


# sha256[:16] of each output (tmp dir replaced by <ROOT>) as the in-memory assembly wrote them
# before it streamed (commit 9c9d39b, the same case)
GOLDEN = {"jsonl/captions.jsonl": "d246a79cef812154", "jsonl/failed.jsonl": "8a600c6a2eef0bfb",
          "jsonl/captioned.jsonl": "6d794cfd61eb44fc", "csv/captions.jsonl": "d246a79cef812154",
          "csv/failed.jsonl": "d1ee2cd235c34f87", "csv/captioned.csv": "2d080406ff0fe50b",
          "tsv/captions.jsonl": "d246a79cef812154", "tsv/failed.jsonl": "6f30d038a2212beb",
          "tsv/captioned.tsv": "be2c323a2b9a3f64", "wds/captions.jsonl": "9e68ccdf46418969",
          "wds/failed.jsonl": "c704b359589fc341"}


def test_streamed_assembly_gives_the_bytes_of_the_in_memory_one(tmp_path):
    import hashlib
    from alip.caption.sources import TarRows
    from data_fixtures import make_wds_dataset
    root = str(tmp_path)
    got = {}

    def digest(d, names, label):
        for name in names:
            data = open(os.path.join(d, "out", name), "rb").read().replace(root.encode(), b"<ROOT>")
            got[f"{label}/{name}"] = hashlib.sha256(data).hexdigest()[:16]

    for fmt in ("jsonl", "csv", "tsv"):
        d = os.path.join(root, fmt)
        caption_run.caption_dataset(ManifestRows(_golden_manifest(d, fmt), d), echo_captioner(), GenSettings(),
                                    os.path.join(d, "out"), batch_size=3, chunk_size=4, workers=0, progress=False)
        digest(d, ("captions.jsonl", "failed.jsonl", f"captioned.{fmt}"), fmt)
    pattern, _ = make_wds_dataset(os.path.join(root, "w"), 9, per_tar=4)
    caption_run.caption_dataset(TarRows(pattern), echo_captioner(), GenSettings(), os.path.join(root, "w", "out"),
                                batch_size=3, chunk_size=4, workers=0, progress=False)
    digest(os.path.join(root, "w"), ("captions.jsonl", "failed.jsonl"), "wds")
    assert got == GOLDEN


def _fake_chunks(root, n, chunk_size):
    """A JSONL manifest of n rows and its chunk files, written directly (no images, no model)."""
    path = os.path.join(root, "rows.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"image": f"images/{i:08d}.jpg", "text": f"web text {i} " * 4}) + "\n"
                     for i in range(n))
    source = ManifestRows(path, root)
    plan = caption_run.make_plan(source, {"backend": "fake"}, GenSettings(), 8, chunk_size)
    out = os.path.join(root, "out")
    writer.check_plan(out, plan)
    fp = writer.fingerprint(plan)
    for c in range(-(-n // chunk_size)):
        rows = range(c * chunk_size, min(n, (c + 1) * chunk_size))
        writer.write_chunk(out, c, fp, rows[0], rows[-1] + 1,
                           [(i, i, f"a synthetic caption of picture {i} " * 3) for i in rows if i % 10],
                           [(i, i, "undecodable image: x", {"source": path, "row": i}) for i in rows if not i % 10])
    return source, plan, out


def test_the_assembly_streams_memory_does_not_grow_with_the_rows(tmp_path):
    """Peak Python memory of the assembly for 2,000 and for 20,000 rows (chunks of 500): about
    the same (the in-memory assembly held every caption and the whole manifest: ~10x)."""
    import tracemalloc
    peaks = []
    for n in (2000, 20000):
        root = str(tmp_path / str(n))
        os.makedirs(root)
        source, plan, out = _fake_chunks(root, n, 500)
        tracemalloc.start()
        s = writer.assemble(out, -(-n // 500), n, source, plan, "cmd")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert (s["captioned"], s["failed"]) == (n - n // 10, n // 10)
        copy = open(os.path.join(out, "captioned.jsonl")).read().splitlines()
        assert len(copy) == n and json.loads(copy[-1])["caption"].startswith(f"a synthetic caption of picture {n - 1}")
    assert peaks[1] < 1.5 * peaks[0] + 200_000, peaks


def test_chunks_are_read_one_at_a_time(tmp_path):
    """iter_chunks is a generator: the first chunk comes before the second file is opened."""
    source, plan, out = _fake_chunks(str(tmp_path), 30, 10)
    fp = writer.fingerprint(plan)
    it = writer.iter_chunks(out, 3, fp)
    start, end, caps, fails = next(it)
    assert (start, end, len(caps), len(fails)) == (0, 10, 9, 1)
    os.remove(writer.chunk_path(out, 2, fp))
    assert next(it)[:2] == (10, 20)
    with pytest.raises(FileNotFoundError):
        next(it)


def test_one_process_assembles(coca_dir, tmp_path, capsys):  # noqa: F811
    """While one process holds OUT/.assemble.lock (it is assembling), another that finds every chunk
    written leaves the outputs to it; outputs assembled for this plan are not written again."""
    import fcntl
    root = str(tmp_path)
    path = quoted_tsv(root)
    out = str(tmp_path / "caps")
    args = ["--manifest", path, "--image-root", root, "--output-dir", out] + coca_args(coca_dir)
    assert caption.main(args + ["--part", "1/2"]) == 0
    capsys.readouterr()
    with open(os.path.join(out, ".assemble.lock"), "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert caption.main(args + ["--part", "0/2"]) == 0
        assert "every chunk is written and another process is assembling the outputs" in capsys.readouterr().out
        assert not outputs(out, ("captions.jsonl", "failed.jsonl", "captioned.tsv", "captions.json"))
    assert caption.main(args + ["--part", "0/2"]) == 0  # the lock is free: this one assembles
    assert f"rows in {len(QUOTED_TEXTS)} = captioned" in capsys.readouterr().out
    names = ("captions.jsonl", "failed.jsonl", "captioned.tsv", "captions.json")
    mtimes = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in names}
    assert caption.main(args) == 0  # a rerun: assembled already, nothing written
    assert f"rows in {len(QUOTED_TEXTS)} = captioned" in capsys.readouterr().out
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in names} == mtimes
