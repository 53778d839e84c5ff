"""What identifies a captioner's weights, so that a resumed run never mixes two models' captions.

plan.json (and so every chunk's fingerprint) records the weights a run captions with: for each
weights file (``--pretrained FILE``, the ``--backend clips`` model file) and each file of a
weights directory (an open_clip ``local-dir:``, a transformers/vLLM model directory), its size
and modification time in nanoseconds; for a hub model, the revision in the local hub cache. A
rerun whose weights differ is refused naming the file and what changed (``change``), rather than
captioning the rest of the rows with other weights under the same name.

Why size + mtime and not a content hash: a stat is ~20 us per file, while SHA-256 ran at
~0.9-1.0 GB/s here (page-cached, SHA-NI; 512 MiB in ~0.55 s): ~2.6 s for a 2.5 GB CoCa ViT-L/14,
~16 s for a 16 GB 7B VLM, paid by every process on every start, and bound by the disk or network
file system when the weights are not cached. Replacing a file (cp, mv, a download, a save) gives
it a new mtime, which is what make and rsync rely on too. Not caught: other weights put in place
with the old size and the same nanosecond mtime (``cp -p``/``rsync -a`` of a file that had
both). Refused although harmless: the same weights copied anew with a new mtime (a per-machine
copy made with plain ``cp`` for another ``--part``): copy weights with ``cp -p``/``rsync -a``,
which keep the mtime, or keep them on the shared file system.
"""
import datetime
import os


def file_identity(path):
    """[size, mtime_ns] of a file (the target of a symlink, as a hub cache holds them), or None
    if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def dir_identity(d):
    """{path: [size, mtime_ns]} of every file below ``d``. Hidden entries (``.git``, ``.cache``,
    ``.ipynb_checkpoints``) are skipped: no loader reads them, and git or a download tool rewrites
    them without touching the weights."""
    files = {}
    for root, dirs, names in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                path = os.path.join(root, name)
                files[path] = file_identity(path)
    return files


def hub_revision(repo, probe="config.json", cache_dir=None):
    """The commit of hub model ``repo`` in the local hub cache (what a load without network
    reads), or None if it is not cached: read from the cache only, never from the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(repo, probe, cache_dir=cache_dir)
    except Exception:  # not a hub id (a missing local path), or no huggingface_hub
        return None
    if not isinstance(path, str) or "/snapshots/" not in path:
        return None
    return path.split("/snapshots/")[1].split("/")[0]


def weights_identity(backend, model, pretrained=""):
    """plan.json's record of the weights, from the flags: stat calls only, so caption.py takes it
    before the model loads (to check a rerun in seconds) and again after (a hub load may have
    downloaded a newer revision). None where the flags name the weights themselves (an open_clip
    tag: open_clip's registry fixes what it downloads)."""
    if backend == "open_clip":
        if model.startswith("local-dir:"):
            return {"files": dir_identity(model[len("local-dir:"):])}
        if model.startswith("hf-hub:"):
            repo = model[len("hf-hub:"):]
            return {"hub": repo, "revision": hub_revision(repo, "open_clip_config.json")}
        return {"files": {pretrained: file_identity(pretrained)}} if pretrained and os.path.isfile(pretrained) \
            else None
    if backend == "clips":
        return {"files": {model: file_identity(model)}}
    if backend in ("hf", "vllm"):
        if os.path.isdir(model):
            return {"files": dir_identity(model)}
        return {"hub": model, "revision": hub_revision(model)}
    return None


def _when(ns):
    return datetime.datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="microseconds")


def _file_change(path, old, new):
    if old is None:
        return f"{path} was added" if new is not None else f"{path} could not be read"
    if new is None:
        return f"{path} is gone or unreadable"
    parts = []
    if old[0] != new[0]:
        parts.append(f"size {old[0]} -> {new[0]} bytes")
    if old[1] != new[1]:
        parts.append(f"modified {_when(old[1])} -> {_when(new[1])}")
    return f"{path} changed ({', '.join(parts)})"


def change(old, new):
    """How the weights changed between two records, naming the first two files that changed
    (and how many more), or None if they did not."""
    if old == new:
        return None
    if not isinstance(old, dict) or not isinstance(new, dict) or set(old) != set(new):
        return f"the weights were recorded as {old}, they are {new} now"
    if "hub" in old:
        return f"hub model {new['hub']}: revision {old['revision']} then, {new['revision']} now"
    a, b = old["files"], new["files"]
    changed = [p for p in sorted(set(a) | set(b)) if a.get(p) != b.get(p)]
    more = f" and {len(changed) - 2} more file(s)" if len(changed) > 2 else ""
    return "; ".join(_file_change(p, a.get(p), b.get(p)) for p in changed[:2]) + more
