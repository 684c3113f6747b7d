"""Which caption (or topic) of a pool of M goes to candidate j of work unit u.

A pure function of (seed, M, unit, j), so reruns, resumes, any worker count and any batch size
give the same assignment, and growing `--n` only adds units without touching existing ones.

    slot  = unit * stride + j          stride = unit_size * reserve
    epoch, pos = divmod(slot, M)
    index = P_epoch(pos)               P: a keyed pseudo-random permutation of [0, M)

Each unit owns a window of `stride` slots, so the captions of different units never collide as
long as the pool is large enough (M >= units * stride) and a unit needs fewer than `stride`
candidates (`reserve` candidates per kept triplet: 4 covers a 25% yield). A small pool wraps
into further epochs, each a fresh permutation, so repeats are spread out rather than in lockstep.
Only a unit that needs more than `stride` candidates spills into the next unit's window.
The permutation is a Feistel network with cycle walking: O(1) memory for any M.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

_M64 = (1 << 64) - 1
_ROUNDS = 6


def _mix(x: int) -> int:
    """splitmix64 finaliser."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


@lru_cache(maxsize=64)
def _keys(seed: int, epoch: int) -> tuple[int, ...]:
    state = np.random.SeedSequence([int(seed), int(epoch), 0x5EED]).generate_state(_ROUNDS, dtype=np.uint64)
    return tuple(int(k) for k in state)


def permute(pos: int, m: int, seed: int, epoch: int) -> int:
    """A bijection of [0, m) keyed by (seed, epoch)."""
    if m <= 1:
        return 0
    half = max(1, ((m - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    keys = _keys(seed, epoch)
    x = pos
    while True:                                 # cycle walking: at most ~4 rounds on average
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        x = (left << half) | right
        if x < m:
            return x


class SlotAssigner:
    """The assignment of the module docstring for a pool of `m` items; `order` "sequential" skips the
    permutation (index = pos). Raises ValueError for an empty pool (`m` < 1)."""

    def __init__(self, m: int, seed: int, stride: int, order: str = "shuffled"):
        if m < 1:
            raise ValueError("cannot assign from an empty pool")
        self.m, self.seed, self.stride, self.order = m, int(seed), int(stride), order

    def slot(self, unit: int, j: int) -> int:
        """The global slot of candidate `j` of work unit `unit`: unit * stride + j."""
        return unit * self.stride + j

    def index(self, unit: int, j: int) -> int:
        """The pool index in [0, m) for candidate `j` of work unit `unit` (epoch, pos = divmod(slot, m))."""
        epoch, pos = divmod(self.slot(unit, j), self.m)
        if self.order == "sequential":
            return pos
        return permute(pos, self.m, self.seed, epoch)
