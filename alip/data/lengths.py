"""Per-record text lengths of RecordIO shards, read from the labels alone (no JPEG is read).

A text field's length is its token count up to and including the end-of-text token
(``argmax + 1`` of its 77 ids, as ``alip.model.text_lengths`` computes it for open_clip's
tokenizer, whose end-of-text id is the largest). ``shard_lengths`` reads, for each record, only
the first bytes of its frame (record header, IRHeader, label) with one ``pread``; a record whose
first frame part does not hold the whole label (a payload split at an embedded magic word) is
read whole. Each shard's result is cached as uint8 [records, fields] in the alip cache dir
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


def _head_lengths(heads, got, n_fields):
    """uint8 [n, n_fields] lengths from the record heads (``got``: bytes read of each), and a
    bool [n] mask of the heads that do not hold a whole, well-formed label (read the slow way)."""
    magic, lrec = heads[:, 0:4].view("<u4")[:, 0], heads[:, 4:8].view("<u4")[:, 0]
    cflag, part = lrec >> 29, lrec & MAX_PART
    flag = heads[:, 8:12].view("<u4")[:, 0]
    label_floats = n_fields * CONTEXT_LENGTH
    fast = ((got == heads.shape[1]) & (magic == MAGIC) & ((cflag == 0) | (cflag == 1))
            & (flag == label_floats) & (part >= IR_SIZE + 4 * label_floats))
    start = FRAME_HEAD + IR_SIZE
    tokens = heads[:, start:start + 4 * label_floats].copy().view("<f4").reshape(-1, n_fields, CONTEXT_LENGTH)
    lengths = (tokens.argmax(axis=-1) + 1).astype(np.uint8)
    return lengths, ~fast


def read_lengths(reader, n_fields):
    """uint8 [len(reader), n_fields] text lengths of one shard's records (``reader``: a
    RecordReader), in .idx order; a record whose label is not ``n_fields`` x 77 floats is a
    RecordIOError naming the shard and the record key."""
    n = len(reader)
    want = FRAME_HEAD + IR_SIZE + 4 * n_fields * CONTEXT_LENGTH
    heads, got = np.zeros((n, want), np.uint8), np.zeros(n, np.int64)
    fd = os.open(reader.rec_path, os.O_RDONLY)
    try:
        for i, off in enumerate(reader.offsets.tolist()):
            b = os.pread(fd, want, off)
            heads[i, :len(b)], got[i] = np.frombuffer(b, np.uint8), len(b)
    finally:
        os.close(fd)
    lengths, slow = _head_lengths(heads, got, n_fields)
    for i in np.flatnonzero(slow).tolist():  # split or damaged records: the full reader's checks
        where = f"{reader.rec_path}: record key {int(reader.keys[i])}"
        rec = unpack(reader.read_payload(i), where)
        if rec.tokens.shape[0] != n_fields:
            raise RecordIOError(f"{where}: {rec.tokens.shape[0]} text fields, but the shards' layout "
                                f"has {n_fields}")
        lengths[i] = rec.tokens.argmax(axis=-1) + 1
    return lengths


def _cache_key(reader, n_fields):
    """(kind, files, ident) of a shard's lengths in the alip cache (alip.data.cache)."""
    return "lengths", (reader.rec_path, reader.idx_path), [VERSION, n_fields]


def shard_lengths(reader, n_fields, use_cache=True):
    """``read_lengths`` through the cache, memory-mapped from it (an unreadable or unwritable
    cache only costs a re-read)."""
    if not use_cache:
        return read_lengths(reader, n_fields)
    lengths, _ = cached_array(
        *_cache_key(reader, n_fields), lambda: read_lengths(reader, n_fields),
        lambda got: got.shape == (len(reader), n_fields) and got.dtype == np.uint8, mmap=True)
    return lengths


def length_parts(readers, n_fields, progress=False, use_cache=True, share=(0, 1), barrier=None):
    """Each shard's uint8 [records, n_fields] lengths (memory-mapped from the cache).

    ``share=(i, k)``, ``barrier``: the k processes of a machine (all call this) split the
    uncached shards: this one first reads those among every k-th shard from the i-th into the
    cache, then ``barrier()`` waits for the others, and every shard then comes from the cache
    (one whose entry is still missing, e.g. under an unwritable cache or another machine's, is
    read here).
    ``progress``: one stderr line before reading uncached shards and one when done."""
    todo = [r for r in readers if not (use_cache and _is_cached(r, n_fields))]
    i, k = share
    if progress and todo:
        mine = f", 1/{k} of them here" if use_cache and k > 1 else ""
        print(f"length index: reading the labels of {sum(len(r) for r in todo)} records in "
              f"{len(todo)} shard(s){mine} (cached for the next run)", file=sys.stderr, flush=True)
    if use_cache and k > 1:  # by shard position, not by what is cached yet: no race
        uncached = {id(r) for r in todo}
        for r in readers[i::k]:
            if id(r) in uncached:
                shard_lengths(r, n_fields)
    if barrier is not None:
        barrier()
    parts = [shard_lengths(r, n_fields, use_cache) for r in readers]
    if progress and todo:
        print("length index: done", file=sys.stderr, flush=True)
    return parts


def length_index(readers, n_fields, progress=False, use_cache=True):
    """uint8 [total records, n_fields]: the lengths of every record of the concatenated shards."""
    parts = length_parts(readers, n_fields, progress, use_cache)
    return np.concatenate(parts) if parts else np.zeros((0, n_fields), np.uint8)


def _is_cached(reader, n_fields):
    try:
        return os.path.exists(cache_path(*_cache_key(reader, n_fields), ".npy"))
    except OSError:
        return False

