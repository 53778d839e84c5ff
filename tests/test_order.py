"""The epoch order (alip.data.order) and the torch reader's batches over it (rank_batches):
numpy's permutation up to 2**24 records, a per-position Feistel bijection above; exactly once
over ranks, exact resume and length bucketing on both; no record-sized allocation at 1e12."""
import math
import os
import tracemalloc

import numpy as np
import pytest

from alip.data import order as order_mod
from alip.data.bucketing import sort_key
from alip.data.loader import build_train_loader
from alip.data.order import EpochOrder, order_kind
from alip.data.recordio import RecordReader
from alip.data.torch_reader import rank_batches
from data_fixtures import cache_dir, make_rec_shards  # noqa: F401  (cache_dir: autouse)


def whole(n, seed=0, epoch=0, kind=None):
    return EpochOrder(n, seed, epoch, kind)[np.arange(n)]


def test_up_to_2_24_records_the_order_is_numpys_permutation():
    # the order the reader has always drawn: runs and checkpoints of that size are unchanged
    for n, seed, epoch in ((1000, 3, 2), (23, 0, 0), (1, 5, 9)):
        assert np.array_equal(whole(n, seed, epoch), np.random.default_rng([seed, epoch]).permutation(n))
    assert order_kind(2 ** 24) == "permutation" and order_kind(2 ** 24 + 1) == "feistel"


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 1000, 4096, 4097, 65537])
def test_feistel_is_a_bijection(n):
    for seed, epoch in ((0, 0), (7, 3)):
        assert np.array_equal(np.sort(whole(n, seed, epoch, "feistel")), np.arange(n))


def test_feistel_order_is_pinned():
    # integer arithmetic only: these are the same on every CPU, and a change here would break
    # the mid-epoch resume of every run over 2**24 records
    assert EpochOrder(10 ** 9, 0, 0)[np.arange(6)].tolist() == [
        666924577, 149048192, 748255053, 189524671, 682981948, 314896664]
    assert EpochOrder(10 ** 9, 1, 0)[np.arange(3)].tolist() == [843497704, 723109612, 736279610]
    assert EpochOrder(10 ** 9, 0, 1)[np.arange(3)].tolist() == [820405232, 349804487, 721783509]
    assert whole(50, kind="feistel")[:10].tolist() == [17, 39, 21, 13, 34, 28, 10, 43, 37, 40]


def test_feistel_looks_like_a_random_permutation():
    n = 2 ** 20
    o = whole(n, 4, 0, "feistel")
    # rank correlation of position and record: sd 1/sqrt(n) ~ 0.001 for a random permutation
    assert abs(np.corrcoef(np.arange(n), o)[0, 1]) < 0.01
    # neighbours in the order land within n/100 of each other with probability ~0.0199
    # (sd 0.00014 over 2**20 pairs)
    assert abs((np.abs(np.diff(o)) < n // 100).mean() - 0.0199) < 0.002
    # another epoch is another order: ~1 fixed point expected
    assert (whole(n, 4, 1, "feistel") == o).sum() < 10
    # the first record over 4000 epochs is uniform on 10 records: chi-square, 9 dof (p=1e-5 at 39)
    first = np.bincount([EpochOrder(10, 0, e, "feistel")[np.array([0])][0] for e in range(4000)],
                        minlength=10)
    assert ((first - 400) ** 2 / 400).sum() < 39, first


def test_positions_outside_the_order_are_refused():
    with pytest.raises(IndexError, match=r"0\.\.9"):
        EpochOrder(10, 0, 0, "feistel")[np.array([10])]
    with pytest.raises(IndexError):
        EpochOrder(10, 0, 0)[np.array([-1])]


@pytest.mark.parametrize("kind", ["permutation", "feistel"])
@pytest.mark.parametrize("pool", [0, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_batches_exactly_once_and_resume(monkeypatch, kind, pool, drop_last):
    if kind == "feistel":
        monkeypatch.setattr(order_mod, "MATERIALISE_MAX", 0)
    key = sort_key(np.random.default_rng(0).integers(3, 78, (1001, 2)))
    for n, W, B in ((23, 2, 3), (150, 4, 5), (1001, 3, 8), (1001, 1, 3)):  # the last: 6 chunks
        got = []
        for r in range(W):
            batches = list(rank_batches(n, 1, 5, r, W, B, drop_last, pool, key))
            mine = len(range(r, W * B * (n // (W * B)) if drop_last else n, W))
            assert len(batches) == math.ceil(mine / B)  # the loader's batches_per_epoch
            assert all(len(b) == B for b in batches[:-1]) and 0 < len(batches[-1]) <= B
            for k in (1, len(batches) // 2, len(batches) - 1):  # resume at batch k
                rest = list(rank_batches(n, 1, 5, r, W, B, drop_last, pool, key, start_batch=k))
                assert len(rest) == len(batches) - k
                assert all(np.array_equal(a, b) for a, b in zip(batches[k:], rest))
            got += np.concatenate(batches).tolist()
        assert len(got) == len(set(got))
        if drop_last:
            assert len(got) == W * B * (n // (W * B))
        else:
            assert sorted(got) == list(range(n))


def test_permutation_batches_are_the_old_sampler_order():
    # rank r's records were perm[:kept][r::W], cut into batches of B
    n, W, B, seed, epoch = 150, 4, 5, 3, 2
    perm = np.random.default_rng([seed, epoch]).permutation(n)[:W * B * (n // (W * B))]
    for r in range(W):
        mine = perm[r::W]
        want = [mine[i:i + B] for i in range(0, len(mine), B)]
        got = list(rank_batches(n, epoch, seed, r, W, B, True))
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_a_trillion_records_cost_no_record_sized_memory():
    n, W, B = 10 ** 12, 64, 512
    tracemalloc.start()
    try:
        first = next(rank_batches(n, 0, 0, 63, W, B, True))
        late = next(rank_batches(n, 0, 0, 63, W, B, True, start_batch=10 ** 7))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(first) == len(late) == B and len(set(first.tolist()) | set(late.tolist())) == 2 * B
    assert ((first >= 0) & (first < n)).all() and ((late >= 0) & (late < n)).all()
    # a few arrays of one chunk (64 batches x 512 x 8 B = 256 KB each); a stored order: 8 TB
    assert peak < 8 << 20, peak


# ---- through the loader ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_rec_shards(tmp_path_factory, 23)


def loader_keys(loader, epoch, start_batch=0):
    """Record keys in the order the loader yields them (the fixture's raw text is ``text {key}``,
    so the key is read back from its tokens through the shards' own table)."""
    table = {tuple(r.raw_tokens): r.key for name in sorted(os.listdir(loader.shards_dir))
             if name.endswith(".rec") for r in RecordReader(os.path.join(loader.shards_dir, name))}
    loader.set_epoch(epoch, start_batch)
    return [table[tuple(row.tolist())] for batch in loader for row in batch["raw"]]


def build(shards, **kw):
    loader = build_train_loader(shards, backend="torch", batch_size=4, image_size=8, workers=0,
                                drop_last=False, **kw)
    loader.shards_dir = shards
    return loader


def test_the_loader_on_the_feistel_order(shards, monkeypatch):
    before = loader_keys(build(shards), 1)
    monkeypatch.setattr(order_mod, "MATERIALISE_MAX", 0)
    parts = [loader_keys(build(shards, rank=r, world_size=2), 1) for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == list(range(23))
    single = build(shards)
    got = loader_keys(single, 1)
    assert sorted(got) == list(range(23)) and got != before
    assert loader_keys(build(shards), 1, start_batch=2) == got[8:]
    # its loader state names the order; a mid-epoch state from the permutation order is refused
    single.set_epoch(1, 2)
    assert single.state_dict() == {"epoch": 1, "batch": 2, "order": "feistel"}
    single.load_state_dict({"epoch": 1, "batch": 2, "order": "feistel"})
    single.load_state_dict({"epoch": 2, "batch": 0})  # an epoch boundary does not depend on it
    with pytest.raises(ValueError, match=r"2 batches into epoch 1 of a 'permutation' sample order"):
        single.load_state_dict({"epoch": 1, "batch": 2})
