"""Which text fields a set of shards carries, and where each one sits in the label.

A record's label is 77*N float32: N text fields of 77 tokens. The names and order come from the
shard dir's manifest.json (``text_fields``, written by data2rec); a dir without one (the
reference's shards, RWKV-CLIP's published ones) is read by label length (``recordio.LAYOUTS``:
154 -> raw, caption; 231 -> raw, caption, generated). ``resolve`` does this for every shard of a
loader and checks that the fields a method asks for are there, before any data is read.
"""
import json
import os

from .recordio import CONTEXT_LENGTH, LAYOUTS, RecordIOError, RecordReader, label_length


def manifest_fields(rec_path):
    """(manifest.json path, its ``text_fields`` tuple or None); (None, None) without a manifest."""
    path = os.path.join(os.path.dirname(os.path.abspath(rec_path)), "manifest.json")
    if not os.path.exists(path):
        return None, None
    try:
        with open(path) as f:
            fields = json.load(f).get("text_fields")
    except (ValueError, AttributeError):
        raise RecordIOError(f"{path}: not a data2rec manifest.json (unreadable JSON object)") from None
    if fields is None:
        return path, None
    if (not isinstance(fields, list) or not fields or not all(isinstance(x, str) and x for x in fields)
            or len(set(fields)) != len(fields)):
        raise RecordIOError(f"{path}: text_fields {fields!r} is not a list of distinct field names")
    return path, tuple(fields)


def shard_fields(rec_path, manifests=None):
    """The field names of one shard, in label order, or None for a shard with no records and no
    manifest (nothing to read, nothing to name). ``manifests``: a dict caching manifest_fields
    per directory across calls."""
    d = os.path.dirname(os.path.abspath(rec_path))
    if manifests is None or d not in manifests:
        found = manifest_fields(rec_path)[1]
        if manifests is None:
            manifests = {}
        manifests[d] = found
    fields = manifests[d]
    if fields is not None:
        return fields
    reader = RecordReader(rec_path, check=False)
    if not len(reader):
        return None
    n = label_length(reader.read_payload(0), f"{rec_path}: record key {int(reader.keys[0])}")
    reader.close()
    if n not in LAYOUTS:
        raise RecordIOError(
            f"{rec_path}: labels of {n} floats and no manifest.json naming the text fields; known "
            f"layouts without one: " + ", ".join(f"{k} -> {'/'.join(v)}" for k, v in LAYOUTS.items()))
    return LAYOUTS[n]


def shards_layout(rec_paths):
    """The field names shared by all shards; shards of different layouts are an error naming two."""
    layout, first, manifests = None, None, {}
    for p in rec_paths:
        fields = shard_fields(p, manifests)
        if fields is None:
            continue
        if layout is None:
            layout, first = fields, p
        elif fields != layout:
            raise RecordIOError(f"{p} has text fields {list(fields)} but {first} has {list(layout)}: "
                                "one loader reads shards of one layout")
    return layout or LAYOUTS[2 * CONTEXT_LENGTH]


def resolve(rec_paths, wanted):
    """{field: its row in the record's [N, 77] tokens} for the ``wanted`` field names; a field the
    shards do not have is a ValueError naming it, the shards and the fields they have."""
    layout = shards_layout(rec_paths)
    missing = [f for f in wanted if f not in layout]
    if missing:
        where = rec_paths[0] if len(rec_paths) == 1 else f"{rec_paths[0]} .. {rec_paths[-1]} ({len(rec_paths)} shards)"
        raise ValueError(f"text field {missing[0]!r} is not in the shards {where}: they have {list(layout)}")
    return {f: layout.index(f) for f in dict.fromkeys(wanted)}, layout
