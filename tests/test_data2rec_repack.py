"""data2rec.py --rec: existing shards repacked with the captions of a captions file keyed by record
key (caption.py --rec's output). Every record keeps its key, JPEG bytes and raw tokens; the caption
is the file's, tokenized; nothing is dropped silently."""
import glob
import json
import os

import numpy as np
import pytest

import data2rec
from alip.data.recordio import pack_fields
from data_fixtures import cache_dir, make_rec_shards, text_of, tokenize  # noqa: F401
from test_data2rec import records, shard_bytes

N = 23


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    return make_rec_shards(tmp_path_factory, N)


def new_caption(k):
    return f"a better caption of picture {k} with {k % 4} red shapes"


def write_captions(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def repack(old, tmp_path, captions, *extra, out="new"):
    out = str(tmp_path / out)
    code = data2rec.main(["--rec", old, "--captions", captions, "--output-dir", out,
                          "--shard-size", "10", "--no-progress", *extra])
    return code, out


def test_repack_keeps_keys_images_and_raw_tokens_and_takes_the_new_captions(old, tmp_path, capsys):
    captions = write_captions(tmp_path / "c.jsonl", [{"key": k, "caption": new_caption(k)} for k in range(N)])
    code, out = repack(old, tmp_path, captions)
    assert code == 0, capsys.readouterr().err
    assert f"rows in {N} = written {N} + rejected 0" in capsys.readouterr().out
    before, after = records(old), records(out)
    assert sorted(after) == sorted(before) == list(range(N))
    want = tokenize([new_caption(k) for k in range(N)])
    for k, r in after.items():
        assert r.jpeg == before[k].jpeg  # byte for byte
        assert (r.raw_tokens == before[k].raw_tokens).all()
        assert (r.raw_tokens == tokenize([text_of(k)])[0]).all()
        assert (r.caption_tokens == want[k]).all()
        assert not (r.caption_tokens == before[k].caption_tokens).all()
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["text_fields"] == ["raw", "caption"] and m["inputs"]["rec"] == old
    assert m["flags"]["copy_jpeg"] is True
    # the worker processes read the same records: same bytes
    code, out2 = repack(old, tmp_path, captions, "--workers", "2", out="new2")
    assert code == 0 and shard_bytes(out2) == shard_bytes(out)


def test_missing_captions_stop_unless_the_raw_text_stands_in(old, tmp_path, capsys):
    captions = write_captions(tmp_path / "c.jsonl", [{"key": k, "caption": new_caption(k)} for k in range(0, N, 2)])
    code, out = repack(old, tmp_path, captions)
    err = capsys.readouterr().err
    assert code == 1 and f"c.jsonl: no caption for {N // 2} of {N} records (first keys: [" in err
    first = [int(k) for k in err.split("first keys: [")[1].split("]")[0].split(", ")]
    assert len(first) == 5 and all(k % 2 for k in first)
    assert not os.path.exists(os.path.join(out, "train-00000.rec"))
    code, out = repack(old, tmp_path, captions, "--caption-fallback", "raw", out="fallback")
    assert code == 0
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["caption_fallbacks"] == N // 2
    for k, r in records(out).items():
        want = tokenize([new_caption(k)])[0] if k % 2 == 0 else r.raw_tokens
        assert (r.caption_tokens == want).all()


def test_extra_fields_come_from_the_captions_file_or_the_input(old, tmp_path, capsys):
    rows = [{"key": k, "caption": new_caption(k), "generated": f"generated {k}"} for k in range(N)]
    captions = write_captions(tmp_path / "c.jsonl", rows)
    code, three = repack(old, tmp_path, captions, "--text-fields", "raw,caption,generated", out="three")
    assert code == 0, capsys.readouterr().err
    for k, r in records(three).items():
        assert (r.tokens[2] == tokenize([f"generated {k}"])[0]).all()
    # repacking the 3-field shards with only new captions keeps their generated field
    captions = write_captions(tmp_path / "c2.jsonl", [{"key": k, "caption": f"third {k}"} for k in range(N)])
    code, again = repack(three, tmp_path, captions, "--text-fields", "raw,caption,generated", out="again")
    assert code == 0, capsys.readouterr().err
    for k, r in records(again).items():
        assert (r.tokens[2] == tokenize([f"generated {k}"])[0]).all()
        assert (r.caption_tokens == tokenize([f"third {k}"])[0]).all()
    # a field neither has
    code, _ = repack(old, tmp_path, captions, "--text-fields", "raw,caption,summary", out="none")
    assert code == 1
    assert ("--text-fields names 'summary': neither " + captions + " has a column 'summary' nor the "
            "shards a field of that name (they have ['raw', 'caption'])") in capsys.readouterr().err


def test_a_repack_keeps_every_field_of_the_input_unless_told_otherwise(old, tmp_path, capsys):
    """3-field shards (raw, caption, generated) repacked with new captions and no --text-fields
    keep their generated field (it used to be dropped from every record, exit 0); leaving it out
    takes --text-fields raw,caption, and is said on stderr."""
    rows = [{"key": k, "caption": new_caption(k), "generated": f"generated {k}"} for k in range(N)]
    three_caps = write_captions(tmp_path / "c3.jsonl", rows)
    code, three = repack(old, tmp_path, three_caps, "--text-fields", "raw,caption,generated", out="three")
    assert code == 0, capsys.readouterr().err
    captions = write_captions(tmp_path / "c.jsonl", [{"key": k, "caption": f"fourth {k}"} for k in range(N)])
    code, kept = repack(three, tmp_path, captions, out="kept")
    assert code == 0, capsys.readouterr().err
    m = json.load(open(os.path.join(kept, "manifest.json")))
    assert m["text_fields"] == ["raw", "caption", "generated"]
    before = records(three)
    for k, r in records(kept).items():
        assert r.tokens.shape == (3, 77)
        assert (r.tokens[0] == before[k].tokens[0]).all() and (r.tokens[2] == before[k].tokens[2]).all()
        assert (r.caption_tokens == tokenize([f"fourth {k}"])[0]).all()
    code, two = repack(three, tmp_path, captions, "--text-fields", "raw,caption", out="two")
    assert code == 0
    assert ("data2rec: note: --text-fields raw,caption leaves out the input shards' field(s) ['generated']"
            in capsys.readouterr().err)
    assert all(r.tokens.shape == (2, 77) for r in records(two).values())


def test_another_tokenizer_than_the_shards_is_refused(old, tmp_path, capsys):
    captions = write_captions(tmp_path / "c.jsonl", [{"key": k, "caption": "x"} for k in range(N)])
    code, out = repack(old, tmp_path, captions, "--tokenizer", "ViT-B-32")
    assert code == 1
    assert ("--tokenizer ViT-B-32: the shards' raw tokens come from ALIP-ViT-B-32 (their manifest.json)"
            in capsys.readouterr().err)


def test_a_damaged_record_is_rejected_by_key_not_dropped(old, tmp_path, capsys):
    import shutil
    from alip.data.recordio import RecordReader
    bad = tmp_path / "bad"
    shutil.copytree(old, bad)
    rec = str(bad / "train-00001.rec")
    reader = RecordReader(rec)
    key, offset = int(reader.keys[3]), int(reader.offsets[3])
    jpeg_at = offset + 8 + len(pack_fields(0, np.zeros((2, 77)), b""))  # framing, header + label
    with open(rec, "r+b") as f:
        f.seek(jpeg_at)
        assert f.read(2) == b"\xff\xd8"
        f.seek(jpeg_at)
        f.write(b"\0\0")  # no JPEG start-of-image marker any more
    captions = write_captions(tmp_path / "c.jsonl", [{"key": k, "caption": new_caption(k)} for k in range(N)])
    code, out = repack(str(bad), tmp_path, captions)
    assert code == 0
    assert f"rows in {N} = written {N - 1} + rejected 1" in capsys.readouterr().out
    rejects = [json.loads(line) for line in open(os.path.join(out, "rejects.jsonl"))]
    assert rejects == [{"key": key, "reason": "undecodable image: not an image format Pillow knows",
                        "source": rec, "record": key}]
    assert key not in records(out)


def test_rec_needs_captions_and_is_one_input(old, tmp_path, capsys):
    captions = write_captions(tmp_path / "c.jsonl", [{"key": k, "caption": "x"} for k in range(N)])
    before = shard_bytes(old)
    assert data2rec.main(["--rec", old, "--captions", captions, "--output-dir", old + "/."]) == 1
    assert f"--output-dir {old}/. holds the --rec input shards" in capsys.readouterr().err
    assert shard_bytes(old) == before
    assert data2rec.main(["--rec", old, "--output-dir", str(tmp_path / "o")]) == 2
    assert "--rec needs --captions" in capsys.readouterr().err
    assert data2rec.main(["--rec", old, "--wds", "x", "--captions", "c", "--output-dir", "o"]) == 2
    assert "give exactly one of --manifest, --wds or --rec" in capsys.readouterr().err


def test_a_record_key_in_two_shards_stops_before_any_work(old, tmp_path, capsys):
    import shutil
    from alip.caption.sources import RecRows, TarRows
    from alip.data.pack import DataError
    from data_fixtures import make_wds_dataset
    both = tmp_path / "both"
    both.mkdir()
    for name in ("train-00000", "train-00001"):
        for ext in (".rec", ".idx"):
            shutil.copy(os.path.join(old, "train-00000" + ext), both / (name + ext))
    first = int(min(RecRows(os.path.join(old, "train-00000.rec")).readers[0].keys))
    message = (f"record key {first} is in both {both}/train-00000.rec and {both}/train-00001.rec: "
               "captions are keyed by record key, keys must be unique")
    captions = write_captions(tmp_path / "c.jsonl", [{"key": k, "caption": "x"} for k in range(N)])
    code, out = repack(str(both), tmp_path, captions)
    assert code == 1 and message in capsys.readouterr().err
    with pytest.raises(DataError, match=f"^{message}$"):
        RecRows(str(both))  # caption.py --rec
    # caption.py --wds: the same sample name in two tars
    root = tmp_path / "wds"
    pattern, _ = make_wds_dataset(str(root), 4, per_tar=2)
    tars = sorted(glob.glob(pattern))
    shutil.copy(tars[0], tars[1])
    with pytest.raises(DataError, match=r"^sample key '\S+' is in both .*tar and .*tar: captions are "
                                        r"keyed by sample name, keys must be unique$"):
        TarRows(pattern)


def test_a_key_twice_in_a_captions_file_is_refused_naming_the_rows(old, tmp_path, capsys):
    """Two caption.py outputs concatenated, a re-captioned subset appended, a key written as 5
    and "5", a JSON row naming "caption" twice, a CSV header naming it twice: each used to be
    taken silently, the last value winning. Now one line naming the file, count and rows, before
    any work, for --rec and --wds alike (pack.load_columns, the one reader of captions files)."""
    from data_fixtures import make_wds_dataset
    first = [{"key": k, "caption": new_caption(k)} for k in range(N)]
    cases = {
        "twice.jsonl": (first + first, f"{N} row(s) repeat a key of an earlier row (first: '0' at rows 0 and {N}, "
                                       f"'1' at rows 1 and {N + 1}, '2' at rows 2 and {N + 2}); a captions file "
                                       "gives each key once"),
        "subset.jsonl": (first + [{"key": 4, "caption": "again"}, {"key": 7, "caption": "again"}],
                         f"2 row(s) repeat a key of an earlier row (first: '4' at rows 4 and {N}, '7' at rows 7 "
                         f"and {N + 1})"),
        "types.jsonl": (first + [{"key": "5", "caption": "a string key"}],
                        f"1 row(s) repeat a key of an earlier row (first: '5' at rows 5 and {N})"),
    }
    for name, (rows, message) in cases.items():
        captions = write_captions(tmp_path / name, rows)
        code, out = repack(old, tmp_path, captions, out=name + ".out")
        err = capsys.readouterr().err
        assert code == 1 and f"data2rec: error: {captions}: {message}" in err and len(err.splitlines()) == 1, err
        assert not os.path.exists(os.path.join(out, "train-00000.rec"))
    members = tmp_path / "members.jsonl"
    members.write_text("".join(json.dumps(r) + "\n" for r in first[:3])
                       + '{"key": 3, "caption": "one", "caption": "two"}\n')
    code, _ = repack(old, tmp_path, str(members), out="members")
    assert code == 1 and (f"{members} row 3: member 'caption' twice in one JSON object (json would keep the "
                          "last value silently)") in capsys.readouterr().err
    header = tmp_path / "header.csv"
    header.write_text("key,caption,caption\n" + "".join(f"{k},a,b\n" for k in range(N)))
    code, _ = repack(old, tmp_path, str(header), out="header")
    assert code == 1 and f"{header}: the header names column 'caption' twice" in capsys.readouterr().err
    pattern, caps = make_wds_dataset(str(tmp_path / "wds"), 4, per_tar=2)
    with open(caps, "a") as f:
        f.write(json.dumps({"key": "000000002", "caption": "appended"}) + "\n")
    code = data2rec.main(["--wds", pattern, "--captions", caps, "--output-dir", str(tmp_path / "w"), "--no-progress"])
    assert code == 1 and "1 row(s) repeat a key of an earlier row (first: '000000002' at rows 2 and 4)" in \
        capsys.readouterr().err


def test_captions_of_another_shard_set_are_refused(old, tmp_path, tmp_path_factory, capsys):
    """Every data2rec output numbers its records from 0, so another set's captions file mostly
    matches: its keys this set lacks (136 here) used to be ignored silently. Now refused with the
    count and first keys (also with --caption-fallback raw), and the captions.json that caption.py
    writes beside its captions is checked against the shards when it names them."""
    from alip.data.rec_source import RecShards
    rows = [{"key": k, "caption": new_caption(k)} for k in range(N + 136)]
    captions = write_captions(tmp_path / "c.jsonl", rows)
    for extra in ((), ("--caption-fallback", "raw")):
        code, out = repack(old, tmp_path, captions, *extra)
        err = capsys.readouterr().err
        assert code == 1 and len(err.splitlines()) == 1
        assert (f"{captions}: 136 of its {N + 136} keys are not in the {N} records of --rec {old} (first keys: "
                f"['{N}', '{N + 1}', '{N + 2}', '{N + 3}', '{N + 4}']): captions made for another input?") in err
        assert not os.path.exists(os.path.join(out, "train-00000.rec"))
    # the sidecar names the shards it captioned: these pass, other ones are refused
    caps = tmp_path / "caps"
    caps.mkdir()
    captions = write_captions(caps / "captions.jsonl", rows[:N])
    other = make_rec_shards(tmp_path_factory, N + 1)

    def sidecar(inputs, rows_in):
        with open(caps / "captions.json", "w") as f:
            json.dump({"tool": "alip caption", "inputs": inputs, "rows_in": rows_in,
                       "outputs": {"captions": "captions.jsonl", "failed": "failed.jsonl"}}, f)
    sidecar(RecShards(old).describe(), N)
    assert repack(old, tmp_path, captions, out="same")[0] == 0, capsys.readouterr().err
    sidecar(RecShards(other).describe(), N + 1)
    code, out = repack(old, tmp_path, captions, out="other")
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1
    assert (f"{captions}: made for another input: {caps / 'captions.json'} says rec train-00000.rec .. "
            f"train-00002.rec (3 files), {N + 1} rows") in err and "this input is train-00000.rec .. " in err
    # a sidecar of the manifest the shards were packed from (keys = its row numbers): checked against
    # the shards' manifest.json
    made_from = json.load(open(os.path.join(old, "manifest.json")))["inputs"]
    sidecar(made_from, N)
    assert repack(old, tmp_path, captions, out="manifest")[0] == 0, capsys.readouterr().err
    sidecar(dict(made_from, bytes=made_from["bytes"] + 1), N)
    assert repack(old, tmp_path, captions, out="edited")[0] == 1
    assert f"{captions}: made for another input: {caps / 'captions.json'} says manifest manifest.jsonl" in \
        capsys.readouterr().err
