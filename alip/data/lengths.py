"""Per-record text lengths of RecordIO shards, read from the labels alone (no JPEG is read).

A text field's length is its token count up to and including the end-of-text token
(``argmax + 1`` of its ids, as ``alip.model.text_lengths`` computes it for open_clip's
tokenizer, whose end-of-text id is the largest). ``widths``: the fields' token widths in label
order (alip.data.fields.shards_widths), or an int N for N fields of 77. ``shard_lengths`` reads, for each record, only
the first bytes of its frame (record header, IRHeader, label) with one ``pread``; a record whose
first frame part does not hold the whole label (a payload split at an embedded magic word) is
read whole. Each shard's result is cached as uint8 [records, fields] (uint16 when a field is wider than
255 tokens) in the alip cache dir
(``$ALIP_CACHE_DIR``, else ``~/.cache/alip``, sub-dir ``lengths``), keyed like the verify cache
by the .rec and .idx paths, sizes and mtimes, so a changed shard is read again.
"""
import os
import sys

import numpy as np

from .cache import cache_path, cached_array
from .recordio import CONTEXT_LENGTH, IR_SIZE, MAGIC, MAX_PART, RecordIOError, unpack

VERSION = 1  # bump when the stored lengths change meaning: older cache entries are then ignored
FRAME_HEAD = 8  # uint32 magic | uint32 cflag << 29 | length


def as_widths(widths):
    """A widths tuple from ``widths`` (a sequence, or an int N: N fields of 77)."""
    return (CONTEXT_LENGTH,) * widths if isinstance(widths, int) else tuple(int(w) for w in widths)


def length_dtype(widths):
    return np.uint8 if max(widths) <= 255 else np.uint16


def _head_lengths(heads, got, widths):
    """[n, fields] lengths from the record heads (``got``: bytes read of each), and a
    bool [n] mask of the heads that do not hold a whole, well-formed label (read the slow way)."""
    magic, lrec = heads[:, 0:4].view("<u4")[:, 0], heads[:, 4:8].view("<u4")[:, 0]
    cflag, part = lrec >> 29, lrec & MAX_PART
    flag = heads[:, 8:12].view("<u4")[:, 0]
    label_floats = sum(widths)
    fast = ((got == heads.shape[1]) & (magic == MAGIC) & ((cflag == 0) | (cflag == 1))
            & (flag == label_floats) & (part >= IR_SIZE + 4 * label_floats))
    start = FRAME_HEAD + IR_SIZE
    tokens = heads[:, start:start + 4 * label_floats].copy().view("<f4")
    lengths = np.stack([t.argmax(axis=-1) + 1 for t in np.split(tokens, np.cumsum(widths)[:-1], axis=1)], 1)
    return lengths.astype(length_dtype(widths)), ~fast


def read_lengths(reader, widths):
    """[len(reader), fields] text lengths of one shard's records (``reader``: a RecordReader),
    in .idx order; a record whose label is not ``widths`` wide is a RecordIOError naming the
    shard and the record key."""
    widths = as_widths(widths)
    n_fields = len(widths)
    n = len(reader)
    want = FRAME_HEAD + IR_SIZE + 4 * sum(widths)
    heads, got = np.zeros((n, want), np.uint8), np.zeros(n, np.int64)
    fd = os.open(reader.rec_path, os.O_RDONLY)
    try:
        for i, off in enumerate(reader.offsets.tolist()):
            b = os.pread(fd, want, off)
            heads[i, :len(b)], got[i] = np.frombuffer(b, np.uint8), len(b)
    finally:
        os.close(fd)
    lengths, slow = _head_lengths(heads, got, widths)
    for i in np.flatnonzero(slow).tolist():  # split or damaged records: the full reader's checks
        where = f"{reader.rec_path}: record key {int(reader.keys[i])}"
        payload = reader.read_payload(i)
        if widths == (CONTEXT_LENGTH,) * n_fields:
            rec = unpack(payload, where)
            if rec.tokens.shape[0] != n_fields:
                raise RecordIOError(f"{where}: {rec.tokens.shape[0]} text fields, but the shards' layout "
                                    f"has {n_fields}")
        else:
            rec = unpack(payload, where, widths)
        lengths[i] = [int(np.argmax(t)) + 1 for t in rec.tokens]
    return lengths


def _cache_key(reader, widths):
    """(kind, files, ident) of a shard's lengths in the alip cache (alip.data.cache)."""
    n = len(widths)
    ident = n if widths == (CONTEXT_LENGTH,) * n else list(widths)  # 77 each: the key it always had
    return "lengths", (reader.rec_path, reader.idx_path), [VERSION, ident]


def shard_lengths(reader, widths, use_cache=True):
    """``read_lengths`` through the cache, memory-mapped from it (an unreadable or unwritable
    cache only costs a re-read)."""
    widths = as_widths(widths)
    if not use_cache:
        return read_lengths(reader, widths)
    lengths, _ = cached_array(
        *_cache_key(reader, widths), lambda: read_lengths(reader, widths),
        lambda got: got.shape == (len(reader), len(widths)) and got.dtype == length_dtype(widths), mmap=True)
    return lengths


def length_parts(readers, widths, progress=False, use_cache=True, share=(0, 1), barrier=None):
    """Each shard's [records, fields] lengths (memory-mapped from the cache).

    ``share=(i, k)``, ``barrier``: the k processes of a machine (all call this) split the
    uncached shards: this one first reads those among every k-th shard from the i-th into the
    cache, then ``barrier()`` waits for the others, and every shard then comes from the cache
    (one whose entry is still missing, e.g. under an unwritable cache or another machine's, is
    read here).
    ``progress``: one stderr line before reading uncached shards and one when done."""
    widths = as_widths(widths)
    todo = [r for r in readers if not (use_cache and _is_cached(r, widths))]
    i, k = share
    if progress and todo:
        mine = f", 1/{k} of them here" if use_cache and k > 1 else ""
        print(f"length index: reading the labels of {sum(len(r) for r in todo)} records in "
              f"{len(todo)} shard(s){mine} (cached for the next run)", file=sys.stderr, flush=True)
    if use_cache and k > 1:  # by shard position, not by what is cached yet: no race
        uncached = {id(r) for r in todo}
        for r in readers[i::k]:
            if id(r) in uncached:
                shard_lengths(r, widths)
    if barrier is not None:
        barrier()
    parts = [shard_lengths(r, widths, use_cache) for r in readers]
    if progress and todo:
        print("length index: done", file=sys.stderr, flush=True)
    return parts


def length_index(readers, widths, progress=False, use_cache=True):
    """[total records, fields]: the lengths of every record of the concatenated shards."""
    widths = as_widths(widths)
    parts = length_parts(readers, widths, progress, use_cache)
    return np.concatenate(parts) if parts else np.zeros((0, len(widths)), length_dtype(widths))


def _is_cached(reader, widths):
    try:
        return os.path.exists(cache_path(*_cache_key(reader, widths), ".npy"))
    except OSError:
        return False

