"""ALIP RecordIO shards through DALI's ``fn.readers.mxnet`` (the reference reader), to torch.

* DALI's mxnet reader takes many .rec files but ONE .idx whose offsets run over the files'
  concatenation; we write that combined index (atomically, in the temp dir, named by a hash of
  the shards) from the per-shard .idx files. Shards with no records (every row rejected) are
  left out of both lists (DALI sizes each record by the next offset; an empty file is not
  something its index parsing was written for).
* Sharding: DALI cuts the records into W contiguous ranges; range s = [N*s//W, N*(s+1)//W).
  DALI's own reader moves to the next range every epoch; we build a fresh pipeline per epoch
  with shard_id = (rank + epoch) % W and a seed from (seed, epoch, rank), which keeps that
  rotation but makes epoch e a pure function of (seed, e, rank) (so it can be resumed).
* Exactly once: ``pad_last_batch=True`` + the iterator's ``reader_name`` and
  ``LastBatchPolicy.PARTIAL``: DALI pads the last batch by repeating the range's last record
  and the iterator strips the padding, so each range is yielded exactly once (tested, not
  trusted). With drop_last=True every rank stops after (N // W) // B full batches, the same on
  all ranks; the rest is counted in ``dropped_per_epoch``.
* Shuffle: ``random_shuffle`` inside an ``initial_fill`` buffer only (data2rec shuffles globally).
* Mid-epoch resume, two ways, both exact: DALI's own pipeline checkpointing (works with the
  mxnet reader): ``state_dict()`` between batches, ``load_state_dict()`` on resume, nothing is
  decoded twice; or ``set_epoch(e, start_batch=k)`` without a saved state, which rebuilds epoch
  e's pipeline and decodes and discards its first k batches (the pipeline is deterministic for
  a seed, so what follows is the uninterrupted epoch's batches k..).
* Device: ``device="cuda:N"`` decodes ``mixed`` (nvJPEG) on GPU N and augments there;
  ``device="cpu"`` builds a CPU-only pipeline (``device_id=None``).
"""
import hashlib
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..atomic import replacing
from . import text_views
from .augment import CLIP_MEAN, CLIP_STD, RECIPE_PARAMS
from .fields import label_spans, resolve, shards_widths
from .recordio import RecordIOError, RecordReader, reserve_open_files
from .spec import ALIP_DATA
from .verify import require_verified


def combined_index(rec_paths, idx_dir=None):
    """(rec paths with records, path of one .idx over their concatenation, record count).

    The .idx keeps each record's key, in file order: with ``cat`` of the same .rec files it is also
    a single-file shard (what the reference ALIP dali.py reads)."""
    recs, path, counts = _combined_index(rec_paths, idx_dir)
    return recs, path, sum(counts)


def _combined_index(rec_paths, idx_dir=None):
    """combined_index with the record count of each listed .rec. The file is named by the
    shards' paths, sizes and mtimes, so a rank that finds it written by another (or by an
    earlier run) writes nothing; the text is formatted a million lines at a time."""
    readers = [RecordReader(rec) for rec in rec_paths]  # checks each .idx against its .rec, and its last record
    kept = [r for r in readers if len(r)]
    if not kept:
        raise ValueError(f"no records in {list(rec_paths)}")
    recs = [r.rec_path for r in kept]
    sizes = [os.path.getsize(r) for r in recs]
    h = hashlib.sha1(repr([(os.path.abspath(r), s, os.path.getmtime(r)) for r, s in zip(recs, sizes)]).encode())
    idx_dir = idx_dir or os.path.join(tempfile.gettempdir(), "alip-dali-idx")
    os.makedirs(idx_dir, exist_ok=True)
    path = os.path.join(idx_dir, h.hexdigest() + ".idx")
    if not os.path.exists(path):
        _write_combined(path, kept, sizes)
    return recs, path, [len(r) for r in kept]


def _write_combined(path, readers, sizes, chunk=1 << 20):
    """The combined .idx of ``readers`` (each shard's entries in offset order, offsets shifted by
    the sizes of the shards before it), written whole or not at all."""
    with replacing(path) as f:
        base = 0
        for reader, size in zip(readers, sizes):
            order = np.argsort(reader.offsets, kind="stable")
            for lo in range(0, len(order), chunk):
                rows = order[lo:lo + chunk]
                table = np.column_stack([reader.keys[rows], reader.offsets[rows] + base])
                f.write(("%d\t%d\n" * len(rows)) % tuple(table.ravel().tolist()))
            base += size


def _seed(*parts):
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def _named_errors(make_iterator, loader):
    """DALI's own errors ("nvImageCodec failure", "wrong magic number", ...) name no file: re-raise
    them as RecordIOError naming the shard files and the range of records this rank was reading.
    (The iterator already runs the pipeline when it is built, so that is inside too.)"""
    try:
        yield from make_iterator()
    except RuntimeError as e:
        lo, hi = loader.shard_range(loader.shard_id)
        files = loader.files_of(lo, hi)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if "no longer valid" not in ln), lines[-1] if lines else "")
        raise RecordIOError(
            f"DALI failed reading records {lo}..{hi - 1} of {loader.idx_path} (rank {loader.rank}, epoch "
            f"{loader.epoch}), in {files[0]}" + (f" .. {files[-1]} ({len(files)} files)" if len(files) > 1 else "")
            + f": {detail}; `python data2rec.py verify` on these files names the record") from e


class DaliRecLoader:
    """Batches of ``spec.keys`` dicts (``build_view_pipeline``). Text views run in a thread pool
    of ``text_threads`` beside the pipeline, one batch ahead: batch b+1's transforms run while
    the caller works on batch b (the pipeline checkpoint after b is kept for ``state_dict``)."""

    def __init__(self, rec_paths, batch_size, image_size, rank=0, world_size=1, seed=0, workers=2,
                 device="cpu", drop_last=True, augment=True, shuffle=True, initial_fill=16384,
                 verify=True, spec=ALIP_DATA, text_threads=4):
        text_views.check(spec.text_views, spec.fields_read)  # transforms; the shards' fields in resolve
        self.spec, self.text_threads = spec, text_threads
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        reserve_open_files(rec_paths)  # the combined index below holds every shard's reader
        self.field_rows, self.layout = resolve([str(p) for p in rec_paths], spec.fields_read)
        self.widths = shards_widths([str(p) for p in rec_paths])
        self.spans = label_spans(self.layout, self.widths)
        self.text_widths = text_views.batch_widths(spec, self.layout, self.widths)
        if verify:  # a corrupt JPEG would otherwise kill DALI's decoder mid-epoch, naming nothing
            require_verified(rec_paths, max(1, workers), rank, world_size)
        self.recs, self.idx_path, self.shard_counts = _combined_index(rec_paths)
        self.num_samples = sum(self.shard_counts)
        self.batch_size, self.image_size = batch_size, image_size
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.threads, self.augment, self.shuffle = max(1, workers), augment, shuffle
        self.initial_fill = initial_fill
        device = torch.device(device)
        self.device_id = None
        if device.type == "cuda":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        n, W = self.num_samples, world_size
        self.dropped_per_epoch = n - W * batch_size * ((n // W) // batch_size) if drop_last else 0
        self.sources = SourceIndex(rec_paths) if spec.text_views else None
        self.token_device = torch.device("cpu" if self.device_id is None else f"cuda:{self.device_id}")
        self.set_epoch(0)

    def split_labels(self, labels):
        """int64 [B, W1+..+WN] labels -> {field: int64 [B, W_field]} for the wanted fields."""
        if labels.shape[1] != sum(self.widths):
            raise RecordIOError(f"labels of {labels.shape[1]} floats in {self.idx_path} (rank {self.rank}, "
                                f"epoch {self.epoch}), but the shards' layout is {list(self.layout)} "
                                f"({list(self.widths)} tokens wide): `python data2rec.py verify` names the record")
        return {f: labels[:, slice(*self.spans[f])].contiguous() for f in self.field_rows}

    def files_of(self, lo, hi):
        """The .rec files holding records lo..hi-1 of the combined index."""
        starts = np.cumsum([0] + self.shard_counts)
        return [r for r, a, b in zip(self.recs, starts[:-1], starts[1:]) if a < hi and b > lo]

    def shard_range(self, shard_id):
        n, W = self.num_samples, self.world_size
        return n * shard_id // W, n * (shard_id + 1) // W

    def set_epoch(self, epoch, start_batch=0):
        """Epoch e from batch start_batch: the first start_batch batches are decoded and thrown
        away (exact; load_state_dict skips them for free)."""
        self.epoch, self.shard_id = int(epoch), (self.rank + int(epoch)) % self.world_size
        lo, hi = self.shard_range(self.shard_id)
        if self.drop_last:
            self.batches_per_epoch = (self.num_samples // self.world_size) // self.batch_size
        else:
            self.batches_per_epoch = math.ceil((hi - lo) / self.batch_size)
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is not in 0..{self.batches_per_epoch}")
        self.start_batch = self.position = int(start_batch)
        self._checkpoint, self._it, self._saved_checkpoint = None, None, None

    def state_dict(self):
        """Where this rank is: {epoch, batch, dali_checkpoint}. Call it between batches and keep
        it with the training checkpoint; the DALI pipeline checkpoint restores the reader's
        position and every RNG, so resuming decodes nothing twice."""
        cpt = None
        if self.position >= self.batches_per_epoch:
            pass  # the epoch is over: nothing to restore
        elif self.spec.text_views:  # the pipeline runs a batch ahead: the checkpoint kept with batch b
            cpt = self._saved_checkpoint
        elif self._it is not None:
            cpt = self._it.checkpoints()[0]
        return {"epoch": self.epoch, "batch": self.position, "dali_checkpoint": cpt}

    def load_state_dict(self, state):
        self.set_epoch(state["epoch"], state["batch"])
        self._checkpoint = state.get("dali_checkpoint")

    def __len__(self):
        return self.batches_per_epoch - self.start_batch

    def _fields(self, out):
        """DALI outputs -> the batch dict without text views, and the CPU token fields."""
        fields = self.split_labels(out["labels"].long())
        batch = {v.name: out[f"view{k}"] for k, v in enumerate(self.spec.image_views)}
        batch.update((f, fields[f].to(self.token_device)) for f in self.spec.text_fields)
        return batch, fields

    def _submit_text(self, pool, out, fields):
        """Text views of one batch as futures over chunks of its samples."""
        infos = [bytes(row).rstrip(b"\0").decode() for row in out["source"].numpy()]
        indices = [self.sources(i) for i in infos]
        n = len(indices)
        step = max(1, math.ceil(n / self.text_threads))
        return [pool.submit(text_views.apply_batch, self.spec.text_views,
                            {k: f[lo:lo + step] for k, f in fields.items()}, self.seed, self.epoch,
                            indices[lo:lo + step]) for lo in range(0, n, step)]

    def _finish(self, b, batch, futures, checkpoint):
        parts = [f.result() for f in futures]
        for k in parts[0]:  # the text views and the drawn fields (text_views.apply_batch)
            batch[k] = torch.cat([p[k] for p in parts]).to(self.token_device)
        self.position, self._saved_checkpoint = b + 1, checkpoint
        return batch

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        cpt, self._checkpoint = self._checkpoint, None
        n_views, text = len(self.spec.image_views), bool(self.spec.text_views)
        pipe = build_view_pipeline(self.recs, self.idx_path, self.batch_size, self.image_size,
                                   self.shard_id, self.world_size, _seed(self.seed, self.epoch, self.rank),
                                   self.threads, [v.recipe for v in self.spec.image_views], self.device_id,
                                   self.augment, self.shuffle, min(self.initial_fill, max(1, self.num_samples)),
                                   checkpoint=cpt, source_info=text)
        names = [f"view{k}" for k in range(n_views)] + ["labels"] + (["source"] if text else [])

        def make_iterator():
            self._it = DALIGenericIterator([pipe], names, reader_name="Reader",
                                           last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
            return self._it

        self._it = None
        self.position, self.replayed_batches = self.start_batch, 0
        pool = ThreadPoolExecutor(self.text_threads, thread_name_prefix="alip-text") if text else None
        pending = None
        try:
            for b, out in enumerate(_named_errors(make_iterator, self), start=self.start_batch if cpt else 0):
                if b >= self.batches_per_epoch:
                    break
                if b < self.start_batch:
                    self.replayed_batches += 1
                    continue
                batch, fields = self._fields(out[0])
                if not text:
                    self.position = b + 1
                    yield batch
                    continue
                futures = self._submit_text(pool, out[0], fields)
                after_b = self._it.checkpoints()[0] if b + 1 < self.batches_per_epoch else None
                if pending is not None:
                    yield self._finish(*pending)
                pending = (b, batch, futures, after_b)
            if pending is not None:
                yield self._finish(*pending)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            del pipe  # self._it keeps it until the next epoch, for state_dict() after a break


# ---- the pipeline: decode once, one branch of ops per image view ---------------------------

def _uniform(lo, hi, name):
    """fn.random.uniform over [lo, hi), or the constant when the range is a point (DALI's
    uniform refuses an empty range)."""
    from nvidia.dali import fn
    return fn.random.uniform(range=[lo, hi], name=name) if hi > lo else float(lo)


def _dali_view(images, recipe, size, augment, tag="v0"):
    """One image view of decoded HWC uint8 images with DALI ops, recipe as augment.Recipe:
    random_resized_crop; color_twist with the jitter factors under a per-sample coin (saturation
    0 under the gray coin: DALI's YIQ saturation at 0 is the 0.299/0.587/0.114 luma, torchvision's
    grayscale); gaussian_blur with a random sigma under a coin; mirror and CLIP mean/std.

    Every random op is named after ``tag`` (the view): a DALI checkpoint names the ops whose
    state it holds, and auto-generated names count the pipelines built in the process, so a
    checkpoint would not restore into a pipeline built after a different number of others."""
    from nvidia.dali import fn, types

    r = RECIPE_PARAMS[recipe]
    if not augment:
        v = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                      antialias=True, name=f"{tag}_resize")
    else:
        v = fn.random_resized_crop(images, size=[size, size], random_area=list(r.area),
                                   random_aspect_ratio=list(r.aspect), num_attempts=r.attempts,
                                   interp_type=types.INTERP_LINEAR, antialias=True,
                                   name=f"{tag}_crop")
        if r.jitter_p or r.gray_p:
            on = fn.random.coin_flip(probability=r.jitter_p, name=f"{tag}_jitter_coin")
            b, c, s, h = r.jitter
            colour = 1.0 - fn.random.coin_flip(probability=r.gray_p, name=f"{tag}_gray_coin")
            v = fn.color_twist(v, name=f"{tag}_twist", brightness=1.0 + on * _uniform(-b, b, f"{tag}_brightness"),
                               contrast=1.0 + on * _uniform(-c, c, f"{tag}_contrast"),
                               saturation=(1.0 + on * _uniform(-s, s, f"{tag}_saturation")) * colour,
                               hue=on * _uniform(-360 * h, 360 * h, f"{tag}_hue"))
        if r.blur_p:
            if fn.random.coin_flip(probability=r.blur_p, dtype=types.BOOL, name=f"{tag}_blur_coin"):
                v = fn.gaussian_blur(v, sigma=_uniform(*r.blur_sigma, f"{tag}_blur_sigma"),
                                     name=f"{tag}_blur")
            else:
                v = v
    mirror = fn.random.coin_flip(probability=r.flip, name=f"{tag}_mirror") if augment and r.flip else 0
    return fn.crop_mirror_normalize(v, dtype=types.FLOAT, output_layout="CHW", name=f"{tag}_normalize",
                                    mean=[255 * m for m in CLIP_MEAN], std=[255 * s for s in CLIP_STD],
                                    mirror=mirror)


def build_view_pipeline(recs, idx_path, batch_size, image_size, shard_id, num_shards, seed, threads,
                        recipes, device_id=None, augment=True, shuffle=True, initial_fill=16384,
                        checkpoint=None, source_info=False):
    """The loader's pipeline for one or several image views: decode once (``mixed`` on GPU), one branch of ops
    per view. Outputs: the views (on the decode device), the labels on the CPU (the text views
    are made there), and with ``source_info`` each record's "<file> at index <offset>" padded
    with zeros to the batch's longest."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    kw = dict(device_memory_padding=211025920, host_memory_padding=140544512) if gpu else {}

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=3 if gpu else 2, exec_dynamic=True, enable_conditionals=True)
    def pipe():
        jpegs, labels = fn.readers.mxnet(
            path=recs, index_path=[idx_path], num_shards=num_shards, shard_id=shard_id,
            random_shuffle=shuffle, initial_fill=initial_fill, pad_last_batch=True,
            seed=seed, name="Reader")
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   name="decode", **kw)
        outs = [_dali_view(images, r, image_size, augment, f"v{i}")
                for i, r in enumerate(recipes)] + [labels]
        if source_info:
            outs.append(fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0))
        return tuple(outs)

    return pipe(enable_checkpointing=True, checkpoint=checkpoint)


class SourceIndex:
    """DALI's source_info "<file> at index <byte offset>" -> the record's index in the
    concatenation of ``rec_paths`` (the torch reader's numbering, so both backends seed a
    record's text views alike)."""

    def __init__(self, rec_paths):
        self.files, start = {}, 0
        for p in rec_paths:
            offsets = RecordReader(p).offsets
            if np.all(offsets[1:] > offsets[:-1]):  # data2rec's shards: the cached index as it is
                self.files[str(p)] = (offsets, None, start)
            else:
                order = np.argsort(offsets, kind="stable")
                self.files[str(p)] = (offsets[order], order, start)
            start += len(offsets)

    def __call__(self, info):
        path, _, offset = info.rpartition(" at index ")
        if path not in self.files:
            raise ValueError(f"DALI source_info {info!r}: not one of the loader's shards")
        offsets, order, start = self.files[path]
        j = int(np.searchsorted(offsets, int(offset)))
        if j == len(offsets) or offsets[j] != int(offset):
            raise ValueError(f"DALI source_info {info!r}: no record starts at that offset in {path}")
        return start + (j if order is None else int(order[j]))
