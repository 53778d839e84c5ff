"""caption.py's outputs: the captioned TSV reads back in data2rec as written (quotes are plain
characters), a failed assembly keeps the chunks, the assembly streams and gives the bytes it
gave before it streamed."""
import glob
import json
import os

import pytest
import torch

import caption
import data2rec
from alip.caption import run as caption_run
from alip.caption import writer
from alip.caption.backends import GenSettings
from alip.caption.sources import DataError, ManifestRows
from alip.data.pack import ManifestSource
from alip.data.recordio import RecordReader
from data_fixtures import image
from test_caption import coca_args, coca_dir, one_thread, outputs  # noqa: F401  (fixtures)


class _Quoting:
    """A fake captioner whose captions hold quotes (row-dependent, never empty)."""
    name = "quoting"

    def __init__(self):
        self.preprocess = lambda img: torch.tensor(img.getpixel((0, 0)), dtype=torch.float64)

    def describe(self):
        return {"backend": "quoting"}

    def collate(self, items):
        return torch.stack(items)

    def __call__(self, x):
        return [f'a "quoted" caption {int(v[0])}"' if int(v[0]) % 2 else f'"{int(v[1])} inches" tall' for v in x]


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
    s = caption_run.caption_dataset(ManifestRows(path, root), _Quoting(), GenSettings(), out, batch_size=3,
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
    monkeypatch.setattr(writer, "write_captioned_manifest", boom)
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
