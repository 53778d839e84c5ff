"""The pure-Python MXNet RecordIO module: exact bytes, multi-part records, bad files."""
import struct

import numpy as np
import pytest

from alip.data.recordio import (IR_SIZE, MAGIC, MAGIC_BYTES, RecordIOError, RecordReader, RecordWriter,
                                frame, pack, read_framed, read_index, unpack)


def test_frame_bytes_by_hand():
    # 5-byte payload: magic, lrec = length (cflag 0), data, 3 zero bytes to a 4-byte boundary
    assert frame(b"hello") == struct.pack("<II", 0xCED7230A, 5) + b"hello" + b"\0\0\0"
    # 8 bytes: no padding
    assert frame(b"12345678") == struct.pack("<II", MAGIC, 8) + b"12345678"


def test_frame_splits_at_aligned_magic_like_dmlc():
    payload = b"ab\0\0" + MAGIC_BYTES + b"xyz"
    want = (struct.pack("<II", MAGIC, (1 << 29) | 4) + b"ab\0\0"  # first part, cflag 1
            + struct.pack("<II", MAGIC, (3 << 29) | 3) + b"xyz" + b"\0")  # last part, cflag 3
    assert frame(payload) == want
    # three parts: first, middle (cflag 2, empty), last
    payload3 = MAGIC_BYTES + MAGIC_BYTES + b"q"
    assert frame(payload3) == (struct.pack("<II", MAGIC, (1 << 29) | 0) + struct.pack("<II", MAGIC, (2 << 29) | 0)
                               + struct.pack("<II", MAGIC, (3 << 29) | 1) + b"q\0\0\0")
    # an unaligned magic is left alone
    unaligned = b"a" + MAGIC_BYTES + b"bcd"
    assert frame(unaligned) == struct.pack("<II", MAGIC, 8) + unaligned


def test_pack_layout_is_mxnet_pack():
    raw, cap = np.arange(77), np.arange(77) + 49330
    payload = pack(7, raw, cap, b"JPEGDATA")
    # mx.recordio.pack(IRHeader(0, label_array, 7, 0), s): flag = label size, label field 0.0
    want = struct.pack("IfQQ", 154, 0.0, 7, 0) + np.concatenate([raw, cap]).astype(np.float32).tobytes() + b"JPEGDATA"
    assert IR_SIZE == 24 and payload == want
    rec = unpack(payload)
    assert rec.key == 7 and rec.jpeg == b"JPEGDATA"
    assert rec.raw_tokens.dtype == np.int64 and (rec.raw_tokens == raw).all() and (rec.caption_tokens == cap).all()
    with pytest.raises(ValueError, match="2x77"):
        pack(1, raw, cap[:10], b"")


def _write(tmp_path, payloads):
    rec, idx = tmp_path / "s.rec", tmp_path / "s.idx"
    with RecordWriter(rec, idx) as w:
        for key, (raw, cap, jpeg) in payloads.items():
            w.write(key, raw, cap, jpeg)
    return rec, idx


def test_writer_reader_round_trip_with_multipart(tmp_path):
    rng = np.random.default_rng(0)
    payloads = {}
    for key in (5, 3, 9, 1):
        jpeg = rng.integers(0, 256, 37 + key, dtype=np.uint8).tobytes()
        if key == 9:  # put the magic word at an aligned payload position (payload = 640 + jpeg)
            jpeg = b"\xff\xd8" + b"\0\0" + MAGIC_BYTES + jpeg + MAGIC_BYTES + b"end"
        payloads[key] = (rng.integers(0, 49408, 77), rng.integers(0, 49408, 77), jpeg)
    rec, idx = _write(tmp_path, payloads)
    keys, offsets = read_index(idx)
    assert list(keys) == [5, 3, 9, 1] and offsets[0] == 0 and (np.diff(offsets) % 4 == 0).all()
    assert idx.read_text().splitlines()[1] == f"3\t{offsets[1]}"
    data = rec.read_bytes()
    assert data.count(struct.pack("<I", (1 << 29) | 644)) == 1  # record 9 was split after 644 bytes
    r = RecordReader(rec)
    assert len(r) == 4
    for i, rd in enumerate(r):
        raw, cap, jpeg = payloads[rd.key]
        assert rd.key == list(payloads)[i] and rd.jpeg == jpeg
        assert (rd.raw_tokens == raw).all() and (rd.caption_tokens == cap).all()


def test_truncated_rec_is_an_error_naming_file_and_key(tmp_path):
    payloads = {k: (np.arange(77), np.arange(77), b"x" * 100) for k in range(3)}
    rec, idx = _write(tmp_path, payloads)
    data = rec.read_bytes()
    rec.write_bytes(data[:-20])  # cut into the last record
    with pytest.raises(RecordIOError, match=r"s\.rec: record key 2: truncated \.rec"):
        RecordReader(rec)
    r = RecordReader(rec, check=False)
    assert r[1].key == 1  # the whole records before it stay readable
    with open(rec, "rb") as f, pytest.raises(RecordIOError, match="truncated"):
        read_framed(f, int(r.offsets[2]), "x")


def test_idx_entry_past_end_is_an_error_naming_idx_line_and_key(tmp_path):
    payloads = {k: (np.arange(77), np.arange(77), b"x" * 100) for k in range(3)}
    rec, idx = _write(tmp_path, payloads)
    with open(idx, "a") as f:
        f.write(f"77\t{rec.stat().st_size + 4}\n")
    with pytest.raises(RecordIOError, match=r"s\.idx:4: record key 77 at offset \d+ is past the end"):
        RecordReader(rec)


def test_bad_magic_and_bad_flag(tmp_path):
    rec, idx = _write(tmp_path, {0: (np.arange(77), np.arange(77), b"abc")})
    data = bytearray(rec.read_bytes())
    data[0] ^= 0xFF
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match="bad magic"):
        RecordReader(rec)
    with pytest.raises(RecordIOError, match="flag is 1, expected 77\\*N"):
        unpack(struct.pack("IfQQ", 1, 3.0, 0, 0) + b"\0" * 700)


# ---- the shard index: fast parse, cached and memory-mapped ----------------------------------

@pytest.mark.parametrize("text", [
    "1\t0\n2\t100\n", "1\t0\n\n2\t100\n", " 5\t6 \n", "+5\t0\n", "1\t0\r\n2\t100\r\n", "-1\t0\n",
    "1 0\n", "", "\n\n", "1_000\t0\n", "3.0\t0\n", "1e3\t0\n", "0x10\t0\n", "nan\t0\n", "1\t0\t7\n",
    "1\n", "1\t0\n1\t100\n", "1\t0\n2\t0\n", "1\t0\n2\t200\n"])
def test_fast_index_parse_agrees_with_the_line_reader(tmp_path, text):
    from alip.data.recordio import _read_index_fast, _read_index_lines
    p = tmp_path / "a.idx"
    p.write_text(text, newline="")
    try:
        want = [a.tolist() for a in _read_index_lines(str(p), 150)]
    except RecordIOError as e:
        want = e
    fast = _read_index_fast(str(p), 150)
    if fast is not None:  # the fast path only answers files without a problem, and answers alike
        assert [a.tolist() for a in fast] == want
    got = read_index(str(p), 150) if not isinstance(want, Exception) else None
    if isinstance(want, Exception):
        with pytest.raises(RecordIOError) as e:
            read_index(str(p), 150)
        assert str(e.value) == str(want)  # the line reader's message, naming the line
    else:
        assert [a.tolist() for a in got] == want


def many_records(tmp_path, n=3000):
    stem = str(tmp_path / "s")
    with RecordWriter(stem + ".rec", stem + ".idx") as w:
        for k in range(n):
            w.write(10 * k, np.zeros(77), np.zeros(77), b"J")
    return stem


def test_index_is_cached_memory_mapped_and_parsed_once(tmp_path, monkeypatch):
    import pickle

    from alip.data import recordio
    monkeypatch.setenv("ALIP_CACHE_DIR", str(tmp_path / "cache"))
    stem = many_records(tmp_path)
    first = RecordReader(stem + ".rec")
    keys, offsets = read_index(stem + ".idx")
    assert isinstance(first.offsets, np.memmap) and isinstance(first.keys, np.memmap)
    assert (first.keys == keys).all() and (first.offsets == offsets).all()
    assert len(list((tmp_path / "cache" / "index").iterdir())) == 1

    def no_parse(*a, **k):
        raise AssertionError("parsed the .idx again")
    monkeypatch.setattr(recordio, "read_index", no_parse)
    again = RecordReader(stem + ".rec")  # from the cache
    assert again[2999].key == 29990
    # a pickled reader (a spawned DataLoader worker's copy) maps the cache again, not a copy
    blob = pickle.dumps(again)
    assert len(blob) < 2000 < 16 * 3000, len(blob)
    assert pickle.loads(blob)[1234].key == 12340


def test_a_rewritten_idx_is_read_again(tmp_path, monkeypatch):
    import os
    monkeypatch.setenv("ALIP_CACHE_DIR", str(tmp_path / "cache"))
    stem = many_records(tmp_path, 10)
    assert len(RecordReader(stem + ".rec")) == 10
    lines = open(stem + ".idx").read().splitlines(keepends=True)
    with open(stem + ".idx", "w") as f:
        f.writelines(lines + lines[3:4])  # a duplicated line
    st = os.stat(stem + ".idx")
    os.utime(stem + ".idx", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    with pytest.raises(RecordIOError, match=r"s\.idx:11: key 30 is already on line 4"):
        RecordReader(stem + ".rec")


def test_an_unusable_cache_dir_costs_only_a_parse(tmp_path, monkeypatch):
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("ALIP_CACHE_DIR", str(tmp_path / "not-a-dir"))
    stem = many_records(tmp_path, 10)
    r = RecordReader(stem + ".rec")
    assert not isinstance(r.offsets, np.memmap) and r[9].key == 90


FD_SCRIPT = """
import glob, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (300, int(sys.argv[2])))
from alip.data.torch_reader import RecDataset
ds = RecDataset(sorted(glob.glob(sys.argv[1] + "/*.rec")), 8)
for i in range(len(ds)):  # every .rec opened, every index mapped: 2 descriptors a shard
    ds.record(i)
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize("hard", [4096, 500])
def test_many_shards_raise_the_open_file_limit_or_say_why(tmp_path, hard):
    import subprocess
    import sys
    for s in range(200):  # 2 descriptors each: 400, over a soft limit of 300
        stem = str(tmp_path / f"train-{s:05d}")
        with RecordWriter(stem + ".rec", stem + ".idx") as w:
            w.write(s, np.zeros(77), np.zeros(77), b"J")
    out = subprocess.run([sys.executable, "-c", FD_SCRIPT, str(tmp_path), str(hard)],
                         capture_output=True, text=True)
    if hard == 4096:  # raised to 2 x 200 + 256
        assert out.returncode == 0 and out.stdout.split() == ["656"], out.stderr[-2000:]
    else:
        assert out.returncode == 1
        assert ("train-00000.rec and 199 more shards: 200 shards need up to 656 open files in each "
                "reading process, but the hard limit (ulimit -Hn) is 500") in out.stderr
