"""An epoch's sample order: a bijection of [0, n) drawn from (seed, epoch), read by position.

Up to ``MATERIALISE_MAX`` records (2**24, 128 MB) it is numpy's ``default_rng([seed,
epoch]).permutation(n)``, the order this reader has always used. Above that a materialised
permutation would cost 8 bytes per record on every rank each epoch (8 GB and over a minute per
rank at 1B records, 8 ranks a node), so the order is computed per position and never stored:
rank r asks only for its own positions, a batch or a length-bucketing pool at a time. It is the
idea of TensorFlow's ``tf.random_index_shuffle`` (a small block cipher with cycle-walking): a
Feistel network is a bijection of [0, 4**h) for any round function; cycle-walking (apply it
again while the result is >= n) restricts it to a bijection of [0, n). 4**h < 4n, so a position
takes under 4 walks on average. The rounds mix with the splitmix64 finaliser keyed by 64-bit
words drawn from ``SeedSequence([seed, epoch, TAG])``; everything is unsigned 64-bit integer
arithmetic, the same bits on every CPU. (Feistel permutations are even permutations, so for a
tiny domain the distribution over orders is not uniform; above 2**24 records that is
immaterial.)
"""
import numpy as np

TAG = 0x6F726472  # "ordr": keeps this stream apart from other (seed, epoch, ...) draws
ROUNDS = 8
MATERIALISE_MAX = 1 << 24
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x):
    """splitmix64's finaliser (x: uint64 array, modified in place and returned)."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def order_kind(n):
    """Which order ``n`` records get: "permutation" (stored) or "feistel" (per position)."""
    return "permutation" if n <= MATERIALISE_MAX else "feistel"


class EpochOrder:
    """``order[positions]``: the record index at each position of epoch ``epoch``'s order of
    ``n`` records (int64 array in, int64 array out); a bijection of [0, n) drawn from
    (seed, epoch). ``kind`` (default: by ``n``) forces one of the two ways."""

    def __init__(self, n, seed, epoch, kind=None):
        self.n = int(n)
        if self.n < 0:
            raise ValueError(f"n = {n}: expected a record count >= 0")
        self.kind = kind or order_kind(self.n)
        if self.kind == "permutation":
            self.perm = np.random.default_rng([int(seed), int(epoch)]).permutation(self.n)
            return
        self.half = max(1, (max(self.n - 1, 1).bit_length() + 1) // 2)  # 4**half >= n
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.SeedSequence([int(seed), int(epoch), TAG]).generate_state(ROUNDS, np.uint64)

    def _feistel(self, x):
        h, mask = np.uint64(self.half), self.mask
        left, right = x >> h, x & mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << h) | right

    def __getitem__(self, positions):
        p = np.asarray(positions, np.int64)
        if p.size and (p.min() < 0 or p.max() >= self.n):
            raise IndexError(f"positions must lie in 0..{self.n - 1}")
        if self.kind == "permutation":
            return self.perm[p]
        x = self._feistel(p.astype(np.uint64))
        out = x >= np.uint64(self.n)
        while out.any():  # cycle-walking: each x stays on its own cycle of the bijection
            x[out] = self._feistel(x[out])
            out[out] = x[out] >= np.uint64(self.n)
        return x.astype(np.int64)
