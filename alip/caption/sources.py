"""The rows to caption: a manifest, webdataset tars, or existing rec shards.

Reading is data2rec's own (``alip.data.pack`` / ``alip.data.recordio``), so caption.py sees the
same rows, in the same order, with the same reasons for the bad ones. Every source gives
``len(source)`` rows; ``source.key(i)`` is what the captions file is keyed by (data2rec's key:
the manifest row number, the tar sample name, the record key) and ``source.image_bytes(i)``
returns the encoded image or raises ``Reject`` with the reason.
"""
import os
import tempfile

from alip.data.pack import (DataError, ManifestSource, MissingColumn, Reject, WebDatasetSource,  # noqa: F401
                            first_duplicate, read_source)
from alip.data.rec_source import RecShards
from alip.data.recordio import RecordIOError


def _forget_handles_after_fork(obj, reset):
    """data2rec's sources open their files lazily and keep them; a DataLoader worker forked after
    the parent read must not share that handle (one file offset for all processes)."""
    if getattr(obj, "_pid", None) != os.getpid():
        reset()
        obj._pid = os.getpid()


def check_caption_col(image_col, text_col, caption_col):
    """Refuse a --caption-col that is a column this run reads: the captioned copy would carry the
    generated caption in place of every row's raw text (an img2dataset/CC3M manifest names its
    alt-text ``caption``: ``--text-col caption`` with the default --caption-col), and data2rec
    would then pack raw = caption; or in place of every image path."""
    for col, flag, what in ((text_col, "--text-col", "raw text"), (image_col, "--image-col", "image path")):
        if caption_col == col:
            raise DataError(f"--caption-col {caption_col!r} is also {flag}: the captioned manifest would "
                            f"hold the generated caption in place of each row's {what}; give the generated "
                            "captions a column of their own, e.g. --caption-col synthetic_caption")


class ManifestRows:
    """Rows of a JSONL/CSV/TSV manifest (data2rec's ``ManifestSource``); key = row number."""

    kind = "manifest"

    def __init__(self, path, image_root=".", image_col="image", text_col="text", caption_col="caption"):
        check_caption_col(image_col, text_col, caption_col)
        # caption_fallback="raw": the caption column may be absent, it is what we are making
        try:
            self.rows = ManifestSource(path, image_root, image_col, text_col, caption_col, caption_fallback="raw")
        except MissingColumn as e:
            if e.flag != "--text-col":
                raise
            # an image-only manifest is refused on purpose: captioned.<ext> is data2rec's input, and
            # data2rec packs each row's raw text with its caption (ALIP trains on both)
            raise DataError(f"{e}; captioning needs only images, but data2rec, which reads this run's "
                            "captioned manifest, stores each row's raw text next to its caption (ALIP "
                            "trains on both), so a manifest without raw text is refused here") from None
        self.path, self.caption_col = path, caption_col

    def __len__(self):
        return len(self.rows)

    def key(self, i):
        return i

    def image_bytes(self, i):
        _forget_handles_after_fork(self, lambda: setattr(self.rows, "_f", None))
        src, _, _ = self.rows.read(i)
        return read_source(src)

    def where(self, i):
        return self.rows.where(i)

    def describe(self):
        return self.rows.describe()


class TarRows:
    """img2dataset-style tars (data2rec's ``WebDatasetSource``); key = the sample name."""

    kind = "wds"

    def __init__(self, pattern):
        with tempfile.TemporaryDirectory() as d:  # WebDatasetSource wants a captions file: none yet
            empty = os.path.join(d, "none.jsonl")
            open(empty, "w").close()
            self.rows = WebDatasetSource(pattern, empty, caption_fallback="raw")
        self.pattern = pattern
        dup = first_duplicate((key, self.rows.tars[t]) for key, t, _ in self.rows.items)
        if dup:
            raise DataError(f"sample key {dup[0]!r} is in both {dup[1]} and {dup[2]}: captions are "
                            f"keyed by sample name, keys must be unique")

    def __len__(self):
        return len(self.rows)

    def key(self, i):
        return self.rows.items[i][0]

    def image_bytes(self, i):
        _forget_handles_after_fork(self, lambda: setattr(self.rows, "_files", {}))
        src, _, _ = self.rows.read(i)
        return read_source(src)

    def where(self, i):
        return self.rows.where(i)

    def describe(self):
        tars = self.rows.tars
        return {"wds": self.pattern, "tars": [os.path.abspath(t) for t in tars],
                "tar_bytes": sum(os.path.getsize(t) for t in tars)}


class RecRows(RecShards):
    """The images already packed in rec shards (``DIR`` or a glob of .rec); key = record key."""

    kind = "rec"

    def image_bytes(self, i):
        s, j = self.locate(i)
        try:
            return self.readers[s][j].jpeg
        except RecordIOError as e:
            raise Reject(str(e)) from None

