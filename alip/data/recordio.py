"""MXNet RecordIO, written and read in pure Python (no mxnet), in ALIP's record layout.

Framing (dmlc-core ``RecordIOWriter``, what ``mx.recordio.MXIndexedRecordIO`` writes)::

    uint32 magic = 0xced7230a | uint32 lrec = cflag << 29 | length | data | zero pad to 4 bytes

A payload that contains the magic word at a 4-byte aligned position is split there into parts
(cflag 1 = first, 2 = middle, 3 = last; the magic word itself is dropped and re-inserted by the
reader), exactly as dmlc does, so mxnet, DALI and this module read each other's files.

Payload (``mx.recordio.pack`` with an array label)::

    IRHeader '<IfQQ' (flag=W1+..+WN, label=0.0, id=key, id2=0) | W1+..+WN float32 | JPEG bytes

The floats are the label: open_clip tokens of N text fields, field k ``Wk`` tokens wide (its
context; 77 unless data2rec was told otherwise), in the shard's field order (token ids < 2**24,
so float32 holds them exactly). ALIP's layout is N=2, 77 each: the raw web text [0:77] and the
synthetic caption [77:154]; RWKV-CLIP's shards carry N=3 (raw, caption, generated). Which field
is which, and how wide, is in the shard dir's manifest.json (``text_fields``, ``text_context``;
without the latter every field is 77 wide), else it follows from the label length (``LAYOUTS``).

The ``.idx`` file has one ``key\\toffset`` line per record (offset of the record's first byte).
"""
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np

from .cache import cached_array

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
CONTEXT_LENGTH = 77
LABEL_LEN = 2 * CONTEXT_LENGTH  # ALIP's layout: raw | caption
DEFAULT_FIELDS = ("raw", "caption")
# label length -> field names, for shards without a manifest.json naming them
LAYOUTS = {2 * CONTEXT_LENGTH: DEFAULT_FIELDS, 3 * CONTEXT_LENGTH: ("raw", "caption", "generated")}
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
MAX_PART = (1 << 29) - 1
INDEX_VERSION = 1  # of the cached index arrays (shard_index): bump when their meaning changes


class RecordIOError(ValueError):
    """A .rec/.idx file is not what it should be; the message names the file and record."""


def _lrec(cflag, length):
    if length > MAX_PART:
        raise ValueError(f"record part of {length} bytes exceeds RecordIO's 2**29-1 limit")
    return struct.pack("<II", MAGIC, (cflag << 29) | length)


def frame(payload: bytes) -> bytes:
    """One payload framed as dmlc's RecordIOWriter::WriteRecord frames it."""
    out = []
    n = len(payload)
    start = 0
    pos = payload.find(MAGIC_BYTES)
    while pos != -1 and pos + 4 <= (n >> 2) << 2:
        if pos % 4 == 0:
            out.append(_lrec(1 if start == 0 else 2, pos - start))
            out.append(payload[start:pos])
            start = pos + 4
            pos = payload.find(MAGIC_BYTES, start)
        else:
            pos = payload.find(MAGIC_BYTES, pos + 1)
    out.append(_lrec(3 if start else 0, n - start))
    out.append(payload[start:])
    out.append(b"\0" * (-n % 4))
    return b"".join(out)


def pack(key: int, raw_tokens, caption_tokens, jpeg: bytes) -> bytes:
    """The record payload in ALIP's layout: IRHeader + 154 float32 label + JPEG bytes."""
    label = np.concatenate([np.asarray(raw_tokens), np.asarray(caption_tokens)])
    if label.size != LABEL_LEN:
        raise ValueError(f"record {key}: expected 2x{CONTEXT_LENGTH} tokens, got {label.size}")
    return pack_fields(key, label.reshape(2, CONTEXT_LENGTH), jpeg)


def pack_fields(key: int, tokens, jpeg: bytes) -> bytes:
    """The record payload of N text fields: IRHeader(flag=W1+..+WN) + the fields' tokens as
    float32 + JPEG. ``tokens``: [N, 77] (or [N, W]), or a list of N 1-D rows of any widths."""
    rows = list(tokens) if not isinstance(tokens, np.ndarray) or tokens.ndim == 2 else [tokens]
    rows = [np.asarray(r) for r in rows]
    if not rows or any(r.ndim != 1 or r.size < 1 for r in rows):
        raise ValueError(f"record {key}: expected N >= 1 token rows, got {[r.shape for r in rows]}")
    label = np.concatenate(rows).astype("<f4")
    return struct.pack(IR_FORMAT, label.size, 0.0, key, 0) + label.tobytes() + bytes(jpeg)


def split_label(label, widths, where="record"):
    """A flat int64 label -> the fields' token rows: [N, W] when every width is W, else a tuple
    of N rows of their widths. ``widths`` None: 77 each."""
    if widths is None:
        n = label_fields(label.size)
        if n is None:
            raise RecordIOError(f"{where}: IRHeader flag is {label.size}, expected 77*N label floats "
                                "(N text fields; manifest.json gives other widths in text_context)")
        widths = (CONTEXT_LENGTH,) * n
    if sum(widths) != label.size:
        raise RecordIOError(f"{where}: IRHeader flag is {label.size}, expected {sum(widths)} label "
                            f"floats (text fields {list(widths)} tokens wide)")
    if len(set(widths)) == 1:
        return label.reshape(len(widths), widths[0])
    return tuple(np.split(label, np.cumsum(widths)[:-1]))


@dataclass
class Record:
    key: int
    tokens: object  # int64 [N, W] (every field W wide, W=77 by default) or a tuple of N rows
    jpeg: bytes

    @property
    def raw_tokens(self):  # field 0 in ALIP's layout (and RWKV-CLIP's)
        return self.tokens[0]

    @property
    def caption_tokens(self):  # field 1 in ALIP's layout (and RWKV-CLIP's)
        return self.tokens[1]


def label_fields(flag):
    """N for an IRHeader flag of 77*N (N >= 1), else None."""
    return flag // CONTEXT_LENGTH if flag > 0 and flag % CONTEXT_LENGTH == 0 else None


def unpack(payload: bytes, where="record", widths=None) -> Record:
    """The Record of a payload; ``widths``: the fields' token widths (None: 77 each)."""
    if len(payload) < IR_SIZE:
        raise RecordIOError(f"{where}: {len(payload)} bytes is shorter than the IRHeader")
    flag, _, key, _ = struct.unpack_from(IR_FORMAT, payload)
    if widths is None and label_fields(flag) is None:
        raise RecordIOError(f"{where}: IRHeader flag is {flag}, expected 77*N label floats (N text fields)")
    end = IR_SIZE + 4 * flag
    if len(payload) < end:
        raise RecordIOError(f"{where}: payload too short for a {flag}-float label")
    label = np.frombuffer(payload, "<f4", flag, IR_SIZE).astype(np.int64)
    return Record(key, split_label(label, widths, where), payload[end:])


def label_length(payload: bytes, where="record"):
    """The IRHeader flag (label length) of a payload, without decoding the rest."""
    if len(payload) < IR_SIZE:
        raise RecordIOError(f"{where}: {len(payload)} bytes is shorter than the IRHeader")
    return struct.unpack_from(IR_FORMAT, payload)[0]


class RecordWriter:
    """Appends records to ``path.rec`` and their ``key\\toffset`` lines to ``path.idx``."""

    def __init__(self, rec_path, idx_path):
        self.rec_path, self.idx_path = str(rec_path), str(idx_path)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w")
        self.count = 0

    def write(self, key, raw_tokens, caption_tokens, jpeg):
        self.write_payload(key, pack(key, raw_tokens, caption_tokens, jpeg))

    def write_payload(self, key, payload):
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        self._rec.write(frame(payload))
        self.count += 1

    @property
    def bytes(self):
        return self._rec.tell()

    def close(self):
        self._rec.close()
        self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_index(idx_path, rec_size=None):
    """(keys, offsets) int64 arrays of an .idx file, in file order.

    With ``rec_size`` every offset is checked to lie inside the .rec (an entry past the end is an
    error naming the .idx file, its line and key). A key or offset listed twice is an error
    naming both lines (a duplicated line would make readers yield that record twice). A
    well-formed file is parsed by numpy's C reader (~80 ns a line); any problem sends it through
    the line-by-line reader, whose error names the line.
    """
    got = _read_index_fast(idx_path, rec_size)
    return got if got is not None else _read_index_lines(idx_path, rec_size)


def _read_index_fast(idx_path, rec_size):
    """read_index of a file with no problem; None if it has one (or might)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data"
            table = np.loadtxt(idx_path, dtype=np.int64, comments=None, ndmin=2)
    except (ValueError, OverflowError):
        return None
    if table.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if table.shape[1] != 2:
        return None
    keys, offsets = np.ascontiguousarray(table[:, 0]), np.ascontiguousarray(table[:, 1])
    if rec_size is not None and (offsets + 8 > rec_size).any():
        return None
    for values in (keys, offsets):
        ordered = np.sort(values)
        if (ordered[1:] == ordered[:-1]).any():
            return None
    return keys, offsets


def _read_index_lines(idx_path, rec_size):
    """read_index, a line at a time: the error of a file with a problem names its line."""

    keys, offsets, linenos = [], [], []
    with open(idx_path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise RecordIOError(f"{idx_path}:{lineno}: expected 'key<TAB>offset', got {line!r}")
            try:
                key, off = int(parts[0]), int(parts[1])
            except ValueError:
                raise RecordIOError(f"{idx_path}:{lineno}: not integers: {line!r}") from None
            if rec_size is not None and off + 8 > rec_size:
                raise RecordIOError(
                    f"{idx_path}:{lineno}: record key {key} at offset {off} is past the end of the "
                    f".rec ({rec_size} bytes): the .rec is truncated or the .idx belongs to another file")
            keys.append(key)
            offsets.append(off)
            linenos.append(lineno)
    keys, offsets = np.asarray(keys, np.int64), np.asarray(offsets, np.int64)
    for name, values in (("key", keys), ("offset", offsets)):
        order = np.argsort(values, kind="stable")
        dup = np.flatnonzero(values[order][1:] == values[order][:-1])
        if len(dup):
            first, second = sorted((int(order[dup[0]]), int(order[dup[0] + 1])))
            raise RecordIOError(f"{idx_path}:{linenos[second]}: {name} {int(values[second])} is already on line "
                                f"{linenos[first]} (duplicated .idx line; rebuild the shard or its .idx)")
    return keys, offsets


def shard_index(rec_path, idx_path, use_cache=True):
    """(keys, offsets, cache file or None) of one shard: ``read_index`` with every check once,
    then the checked arrays memory-mapped from the alip cache dir (``$ALIP_CACHE_DIR``, else
    ``~/.cache/alip``, sub-dir ``index``; keyed by both files' paths, sizes and mtimes), so the
    ranks and loader workers of a machine share one copy instead of 16 bytes a record each, and
    a rerun parses nothing."""
    size = os.path.getsize(rec_path)
    if not use_cache:
        return (*read_index(idx_path, size), None)

    def build():
        return np.stack(read_index(idx_path, size))

    table, path = cached_array("index", (rec_path, idx_path), [INDEX_VERSION], build,
                               lambda got: got.ndim == 2 and got.shape[0] == 2 and got.dtype == np.int64,
                               mmap=True)
    return table[0], table[1], path


def read_framed(f, offset, where):
    """The payload of the framed record starting at ``offset`` of the open binary file ``f``."""
    f.seek(offset)
    parts = []
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise RecordIOError(f"{where}: truncated .rec (record header cut off at offset {f.tell()})")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"{where}: bad magic 0x{magic:08x} at offset {f.tell() - 8}")
        cflag, length = lrec >> 29, lrec & MAX_PART
        data = f.read(length)
        if len(data) < length:
            raise RecordIOError(
                f"{where}: truncated .rec (record needs {length} bytes at offset {f.tell() - len(data)}, "
                f"only {len(data)} left)")
        f.seek(-length % 4, 1)
        parts.append(data)
        if cflag in (0, 3):
            break
        if cflag not in (1, 2):
            raise RecordIOError(f"{where}: bad cflag {cflag}")
    return MAGIC_BYTES.join(parts)


def reserve_open_files(rec_paths):
    """Make room for a RecordReader per shard of ``rec_paths`` in every process that reads
    through them: each may hold two descriptors there (its memory-mapped index, its .rec once
    read), so this process's soft RLIMIT_NOFILE (inherited by loader workers) is raised toward
    the hard limit to 2 per shard + 256. A hard limit too low for that is a RecordIOError naming
    both numbers, at start-up instead of "Too many open files" mid-epoch."""
    import resource
    need = 2 * len(rec_paths) + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        raise RecordIOError(
            f"{rec_paths[0]} and {len(rec_paths) - 1} more shards: {len(rec_paths)} shards need up "
            f"to {need} open files in each reading process, but the hard limit (ulimit -Hn) is "
            f"{hard}: write fewer, bigger shards (data2rec.py --shard-size) or raise the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return need


class RecordReader:
    """Random access to the records of one shard (``.rec`` + ``.idx``).

    ``len(reader)`` records; ``reader[i]`` is the i-th (in .idx order) as a :class:`Record`
    (its fields split by ``widths``, the shard's field widths: None for 77 each);
    ``reader.keys`` / ``reader.offsets`` (memory-mapped from the cache: ``shard_index``). Opening checks every .idx offset lies inside the .rec and
    that the last record is complete, so a truncated shard fails here, naming the file and key.
    The file handle is opened lazily per process (safe to pickle into DataLoader workers).
    """

    def __init__(self, rec_path, idx_path=None, check=True, use_cache=True, widths=None):
        self.rec_path = str(rec_path)
        self.widths = None if widths is None else tuple(widths)  # the fields' widths (None: 77 each)
        self.idx_path = str(idx_path or os.path.splitext(self.rec_path)[0] + ".idx")
        if not os.path.exists(self.rec_path):
            raise FileNotFoundError(f"{self.rec_path}: no such .rec file")
        if not os.path.exists(self.idx_path):
            raise FileNotFoundError(f"{self.idx_path}: no such .idx file (next to {self.rec_path})")
        self.keys, self.offsets, self._index_file = shard_index(self.rec_path, self.idx_path, use_cache)
        self._f = None
        self._pid = None
        if check and len(self.offsets):
            i = int(np.argmax(self.offsets))
            self.read_payload(i)  # the record closest to the end must be whole

    def __len__(self):
        return len(self.offsets)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_f"], state["_pid"] = None, None
        if self._index_file:  # a spawned worker maps the cached index again instead of a copy
            state["keys"] = state["offsets"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.keys is None:
            try:
                table = np.load(self._index_file, mmap_mode="r")
            except (OSError, ValueError):  # the cache entry went away: parse the .idx again
                table = np.stack(read_index(self.idx_path, os.path.getsize(self.rec_path)))
            self.keys, self.offsets = table[0], table[1]

    def _file(self):
        if self._f is None or self._pid != os.getpid():
            self._f = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._f

    def read_payload(self, i):
        where = f"{self.rec_path}: record key {int(self.keys[i])}"
        return read_framed(self._file(), int(self.offsets[i]), where)

    def __getitem__(self, i) -> Record:
        where = f"{self.rec_path}: record key {int(self.keys[i])}"
        rec = unpack(self.read_payload(i), where, self.widths)
        rec.key = int(self.keys[i])  # the .idx key (the reference writes IRHeader id=1 everywhere)
        return rec

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None
