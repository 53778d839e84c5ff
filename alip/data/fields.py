"""Which text fields a set of shards carries, and where each one sits in the label.

A record's label is N text fields of tokens as float32, field k ``Wk`` tokens wide (its
context). The names and order come from the shard dir's manifest.json (``text_fields``, written
by data2rec), the widths from its ``text_context`` ({field: width}; a manifest without that key:
77 each, what data2rec wrote before it could write other widths); a dir without one (the
reference's shards, RWKV-CLIP's published ones) is read by label length (``recordio.LAYOUTS``:
154 -> raw, caption; 231 -> raw, caption, generated). ``resolve`` does this for every shard of a
loader and checks that the fields a method asks for are there, before any data is read.
"""
import json
import os

from .recordio import CONTEXT_LENGTH, LAYOUTS, RecordIOError, RecordReader, label_length


def manifest_fields(rec_path):
    """(manifest.json path, its ``text_fields`` tuple or None); (None, None) without a manifest."""
    path, fields, _ = manifest_layout(rec_path)
    return path, fields


def manifest_layout(rec_path):
    """(manifest.json path, its ``text_fields`` tuple or None, their widths or None);
    (None, None, None) without a manifest. Widths come from ``text_context`` (77 each without it)."""
    path = os.path.join(os.path.dirname(os.path.abspath(rec_path)), "manifest.json")
    if not os.path.exists(path):
        return None, None, None
    try:
        with open(path) as f:
            manifest = json.load(f)
        fields, context = manifest.get("text_fields"), manifest.get("text_context")
    except (ValueError, AttributeError):
        raise RecordIOError(f"{path}: not a data2rec manifest.json (unreadable JSON object)") from None
    if fields is None:
        return path, None, None
    if (not isinstance(fields, list) or not fields or not all(isinstance(x, str) and x for x in fields)
            or len(set(fields)) != len(fields)):
        raise RecordIOError(f"{path}: text_fields {fields!r} is not a list of distinct field names")
    if context is None:
        return path, tuple(fields), (CONTEXT_LENGTH,) * len(fields)
    if (not isinstance(context, dict) or sorted(context) != sorted(fields)
            or not all(type(w) is int and w >= 1 for w in context.values())):
        raise RecordIOError(f"{path}: text_context {context!r} is not a width >= 1 for each of the "
                            f"text_fields {fields}")
    return path, tuple(fields), tuple(context[f] for f in fields)


def shard_fields(rec_path, manifests=None):
    """The field names of one shard, in label order, or None for a shard with no records and no
    manifest (nothing to read, nothing to name). ``manifests``: a dict caching manifest_layout
    per directory across calls."""
    got = shard_layout(rec_path, manifests)
    return None if got is None else got[0]


def shard_layout(rec_path, manifests=None):
    """(field names, widths) of one shard, or None (as ``shard_fields``)."""
    d = os.path.dirname(os.path.abspath(rec_path))
    if manifests is None or d not in manifests:
        found = manifest_layout(rec_path)[1:]
        if manifests is None:
            manifests = {}
        manifests[d] = found
    fields, widths = manifests[d]
    if fields is not None:
        return fields, widths
    reader = RecordReader(rec_path, check=False)
    if not len(reader):
        return None
    n = label_length(reader.read_payload(0), f"{rec_path}: record key {int(reader.keys[0])}")
    reader.close()
    if n not in LAYOUTS:
        raise RecordIOError(
            f"{rec_path}: labels of {n} floats and no manifest.json naming the text fields; known "
            f"layouts without one: " + ", ".join(f"{k} -> {'/'.join(v)}" for k, v in LAYOUTS.items()))
    return LAYOUTS[n], (CONTEXT_LENGTH,) * len(LAYOUTS[n])


def shards_layout(rec_paths):
    """The field names shared by all shards; shards of different layouts are an error naming two."""
    return shards_layout_widths(rec_paths)[0]


def shards_widths(rec_paths):
    """The fields' token widths, in label order, shared by all shards (77 each by default)."""
    return shards_layout_widths(rec_paths)[1]


def shards_layout_widths(rec_paths):
    """(field names, widths) shared by all shards; shards of different layouts or widths are an
    error naming two."""
    layout, first, manifests = None, None, {}
    for p in rec_paths:
        got = shard_layout(p, manifests)
        if got is None:
            continue
        if layout is None:
            layout, first = got, p
        elif got[0] != layout[0]:
            raise RecordIOError(f"{p} has text fields {list(got[0])} but {first} has {list(layout[0])}: "
                                "one loader reads shards of one layout")
        elif got[1] != layout[1]:
            raise RecordIOError(f"{p} has text fields {list(got[0])} {list(got[1])} tokens wide but {first} "
                                f"has them {list(layout[1])} wide: one loader reads shards of one layout")
    if layout is None:
        return LAYOUTS[2 * CONTEXT_LENGTH], (CONTEXT_LENGTH, CONTEXT_LENGTH)
    return layout


def label_spans(layout, widths):
    """{field: (start, stop)} of each field in the flat label."""
    starts = [sum(widths[:k]) for k in range(len(widths))]
    return {f: (a, a + w) for f, a, w in zip(layout, starts, widths)}


def resolve(rec_paths, wanted):
    """{field: its row in the record's tokens (index into Record.tokens)} for the ``wanted`` field
    names, and the shards' field names (``shards_widths`` gives their widths); a field the
    shards do not have is a ValueError naming it, the shards and the fields they have."""
    layout = shards_layout(rec_paths)
    missing = [f for f in wanted if f not in layout]
    if missing:
        where = rec_paths[0] if len(rec_paths) == 1 else f"{rec_paths[0]} .. {rec_paths[-1]} ({len(rec_paths)} shards)"
        raise ValueError(f"text field {missing[0]!r} is not in the shards {where}: they have {list(layout)}")
    return {f: layout.index(f) for f in dict.fromkeys(wanted)}, layout
