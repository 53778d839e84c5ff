"""Length bucketing across batches (``train.py --length-bucketing N``), a pure reordering.

A rank's records of an epoch, in the sampler's order, are cut into pools of N batches (N*B
records; the last pool may be shorter). Each pool is sorted by text length (stable, so records
of equal length keep the sampler's random order) and cut into its batches of B, which are then
emitted in an order drawn from (seed, epoch, pool index): the batches are length-homogeneous,
the epoch's sequence of lengths is not a ramp. A short last batch (drop_last=False) stays last.

Every batch is a function of (seed, epoch, rank's record list, lengths) alone, so a resumed
epoch (``start_batch``) yields exactly the batches an uninterrupted one would; every record of
the rank's list is in exactly one batch, so exactly-once per epoch and the ranks' disjointness
carry over from the sampler unchanged. The batch-order draw does not depend on the rank: in
DDP all ranks hold their k-th shortest batch at the same step (pools of the same size drawn
from one permutation), so the global batch is length-homogeneous too and ranks do not wait on
each other's long-text batches.
"""
import numpy as np

TAG = 0x62756B74  # "bukt": keeps this stream apart from other (seed, epoch, ...) draws


def sort_key(lengths):
    """int64 sort key per record from its [n, F] text lengths, in the loader's field
    order: the first field (the raw web text in every method: the long, widely spread one)
    decides, the sum of the others breaks ties (any widths: the sum stays below 2**32)."""
    lengths = np.asarray(lengths, np.int64)
    return (lengths[:, 0] << 32) + lengths[:, 1:].sum(axis=1)


class LengthKey:
    """``key[records]``: the sort keys of those records (``sort_key`` of the ``columns`` of
    their lengths), read from per-shard length arrays (``alip.data.lengths.length_parts``,
    memory-mapped) a pool at a time, so no rank holds a key per record (8 B each)."""

    def __init__(self, parts, columns):
        self.parts, self.columns = parts, list(columns)
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __getitem__(self, records):
        records = np.asarray(records, np.int64)
        shard = np.searchsorted(self.starts, records, side="right") - 1
        lengths = np.empty((len(records), len(self.columns)), np.int64)
        for s in np.unique(shard).tolist():
            here = shard == s
            lengths[here] = self.parts[s][records[here] - self.starts[s]][:, self.columns]
        return sort_key(lengths)


def bucket_pool(records, key, batch_size, seed, epoch, p):
    """The batches of pool ``p`` (``records``: its record indices in sampler order), sorted by
    ``key`` and emitted in the pool's drawn order, a short last batch last."""
    B = int(batch_size)
    records = records[np.argsort(key[records], kind="stable")]
    batches = [records[i:i + B] for i in range(0, len(records), B)]
    full = len(records) // B
    order = np.random.default_rng([int(seed), int(epoch), int(p), TAG]).permutation(full)
    return [batches[j] for j in order] + batches[full:]


def bucketed_batches(idx, key, batch_size, pool_batches, seed, epoch):
    """The batches (index arrays) of a rank's epoch ``idx`` (record indices in sampler order),
    bucketed by ``key`` (indexed by record index) in pools of ``pool_batches`` batches."""
    pool = int(pool_batches) * int(batch_size)
    return [b for p, start in enumerate(range(0, len(idx), pool))
            for b in bucket_pool(idx[start:start + pool], key, batch_size, seed, epoch, p)]
