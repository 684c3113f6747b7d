"""Near-duplicate captions: normalised text, word-set Jaccard, MinHash-LSH candidate search.

`NearDupIndex.add(text)` keeps a caption unless an earlier one is an exact duplicate (after
`normalise`) or a near duplicate (word-set Jaccard >= threshold). MinHash with banded LSH only
proposes candidates; every candidate is verified with the exact Jaccard, so the result is exact
for the pairs LSH proposes and deterministic (first occurrence wins, in insertion order).
Hashes are keyed by blake2b, not Python's salted `hash`, so results do not change between runs.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from ..filters import normalise

_PERMS = 64
_BANDS = 16                 # 16 bands x 4 rows: pairs with Jaccard >= ~0.5 are very likely proposed
_ROWS = _PERMS // _BANDS
_rng = np.random.default_rng(20240607)
_A = (_rng.integers(1, 2**63, _PERMS, dtype=np.uint64) | np.uint64(1))   # odd multipliers
_B = _rng.integers(0, 2**63, _PERMS, dtype=np.uint64)


def word_set(text: str) -> frozenset[str]:
    """The distinct words of `text` after `datagen.filters.normalise`."""
    return frozenset(normalise(text).split())


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a & b| / |a | b| in [0, 1]; 1.0 for two empty sets."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _token_hash(tok: str) -> int:
    return int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=8).digest(), "little")


def minhash(words: frozenset[str]) -> np.ndarray:
    """MinHash signature of a word set: uint64 [64] (one min of (a * h + b) mod 2**64 per permutation,
    h = blake2b-64 of each word); an empty set hashes as the single value 0."""
    x = np.array(sorted(_token_hash(w) for w in words) or [0], dtype=np.uint64)
    with np.errstate(over="ignore"):                 # multiply-add mod 2**64 is the point
        h = _A[:, None] * x[None, :] + _B[:, None]
    return h.min(axis=1)


class NearDupIndex:
    """Kept captions, checked by exact normalised text and (`near`) word-set Jaccard >= `threshold`
    via MinHash-LSH; `removed` counts the "exact" and "near" duplicates `add` refused."""

    def __init__(self, threshold: float = 0.8, near: bool = True):
        self.threshold, self.near = threshold, near
        self.exact: set[str] = set()
        self.sets: list[frozenset[str]] = []
        self.buckets: list[dict] = [defaultdict(list) for _ in range(_BANDS)]
        self.removed = {"exact": 0, "near": 0}

    def _probe(self, text: str):
        key = normalise(text)
        if key in self.exact:
            return key, None, None, "exact"
        if not self.near:
            return key, None, None, None
        ws = word_set(text)
        sig = minhash(ws)
        seen: set[int] = set()
        for b in range(_BANDS):
            for k in self.buckets[b].get(sig[b * _ROWS:(b + 1) * _ROWS].tobytes(), ()):
                if k not in seen:
                    seen.add(k)
                    if jaccard(ws, self.sets[k]) >= self.threshold:
                        return key, ws, sig, "near"
        return key, ws, sig, None

    def check(self, text: str) -> str | None:
        """"exact" / "near" if `text` duplicates a kept caption, else None (nothing is added)."""
        return self._probe(text)[3]

    def add(self, text: str) -> bool:
        """Keep `text` (True) unless it duplicates a kept caption (False, counted)."""
        key, ws, sig, dup = self._probe(text)
        if dup:
            self.removed[dup] += 1
            return False
        self.exact.add(key)
        if self.near:
            k = len(self.sets)
            self.sets.append(ws)
            for b in range(_BANDS):
                self.buckets[b][sig[b * _ROWS:(b + 1) * _ROWS].tobytes()].append(k)
        return True
