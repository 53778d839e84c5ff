"""data2rec: (image, web text, synthetic caption) rows -> ALIP RecordIO shards.

The plan is a pure function of the input and the flags: rows are numbered in input order (that
number is the record key), permuted with ``--seed`` (global shuffle: DALI's reader only shuffles
inside its ``initial_fill`` buffer), and cut into shards of ``--shard-size`` consecutive rows of
that order. A shard holds the accepted rows of its slice, so every shard can be (re)built on its
own: a rerun skips shards whose ``.done.json`` exists and rebuilds the rest, and the same input
and flags give byte-identical shards, killed midway or not. ``--part I/N`` lets N machines build
disjoint shard sets into one shared output dir.

Inputs: a manifest (JSONL / CSV / TSV, header row for CSV/TSV) or webdataset tars
(``KEY.jpg`` + ``KEY.txt``) plus a captions file keyed by KEY.
Text fields: ``raw`` (the text column / KEY.txt) and ``caption`` always, plus any extra field F
(``--text-fields raw,caption,F``) read from the manifest's column F, or the captions file's column
F for tars; the label holds their tokens in the given order. A field may carry its context
(``caption:256``): its tokens are stored that wide (default: the tokenizer's context, 77 for
CLIP's); manifest.json records every field's width (``text_context``) and how many texts were cut
at it (``text_cut``).
Outcomes per row: a record, or a line in ``rejects.jsonl`` (missing file, undecodable image,
empty text, a missing or empty extra field, ...). A missing caption stops the run before anything is written unless
``--caption-fallback raw``. Rows in = written + rejected, always.
"""
import csv
import glob
import io
import json
import math
import os
import re
import sys
import tarfile
import unicodedata
from array import array

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from alip import procs

from .recordio import CONTEXT_LENGTH, DEFAULT_FIELDS, RecordWriter, pack_fields

TOOL_VERSION = "1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
DEFAULT_TOKENIZER = "ALIP-ViT-B-32"
DEFAULT_MAX_ROW_LINES = 8  # a CSV record may span this many physical lines (quoted newlines)


class DataError(Exception):
    """Input that stops the run (the message names the file and row)."""


class MissingColumn(DataError):
    """A manifest column that no row (JSONL) or the header (CSV/TSV) has; ``flag`` sets it."""

    def __init__(self, message, flag=None):
        super().__init__(message)
        self.flag = flag


class Reject(Exception):
    """A row that is skipped and written to rejects.jsonl with this reason."""


def manifest_format(path):
    ext = os.path.splitext(path)[1].lower()
    fmt = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}.get(ext)
    if fmt is None:
        raise DataError(f"{path}: unknown manifest format {ext!r} (use .jsonl, .csv or .tsv)")
    return fmt


def _csv_kwargs(fmt):
    # TSV as img2dataset/CC3M write it: tab separated, quotes are plain characters.
    return dict(delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else dict(delimiter=",")


def read_csv_record(f, fmt, max_lines):
    """One CSV/TSV record from binary file f's position: (row, reason, physical lines used).

    (None, None, 0) at the end of the file. A quoted field still open after ``max_lines`` lines
    or at the end of the file is an unbalanced quote, and so is a csv error (a field over the
    csv module's size limit): the record is then only its first line, rejected with ``reason``,
    and f is left at the next line, so one stray quote costs one row, never the rows after it.
    """
    start = f.tell()
    state = {"lines": 0, "cut": False}

    def lines():
        while state["lines"] < max_lines:
            line = f.readline()
            if not line:
                break
            state["lines"] += 1
            yield line.decode("utf-8", "surrogateescape")
        state["cut"] = True  # the reader asked for a line past the limit or the end of the file

    try:
        row, reason = next(csv.reader(lines(), **_csv_kwargs(fmt))), None
    except StopIteration:
        return None, None, 0
    except csv.Error as e:
        row, reason = None, f"unparseable CSV ({e})"
    if reason is None and state["cut"]:
        reason = (f"unbalanced quote: a quoted field runs past {max_lines} lines (--max-row-lines)"
                  if state["lines"] >= max_lines else "unbalanced quote: a quoted field runs to the end of the file")
    if reason is not None:
        f.seek(start)
        f.readline()
        return None, reason, 1
    return row, None, state["lines"]


class ManifestSource:
    """Rows of a JSONL/CSV/TSV manifest, indexed by byte offset for random access."""

    def __init__(self, path, image_root, image_col="image", text_col="text", caption_col="caption",
                 caption_fallback=None, max_row_lines=DEFAULT_MAX_ROW_LINES, extra_fields=()):
        self.path, self.image_root = path, image_root
        self.cols = (image_col, text_col, caption_col)
        self.extra = tuple(extra_fields)  # extra text fields, each read from its own column
        self._extra_seen = dict.fromkeys(self.extra, 0)
        self.fmt = manifest_format(path)
        if not os.path.isdir(image_root):
            raise DataError(f"--image-root {image_root}: "
                            f"{'not a directory' if os.path.exists(image_root) else 'no such directory'}")
        self._col_seen = dict.fromkeys(self.cols[:2], 0)  # JSONL: rows with a value in each column
        self.caption_fallback = caption_fallback
        self.max_row_lines = max_row_lines
        self.header = None
        self.bad_rows = {}  # row -> reason, for rows the scan already knows are broken
        self._parsed = 0  # rows the scan could parse
        offsets = array("q")
        with open(path, "rb") as f:
            if self.fmt == "jsonl":
                while True:
                    pos = f.tell()
                    line = f.readline()
                    if not line:
                        break
                    if line.strip():
                        offsets.append(pos)
                        self._check_caption(len(offsets) - 1, self._parse_jsonl(line, len(offsets) - 1, strict=False))
            else:
                self._scan_csv(f, offsets)
        self.offsets = np.frombuffer(offsets, np.int64) if len(offsets) else np.zeros(0, np.int64)
        self._f = None
        if not len(self.offsets):
            below = "" if self.fmt == "jsonl" else " below its header"
            raise DataError(f"{path}: no rows (the manifest is empty{below})")
        if self.fmt == "jsonl" and self._parsed:
            # as the CSV header check: a typo'd --image-col/--text-col would reject every row
            for name, flag in zip(self.cols[:2], ("--image-col", "--text-col")):
                if not self._col_seen[name]:
                    raise MissingColumn(f"{path}: no row has a value in column {name!r} (set it with {flag})",
                                        flag)
        absent = [f for f, n in self._extra_seen.items() if n == 0]
        if absent and len(self.offsets) > len(self.bad_rows):
            raise DataError(f"{path}: no row has a value in column {absent[0]!r} (--text-fields names "
                            f"{list(self.extra)} as extra columns)")

    def _scan_csv(self, f, offsets):
        """Index the data rows; a row is a record that starts on a new physical line."""
        path, (image_col, text_col, caption_col) = self.path, self.cols
        self.header, reason, lineno = read_csv_record(f, self.fmt, self.max_row_lines)
        if self.header is None:
            raise DataError(f"{path}: {reason or 'empty manifest'} in the header row "
                            f"(a {self.fmt.upper()} needs a header row)")
        _check_header(path, self.header, (*self.cols, *self.extra))
        for name, flag in ((image_col, "--image-col"), (text_col, "--text-col")):
            if name not in self.header:
                raise MissingColumn(f"{path}: header {self.header} has no column {name!r} (set it with {flag})",
                                    flag)
        for name in self.extra:
            if name not in self.header:
                raise DataError(f"{path}: header {self.header} has no column {name!r} (named by --text-fields)")
        if caption_col not in self.header and self.caption_fallback != "raw":
            raise DataError(f"{path}: header {self.header} has no caption column {caption_col!r}; "
                            "set --caption-col, or pass --caption-fallback raw to use the raw text")
        lineno += 1  # the first data line
        while True:
            pos = f.tell()
            row, reason, used = read_csv_record(f, self.fmt, self.max_row_lines)
            if used == 0:
                return
            if row == []:  # blank line
                lineno += used
                continue
            if reason is None and used > 1:
                reason = self._stray_quote(f, pos, used, row)
                if reason is not None:  # reject the first line, read on from the next
                    f.seek(pos)
                    f.readline()
                    used = 1
            i = len(offsets)
            offsets.append(pos)
            if reason is not None:
                self.bad_rows[i] = f"line {lineno}: {reason}"
            else:
                self._check_caption(i, self._csv_dict(row, i, strict=False))
            lineno += used

    def _stray_quote(self, f, pos, used, row):
        """Why a multi-line record is a stray quote rather than a field with newlines, or None:
        it does not give the header's number of fields, or one of its later lines is a whole
        row on its own (the quote swallowed that row)."""
        n = len(self.header)
        if len(row) != n:
            return f"unbalanced quote: a quoted field spans {used} lines and leaves {len(row)} fields (the header has {n})"
        f.seek(pos)
        lines = [f.readline() for _ in range(used)]
        for j, line in enumerate(lines[1:], 1):
            alone = read_csv_record(io.BytesIO(line), self.fmt, 1)[0]
            if alone is not None and len(alone) == n:
                return f"unbalanced quote: the quoted field swallows the next line{'s' if used > 2 else ''}, a row of its own"
        return None

    def __len__(self):
        return len(self.offsets)

    def describe(self):
        return {"manifest": os.path.abspath(self.path), "format": self.fmt,
                "image_root": os.path.abspath(self.image_root), "columns": list(self.cols),
                **({"extra_columns": list(self.extra)} if self.extra else {}),
                "bytes": os.path.getsize(self.path),
                **({"max_row_lines": self.max_row_lines} if self.fmt == "csv" else {})}

    def _where(self, i):
        return f"{self.path} row {i}"

    def where(self, i):
        """Row i as rejects.jsonl names it."""
        return {"source": self.path, "row": i}

    def _parse_jsonl(self, line, i, strict=True):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                raise Reject(f"non-UTF-8 text ({e.reason} at byte {e.start})") from None
            return None
        try:
            obj = loads_json(text)
        except json.JSONDecodeError as e:
            if strict:
                raise Reject(f"malformed JSON line: {e.msg}") from None
            return None
        except DuplicateMember as e:  # which of the two values is meant is not ours to guess
            if strict:
                raise Reject(f"malformed JSON line: {e}") from None
            return None
        except RecursionError:
            if strict:
                raise Reject("malformed JSON line: nested too deeply") from None
            return None
        if not isinstance(obj, dict):
            if strict:
                raise Reject("JSON line is not an object")
            return None
        return obj

    def _csv_dict(self, row, i, strict=True):
        for cell in row:
            try:
                cell.encode("utf-8")
            except UnicodeEncodeError:
                if strict:
                    raise Reject("non-UTF-8 text") from None
                return None
        if len(row) != len(self.header):
            if strict:
                raise Reject(f"row has {len(row)} fields, the header has {len(self.header)}")
            return None
        return dict(zip(self.header, row))

    def _check_caption(self, i, obj):
        if obj is None:
            return
        self._parsed += 1
        for name in self._col_seen:
            self._col_seen[name] += obj.get(name) is not None
        for name in self.extra:
            self._extra_seen[name] += obj.get(name) is not None
        if self.caption_fallback == "raw":
            return
        if obj.get(self.cols[2]) is None:
            raise DataError(f"{self._where(i)}: no caption (column {self.cols[2]!r}); set --caption-col, "
                            "or pass --caption-fallback raw to use the raw text instead")

    def read(self, i):
        """(image source, raw text, caption or None) of row i, or raise Reject."""
        return self.read_fields(i)[:3]

    def read_fields(self, i):
        """(image source, raw text, caption or None, {extra field: text or None}) of row i, or
        raise Reject."""
        if i in self.bad_rows:
            raise Reject(self.bad_rows[i])
        if self._f is None:
            self._f = open(self.path, "rb")
        self._f.seek(int(self.offsets[i]))
        if self.fmt == "jsonl":
            obj = self._parse_jsonl(self._f.readline(), i)
        else:
            obj = self._csv_dict(read_csv_record(self._f, self.fmt, self.max_row_lines)[0], i)
        image_col, text_col, caption_col = self.cols
        for name in (image_col, text_col):
            if obj.get(name) is None:
                raise Reject(f"missing column {name!r}")
        image, text, caption = (_string(obj, name) for name in self.cols)
        if not image:
            raise Reject("empty image path")
        if "\0" in image:
            raise Reject("image path contains a NUL byte")
        extras = {name: _string(obj, name) for name in self.extra}
        return ("file", os.path.join(self.image_root, image)), text, caption, extras


def _string(obj, name):
    """obj[name] if it is a string, None if absent or null; any other type is a Reject."""
    return text_value(obj.get(name), name)


def text_value(v, column):
    """``v`` (a parsed value of ``column``) if it is a string or None; any other type is a Reject."""
    if v is None or isinstance(v, str):
        return v
    kind = {bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}.get(type(v), type(v).__name__)
    raise Reject(f"column {column!r} is a JSON {kind}, not a string")


def first_duplicate(keyed):
    """The first (key, where it was first, where again) of (key, where) pairs, or None."""
    seen = {}
    for key, where in keyed:
        if key in seen:
            return key, seen[key], where
        seen[key] = where
    return None


def is_blank(s):
    """True for text with nothing visible: whitespace, zero-width and other format/control chars."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp") for ch in s)


class WebDatasetSource:
    """img2dataset-style tars (KEY.jpg + KEY.txt [+ KEY.json]) plus a captions file keyed by KEY."""

    def __init__(self, pattern, captions_path, key_col="key", caption_col="caption", caption_fallback=None,
                 extra_fields=()):
        self.pattern, self.captions_path = pattern, captions_path
        self.extra = tuple(extra_fields)  # extra text fields, each from its column of the captions file
        self.tars = sorted(glob.glob(pattern))
        if not self.tars:
            raise DataError(f"--wds {pattern!r} matches no files")
        self.items = []  # (key, tar index, {ext: (offset, size)})
        for t, path in enumerate(self.tars):
            groups = {}
            try:
                with tarfile.open(path, "r:") as tar:
                    for m in tar:
                        if not m.isfile():
                            continue
                        base = os.path.basename(m.name)
                        key, _, ext = base.partition(".")
                        prefix = os.path.join(os.path.dirname(m.name), key)
                        groups.setdefault(prefix, {})[ext.lower()] = (m.offset_data, m.size)
                    end = tar.offset
                    tar.fileobj.seek(end)
                    tail = tar.fileobj.read(tarfile.BLOCKSIZE)
            except tarfile.TarError as e:
                raise DataError(f"{path}: not a readable tar ({e})") from None
            problem = check_tar_end(tail, end)
            if problem:
                raise DataError(f"{path}: not a readable tar ({problem})")
            for prefix in sorted(groups):
                self.items.append((os.path.basename(prefix), t, groups[prefix]))
        if not self.items:
            raise DataError(f"--wds {pattern!r}: no samples in {len(self.tars)} tar(s) (empty tars)")
        columns, keys = load_columns(captions_path, key_col, (caption_col,) + self.extra)
        samples = {k for k, _, _ in self.items}
        refuse_foreign_keys(captions_path, [k for k in keys if k not in samples], len(keys),
                            f"the {len(samples)} samples of --wds {pattern!r}")
        check_captions_origin(captions_path, [input_identity(self.describe(), len(self.items))])
        self.captions = columns[caption_col]
        self.extra_values = {name: columns[name] for name in self.extra}
        absent = [name for name, v in self.extra_values.items() if not v]
        if absent and self.items:
            raise DataError(f"{captions_path}: no row has a value in column {absent[0]!r} (--text-fields "
                            f"names {list(self.extra)} as extra columns)")
        if caption_fallback != "raw":
            missing = [k for k, _, _ in self.items if k not in self.captions]
            if missing:
                raise DataError(f"{captions_path}: no caption for {len(missing)} of {len(self.items)} "
                                f"samples (first keys: {missing[:5]}); pass --caption-fallback raw "
                                "to use the raw text instead")
        self._files = {}

    def __len__(self):
        return len(self.items)

    def describe(self):
        return {"wds": self.pattern, "tars": [os.path.abspath(t) for t in self.tars],
                "tar_bytes": sum(os.path.getsize(t) for t in self.tars),
                "captions": os.path.abspath(self.captions_path),
                "captions_bytes": os.path.getsize(self.captions_path)}

    def _read_member(self, t, span):
        f = self._files.get(t)
        if f is None:
            f = self._files[t] = open(self.tars[t], "rb")
        f.seek(span[0])
        return f.read(span[1])

    def read(self, i):
        key, t, members = self.items[i]
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            raise Reject(f"missing image (no {'/'.join(IMAGE_EXTS)} member for key {key})")
        if "txt" not in members:
            raise Reject(f"missing text (no {key}.txt member)")
        try:
            text = self._read_member(t, members["txt"]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise Reject(f"non-UTF-8 text ({e.reason} at byte {e.start})") from None
        return ("tar", self.tars[t], *members[ext]), text, _string(self.captions, key)

    def where(self, i):
        """Sample i as rejects.jsonl names it."""
        key, t, _ = self.items[i]
        return {"source": self.tars[t], "sample": key}

    def read_fields(self, i):
        """read(i) + {extra field: text or None} from the captions file."""
        key = self.items[i][0]
        return (*self.read(i), {name: _string(v, key) for name, v in self.extra_values.items()})


def check_tar_end(tail, offset):
    """Why the bytes ``tail`` at ``offset``, where tarfile stopped listing a tar (its first
    BLOCKSIZE bytes after the last member), are not the end-of-archive marker; None if they are.
    tarfile ends a listing quietly at the end of the file, at a short header or at an unreadable
    one, so a tar cut at a block boundary or inside a header would lose its later samples unseen
    (GNU tar says "Unexpected EOF"). Like GNU tar, one zero block (it writes two) is enough."""
    if not tail:
        return f"it ends at byte {offset}, after a member, without the end-of-archive marker: cut short?"
    if len(tail) < tarfile.BLOCKSIZE:
        return f"it ends {len(tail)} bytes into the header at byte {offset}: cut short?"
    if tail.count(0) != len(tail):
        return f"an unreadable header at byte {offset}"
    return None


def load_captions(path, key_col="key", caption_col="caption"):
    """{key: caption} from a JSONL, CSV or TSV captions file."""
    return load_columns(path, key_col, (caption_col,))[0][caption_col]


class DuplicateMember(ValueError):
    """A JSON object that names a member twice (json.loads would keep the last one silently)."""

    def __init__(self, name):
        super().__init__(f"member {name!r} twice in one JSON object")
        self.name = name


def _unique_members(pairs):
    """json's object_pairs_hook: a dict, or DuplicateMember when a name repeats."""
    obj = {}
    for name, value in pairs:
        if name in obj:
            raise DuplicateMember(name)
        obj[name] = value
    return obj


def loads_json(text):
    """json.loads that refuses an object naming a member twice: {"key": 3, "caption": "a",
    "caption": "b"} is a mistake to report, not a caption to pick at random."""
    return json.loads(text, object_pairs_hook=_unique_members)


def load_columns(path, key_col="key", cols=("caption",)):
    """({column: {key: value}}, [every key, in file order]) from a JSONL, CSV or TSV captions file
    (rows without a value in a column are absent from its dict), in one pass. The one reader of
    captions files: each key must be on one row (two caption.py outputs concatenated, a
    re-captioned subset appended: which caption wins would be an accident of file order), each
    JSON row must name each member once and a CSV/TSV header each column once; else a DataError
    naming the file, the count and the first repeats."""
    fmt = manifest_format(path)
    out = {c: {} for c in cols}
    keys, repeats = {}, []  # key -> first row; (key, first row, row again)
    with open(path, "rb") as f:
        if fmt == "jsonl":
            rows, parse = (line for line in f if line.strip()), loads_json
        else:
            rows, parse = csv.DictReader(io.TextIOWrapper(f, "utf-8", newline=""), **_csv_kwargs(fmt)), None
        n = 0
        try:
            if fmt != "jsonl":
                _check_header(path, rows.fieldnames or [], (key_col, *cols))
            for n, row in enumerate(rows):
                row = parse(row) if parse else row
                if not isinstance(row, dict) or key_col not in row:
                    raise DataError(f"{path} row {n}: no key column {key_col!r} (set --key-col)")
                key = str(row[key_col])
                if key in keys:
                    repeats.append((key, keys[key], n))
                    continue
                keys[key] = n
                for c in cols:
                    if row.get(c) is not None:
                        # a value of the wrong type rejects its sample (in read), never str() of it
                        out[c][key] = row[c]
        except DuplicateMember as e:
            raise DataError(f"{path} row {n}: {e} (json would keep the last value silently): write "
                            "each member once") from None
        except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
            raise DataError(f"{path}: unreadable captions file ({e})") from None
        except RecursionError:
            raise DataError(f"{path}: unreadable captions file (a JSON line nested too deeply)") from None
    if repeats:
        first = ", ".join(f"{k!r} at rows {a} and {b}" for k, a, b in repeats[:3])
        raise DataError(f"{path}: {len(repeats)} row(s) repeat a key of an earlier row (first: {first}); "
                        "a captions file gives each key once (two caption.py outputs concatenated? a "
                        "re-captioned subset appended?): keep one row per key")
    return out, list(keys)


def _check_header(path, names, used):
    """A CSV/TSV header naming a column of ``used`` twice: the reader would keep one of the two
    cells silently (another column twice is no concern of ours)."""
    dup = first_duplicate((name, None) for name in names if name in used)
    if dup:
        raise DataError(f"{path}: the header names column {dup[0]!r} twice; name each column once")


def refuse_foreign_keys(path, foreign, total, what):
    """A captions file with keys its input does not have was made for another input (every
    data2rec output numbers its records from 0, so another set's keys mostly match ours): a
    DataError with the count and the first keys. ``foreign``: those keys, in file order."""
    if foreign:
        raise DataError(f"{path}: {len(foreign)} of its {total} keys are not in {what} (first keys: "
                        f"{foreign[:5]}): captions made for another input? use the captions of this one")


def captions_sidecar(captions_path):
    """(path, summary) of the captions.json that caption.py wrote beside ``captions_path``
    describing that file (its ``outputs.captions`` names it), else (None, None)."""
    path = os.path.join(os.path.dirname(os.path.abspath(captions_path)), "captions.json")
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None, None
    if (not isinstance(summary, dict) or summary.get("tool") != "alip caption"
            or (summary.get("outputs") or {}).get("captions") != os.path.basename(captions_path)):
        return None, None
    return path, summary


def input_identity(inputs, rows):
    """What names an input across copies and moves: (kind, rows, file names, bytes) from a
    ``describe()`` dict (caption.py's sidecar and data2rec's manifest.json record them), or None."""
    if not isinstance(inputs, dict):
        return None
    for kind, files, size in (("rec", "shards", "bytes"), ("wds", "tars", "tar_bytes"),
                              ("manifest", "manifest", "bytes")):
        if kind in inputs:
            names = inputs.get(files)
            names = [names] if isinstance(names, str) else names or []
            return kind, rows, [os.path.basename(str(n)) for n in names], inputs.get(size)
    return None


def check_captions_origin(captions_path, candidates):
    """Refuse a captions file whose caption.py sidecar (``captions_sidecar``) names another input
    than this run's. ``candidates``: input_identity tuples this input is known by (its own; for
    shards also the input data2rec made them from); a sidecar input of a kind no candidate has
    cannot be compared and passes (the key checks still apply)."""
    path, summary = captions_sidecar(captions_path)
    theirs = summary and input_identity(summary.get("inputs"), summary.get("rows_in"))
    same_kind = [c for c in candidates if theirs and c and c[0] == theirs[0]]
    if not same_kind or theirs in same_kind:
        return
    kind, rows, names, size = theirs
    ours = same_kind[0]
    raise DataError(f"{captions_path}: made for another input: {path} says {kind} {_few(names)}, "
                    f"{rows} rows, {size} bytes; this input is {_few(ours[2])}, {ours[1]} rows, "
                    f"{ours[3]} bytes: use the captions of this input")


def _few(names):
    return f"{names[0]} .. {names[-1]} ({len(names)} files)" if len(names) > 2 else " + ".join(names) or "?"


# ----------------------------------------------------------------------------------------------
# per-row work (runs in the worker processes)

def read_source(src):
    """Bytes of an image source: ("file", path) or ("tar", path, offset, size); Reject on failure."""
    if src[0] == "file":
        try:
            with open(src[1], "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise Reject(f"missing image file {src[1]}") from None
        except OSError as e:
            raise Reject(f"unreadable image file {src[1]}: {e.strerror}") from None
        except ValueError as e:  # a NUL byte in the path
            raise Reject(f"bad image path {src[1]!r}: {e}") from None
    _, tar, offset, size = src
    with open(tar, "rb") as f:
        f.seek(offset)
        return f.read(size)


def encode_image(data, quality=95, max_size=0, copy_jpeg=False):
    """JPEG bytes for a record: RGB, EXIF orientation applied, shorter side <= max_size (0: any).

    With ``copy_jpeg`` a baseline-RGB JPEG already within bounds and upright is stored as is.
    Anything Pillow cannot fully decode raises Reject.
    """
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        w, h = img.size
        too_big = bool(max_size) and min(w, h) > max_size
        orientation = img.getexif().get(0x0112, 1) if fmt == "JPEG" else 1
        if copy_jpeg and fmt == "JPEG" and img.mode == "RGB" and not too_big and orientation == 1:
            img.load()  # decodes fully: a truncated JPEG is rejected, not copied
            return bytes(data)
        if too_big:
            scale = max_size / min(w, h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            if fmt == "JPEG":
                img.draft("RGB", size)  # DCT-domain downscale, never below `size`
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
            img = _gray16_to_8(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        if too_big:
            w, h = img.size
            scale = max_size / min(w, h)
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=quality)
        return out.getvalue()
    except Reject:
        raise
    except Exception as e:  # Pillow raises many types for bad files
        raise undecodable(e) from None


def undecodable(e):
    """The Reject for an image Pillow failed on, worded once for data2rec and caption.py (its
    ``decode_image``), so their reasons for the same file agree; no object reprs ("<_io.BytesIO
    object at 0x7f...>"): rejects.jsonl and failed.jsonl are the same every run."""
    if isinstance(e, UnidentifiedImageError):
        return Reject("undecodable image: not an image format Pillow knows")
    return Reject(f"undecodable image: {type(e).__name__}: {re.sub(' at 0x[0-9a-fA-F]+', '', str(e))}")


def _gray16_to_8(img):
    """16-bit grayscale (PNG/TIFF modes I;16*, I) to 8-bit L by scaling 0..65535 to 0..255
    (Pillow's own convert clips at 255, which leaves such images almost white)."""
    a = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")


_WORKER = {}


def _init_worker(tokenizer_name, quality, max_size, copy_jpeg, widths=None, parent=None):
    """Per-process state of process_row; ``parent``: the run's pid, for a pool worker, which must
    end with it (``alip.procs.die_with_parent``)."""
    if parent is not None:
        procs.die_with_parent(parent)
    import open_clip

    import alip  # noqa: F401  (registers the ALIP-* model configs)
    _WORKER.update(tokenizer=open_clip.get_tokenizer(tokenizer_name), quality=quality,
                   max_size=max_size, copy_jpeg=copy_jpeg, widths=dict(widths or {}))


def tokenize_at(tokenizer, texts, width):
    """(int64 [n, width] token rows, bool [n]: the text was cut at ``width``). The texts are
    tokenized one token wider: one whose row there still ends in padding fits, and its row is
    that row's first ``width`` tokens; the others (cut: open_clip's tokenizers cut the text and
    end the row with the end-of-text token) are tokenized again at ``width``."""
    wider = tokenizer(texts, context_length=width + 1).numpy()
    pad = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None)  # HF; CLIP's BPE pads with 0
    cut = wider[:, width] != (0 if pad is None else pad)
    rows = np.ascontiguousarray(wider[:, :width])
    if cut.any():
        rows[cut] = tokenizer([t for t, c in zip(texts, cut) if c], context_length=width).numpy()
    return rows, cut


def process_row(job):
    """job = (row, key, source, texts) with texts ((field, value), ...) in label order, a value
    being the text to tokenize, None (missing) or, for a ("rec", path, j) source, an int: the row
    of that input record's tokens to copy -> (row, key, payload, None, cut) or (row, key, None,
    reason, ()); ``cut``: the fields whose text was cut at the field's width."""
    row, key, src, texts = job
    try:
        texts = dict(texts)
        for name in ("raw", "caption", *texts):  # today's reasons first: "empty text", "empty caption"
            if texts[name] is None:
                raise Reject(f"missing {name} (no value in column {name!r})")
            if isinstance(texts[name], str) and is_blank(texts[name]):
                raise Reject("empty text" if name == "raw" else f"empty {name}")
        record = _read_record(src) if src[0] == "rec" else None
        data = record.jpeg if record is not None else read_source(src)
        jpeg = encode_image(data, _WORKER["quality"], _WORKER["max_size"], _WORKER["copy_jpeg"])
        widths = {name: _WORKER["widths"].get(name, CONTEXT_LENGTH) for name in texts}
        made, cut = {}, []
        for width in dict.fromkeys(widths.values()):  # one tokenizer call per width
            names = [f for f, v in texts.items() if widths[f] == width and isinstance(v, str)]
            if names:
                rows, was_cut = tokenize_at(_WORKER["tokenizer"], [texts[f] for f in names], width)
                made.update(zip(names, rows))
                cut += [f for f, c in zip(names, was_cut) if c]
        tokens = [made[f] if isinstance(v, str) else record.tokens[v] for f, v in texts.items()]
        return row, key, pack_fields(key, tokens, jpeg), None, tuple(f for f in texts if f in cut)
    except Reject as e:
        return row, key, None, str(e), ()


def _read_record(src):
    """The Record at ("rec", rec_path, j), through this worker's reader of that shard."""
    from .recordio import RecordIOError, RecordReader
    from .fields import shards_widths
    _, path, j = src
    readers = _WORKER.setdefault("readers", {})
    try:
        if path not in readers:
            readers[path] = RecordReader(path, check=False, widths=shards_widths([path]))
        return readers[path][j]
    except RecordIOError as e:
        raise Reject(f"unreadable record: {e}") from None


# ----------------------------------------------------------------------------------------------
# the run

def check_text_fields(text_fields, extra=()):
    """``text_fields`` must hold raw and caption once each, other names being distinct identifiers
    that are exactly the source's extra columns ``extra``; else a DataError."""
    fields = list(text_fields)
    bad = [f for f in fields if not isinstance(f, str) or not f.isidentifier()]
    if bad:
        raise DataError(f"--text-fields: {bad[0]!r} is not a field name (letters, digits, _)")
    if len(set(fields)) != len(fields) or "raw" not in fields or "caption" not in fields:
        raise DataError(f"--text-fields {','.join(fields)}: needs raw and caption once each, "
                        "every field once (e.g. raw,caption,generated)")
    if [f for f in fields if f not in DEFAULT_FIELDS] != list(extra):
        raise DataError(f"--text-fields {','.join(fields)}: the source reads extra columns {list(extra)}")


def parse_text_fields(spec):
    """``raw,caption:256`` -> (("raw", "caption"), {"caption": 256}): the fields in order and
    the contexts given (``:N``, N >= 1); a DataError naming --text-fields otherwise."""
    fields, context = [], {}
    for item in str(spec).split(","):
        name, colon, width = item.strip().partition(":")
        name = name.strip()
        if colon:
            width = width.strip()
            if not width.isdigit() or int(width) < 1:
                raise DataError(f"--text-fields {spec}: {item.strip()!r}: the context after ':' must be a "
                                "whole number of tokens >= 1 (e.g. caption:256)")
            context[name] = int(width)
        fields.append(name)
    return tuple(fields), context


def field_widths(text_fields, context, default, fixed=None):
    """{field: width} of the label: ``context`` (the --text-fields ``:N``) where given, else
    ``fixed`` (fields copied from input shards keep their width), else ``default`` (the
    tokenizer's context). A ``:N`` on a copied field of another width is a DataError."""
    fixed = fixed or {}
    for f, n in context.items():
        if f in fixed and fixed[f] != n:
            raise DataError(f"--text-fields {f}:{n}: {f} is copied from the --rec shards as tokens "
                            f"{fixed[f]} wide (its text is not in them); drop the :{n}")
    return {f: context.get(f, fixed.get(f, default)) for f in text_fields}


def check_widths(tokenizer, widths):
    """DataError when a width exceeds what ``tokenizer`` (an open_clip tokenizer) can give: an HF
    tokenizer's ``model_max_length`` (CLIP's BPE has no limit)."""
    limit = getattr(getattr(tokenizer, "tokenizer", None), "model_max_length", None)
    if isinstance(limit, int) and limit < 10 ** 6:
        over = [f"{f}:{n}" for f, n in widths.items() if n > limit]
        if over:
            raise DataError(f"--text-fields {over[0]}: above the tokenizer's {limit} positions "
                            f"(model_max_length)")


def check_tokenizer(name):
    """DataError unless open_clip knows ``name`` (a built-in or ALIP model config, an hf-hub: or an
    existing local-dir: name); returns its context length (None for hf-hub: known to the hub
    only): open_clip.get_tokenizer itself only warns and falls back to a plain SimpleTokenizer
    for an unknown name, which would label the shards with the wrong tokens."""
    import open_clip

    import alip  # noqa: F401  (registers the ALIP-* model configs)
    schema, ident = open_clip.factory.parse_model_name(name)
    if schema == "hf-hub":
        return None  # known only to the hub (network); get_tokenizer says so if it is not there
    if schema == "local-dir":
        path = os.path.join(ident, "open_clip_config.json")
        try:
            with open(path) as f:
                config = json.load(f).get("model_cfg", {})
        except (OSError, ValueError, AttributeError) as e:
            raise DataError(f"--tokenizer {name!r}: {path}: no readable open_clip config ({e})") from None
    else:
        config = open_clip.get_model_config(ident) if ident else None
        if config is None:
            raise DataError(f"--tokenizer {name!r}: not an open_clip model name (see open_clip.list_models(); "
                            f"default {DEFAULT_TOKENIZER})")
    return (config.get("text_cfg") or {}).get("context_length", CONTEXT_LENGTH)


def shard_name(k):
    return f"train-{k:05d}"


def plan_order(n, shuffle, seed):
    return np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)


def _jobs(source, keys, caption_fallback, stats, rejects, text_fields=DEFAULT_FIELDS):
    """Jobs for the worker pool; rows that fail to parse go straight to rejects."""
    for row in keys:
        row = int(row)
        key = source.record_key(row) if hasattr(source, "record_key") else row
        try:
            src, text, caption, extras = source.read_fields(row)
        except Reject as e:
            rejects.append({"key": key, "reason": str(e), **source.where(row)})
            continue
        if caption is None and caption_fallback != "raw":
            raise DataError(f"{source.where(row)}: no caption; pass --caption-fallback raw "
                            "to use the raw text instead")
        if caption is None or (caption_fallback == "raw" and isinstance(caption, str) and is_blank(caption)):
            caption = text
            stats["caption_fallbacks"] += 1
        texts = {"raw": text, "caption": caption, **extras}
        yield row, key, src, tuple((f, texts[f]) for f in text_fields)


def run(source, output_dir, shard_size=10000, workers=1, quality=95, max_size=0, copy_jpeg=False,
        shuffle=True, seed=0, caption_fallback=None, tokenizer=DEFAULT_TOKENIZER, command=None,
        progress=True, part=(0, 1), text_fields=DEFAULT_FIELDS, text_context=None):
    """Write (or complete) the shards in ``output_dir``; returns the summary dict (manifest.json).

    ``text_fields``: the label's fields in order, ``raw`` and ``caption`` among them; any other
    name is an extra field the source reads (its ``extra`` columns). ``text_context``: {field:
    width} for the fields given one (``caption:256``); the others get the tokenizer's context
    (a --rec source's copied fields: their width in the input shards).

    ``part=(i, n)`` builds only shards k with k % n == i, so n machines can share one output dir
    on a shared file system; whichever run finds every shard done writes manifest.json and
    rejects.jsonl, the others return None."""
    check_tokenizer(tokenizer)
    try:
        os.makedirs(output_dir, exist_ok=True)
        lock = _lock_output_dir(output_dir, part)
    except OSError as e:
        raise DataError(f"{e.filename or output_dir}: cannot create or lock the output dir ({e.strerror})") from None
    try:
        return _run(source, output_dir, shard_size, workers, quality, max_size, copy_jpeg, shuffle, seed,
                    caption_fallback, tokenizer, command, progress, part, tuple(text_fields),
                    dict(text_context or {}))
    except OSError as e:
        raise DataError(f"{e.filename or output_dir}: {e.strerror or e}") from None
    finally:
        if lock is not None:
            procs.release(lock)  # releases the flock (so does the process's death)


def _lock_output_dir(output_dir, part):
    """An exclusive lock on OUTPUT/.data2rec[.part-I-of-N].lock, held for the whole run: a second
    run into the same dir (and part) stops with an error instead of writing the same files. The
    pool's workers never hold it and die with the run (``alip.procs``), and a lock left held by a
    run that is gone is taken over, so rerunning the same command is always the recovery."""
    name = ".data2rec.lock" if part == (0, 1) else f".data2rec.part-{part[0]}-of-{part[1]}.lock"
    path = os.path.join(output_dir, name)
    try:
        return procs.acquire(path, "data2rec")
    except procs.Held as e:
        raise DataError(f"{path}: another data2rec run ({e.holder}) is writing into {output_dir}; "
                        "wait for it to finish, or use another --output-dir") from None
    except procs.NoLocking as e:
        print(f"data2rec: warning: {path}: no file locking here ({e.reason}); make sure no other run "
              "writes into this dir", file=sys.stderr)
        return None


def _run(source, output_dir, shard_size, workers, quality, max_size, copy_jpeg, shuffle, seed,
         caption_fallback, tokenizer, command, progress, part, text_fields, text_context):
    import open_clip
    from tqdm import tqdm

    import alip  # noqa: F401  (registers the ALIP-* model configs)

    check_text_fields(text_fields, getattr(source, "extra", ()))
    unknown = [f for f in text_context if f not in text_fields]
    if unknown:
        raise DataError(f"--text-fields: {unknown[0]!r} is given a context but is not a field")
    tok = open_clip.get_tokenizer(tokenizer)
    widths = field_widths(text_fields, text_context, int(tok.context_length),
                          getattr(source, "copied_widths", None))
    check_widths(tok, widths)

    n = len(source)
    flags = dict(shard_size=shard_size, quality=quality, max_size=max_size, copy_jpeg=copy_jpeg,
                 shuffle=shuffle, seed=seed, caption_fallback=caption_fallback, tokenizer=tokenizer)
    if text_fields != DEFAULT_FIELDS:  # only then: an output dir of an older version still resumes
        flags["text_fields"] = list(text_fields)
    if set(widths.values()) != {CONTEXT_LENGTH}:  # likewise: 77 each is what every older run wrote
        flags["text_context"] = widths
    plan = {"tool_version": TOOL_VERSION, "rows": n, "inputs": source.describe(), "flags": flags}
    plan_path = os.path.join(output_dir, "plan.json")
    plan_text = json.dumps(plan, indent=1, sort_keys=True)
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            old = f.read()
        if old != plan_text:
            raise DataError(f"{output_dir} holds shards of a different input or flags ({plan_path}); "
                            "use a new --output-dir or delete that one")
    else:
        tmp = f"{plan_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(plan_text)
        os.replace(tmp, plan_path)

    order = plan_order(n, shuffle, seed)
    num_shards = max(1, math.ceil(n / shard_size))
    todo = [k for k in range(part[0], num_shards, part[1])
            if not os.path.exists(os.path.join(output_dir, shard_name(k) + ".done.json"))]
    todo_rows = sum(len(order[k * shard_size:(k + 1) * shard_size]) for k in todo)
    bar = tqdm(total=todo_rows, unit="rec", desc="data2rec", disable=not progress, smoothing=0.1)
    init = (tokenizer, quality, max_size, copy_jpeg, widths)
    pool = None
    if workers > 1:
        init += (os.getpid(),)  # the workers die with this process, never outlive it as orphans
        # not multiprocessing.Pool: it replaces a killed worker but never redoes its tasks, so the
        # run would wait forever; the executor raises BrokenProcessPool instead
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        pool = ProcessPoolExecutor(workers, mp.get_context("fork" if sys.platform == "linux" else "spawn"),
                                   initializer=_init_worker, initargs=init)
        imap = lambda jobs: pool.map(process_row, jobs, chunksize=4)  # noqa: E731
    else:
        _init_worker(*init)
        imap = lambda jobs: map(process_row, jobs)  # noqa: E731
    from concurrent.futures.process import BrokenProcessPool
    k = None
    try:
        for k in todo:
            try:
                _write_shard(output_dir, k, order[k * shard_size:(k + 1) * shard_size], source,
                             caption_fallback, imap, bar, text_fields)
            except OSError as e:  # full disk, read-only or vanished output dir
                where = e.filename or os.path.join(output_dir, shard_name(k) + ".rec.partial")
                raise DataError(f"{where}: cannot write shard {shard_name(k)} ({e.strerror or e})") from None
    except BrokenProcessPool:
        raise DataError(
            f"{os.path.join(output_dir, shard_name(k))}: a worker process died while this shard was "
            "being built (killed by a signal: the OOM killer? see dmesg); finished shards are kept; rerun "
            "the same command to build the rest (fewer --workers or a smaller --max-size use less memory)"
        ) from None
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if not all(os.path.exists(os.path.join(output_dir, shard_name(k) + ".done.json")) for k in range(num_shards)):
        return None  # other parts still running
    return _finish(output_dir, num_shards, n, plan, command)


def _write_shard(output_dir, k, keys, source, caption_fallback, imap, bar, text_fields=DEFAULT_FIELDS):
    base = os.path.join(output_dir, shard_name(k))
    stats = {"caption_fallbacks": 0, "text_cut": dict.fromkeys(text_fields, 0)}
    rejects = []
    with RecordWriter(base + ".rec.partial", base + ".idx.partial") as w:
        # the jobs are listed here, in this thread: Pool.imap would run a generator in its task
        # thread, racing the parse-time rejects it appends against the end of this loop
        jobs = list(_jobs(source, keys, caption_fallback, stats, rejects, text_fields))
        processed = 0
        for row, key, payload, reason, cut in imap(jobs):
            if payload is None:
                rejects.append({"key": key, "reason": reason, **source.where(row)})
            else:
                w.write_payload(key, payload)
                for f in cut:
                    stats["text_cut"][f] += 1
            processed += 1
            bar.update(1)
        bar.update(len(keys) - processed)  # rows rejected while parsing never reached the pool
        count, nbytes = w.count, w.bytes
    rejects.sort(key=lambda r: r["key"])
    if count + len(rejects) != len(keys):
        raise RuntimeError(f"{base}: {len(keys)} rows but {count} written + {len(rejects)} rejected")
    os.replace(base + ".idx.partial", base + ".idx")
    os.replace(base + ".rec.partial", base + ".rec")
    done = {"records": count, "bytes": nbytes, "rows": len(keys), "rejects": rejects,
            "caption_fallbacks": stats["caption_fallbacks"], "text_cut": stats["text_cut"]}
    with open(base + ".done.json.tmp", "w") as f:
        json.dump(done, f)
    os.replace(base + ".done.json.tmp", base + ".done.json")


def _finish(output_dir, num_shards, n, plan, command):
    shards, rejects = [], []
    fallbacks = 0
    fields = plan["flags"].get("text_fields", DEFAULT_FIELDS)
    widths = plan["flags"].get("text_context") or dict.fromkeys(fields, CONTEXT_LENGTH)
    cut = dict.fromkeys(fields, 0)
    for k in range(num_shards):
        with open(os.path.join(output_dir, shard_name(k) + ".done.json")) as f:
            done = json.load(f)
        shards.append({"rec": shard_name(k) + ".rec", "idx": shard_name(k) + ".idx",
                       "records": done["records"], "bytes": done["bytes"], "rows": done["rows"]})
        rejects.extend(done["rejects"])
        fallbacks += done["caption_fallbacks"]
        for f, c in (done.get("text_cut") or {}).items():  # a shard of an older run: not counted
            cut[f] = cut.get(f, 0) + c
    with open(os.path.join(output_dir, "rejects.jsonl"), "w") as f:
        for r in rejects:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    written = sum(s["records"] for s in shards)
    if written + len(rejects) != n:
        raise RuntimeError(f"{output_dir}: {n} rows in but {written} written + {len(rejects)} rejected")
    import alip
    spans = [sum(widths[f] for f in fields[:k]) for k in range(len(fields) + 1)]
    summary = {
        "tool": "alip data2rec", "tool_version": TOOL_VERSION, "alip_version": alip.__version__,
        "command": command, "inputs": plan["inputs"], "flags": plan["flags"],
        "tokenizer": f"open_clip.get_tokenizer({plan['flags']['tokenizer']!r}) (CLIP BPE, SOT 49406, EOT 49407, pad 0)",
        **({"context_length": widths[fields[0]]} if len(set(widths.values())) == 1 else {}),
        "text_fields": list(fields),
        "text_context": {f: widths[f] for f in fields},
        "label_layout": f"IRHeader flag={spans[-1]}, {spans[-1]} float32: " + " | ".join(
            f"{f} tokens [{spans[k]}:{spans[k + 1]}]" for k, f in enumerate(fields)),
        "text_cut": cut,
        "rows_in": n, "total_records": written, "rejected": len(rejects), "caption_fallbacks": fallbacks,
        "shards": shards,
    }
    with open(os.path.join(output_dir, "manifest.json.tmp"), "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(output_dir, "manifest.json.tmp"), os.path.join(output_dir, "manifest.json"))
    return summary
