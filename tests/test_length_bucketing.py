"""Length bucketing across batches (build_train_loader(length_bucketing=N), train.py
--length-bucketing): exactly once per epoch on 1 and 2 ranks, length-homogeneous batches, exact
resume, off == the plain sampler's order; the label-only length index; the flag's checks."""
import os

import numpy as np
import pytest
import torch

from alip.data.bucketing import LengthKey, bucketed_batches, sort_key
from alip.data.lengths import length_index, length_parts, read_lengths
from alip.data.loader import build_train_loader
from alip.data.recordio import MAGIC, RecordIOError, RecordReader, RecordWriter, pack_fields
from alip.training.params import parse_args, resume_conflicts
from data_fixtures import cache_dir, image, jpeg_bytes  # noqa: F401  (cache_dir: autouse)

N = 150  # records, in 3 shards of 50
SOT, EOT, ID0 = 49406, 49407, 1000


def lengths_of(n, seed=0):
    """YFCC-like raw lengths (lognormal, median 15, cut to 3..77) and caption lengths 10..25."""
    rng = np.random.default_rng(seed)
    raw = np.clip(np.round(np.exp(np.log(15) + 0.69 * rng.standard_normal(n))), 3, 77).astype(int)
    return raw, rng.integers(10, 26, n)


def text_row(i, length, rng):
    """77 token ids: SOT, the record's id (so a batch row names its record), filler, EOT."""
    row = np.zeros(77, np.int64)
    row[0], row[1], row[length - 1] = SOT, ID0 + i, EOT
    row[2:length - 1] = rng.integers(1, 49000, length - 3)
    return row


def write_shards(out, raw, cap, per_shard=50, keys=None):
    rng, jpeg = np.random.default_rng(1), jpeg_bytes(image(0, (8, 8)))
    os.makedirs(out, exist_ok=True)
    for s in range(0, len(raw), per_shard):
        stem = os.path.join(out, f"train-{s // per_shard:05d}")
        with RecordWriter(stem + ".rec", stem + ".idx") as w:
            for i in range(s, min(s + per_shard, len(raw))):
                key = i if keys is None else keys[i]
                w.write_payload(key, pack_fields(key, np.stack([text_row(i, raw[i], rng),
                                                                text_row(i, cap[i], rng)]), jpeg))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    raw, cap = lengths_of(N)
    return write_shards(str(tmp_path_factory.mktemp("rec")), raw, cap), raw, cap


def load(data, **kw):
    kw = {"batch_size": 6, "image_size": 8, "workers": 0, "seed": 3, **kw}
    return build_train_loader(data, backend="torch", **kw)


def ids(batch):
    return (batch["raw"][:, 1] - ID0).tolist()


def epoch_ids(loader, e, start_batch=0):
    loader.set_epoch(e, start_batch)
    return [ids(b) for b in loader]


# ---- the loader ------------------------------------------------------------------------------

@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world_size", [1, 2])
def test_every_record_exactly_once_on_each_rank_set(shards, world_size, drop_last):
    data, _, _ = shards
    for e in (0, 1):
        plain, bucketed = [], []
        for r in range(world_size):
            kw = dict(rank=r, world_size=world_size, drop_last=drop_last)
            p, b = epoch_ids(load(data, **kw), e), epoch_ids(load(data, length_bucketing=4, **kw), e)
            # same batch count and sizes per rank, the same records (only their order differs)
            assert [len(x) for x in b] == [len(x) for x in p]
            assert sorted(sum(b, [])) == sorted(sum(p, []))
            plain.append(sum(p, []))
            bucketed.append(sum(b, []))
        got = sum(bucketed, [])
        assert len(got) == len(set(got))  # no duplicates within or across ranks
        if drop_last:  # 150 // (W*6) full batches per rank, the same count on every rank
            assert len(got) == world_size * 6 * (N // (world_size * 6))
        else:
            assert sorted(got) == list(range(N))
        assert bucketed != plain  # bucketing did reorder


def spreads(batches, raw):
    return [raw[b].max() - raw[b].min() for b in map(np.asarray, batches)]


def test_batches_are_length_homogeneous(shards):
    data, raw, _ = shards
    plain = epoch_ids(load(data, drop_last=False), 0)
    bucketed = epoch_ids(load(data, drop_last=False, length_bucketing=8), 0)
    # each batch's raw lengths as the loader yields them match the shards' lengths
    loader = load(data, drop_last=False, length_bucketing=8)
    loader.set_epoch(0)
    for batch in loader:
        assert ((batch["raw"].argmax(-1) + 1).numpy() == raw[ids(batch)]).all()
    # 150 lognormal lengths (median 15), batches of 6, pools of 8: the mean within-batch spread
    # (max - min) of raw lengths falls from 29.4 to 6.1 tokens (the long tail's batches keep
    # most of it); padded raw tokens (6 x batch max, summed) from 5562 to 3390
    s_plain, s_bucketed = np.mean(spreads(plain, raw)), np.mean(spreads(bucketed, raw))
    assert s_bucketed < 0.4 * s_plain, (s_plain, s_bucketed)
    padded = [sum(len(b) * raw[b].max() for b in map(np.asarray, x)) for x in (plain, bucketed)]
    assert padded[1] < 0.8 * padded[0], padded


def test_resume_mid_epoch_yields_the_rest_bit_identical(shards):
    data, _, _ = shards
    kw = dict(drop_last=False, length_bucketing=3, workers=1)
    full = load(data, **kw)
    full.set_epoch(1)
    uninterrupted = list(full)
    assert len(uninterrupted) == 25 and len(uninterrupted[-1]["image"]) == 6
    first = load(data, **kw)
    first.set_epoch(1)
    for k, _ in enumerate(first):
        if k == 6:  # 7 batches consumed
            break
    state = first.state_dict()
    assert state == {"epoch": 1, "batch": 7, "length_bucketing": 3}
    resumed = load(data, **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(uninterrupted) - 7
    for a, b in zip(uninterrupted[7:], rest):  # images and tokens
        assert list(a) == list(b) == ["image", "raw", "caption"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="length_bucketing=3, this loader has 4"):
        load(data, drop_last=False, length_bucketing=4).load_state_dict(state)
    with pytest.raises(ValueError, match="length_bucketing=0, this loader has 3"):
        load(data, **kw).load_state_dict({"epoch": 1, "batch": 7})


def test_off_is_the_plain_sampler_order(shards):
    data, _, _ = shards
    for world_size in (1, 2):
        for r in range(world_size):
            loader = load(data, rank=r, world_size=world_size, drop_last=False, length_bucketing=0)
            got = epoch_ids(loader, 2)
            perm = np.random.default_rng([3, 2]).permutation(N)[r::world_size]
            assert got == [perm[i:i + 6].tolist() for i in range(0, len(perm), 6)]
            assert loader.state_dict() == {"epoch": 2, "batch": len(got)}


def test_dali_backend_refuses_the_flag_before_reading(tmp_path):
    (tmp_path / "x.rec").write_bytes(b"")  # not a shard at all: refused before it is read
    with pytest.raises(ValueError, match="length_bucketing=2: the dali backend does not support"):
        build_train_loader([str(tmp_path / "x.rec")], backend="dali", length_bucketing=2)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4"])
def test_bad_pool_size_is_an_error(shards, bad):
    with pytest.raises(ValueError, match="length_bucketing must be an integer >= 0"):
        load(shards[0], length_bucketing=bad)


# ---- the pure reordering ---------------------------------------------------------------------

def test_bucketed_batches_sort_pools_and_keep_the_short_batch_last():
    idx = np.random.default_rng(0).permutation(23)
    key = np.arange(23)[::-1].copy()  # record i has key 22 - i
    out = bucketed_batches(idx, key, batch_size=3, pool_batches=2, seed=0, epoch=0)
    assert [len(b) for b in out] == [3] * 7 + [2]
    assert sorted(np.concatenate(out).tolist()) == list(range(23))
    for p in range(4):  # each pool of 6 holds its own records, cut in key order
        pool = out[2 * p:2 * p + 2]
        assert sorted(np.concatenate(pool).tolist()) == sorted(idx[6 * p:6 * p + 6].tolist())
        for b in pool:
            assert (np.diff(key[b]) >= 0).all()
    orders = {tuple(b[0] for b in bucketed_batches(np.arange(60), np.arange(60), 3, 20, 0, e))
              for e in range(4)}
    assert len(orders) > 1  # batch order within a pool is drawn per epoch, not a length ramp
    assert all(np.array_equal(a, b) for a, b in zip(out, bucketed_batches(idx, key, 3, 2, 0, 0)))


def test_sort_key_raw_first_then_the_other_fields():
    lengths = np.array([[10, 20], [10, 5], [9, 77], [77, 3]], np.uint8)
    assert np.argsort(sort_key(lengths)).tolist() == [2, 1, 0, 3]
    assert np.argsort(sort_key(lengths[:, :1]), kind="stable").tolist() == [2, 0, 1, 3]


# ---- the length index ------------------------------------------------------------------------

def test_length_index_matches_the_labels_and_is_cached(shards, cache_dir):
    data, raw, cap = shards
    readers = [RecordReader(os.path.join(data, f"train-{s:05d}.rec")) for s in range(3)]
    got = length_index(readers, 2)
    assert got.dtype == np.uint8 and (got == np.stack([raw, cap], 1)).all()
    cached = sorted(os.listdir(cache_dir / "lengths"))
    assert len(cached) == 3
    for name in cached:  # tampered entries: the next call reads them, not the shards
        np.save(cache_dir / "lengths" / name, np.full((50, 2), 7, np.uint8))
    assert (length_index(readers, 2) == 7).all()
    assert (length_index(readers, 2, use_cache=False) == np.stack([raw, cap], 1)).all()
    rec = readers[0].rec_path
    os.utime(rec, ns=(os.stat(rec).st_atime_ns, os.stat(rec).st_mtime_ns + 10**9))  # a changed shard
    got = length_index(readers, 2)
    assert (got[:50] == np.stack([raw, cap], 1)[:50]).all() and (got[50:] == 7).all()


def test_length_key_reads_memory_mapped_lengths_a_pool_at_a_time(shards):
    data, raw, cap = shards
    readers = [RecordReader(os.path.join(data, f"train-{s:05d}.rec")) for s in range(3)]
    parts = length_parts(readers, 2)
    assert [len(p) for p in parts] == [50, 50, 50] and all(isinstance(p, np.memmap) for p in parts)
    records = np.random.default_rng(0).permutation(N)[:40]  # across the 3 shards, in any order
    assert (LengthKey(parts, [0, 1])[records] == sort_key(np.stack([raw, cap], 1))[records]).all()
    assert (LengthKey(parts, [1])[records] == (1 << 32) * cap[records].astype(np.int64)).all()  # the loader's field order


def _split_worker(rank, world_size, port, data, cache, out):
    import json

    import torch.distributed as dist

    from alip.data import lengths
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ALIP_CACHE_DIR=cache)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    read, real = [], lengths.read_lengths
    lengths.read_lengths = lambda reader, n: read.append(os.path.basename(reader.rec_path)) or real(reader, n)
    loader = load(data, rank=rank, world_size=world_size, length_bucketing=2)
    key = loader._batches.key[np.arange(N)]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"read": read, "key": key.tolist()}, f)
    dist.destroy_process_group()


def test_the_ranks_of_a_machine_split_the_first_length_read(shards, tmp_path):
    # 3 uncached shards, 2 ranks: rank 0 reads shards 0 and 2, rank 1 shard 1, each once; after
    # the barrier both take every shard's lengths from the cache, the same keys on both
    import json

    import torch.multiprocessing as mp

    from test_train_helpers import free_port
    data, raw, cap = shards
    mp.spawn(_split_worker, nprocs=2, join=True,
             args=(2, free_port(), data, str(tmp_path / "cache"), str(tmp_path)))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["read"] == ["train-00000.rec", "train-00002.rec"] and got[1]["read"] == ["train-00001.rec"]
    assert got[0]["key"] == got[1]["key"] == sort_key(np.stack([raw, cap], 1)).tolist()


def test_length_index_reads_split_records_and_names_bad_ones(tmp_path):
    raw, cap = lengths_of(4, seed=5)
    # key MAGIC puts the magic word at payload offset 8: the frame is split inside the IRHeader
    data = write_shards(str(tmp_path / "rec"), raw, cap, keys=[0, MAGIC, 2, 3])
    reader = RecordReader(os.path.join(data, "train-00000.rec"))
    with open(reader.rec_path, "rb") as f:
        f.seek(int(reader.offsets[1]) + 4)
        assert int.from_bytes(f.read(4), "little") >> 29 == 1  # cflag 1: a first part, 8 bytes long
    assert (read_lengths(reader, 2) == np.stack([raw, cap], 1)).all()
    with pytest.raises(RecordIOError, match="train-00000.rec: record key 0: 2 text fields, but "
                                            "the shards' layout has 3"):
        read_lengths(reader, 3)


# ---- train.py's flag -------------------------------------------------------------------------

def test_flag_checks_and_resume_refusal():
    assert parse_args([]).length_bucketing == 0
    assert parse_args(["--length-bucketing", "8"]).length_bucketing == 8
    for argv, msg in ((["--length-bucketing", "-1"], "--length-bucketing must be >= 0"),
                      (["--length-bucketing", "4", "--data-backend", "dali"], "--data-backend dali"),
                      (["--length-bucketing", "4", "--dataset-type", "synthetic"], "synthetic")):
        with pytest.raises(SystemExit, match=msg):
            parse_args(argv)
    args = parse_args(["--length-bucketing", "8"])
    assert resume_conflicts({"length_bucketing": 4}, args) == ["length_bucketing (checkpoint 4, now 8)"]
    assert resume_conflicts({}, args) == ["length_bucketing (checkpoint 0, now 8)"]  # older checkpoints
    assert resume_conflicts({}, parse_args([])) == []
