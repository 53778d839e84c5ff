"""Existing rec shards as rows: data2rec's ``--rec`` input (repacking with new captions) and
caption.py's (captioning images already packed).

``RecShards`` lists the records of a shard dir (or a glob of .rec files) with their record keys,
which must be unique: captions files are keyed by record key. ``RecSource`` is a data2rec source
over them: each output record keeps its input record's key, JPEG bytes and the tokens of the
fields it copies (``raw`` always: the shards hold tokens, not the text), and takes ``caption``
(and any extra field the captions file has a column for) from a captions file keyed by record
key, tokenized by data2rec's workers.
"""
import glob
import json
import os

import numpy as np

from .fields import shards_layout
from .pack import DataError, load_columns, text_value
from .recordio import RecordIOError, RecordReader


class RecShards:
    """The records of rec shards (``DIR``: its ``*.rec``; or a glob), in shard then .idx order."""

    def __init__(self, spec, flag="--rec"):
        paths = sorted(glob.glob(os.path.join(spec, "*.rec"))) if os.path.isdir(spec) else sorted(glob.glob(spec))
        if not paths:
            raise DataError(f"{flag} {spec!r}: no .rec files")
        try:
            self.readers = [RecordReader(p) for p in paths]
        except (RecordIOError, FileNotFoundError) as e:
            raise DataError(str(e)) from None
        self.spec, self.paths = spec, paths
        self.starts = np.cumsum([0] + [len(r) for r in self.readers])  # 8 B per shard, not per record
        keys = np.concatenate([np.asarray(r.keys) for r in self.readers])
        order = np.argsort(keys, kind="stable")
        same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
        if same.size:
            a, b = (self.locate(int(order[same[0] + d]))[0] for d in (0, 1))
            raise DataError(f"record key {int(keys[order[same[0]]])} is in both {paths[a]} and {paths[b]}: "
                            "captions are keyed by record key, keys must be unique")

    def __len__(self):
        return int(self.starts[-1])

    def locate(self, i):
        """(shard, record within it) of row i."""
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return s, i - int(self.starts[s])

    def key(self, i):
        s, j = self.locate(i)
        return int(self.readers[s].keys[j])

    def where(self, i):
        s, j = self.locate(i)
        return {"source": self.readers[s].rec_path, "record": int(self.readers[s].keys[j])}

    def describe(self):
        return {"rec": self.spec, "shards": [os.path.abspath(r.rec_path) for r in self.readers],
                "bytes": sum(os.path.getsize(r.rec_path) for r in self.readers)}


def input_tokenizer(paths):
    """The tokenizer named in the manifest.json beside the shards (data2rec writes it), or None."""
    path = os.path.join(os.path.dirname(os.path.abspath(paths[0])), "manifest.json")
    try:
        with open(path) as f:
            return (json.load(f).get("flags") or {}).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return None


class RecSource:
    """data2rec's source over existing shards (see the module doc). ``text_fields``: the output's
    fields; ``extra``: those other than raw and caption (the names check_text_fields expects)."""

    def __init__(self, spec, captions_path, text_fields, key_col="key", caption_col="caption",
                 caption_fallback=None, tokenizer=None):
        self.shards = RecShards(spec)
        self.captions_path, self.caption_col = captions_path, caption_col
        self.extra = tuple(f for f in text_fields if f not in ("raw", "caption"))
        try:
            self.layout = shards_layout(self.shards.paths)  # the input's fields, in label order
        except RecordIOError as e:
            raise DataError(f"--rec {spec!r}: {e}") from None
        if "raw" not in self.layout:
            raise DataError(f"--rec {spec!r}: the shards have no raw field (they have "
                            f"{list(self.layout)}); data2rec keeps the raw text's tokens")
        used = tokenizer and input_tokenizer(self.shards.paths)
        if used and used != tokenizer:
            raise DataError(f"--tokenizer {tokenizer}: the shards' raw tokens come from {used} "
                            f"(their manifest.json); tokenize the captions with the same one")
        wanted = (caption_col,) + self.extra
        columns = load_columns(captions_path, key_col, wanted)
        self.captions = columns[caption_col]
        # an extra field comes from the captions file when it has that column, else from the input
        self.from_file = {f: columns[f] for f in self.extra if columns[f]}
        missing = [f for f in self.extra if f not in self.from_file and f not in self.layout]
        if missing:
            raise DataError(f"--text-fields names {missing[0]!r}: neither {captions_path} has a column "
                            f"{missing[0]!r} nor the shards a field of that name (they have {list(self.layout)})")
        if caption_fallback != "raw":
            keys = (self.shards.key(i) for i in range(len(self.shards)))
            absent = [k for k in keys if str(k) not in self.captions]
            if absent:
                raise DataError(f"{captions_path}: no caption for {len(absent)} of {len(self.shards)} "
                                f"records (first keys: {absent[:5]}); pass --caption-fallback raw to use "
                                "the raw text instead")

    def __len__(self):
        return len(self.shards)

    def record_key(self, i):
        return self.shards.key(i)

    def where(self, i):
        return self.shards.where(i)

    def describe(self):
        return {**self.shards.describe(), "captions": os.path.abspath(self.captions_path),
                "captions_bytes": os.path.getsize(self.captions_path)}

    def read_fields(self, i):
        """(("rec", rec_path, j), raw, caption, {extra: value}): a value is the text to tokenize,
        an int (the row of the input record's tokens to copy) or None (missing); the worker reads
        the record itself."""
        s, j = self.shards.locate(i)
        key = str(self.shards.key(i))
        raw = self.layout.index("raw")
        caption = text_value(self.captions.get(key), self.caption_col)
        extras = {}
        for f in self.extra:
            if f not in self.from_file:
                extras[f] = self.layout.index(f)
                continue
            extras[f] = text_value(self.from_file[f].get(key), f)
        return ("rec", self.shards.readers[s].rec_path, j), raw, caption, extras
