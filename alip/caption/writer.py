"""The output directory: plan, chunk files, and the assembled captions.

Layout of ``OUT/``::

    plan.json              input + every setting that changes a caption; a rerun must match it
    chunks/chunk-NNNNNN.FP.json   rows [start, end): their captions and failures; complete or absent;
                           FP = the plan's fingerprint, so a chunk made with other settings is never reused
    captions.jsonl         {"key", "caption"} per captioned row, in input order (data2rec --captions)
    failed.jsonl           {"key", "reason", "source", row|sample|record} per row without a caption
    captioned.<ext>        manifest inputs only: the manifest with the caption column filled
    captions.json          the sidecar: captioner, generation settings, counts, command

Chunks are written to a temporary name, fsynced and renamed, so a killed run leaves each chunk
whole or absent; the assembled files depend only on the chunks, so the same input and settings
give the same bytes however the run was split, interrupted or spread over ranks and machines.
"""
import csv
import hashlib
import io
import json
import os

from alip.data.pack import DataError, _csv_kwargs

TOOL_VERSION = "2"  # 2: chunk files carry the plan fingerprint; plan.generation normalised


def _atomic_write(path, text, errors="strict"):
    """Write to a per-process temporary name, fsync, rename: whole or absent, whoever else writes it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8", errors=errors, newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_output_dir(output_dir):
    """Create OUT/chunks and check that a file can be written there (before any model is loaded)."""
    probe = os.path.join(output_dir, "chunks", f".probe.{os.getpid()}.tmp")
    try:
        os.makedirs(os.path.join(output_dir, "chunks"), exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise DataError(f"--output-dir {output_dir}: cannot write there ({e.strerror}: {e.filename})") from None


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
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        diff = _differences(old, json.loads(text))
        if diff:
            fields = "; ".join(f"{k}: {_short(a)} there, {_short(b)} now" for k, a, b in diff[:4])
            more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
            raise DataError(f"{output_dir} holds captions made with other settings or input ({fields}{more}; "
                            f"from {path}): use a new --output-dir, or delete the whole directory {output_dir} "
                            "to caption it anew with these settings")
    elif write:
        os.makedirs(os.path.join(output_dir, "chunks"), exist_ok=True)
        _atomic_write(path, text)


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
    _atomic_write(chunk_path(output_dir, c, fp), json.dumps(doc, ensure_ascii=False))


def read_chunks(output_dir, num_chunks, fp):
    captions, failed = [], []
    for c in range(num_chunks):
        path = chunk_path(output_dir, c, fp)
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("plan") != fp:
            raise DataError(f"{path}: made under plan {doc.get('plan')}, not {fp}")
        captions.extend(doc["captions"])
        failed.extend(doc["failed"])
    return captions, failed


def _jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def assemble(output_dir, num_chunks, n, source, plan, command, recorded=None):
    """Write captions.jsonl, failed.jsonl, captioned.<ext> (manifests) and captions.json
    (``recorded``: entries that replace the plan's there: the loaded captioner, every setting)."""
    captions, failed = read_chunks(output_dir, num_chunks, fingerprint(plan))
    if len(captions) + len(failed) != n:
        raise RuntimeError(f"{output_dir}: {n} rows in but {len(captions)} captioned + {len(failed)} failed")
    _atomic_write(os.path.join(output_dir, "captions.jsonl"),
                  _jsonl({"key": k, "caption": cap} for _, k, cap in captions))
    _atomic_write(os.path.join(output_dir, "failed.jsonl"),
                  _jsonl({"key": k, "reason": reason, **where} for _, k, reason, where in failed))
    outputs = {"captions": "captions.jsonl", "failed": "failed.jsonl"}
    if source.kind == "manifest":
        outputs["manifest"] = write_captioned_manifest(output_dir, source, {r: cap for r, _, cap in captions})
    reasons = {}
    for _, _, reason, _ in failed:
        kind = " ".join(w for w in reason.split(":")[0].split() if os.sep not in w)  # no paths
        reasons[kind] = reasons.get(kind, 0) + 1
    import alip
    summary = {"tool": "alip caption", "tool_version": TOOL_VERSION, "alip_version": alip.__version__,
               "command": command, "inputs": plan["inputs"], **plan["settings"],
               **(recorded or {}), "plan_fingerprint": fingerprint(plan),
               "rows_in": n, "captioned": len(captions), "failed": len(failed),
               "failure_kinds": dict(sorted(reasons.items())), "outputs": outputs}
    _atomic_write(os.path.join(output_dir, "captions.json"), json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


def write_captioned_manifest(output_dir, source, caption_of_row):
    """A copy of the input manifest with the caption column set, row for row (data2rec --manifest).

    Rows without a caption keep their line but get caption null (JSONL) or "" (CSV/TSV), so
    data2rec stops (JSONL) or rejects them (CSV/TSV), or with ``--caption-fallback raw`` uses the
    raw text, counted. Rows caption.py could not parse are copied byte for byte.
    """
    ms = source.rows
    col = source.caption_col
    with open(ms.path, "rb") as f:
        data = f.read()
    bounds = list(map(int, ms.offsets)) + [len(data)]
    ext = os.path.splitext(ms.path)[1].lower()
    name = "captioned" + ext
    out = io.StringIO(newline="")
    if ms.fmt == "jsonl":
        for i in range(len(ms)):
            out.write(_jsonl_row(data[bounds[i]:bounds[i + 1]], col, caption_of_row.get(i)))
    else:
        read_kw = _csv_kwargs(ms.fmt)  # exactly how data2rec reads it
        header = list(ms.header)
        if col not in header:
            header.append(col)
        write_row = _tsv_writer(out, ms.path) if ms.fmt == "tsv" else csv.writer(out, lineterminator="\n").writerow
        write_row(header)
        for i in range(len(ms)):
            raw = data[bounds[i]:bounds[i + 1]]
            row = next(csv.reader(io.StringIO(raw.decode("utf-8", "surrogateescape"), newline=""), **read_kw), None)
            if row is None or len(row) != len(ms.header):
                out.write(raw.decode("utf-8", "surrogateescape"))  # unparseable: as it was
                continue
            cells = dict(zip(ms.header, row), **{col: caption_of_row.get(i, "")})
            write_row([cells.get(h, "") for h in header])
    _atomic_write(os.path.join(output_dir, name), out.getvalue(), errors="surrogateescape")
    return name


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
