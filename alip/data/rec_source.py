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

from .fields import shards_layout_widths
from .pack import (DataError, check_captions_origin, input_identity, load_columns, refuse_foreign_keys,
                   text_value)
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

    def foreign(self, keys):
        """The captions-file keys (strings, in order) that name no record here: not the decimal
        form of a record key (``str(key)`` is how records are looked up)."""
        keys = list(keys)
        ints, ok = np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
        for i, k in enumerate(keys):
            try:
                v = int(k)
            except ValueError:
                continue
            if str(v) == k and -2 ** 63 <= v < 2 ** 63:
                ints[i], ok[i] = v, True
        have = np.unique(np.concatenate([np.asarray(r.keys) for r in self.readers]))
        at = np.minimum(np.searchsorted(have, ints), max(len(have) - 1, 0))
        ok &= have[at] == ints if len(have) else False
        return [k for k, good in zip(keys, ok) if not good]


def input_manifest(paths):
    """The manifest.json beside the shards (data2rec writes it) as a dict, or None."""
    path = os.path.join(os.path.dirname(os.path.abspath(paths[0])), "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def input_tokenizer(paths):
    """The tokenizer named in the manifest.json beside the shards (data2rec writes it), or None."""
    flags = (input_manifest(paths) or {}).get("flags")
    return flags.get("tokenizer") if isinstance(flags, dict) else None


class RecSource:
    """data2rec's source over existing shards (see the module doc). ``text_fields``: the output's
    fields, None for the input's own (a repack keeps every field it is not told to leave out:
    ``dropped`` lists those it was); ``extra``: those other than raw and caption (the names
    check_text_fields expects)."""

    def __init__(self, spec, captions_path, text_fields=None, key_col="key", caption_col="caption",
                 caption_fallback=None, tokenizer=None):
        self.shards = RecShards(spec)
        self.captions_path, self.caption_col = captions_path, caption_col
        try:
            self.layout, widths = shards_layout_widths(self.shards.paths)  # the input's fields, in label order
        except RecordIOError as e:
            raise DataError(f"--rec {spec!r}: {e}") from None
        self.text_fields = tuple(self.layout if text_fields is None else text_fields)
        self.extra = tuple(f for f in self.text_fields if f not in ("raw", "caption"))
        self.dropped = tuple(f for f in self.layout if f not in self.text_fields)
        if "raw" not in self.layout:
            raise DataError(f"--rec {spec!r}: the shards have no raw field (they have "
                            f"{list(self.layout)}); data2rec keeps the raw text's tokens")
        used = tokenizer and input_tokenizer(self.shards.paths)
        if used and used != tokenizer:
            raise DataError(f"--tokenizer {tokenizer}: the shards' raw tokens come from {used} "
                            f"(their manifest.json); tokenize the captions with the same one")
        wanted = (caption_col,) + self.extra
        columns, keys = load_columns(captions_path, key_col, wanted)
        refuse_foreign_keys(captions_path, self.shards.foreign(keys), len(keys),
                            f"the {len(self.shards)} records of --rec {spec}")
        made_from = input_manifest(self.shards.paths) or {}  # the input the record keys number
        check_captions_origin(captions_path, [input_identity(self.shards.describe(), len(self.shards)),
                                              input_identity(made_from.get("inputs"), made_from.get("rows_in"))])
        self.captions = columns[caption_col]
        # an extra field comes from the captions file when it has that column, else from the input
        self.from_file = {f: columns[f] for f in self.extra if columns[f]}
        missing = [f for f in self.extra if f not in self.from_file and f not in self.layout]
        if missing:
            raise DataError(f"--text-fields names {missing[0]!r}: neither {captions_path} has a column "
                            f"{missing[0]!r} nor the shards a field of that name (they have {list(self.layout)})")
        # the fields copied as tokens keep their input widths (data2rec's field_widths)
        self.copied_widths = {f: w for f, w in zip(self.layout, widths)
                              if f in self.text_fields and f != "caption" and f not in self.from_file}
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
