"""ALIP RecordIO shards through a torch DataLoader (Pillow decode, the reference augmentation).

Each epoch draws one global order of the records from (seed, epoch) (alip.data.order: numpy's
permutation up to 2**24 records, above that computed per position so no rank stores it); rank r
takes every W-th record of it, cut into batches. drop_last=True trims the order to W*B*(N // (W*B)) records first so every
rank yields the same number of full batches (the dropped records differ from epoch to epoch);
drop_last=False yields every record exactly once across ranks (a rank's batch count may then be
one less than another's). ``set_epoch(e, start_batch=k)`` yields exactly batches k.. of epoch e,
bit-identical, since each sample's augmentation comes from (seed, epoch, record index).
``length_bucketing=N`` (N > 0) reorders each rank's records within pools of N batches by text
length (alip.data.bucketing; lengths from alip.data.lengths), keeping all of the above.
"""
import contextlib
import io
import itertools
import math
import os
import signal
import threading

import numpy as np
import torch
from PIL import Image

from ..cli import without_addresses
from . import text_views
from .augment import image_views, view_rngs
from .bucketing import LengthKey, bucket_pool
from .fields import resolve, shards_widths
from .lengths import length_parts
from .order import EpochOrder, order_kind
from .recordio import RecordIOError, RecordReader, reserve_open_files
from .spec import ALIP_DATA



def _undecodable(dataset, i, rec, e):
    """The one-line error for record ``i`` of ``dataset`` whose image does not decode."""
    s = int(np.searchsorted(dataset.starts, i, side="right")) - 1
    why = without_addresses(f"{type(e).__name__}: {e}")
    return RecordIOError(f"{dataset.readers[s].rec_path}: record key {rec.key}: undecodable "
                         f"image ({why}); `data2rec.py verify` checks every record of the shards")


def machine_share(rank, world_size):
    """((i, k), barrier): this process is the i-th of the k ranks of its machine (torchrun's
    LOCAL_RANK / LOCAL_WORLD_SIZE; without them all ``world_size`` ranks count as one machine)
    and ``barrier`` waits for every rank, under torch.distributed with ``world_size`` ranks;
    else ((0, 1), None)."""
    import torch.distributed as dist
    if not (world_size > 1 and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() == world_size):
        return (0, 1), None
    i = int(os.environ.get("LOCAL_RANK", rank))
    k = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return (i, k), dist.barrier


class RecDataset(torch.utils.data.Dataset):
    """Record i of the concatenated shards -> {key: tensor} for a ``DataSpec``: every image view
    from one decode (view k's randomness from ``view_rngs(seed, epoch, i, ...)[k]``), the
    asked-for text fields (each as wide as the shards store it: ``widths``, from manifest.json;
    77 by default), and the text views (transformed here, in the DataLoader worker).

    Indexed by (i, epoch) pairs so the augmentation is a function of (seed, epoch, i).
    The text fields the spec reads are looked up in the shards' layout (alip.data.fields) here,
    so a field the shards lack fails before anything is read.
    """

    def __init__(self, rec_paths, image_size, seed=0, augment=True, spec=ALIP_DATA):
        reserve_open_files(rec_paths)
        self.field_rows, self.layout = resolve([str(p) for p in rec_paths], spec.fields_read)
        self.widths = shards_widths([str(p) for p in rec_paths])
        self.readers = [RecordReader(p, widths=self.widths) for p in rec_paths]
        self.starts = np.cumsum([0] + [len(r) for r in self.readers])
        self.image_size, self.seed, self.augment = image_size, seed, augment
        self.spec, self.recipes = spec, [v.recipe for v in spec.image_views]

    def __len__(self):
        return int(self.starts[-1])

    def record(self, i):
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        rec = self.readers[s][i - int(self.starts[s])]
        if len(rec.tokens) != len(self.layout):
            raise RecordIOError(f"{self.readers[s].rec_path}: record key {rec.key}: {len(rec.tokens)} text "
                                f"fields, but the shards' layout is {list(self.layout)}")
        return rec

    def fields(self, rec):
        """{field: int64 [W_field]} of the wanted fields of a record."""
        return {f: torch.from_numpy(rec.tokens[k]) for f, k in self.field_rows.items()}

    def __getitem__(self, item):
        i, epoch = item
        rec = self.record(i)
        rngs = view_rngs(self.seed, epoch, i, len(self.recipes)) if self.augment else None
        try:
            images = image_views(Image.open(io.BytesIO(rec.jpeg)), self.image_size, self.recipes, rngs)
        except Exception as e:
            raise _undecodable(self, i, rec, e) from e
        fields = self.fields(rec)
        out = {v.name: x for v, x in zip(self.spec.image_views, images)}
        out.update((f, fields[f]) for f in self.spec.text_fields)
        out.update((v.name, text_views.apply(v, fields, self.seed, epoch, i))
                   for v in self.spec.text_views)
        out.update(text_views.draws(self.spec.text_views, self.seed, epoch, i))
        return out


def stop_signals():
    """The signals this process saves and stops on: those whose handler is marked
    ``spares_data_workers`` (alip.training.preemption's, while a run is in its loop). Empty
    where a worker could not take them (no sigwaitinfo)."""
    if not hasattr(signal, "sigwaitinfo"):
        return frozenset()
    return frozenset(s for s in signal.valid_signals()
                     if getattr(signal.getsignal(s), "spares_data_workers", False))


@contextlib.contextmanager
def signals_blocked(signals):
    """``signals`` blocked in this thread meanwhile: a worker forked or spawned here is born with
    them blocked, so none reaches it before its ``OutliveStopSignals`` takes them over. One that
    arrives meanwhile is delivered here afterwards. (A thread started here, the DataLoader's
    pin-memory thread, keeps them blocked: the process takes them on its other threads.)"""
    if not signals:
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class OutliveStopSignals:
    """DataLoader ``worker_init_fn``: the worker survives the signals its parent saves on.

    A preemption signals every process of the job (SLURM) or of the rank's process group
    (torchrun), the workers too, and torch's worker handler dies of a SIGTERM its parent did not
    send: the rank then failed on the lost worker ("DataLoader worker ... is killed by signal")
    before it could save. The loader sets ``signals`` (``stop_signals()`` of the parent) just
    before it starts its workers, with them blocked (``signals_blocked``); the worker keeps them
    blocked and a thread takes them: one from the parent (the DataLoader's or multiprocessing's
    terminate()) ends the worker at once, as torch's handler does; any other is dropped, since
    the parent saves, then ends its workers itself. A worker still ends when its parent dies
    (torch's watchdog sees the parent gone)."""

    def __init__(self):
        self.signals = frozenset()

    def __call__(self, worker_id):
        if not self.signals:
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)  # threads started later inherit it
        threading.Thread(target=_take_signals, args=(self.signals, os.getppid()), daemon=True,
                         name="alip-stop-signals").start()


def _take_signals(signals, parent):
    """The blocked ``signals`` as they come: the parent's end this process (exit status 0, so
    the parent's SIGCHLD check reports no failed worker), the others are dropped."""
    while True:
        if signal.sigwaitinfo(signals).si_pid == parent:
            os._exit(0)


CHUNK_BATCHES = 64  # without bucketing, the order is computed for this many batches at a time


def rank_batches(n, epoch, seed, rank, world_size, batch_size, drop_last, pool_batches=0, key=None,
                 start_batch=0):
    """Rank ``rank``'s batches of ``epoch`` from ``start_batch`` on (int64 record-index arrays).

    The epoch's order is a bijection of the n records drawn from (seed, epoch)
    (alip.data.order); drop_last=True keeps its first W*B*(n // (W*B)) positions, and rank r
    takes positions r, r + W, r + 2W, ... of what is kept, cut into batches of B. Nothing of
    size n is built: each chunk of ``CHUNK_BATCHES`` batches (with length bucketing, each pool
    of ``pool_batches`` batches) is computed when it is reached."""
    W, B = int(world_size), int(batch_size)
    order = EpochOrder(n, seed, epoch)
    kept = W * B * (n // (W * B)) if drop_last else n
    mine = len(range(rank, kept, W))

    def records(lo, hi):  # rank's records lo..hi-1 (in its sequence)
        return order[rank + W * np.arange(lo, min(hi, mine), dtype=np.int64)]

    per_pool = int(pool_batches) or CHUNK_BATCHES  # batches computed at once
    for p in range(start_batch // per_pool, math.ceil(mine / (B * per_pool))):
        pool = records(p * per_pool * B, (p + 1) * per_pool * B)
        if pool_batches:
            batches = bucket_pool(pool, key, B, seed, epoch, p)
        else:
            batches = [pool[i:i + B] for i in range(0, len(pool), B)]
        yield from batches[max(0, start_batch - p * per_pool):]


class _Batches:
    """Batch sampler whose epoch / start batch the loader sets (iterated in the main process).

    It holds no reference to the loader: a cycle would leave the DataLoader's workers to the
    garbage collector, whose shutdown then waits 5 s per worker.
    """

    def __init__(self, n, seed, rank, world_size, batch_size, drop_last, batches_per_epoch,
                 pool_batches=0, key=None):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.batch_size, self.drop_last, self.batches_per_epoch = batch_size, drop_last, batches_per_epoch
        self.pool_batches, self.key = pool_batches, key  # length bucketing (off: 0)
        self.epoch, self.start_batch = 0, 0

    def __iter__(self):
        batches = rank_batches(self.n, self.epoch, self.seed, self.rank, self.world_size,
                               self.batch_size, self.drop_last, self.pool_batches, self.key,
                               self.start_batch)
        for batch in itertools.islice(batches, max(0, self.batches_per_epoch - self.start_batch)):
            yield [(int(i), self.epoch) for i in batch]

    def __len__(self):
        return self.batches_per_epoch - self.start_batch


class TorchRecLoader:
    """Batches of ``spec.keys`` dicts (``RecDataset``), in the order, exactly-once and resume
    rules of the module docstring."""

    def __init__(self, rec_paths, batch_size, image_size, rank=0, world_size=1, seed=0, workers=2,
                 device="cpu", drop_last=True, augment=True, length_bucketing=0, spec=ALIP_DATA):
        text_views.check(spec.text_views, spec.fields_read)  # transforms; the shards' fields in resolve
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if (isinstance(length_bucketing, bool) or not isinstance(length_bucketing, (int, np.integer))
                or length_bucketing < 0):
            raise ValueError(f"length_bucketing must be an integer >= 0 (batches per pool; 0: off), "
                             f"got {length_bucketing!r}")
        self.length_bucketing = int(length_bucketing)
        self.spec = spec
        self.dataset = RecDataset(rec_paths, image_size, seed, augment, spec)
        self.text_widths = text_views.batch_widths(spec, self.dataset.layout, self.dataset.widths)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.drop_last = seed, drop_last
        self.num_samples = len(self.dataset)
        if drop_last:
            self.batches_per_epoch = self.num_samples // (world_size * batch_size)
            self.dropped_per_epoch = self.num_samples - self.batches_per_epoch * world_size * batch_size
        else:
            mine = len(range(rank, self.num_samples, world_size))
            self.batches_per_epoch = math.ceil(mine / batch_size)
            self.dropped_per_epoch = 0
        self.epoch, self.start_batch, self.position = 0, 0, 0
        key = self.length_key(progress=rank == 0) if self.length_bucketing else None
        self._batches = _Batches(self.num_samples, seed, rank, world_size, batch_size, drop_last,
                                 self.batches_per_epoch, self.length_bucketing, key)
        self._worker_init = OutliveStopSignals()
        self._loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self._batches, num_workers=workers,
            pin_memory=str(device).startswith("cuda"), persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None, worker_init_fn=self._worker_init)

    def length_key(self, progress=False):
        """The bucketing sort key of the records (from the text fields this loader reads)."""
        d = self.dataset
        share, barrier = machine_share(self.rank, self.world_size)
        parts = length_parts(d.readers, d.widths, progress=progress, share=share, barrier=barrier)
        return LengthKey(parts, d.field_rows.values())

    def set_epoch(self, epoch, start_batch=0):
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is not in 0..{self.batches_per_epoch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        self.position = self.start_batch
        self._batches.epoch, self._batches.start_batch = self.epoch, self.start_batch

    def state_dict(self):
        """{epoch, batch}: batch = batches yielded so far this epoch (resume from there); with
        length bucketing also its pool size, and above 2**24 records the order's kind, which
        the batches depend on."""
        state = {"epoch": self.epoch, "batch": self.position}
        if self.length_bucketing:
            state["length_bucketing"] = self.length_bucketing
        if order_kind(self.num_samples) != "permutation":
            state["order"] = order_kind(self.num_samples)
        return state

    def load_state_dict(self, state):
        saved = state.get("length_bucketing", 0)
        if saved != self.length_bucketing:
            raise ValueError(f"loader state was saved with length_bucketing={saved}, this loader has "
                             f"{self.length_bucketing}: its batches would differ")
        saved, now = state.get("order", "permutation"), order_kind(self.num_samples)
        if saved != now and state["batch"] > 0:
            raise ValueError(
                f"loader state is {state['batch']} batches into epoch {state['epoch']} of a "
                f"{saved!r} sample order, but {self.num_samples} records now get the {now!r} order "
                f"(alip.data.order; the checkpoint predates it): resuming mid-epoch would repeat "
                f"and skip records. Finish this epoch with the alip that wrote the checkpoint, or "
                f"resume from an end-of-epoch checkpoint")
        self.set_epoch(state["epoch"], state["batch"])

    def __len__(self):
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        self.position = self.start_batch
        # the (persistent) workers start in the first iter(): they take the signals a run saves on
        self._worker_init.signals = stop_signals() if self._loader.num_workers else frozenset()
        with signals_blocked(self._worker_init.signals):
            batches = iter(self._loader)
        for batch in batches:
            self.position += 1
            yield batch
