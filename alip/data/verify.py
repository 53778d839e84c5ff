"""Check ALIP RecordIO shards before training reads them: ``python data2rec.py verify SHARDS...``.

Per shard (``.rec`` + ``.idx``), every problem is reported as ``FILE: record key K: what``:

* framing: the .rec is walked from byte 0 record by record (magic, length, cflag, multi-part
  records, 4-byte padding) to its last byte;
* index: one .idx line per record, each offset the start of a record, no key or offset twice,
  no record missing from the .idx, the count equal to manifest.json's for the shard when the
  dir has one;
* payload: IRHeader flag W1+..+WN and that many float32 label values that are token ids
  (integers in 0..2**24), N the number of ``text_fields`` in manifest.json and Wk their widths
  (``text_context``; 77 each without it); without a manifest 77*N, the same N in every record
  of the shard;
* image: a JPEG that Pillow decodes to the last scan (at 1/8 scale in the DCT domain: all
  entropy-coded data is read, the inverse DCT is cheap), so a zeroed header, a truncated file
  or a non-JPEG is found here and never reaches DALI's decoder.

Shards run in parallel over a process pool. A shard that passes is recorded in a cache file
keyed by the absolute paths, sizes and mtimes of its .rec and .idx (``$ALIP_CACHE_DIR``, default
``~/.cache/alip``, sub-dir ``verified``), so the next run skips it; any change to either file
verifies it again.
"""
import argparse
import io
import json
import os
import struct
import sys

import numpy as np

from .cache import cache_path
from .fields import manifest_layout
from .recordio import CONTEXT_LENGTH, IR_FORMAT, IR_SIZE, MAGIC, MAX_PART, RecordIOError, label_fields, read_index
from .shards import rec_paths as shard_paths

VERSION = 2  # bump when the checks change: older cache entries are then ignored
MAX_LISTED = 20  # problems printed per shard by the CLI (all are counted)


def idx_path_of(rec_path):
    return os.path.splitext(str(rec_path))[0] + ".idx"


def manifest_count(rec_path):
    """(manifest.json path, records it lists for this shard), or (None, None) without one."""
    d, name = os.path.split(os.path.abspath(rec_path))
    path = os.path.join(d, "manifest.json")
    if not os.path.exists(path):
        return None, None
    try:
        with open(path) as f:
            shards = json.load(f).get("shards", [])
        counts = {s["rec"]: int(s["records"]) for s in shards}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise RecordIOError(f"{path}: not a data2rec manifest.json (no shards/rec/records)") from None
    return path, counts.get(name)


def check_index_count(rec_path, n_index):
    """Raise RecordIOError if the .idx has another number of entries than manifest.json lists."""
    manifest, want = manifest_count(rec_path)
    if want is not None and want != n_index:
        raise RecordIOError(
            f"{idx_path_of(rec_path)}: {n_index} index lines but {manifest} lists {want} records for "
            f"{os.path.basename(rec_path)}: the .idx lost or repeats lines (rebuild it, or run "
            "`python data2rec.py verify` on the shards)")


def _walk(f, size):
    """(start offset, payload or None, problem or None) for each record of the .rec, in order."""
    pos = 0
    while pos < size:
        start, parts = pos, []
        while True:
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                yield start, None, f"truncated .rec (record header cut off at offset {pos})"
                return
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                yield start, None, f"bad magic 0x{magic:08x} at offset {pos} (not a record start)"
                return
            cflag, length = lrec >> 29, lrec & MAX_PART
            data = f.read(length)
            if len(data) < length:
                yield start, None, (f"truncated .rec (record at offset {start} needs {length} bytes "
                                    f"at offset {pos + 8}, only {len(data)} left)")
                return
            parts.append(data)
            pos += 8 + length + (-length % 4)
            if cflag in (0, 3):
                break
            if cflag not in (1, 2):
                yield start, None, f"bad cflag {cflag} at offset {pos}"
                return
        yield start, struct.pack("<I", MAGIC).join(parts), None


def check_payload(payload, decode=True, label_len=None, widths=None):
    """None if the payload is a good record, else what is wrong with it. ``label_len``: the
    label length the shard's layout gives (None: any 77*N); ``widths``: its fields' widths."""
    from PIL import Image

    if len(payload) < IR_SIZE:
        return f"payload of {len(payload)} bytes is too short for the IRHeader"
    flag = struct.unpack_from(IR_FORMAT, payload)[0]
    if label_len is None and label_fields(flag) is None:
        return f"IRHeader flag is {flag}, expected 77*N label floats (N text fields)"
    if label_len is not None and flag != label_len:
        widths = widths or (CONTEXT_LENGTH,) * (label_len // CONTEXT_LENGTH)
        if len(set(widths)) == 1:
            return (f"IRHeader flag is {flag}, expected {label_len} ({len(widths)} text fields "
                    f"x {widths[0]} tokens)")
        return f"IRHeader flag is {flag}, expected {label_len} (text fields {list(widths)} tokens wide)"
    if len(payload) < IR_SIZE + 4 * flag:
        return f"payload of {len(payload)} bytes is too short for the IRHeader and a {flag}-float label"
    label = np.frombuffer(payload, "<f4", flag, IR_SIZE)
    if not (np.isfinite(label).all() and (label == np.floor(label)).all()
            and label.min() >= 0 and label.max() < 2 ** 24):
        return f"label is not {flag} token ids (non-integer, negative or non-finite floats)"
    jpeg = payload[IR_SIZE + 4 * flag:]
    if not decode:
        return None
    try:
        img = Image.open(io.BytesIO(jpeg))
        if img.format != "JPEG":
            return f"image is {img.format}, not JPEG"
        w, h = img.size
        img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        img.load()
    except Exception as e:  # Pillow raises many types for bad files
        return f"undecodable JPEG ({type(e).__name__}: {str(e).split(' <')[0]})"
    return None


def check_shard(rec_path, decode=True):
    """(records, problems) of one shard; problems are one-line strings naming file and key."""
    rec_path = str(rec_path)
    idx_path = idx_path_of(rec_path)
    for p in (rec_path, idx_path):
        if not os.path.exists(p):
            return 0, [f"{p}: no such file"]
    size = os.path.getsize(rec_path)
    try:
        keys, offsets = read_index(idx_path, size)  # also: entries past the end,: malformed lines, duplicate keys/offsets
        check_index_count(rec_path, len(keys))
        _, fields, widths = manifest_layout(rec_path)
    except RecordIOError as e:
        return 0, [str(e)]
    label_len = sum(widths) if fields else None  # else: the shard's first record's
    key_at = dict(zip(offsets.tolist(), keys.tolist()))
    problems, seen, walked_to = [], set(), size
    with open(rec_path, "rb") as f:
        last_key = None
        for start, payload, problem in _walk(f, size):
            if problem is not None:
                if start in key_at:
                    problems.append(f"{rec_path}: record key {key_at[start]}: {problem}")
                else:
                    after = f" (after record key {last_key})" if last_key is not None else ""
                    problems.append(f"{rec_path}: {problem}{after}")
                walked_to = start  # past a framing error records cannot be found
                break
            key = key_at.get(start)
            if key is None:
                problems.append(f"{rec_path}: the record at offset {start} is not in {idx_path} (lost .idx line)")
                continue
            seen.add(start)
            last_key = key
            bad = check_payload(payload, decode, label_len, widths)
            if label_len is None and not bad:
                label_len = struct.unpack_from(IR_FORMAT, payload)[0]
            if bad:
                problems.append(f"{rec_path}: record key {key}: {bad}")
    for off, key in key_at.items():
        if off not in seen and off < walked_to:
            problems.append(f"{idx_path}: record key {key}: offset {off} is not the start of a record in {rec_path}")
    return len(keys), problems


def _cache_file(rec_path, decode):
    return cache_path("verified", (rec_path, idx_path_of(rec_path)), [VERSION, decode], ".json")


def _cached(rec_path, decode):
    try:
        return os.path.exists(_cache_file(rec_path, decode))
    except OSError:
        return False


def _remember(rec_path, decode, records):
    try:
        path = _cache_file(rec_path, decode)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"rec": os.path.abspath(rec_path), "records": records}, f)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs a re-check next time


def _check_one(args):
    rec_path, decode = args
    return check_shard(rec_path, decode)


def verify_shards(rec_paths, workers=1, decode=True, use_cache=True, progress=False):
    """{rec path: (records, problems)} for every shard not already cached as good."""
    todo = [str(p) for p in rec_paths if not (use_cache and _cached(p, decode))]
    results = {}
    if not todo:
        return results
    jobs = [(p, decode) for p in todo]
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        from alip.procs import die_with_parent
        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        # the workers end with this process: a killed verify leaves no orphans blocked for ever
        with ProcessPoolExecutor(min(workers, len(todo)), ctx, initializer=die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            outs = pool.map(_check_one, jobs)
            results = dict(zip(todo, _progress(outs, len(todo), progress)))
    else:
        results = dict(zip(todo, _progress(map(_check_one, jobs), len(todo), progress)))
    for p, (n, problems) in results.items():
        if not problems:
            _remember(p, decode, n)
    return results


def _progress(it, total, on):
    if not on:
        return it
    from tqdm import tqdm
    return tqdm(it, total=total, unit="shard", desc="verify")


def require_verified(rec_paths, workers=1, rank=0, world_size=1):
    """Verify the shards (cached ones are skipped) and raise RecordIOError naming the first bad
    shard and record. Under torch.distributed with ``world_size`` ranks each rank checks every
    W-th uncached shard and the problems are all-gathered, so every rank raises the same error."""
    paths = [str(p) for p in rec_paths]
    import torch.distributed as dist
    shared = world_size > 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size
    mine = paths[rank::world_size] if shared else paths
    results = verify_shards(mine, workers)
    problems = [q for p in mine if p in results for q in results[p][1]]
    if shared:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, problems)
        problems = [q for part in gathered for q in part]
    if problems:
        more = f" (and {len(problems) - 1} more problems; `python data2rec.py verify` lists them all)" \
            if len(problems) > 1 else ""
        raise RecordIOError(f"{problems[0]}{more}")


def main(argv=None, prog="verify"):
    p = argparse.ArgumentParser(prog=prog, description="Check ALIP RecordIO shards: framing, index, "
                                "labels and JPEG decodability; exit 1 if anything is wrong.")
    p.add_argument("shards", nargs="+", help="data2rec output dirs and/or .rec files")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (one shard each)")
    p.add_argument("--no-decode", action="store_true", help="framing, index and labels only (no JPEG decode)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    paths = []
    try:
        for s in args.shards:
            paths += shard_paths(s)
    except (FileNotFoundError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    results = verify_shards(paths, max(1, args.workers), not args.no_decode, use_cache=False,
                            progress=not args.no_progress)
    bad = 0
    for path in paths:
        n, problems = results[path]
        for q in problems[:MAX_LISTED]:
            print(q)
        if len(problems) > MAX_LISTED:
            print(f"{path}: ... {len(problems) - MAX_LISTED} more problems")
        bad += bool(problems)
    records = sum(n for n, _ in results.values())
    problems = sum(len(q) for _, q in results.values())
    print(f"{prog}: {len(paths)} shards, {records} records: "
          + (f"{problems} problems in {bad} shards" if bad else "all good"), file=sys.stderr if bad else sys.stdout)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
