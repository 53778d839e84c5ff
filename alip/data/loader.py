"""``build_train_loader``: the one entry point training uses to read ALIP RecordIO shards."""
from .shards import rec_paths
from .spec import ALIP_DATA

BACKENDS = ("torch", "dali")


def check_index_counts(paths):
    """Each shard's .idx against the record count manifest.json lists for it (when the dir has
    one): a .idx that lost or repeats lines is a RecordIOError naming it."""
    from .recordio import shard_index
    from .verify import check_index_count, idx_path_of, manifest_count
    for p in paths:
        if manifest_count(p)[1] is not None:
            check_index_count(p, len(shard_index(p, idx_path_of(p))[0]))


def build_train_loader(data, backend="torch", batch_size=64, image_size=32, rank=0, world_size=1,
                       seed=0, workers=2, device="cpu", drop_last=True, augment=True,
                       verify_shards=True, spec=ALIP_DATA, length_bucketing=0):
    """A re-iterable loader of dicts keyed by ``spec.keys`` (an ``alip.data.spec.DataSpec``;
    the default ``ALIP_DATA``: "image", "raw", "caption"): one float32 [B,3,S,S] per image view
    (its recipe's augmentation), int64 [B,W] per text field (W: its width in the shards, 77 unless data2rec
    stored it wider) and text view (its width). It has
    ``num_samples``, ``batches_per_epoch``, ``dropped_per_epoch`` and
    ``set_epoch(epoch, start_batch=0)``. ``augment=False`` squashes the whole image instead of
    the random crop + flip (for checks, not training). ``verify_shards`` (DALI): check every
    shard (framing, index, labels, JPEG decode; alip.data.verify) before the first epoch, once
    per shard version (cached). See torch_reader.py / dali_reader.py.

    ``length_bucketing=N`` (torch backend; 0: off): each rank's records are re-formed into
    batches of similar text length within pools of N consecutive batches (alip.data.bucketing);
    the batch count, exactly-once per epoch, rank disjointness and exact resume are unchanged.
    The first use reads every record's label once (cached per shard; alip.data.lengths)."""
    paths = rec_paths(data)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {BACKENDS}")
    if length_bucketing and backend != "torch":
        raise ValueError(f"length_bucketing={length_bucketing}: the {backend} backend does not support "
                         f"length bucketing; use backend='torch' (train.py --data-backend torch)")
    check_index_counts(paths)
    Loader = _loader_class(backend)
    extra = {"spec": spec}
    if backend == "dali":
        extra["verify"] = verify_shards
    elif length_bucketing:
        extra["length_bucketing"] = length_bucketing
    loader = Loader(paths, batch_size, int(image_size), rank=rank, world_size=world_size, seed=seed,
                    workers=workers, device=device, drop_last=drop_last, augment=augment, **extra)
    if loader.batches_per_epoch == 0:
        raise ValueError(f"{data}: {loader.num_samples} records do not fill one batch of {batch_size} on "
                         f"each of {world_size} ranks (drop_last={drop_last}); use a smaller --batch-size")
    return loader


def _loader_class(backend):
    if backend == "torch":
        from .torch_reader import TorchRecLoader
        return TorchRecLoader
    from .dali_reader import DaliRecLoader
    return DaliRecLoader
