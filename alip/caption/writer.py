"""The output directory: plan, chunk files, and the assembled captions.

Layout of ``OUT/``::

    plan.json              input + every setting that changes a caption + what identifies the
                           weights (weights.py); a rerun must match it. Written once the model
                           has loaded: before, the directory is only checked, nothing is created
    chunks/chunk-NNNNNN.FP.json   rows [start, end): their captions and failures; complete or absent;
                           FP = the plan's fingerprint, so a chunk made with other settings is never reused
    captions.jsonl         {"key", "caption"} per captioned row, in input order (data2rec --captions)
    failed.jsonl           {"key", "reason", "source", row|sample|record} per row without a caption
    captioned.<ext>        manifest inputs only: the manifest with the caption column filled
    captions.json          the sidecar: captioner, generation settings, counts, command; written
                           last, with the plan's fingerprint: the outputs are complete
    .assemble.lock         flock'd by the one process that assembles

Chunks are written to a temporary name, fsynced and renamed, so a killed run leaves each chunk
whole or absent (the temporary files of a killed process are removed by the next assembly);
the assembled files depend only on the chunks, so the same input and settings give the same
bytes however the run was split, interrupted or spread over ranks and machines. The assembly
streams (one chunk and one manifest row in memory at a time). No output replaces an input: the
caption column is never one the run reads (``sources.check_caption_col``), nor an output the
input manifest (``check_spare_inputs``).
"""
import csv
import errno
import hashlib
import io
import json
import os
import re
import socket
import sys

from alip.atomic import temp_name, write_text
from alip.data.pack import DataError, _csv_kwargs

from . import weights

# 2: chunk files carry the plan fingerprint; plan.generation normalised. 3: the plan records what
# identifies the weights (weights.py), so a directory captioned before that is not resumed blind
TOOL_VERSION = "3"
OUTPUT_NAMES = ("plan.json", "captions.jsonl", "failed.jsonl", "captions.json")  # + captioned.<ext>


def check_output_dir(output_dir):
    """Refuse an --output-dir that cannot be written, before any model is loaded, creating
    nothing: a model that then fails to load leaves no directory behind (it left an empty
    chunks/). An existing directory is probed with a file; a new one needs its nearest existing
    parent to be a directory this process may write in (``plan.json`` creates it, after the load)."""
    d = os.path.abspath(output_dir)
    while not os.path.lexists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise DataError(f"--output-dir {output_dir}: cannot write there ({d} is not a directory)")
    if d != os.path.abspath(output_dir):
        if not os.access(d, os.W_OK | os.X_OK):
            raise DataError(f"--output-dir {output_dir}: cannot write there (no permission to create it in {d})")
        return
    probe = os.path.join(output_dir, f".probe.{os.getpid()}.tmp")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise DataError(f"--output-dir {output_dir}: cannot write there ({e.strerror}: {e.filename})") from None


def output_names(source):
    """The files this run writes in OUT (chunks/ aside)."""
    names = list(OUTPUT_NAMES)
    if source.kind == "manifest":
        names.append("captioned" + os.path.splitext(source.rows.path)[1].lower())
    return names


def check_spare_inputs(output_dir, source):
    """Refuse an --output-dir where an output would replace the input manifest (``--manifest
    caps/captioned.jsonl --output-dir caps``): the assembly renames its copy over the file it
    is reading. Tars (*.tar) and shards (*.rec) never share an output's name."""
    if source.kind != "manifest":
        return
    manifest = os.path.realpath(source.rows.path)
    for name in output_names(source):
        if os.path.realpath(os.path.join(output_dir, name)) == manifest:
            raise DataError(f"--output-dir {output_dir}: its {name} would replace the input manifest "
                            f"{source.rows.path}; give another --output-dir")


def fingerprint(plan):
    """16 hex digits of the plan's SHA-256: the name tag of the chunks made under this plan."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


_ABSENT = object()


def _differences(old, new, prefix=""):
    """[(dotted field, old value, new value)] where two plans differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{prefix}{k}.")]
    return [] if old == new else [(prefix[:-1], old, new)]


def _short(v):
    text = "(absent)" if v is _ABSENT else json.dumps(v, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def check_plan(output_dir, plan, write=True):
    """Refuse if the directory holds another input's or settings' captions, naming the fields that
    differ; else write plan.json (``write=False``: only check, as caption.py does before loading
    the model)."""
    path = os.path.join(output_dir, "plan.json")
    text = json.dumps(plan, indent=1, sort_keys=True)
    exists = os.path.exists(path)
    if exists:
        _refuse_other_plan(output_dir, path, json.loads(text))
    if write:  # after the model has loaded: the output dir's first trace (check_output_dir creates nothing)
        os.makedirs(os.path.join(output_dir, "chunks"), exist_ok=True)
        if not exists:
            write_text(path, text)


def _refuse_other_plan(output_dir, path, new):
    """Raise DataError naming what differs between plan.json at ``path`` and the plan ``new``:
    the weights alone (``weights.change``: which file, how), or the fields."""
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except ValueError as e:
        raise DataError(f"{path}: not a readable plan ({e}): delete the whole directory {output_dir} to "
                        "caption anew, or use a new --output-dir") from None
    diff = _differences(old, new)
    if diff and all(k.startswith("settings.captioner.weights") for k, _, _ in diff):
        what = weights.change(old["settings"]["captioner"].get("weights"), new["settings"]["captioner"]["weights"])
        raise DataError(f"{output_dir} holds captions made with other weights: {what} since they were "
                        f"made (from {path}); resuming would mix two captioners' captions under one name. "
                        f"Put those weights back to finish that run, or caption anew with these: a new "
                        f"--output-dir, or delete the whole directory {output_dir}")
    if diff:
        fields = "; ".join(f"{k}: {_short(a)} there, {_short(b)} now" for k, a, b in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise DataError(f"{output_dir} holds captions made with other settings or input ({fields}{more}; "
                        f"from {path}): use a new --output-dir, or delete the whole directory {output_dir} "
                        "to caption it anew with these settings")


def chunk_path(output_dir, c, fp):
    return os.path.join(output_dir, "chunks", f"chunk-{c:06d}.{fp}.json")


def chunk_done(output_dir, c, fp):
    """Chunk c is written under the plan with fingerprint fp (a chunk of other settings is not)."""
    return os.path.exists(chunk_path(output_dir, c, fp))


def write_chunk(output_dir, c, fp, start, end, captions, failed):
    """captions: [(row, key, caption)], failed: [(row, key, reason, where)], rows start..end-1 each once."""
    rows = sorted([r for r, _, _ in captions] + [r for r, *_ in failed])
    if rows != list(range(start, end)):
        raise RuntimeError(f"chunk {c}: rows {start}..{end - 1} but got {len(rows)} results")
    doc = {"plan": fp, "start": start, "end": end,
           "captions": sorted([r, k, cap] for r, k, cap in captions),
           "failed": sorted(([r, k, reason, where] for r, k, reason, where in failed), key=lambda x: x[0])}
    write_text(chunk_path(output_dir, c, fp), json.dumps(doc, ensure_ascii=False))


def iter_chunks(output_dir, num_chunks, fp):
    """(start, end, captions, failed) of each chunk in order, read one at a time (a generator: the
    assembly holds one chunk, never the whole output)."""
    expect = 0
    for c in range(num_chunks):
        path = chunk_path(output_dir, c, fp)
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("plan") != fp or doc["start"] != expect:
            raise DataError(f"{path}: not chunk {c} of plan {fp} (plan {doc.get('plan')}, rows from {doc['start']})")
        expect = doc["end"]
        yield doc["start"], doc["end"], doc["captions"], doc["failed"]


def _jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_summary(output_dir, plan):
    """captions.json if the outputs are assembled for this plan (every output present), else None."""
    try:
        with open(os.path.join(output_dir, "captions.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("plan_fingerprint") != fingerprint(plan):
        return None
    names = summary.get("outputs", {}).values()
    return summary if all(os.path.exists(os.path.join(output_dir, n)) for n in names) else None


def assemble_once(output_dir, num_chunks, n, source, plan, command, recorded=None):
    """``assemble`` by one process only: the one that takes OUT/.assemble.lock (an flock, released
    when the process ends however it ends). Returns the summary, or None when another process holds
    the lock (it is assembling). Outputs already assembled for this plan are not written again:
    their summary is returned. Where the file system has no locks, every process that gets here
    assembles (the same bytes, each file renamed into place whole)."""
    import fcntl

    path = os.path.join(output_dir, ".assemble.lock")
    lock = open(path, "a+")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return None
            print(f"caption: warning: {path}: no file locking here ({e.strerror}); every process that finds "
                  "all chunks written assembles (the same bytes)", file=sys.stderr)
        lock.seek(0)
        lock.truncate()
        lock.write(f"{socket.gethostname()} {os.getpid()}\n")
        lock.flush()
        done = read_summary(output_dir, plan)
        if done is not None:
            return done
        return assemble(output_dir, num_chunks, n, source, plan, command, recorded)
    finally:
        lock.close()


# a temporary file of ours (alip.atomic.temp_name: NAME.HOST.PID.tmp; a host name may hold dots)
_TEMP_FILE = re.compile(r"(?:plan\.json|captions\.jsonl|failed\.jsonl|captions\.json|captioned\.\w+"
                        r"|chunk-\d+\.\w+\.json)\.(?P<host>.+)\.(?P<pid>\d+)\.tmp")


def _writer_gone(name):
    """``name`` is one of our temporary files whose writer is no longer running: this host's
    process PID is gone, or another host wrote it (that host's writer cannot be asked;
    ``remove_leftovers`` says why it cannot be writing now)."""
    m = _TEMP_FILE.fullmatch(name)
    if m is None:
        return False
    if m["host"] != socket.gethostname():
        return True
    try:
        os.kill(int(m["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False


def remove_leftovers(output_dir):
    """Remove the temporary files a killed process left in OUT and OUT/chunks (a kill during the
    assembly left ``captions.json.HOST.PID.tmp`` and the other outputs' beside them). Called by
    the process holding the assembly lock once every chunk is written: the outputs are written
    only under that lock, chunks only until they are all done, and plan.json only where there is
    none, so no temporary file of another host is being written. The probe file and the files of
    this host's live processes are left alone. (Where the file system has no locks, processes on
    two hosts may assemble at once; one may then remove the other's temporary file, whose rename
    fails with an error that says to rerun: the outputs are the same bytes whoever writes them.)"""
    for d in (output_dir, os.path.join(output_dir, "chunks")):
        for name in os.listdir(d):
            if _writer_gone(name):
                try:
                    os.remove(os.path.join(d, name))
                except FileNotFoundError:
                    pass


def assemble(output_dir, num_chunks, n, source, plan, command, recorded=None):
    """Write captions.jsonl, failed.jsonl, captioned.<ext> (manifests) and, last, captions.json
    (``recorded``: entries that replace the plan's there: the loaded captioner, every setting).

    Streams: the chunks and the manifest are read in order and rows written as they come, so
    memory does not grow with the number of rows. Each file is written to a temporary name and
    renamed into place once all are complete; on any error the temporary files are removed (the
    chunks are never touched)."""
    fp = fingerprint(plan)
    remove_leftovers(output_dir)  # of an assembly that was killed
    outputs = {"captions": "captions.jsonl", "failed": "failed.jsonl"}
    manifest = source.kind == "manifest"
    if manifest:
        outputs["manifest"] = "captioned" + os.path.splitext(source.rows.path)[1].lower()
    tmps = {k: temp_name(os.path.join(output_dir, name)) for k, name in outputs.items()}
    files, copy = {}, None
    try:
        for k, tmp in tmps.items():
            files[k] = open(tmp, "w", encoding="utf-8", newline="",
                            errors="surrogateescape" if k == "manifest" else "strict")
        copy = _CaptionedManifest(source, files["manifest"]) if manifest else None
        captioned = failed = 0
        reasons = {}
        for start, end, caps, fails in iter_chunks(output_dir, num_chunks, fp):
            files["captions"].write(_jsonl({"key": k, "caption": cap} for _, k, cap in caps))
            files["failed"].write(_jsonl({"key": k, "reason": reason, **where} for _, k, reason, where in fails))
            captioned, failed = captioned + len(caps), failed + len(fails)
            for _, _, reason, _ in fails:
                kind = " ".join(w for w in reason.split(":")[0].split() if os.sep not in w)  # no paths
                reasons[kind] = reasons.get(kind, 0) + 1
            if copy is not None:
                copy.rows(start, end, {r: cap for r, _, cap in caps})
        if captioned + failed != n:
            raise RuntimeError(f"{output_dir}: {n} rows in but {captioned} captioned + {failed} failed")
        if copy is not None:
            copy.close()
        for k, f in files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for k, name in outputs.items():
            os.replace(tmps[k], os.path.join(output_dir, name))
    except BaseException:
        for f in [*files.values(), *([copy] if copy is not None else [])]:
            f.close()
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    import alip
    summary = {"tool": "alip caption", "tool_version": TOOL_VERSION, "alip_version": alip.__version__,
               "command": command, "inputs": plan["inputs"], **plan["settings"],
               **(recorded or {}), "plan_fingerprint": fp,
               "rows_in": n, "captioned": captioned, "failed": failed,
               "failure_kinds": dict(sorted(reasons.items())), "outputs": outputs}
    write_text(os.path.join(output_dir, "captions.json"), json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


def note_lengths(output_dir, summary, tokenizer, context=0):
    """``summary`` (captions.json) with the captions' lengths at ``context`` tokens
    (``alip.caption.lengths.captions_cut``), rewritten in place when they change."""
    from .lengths import captions_cut
    got = captions_cut(os.path.join(output_dir, summary["outputs"]["captions"]), tokenizer, context)
    if all(summary.get(k) == v for k, v in got.items()):
        return summary
    summary = {**summary, **got}
    write_text(os.path.join(output_dir, "captions.json"), json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


class _CaptionedManifest:
    """The input manifest with the caption column set, row for row (data2rec --manifest), written
    as the chunks come: ``rows(start, end, caption_of_row)`` reads those rows' bytes from the
    manifest in order (never the whole file) and writes their copies.

    Rows without a caption keep their line but get caption null (JSONL) or "" (CSV/TSV), so
    data2rec stops (JSONL) or rejects them (CSV/TSV), or with ``--caption-fallback raw`` uses the
    raw text, counted. Rows caption.py could not parse are copied byte for byte.
    """

    def __init__(self, source, out):
        self.ms, self.col, self.out = source.rows, source.caption_col, out
        self.f = open(self.ms.path, "rb")
        self.next = 0
        if len(self.ms):
            self.f.seek(int(self.ms.offsets[0]))
        if self.ms.fmt != "jsonl":
            self.read_kw = _csv_kwargs(self.ms.fmt)  # exactly how data2rec reads it
            self.header = list(self.ms.header)
            if self.col not in self.header:
                self.header.append(self.col)
            self.write_row = (_tsv_writer(out, self.ms.path) if self.ms.fmt == "tsv"
                              else csv.writer(out, lineterminator="\n").writerow)
            self.write_row(self.header)

    def _raw(self, i):
        """Row i's bytes: from its offset to the next row's (the last: to the end of the file)."""
        if i + 1 < len(self.ms):
            return self.f.read(int(self.ms.offsets[i + 1]) - int(self.ms.offsets[i]))
        return self.f.read()

    def rows(self, start, end, caption_of_row):
        if start != self.next:
            raise RuntimeError(f"manifest copy: rows from {start}, expected {self.next}")
        ms, col, out = self.ms, self.col, self.out
        for i in range(start, end):
            raw = self._raw(i)
            if ms.fmt == "jsonl":
                out.write(_jsonl_row(raw, col, caption_of_row.get(i)))
                continue
            row = next(csv.reader(io.StringIO(raw.decode("utf-8", "surrogateescape"), newline=""), **self.read_kw),
                       None)
            if row is None or len(row) != len(ms.header):
                out.write(raw.decode("utf-8", "surrogateescape"))  # unparseable: as it was
                continue
            cells = dict(zip(ms.header, row), **{col: caption_of_row.get(i, "")})
            self.write_row([cells.get(h, "") for h in self.header])
        self.next = end

    def close(self):
        self.f.close()


def _tsv_writer(out, path):
    """Rows as data2rec reads a TSV (tab separated, no quoting: a quote is a plain character), so
    every cell reads back as it was. A cell read from a TSV holds no tab or line break, nor does a
    caption (``run.clean``); anything else is refused rather than written as another row."""
    def write_row(cells):
        for cell in cells:
            if "\t" in cell or "\n" in cell or "\r" in cell:
                raise DataError(f"{path}: cannot write the cell {cell[:40]!r} to a TSV (a tab or line break)")
        out.write("\t".join(cells) + "\n")
    return write_row


def _jsonl_row(raw, col, caption):
    line = raw.rstrip(b"\r\n")
    try:
        obj = json.loads(line.decode("utf-8"))
        if not isinstance(obj, dict):
            raise ValueError
    except ValueError:
        return raw.decode("utf-8", "surrogateescape") if raw.endswith(b"\n") else raw.decode("utf-8", "surrogateescape") + "\n"
    obj[col] = caption
    return json.dumps(obj, ensure_ascii=False) + "\n"
