"""Perceptual hashes (pHash) and near-duplicate removal of triplets.

pHash (the `imagehash.phash` recipe, in numpy): grey 32x32 (Lanczos), 2-D DCT-II, the top-left 8x8
coefficients, each bit = coefficient > their median -> 64 bits. `channels="rgb"` hashes R, G and B
separately (192 bits): greyscale pHash cannot tell a red circle from a blue one, which in the shapes
world makes different triplets look identical. Distances are Hamming bits summed over channels.

Scope (deterministic by construction):
- **within a work unit** the filter rejects a candidate whose images near-duplicate an earlier
  *kept* triplet of the same unit (`near_duplicate`); candidates are checked in candidate order,
  so the result depends only on the unit, never on batch size or worker count;
- **across units** nothing is removed (units run in parallel, so "earlier" would depend on
  scheduling); `cross_unit_report` lists, after all units are complete, each kept triplet that
  near-duplicates a kept triplet of a lower-numbered unit, computed from the shards alone.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from .candidate import Candidate
from .clip_scores import ImageLike, to_pil
from .schema import shard_path

HASH_SIZE = 8
IMG_SIZE = 32
NEAR_DUPLICATE = "near_duplicate"


@lru_cache(maxsize=4)
def _dct_matrix(n: int) -> np.ndarray:
    # Unnormalised DCT-II as scipy.fftpack.dct(type=2, norm=None): y_k = 2 sum x_i cos(pi k (2i+1) / 2n).
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


def _phash_plane(plane: Image.Image) -> np.uint64:
    x = np.asarray(plane.resize((IMG_SIZE, IMG_SIZE), Image.LANCZOS), dtype=np.float64)
    d = _dct_matrix(IMG_SIZE)
    low = (d @ x @ d.T)[:HASH_SIZE, :HASH_SIZE]
    bits = (low > np.median(low)).flatten()
    return np.packbits(bits).view(">u8")[0].astype(np.uint64)


def phash(image: ImageLike, channels: str = "gray") -> np.ndarray:
    """The image's pHash: uint64 array of 1 (gray) or 3 (rgb) words."""
    img = to_pil(image)
    if channels == "gray":
        planes = [img.convert("L")]
    elif channels == "rgb":
        planes = list(img.split())
    else:
        raise ValueError(f"channels must be 'gray' or 'rgb', got {channels!r}")
    return np.array([_phash_plane(p) for p in planes], dtype=np.uint64)


def phashes(images: Iterable[ImageLike], channels: str = "gray") -> np.ndarray:
    """[n, words] uint64 hashes of many images."""
    rows = [phash(im, channels) for im in images]
    return np.stack(rows) if rows else np.zeros((0, 1 if channels == "gray" else 3), np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ, summed over the last axis; broadcasts ([n,1,w] vs [1,m,w] -> [n,m])."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(-1).astype(np.int64)


def nearest(queries: np.ndarray, index: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(distance, position) of each query's nearest row of `index`; distance -1 when empty."""
    n = len(queries)
    dist, pos = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    if len(index) == 0:
        return dist, pos
    step = max(1, chunk * 4096 // max(1, len(index)))     # bound the [step, len(index)] block
    for i in range(0, n, step):
        d = hamming(queries[i:i + step, None, :], index[None, :, :])
        pos[i:i + step] = d.argmin(1)
        dist[i:i + step] = d[np.arange(len(d)), pos[i:i + step]]
    return dist, pos


class DedupeFilter:
    """Rejects `near_duplicate` candidates; stores the distance to the nearest earlier kept triplet.

    Runs last among the filters, so that only triplets every other filter kept enter the index.
    `score_dedupe_phash` is null when the unit has no earlier kept triplet.
    """

    name = "dedupe"
    score_columns = ["score_dedupe_phash"]
    pass_columns = ["pass_dedupe"]

    def __init__(self, max_distance: int = 4, match: str = "pair", channels: str = "gray"):
        self.max_distance, self.match, self.channels = int(max_distance), match, channels
        self._unit: int | None = None
        self._ref = self._tgt = np.zeros((0, 1 if channels == "gray" else 3), np.uint64)

    @classmethod
    def from_recipe(cls, recipe) -> "DedupeFilter":
        """The filter configured by `recipe.filters.dedupe` (max_distance, match, channels)."""
        c = recipe.filters.dedupe
        return cls(c.max_distance, c.match, c.channels)

    def _reset_if_new_unit(self, c: Candidate) -> None:
        # One Stages object serves many units in a worker; a unit always starts at candidate 0.
        if c.unit != self._unit or c.j == 0:
            self._unit = c.unit
            self._ref = self._tgt = self._ref[:0]

    def distance(self, ref: np.ndarray, tgt: np.ndarray) -> int | None:
        """The distance the rule compares with `max_distance`, in Hamming bits (None: nothing to compare with).

        `ref`, `tgt`: [words] uint64 pHashes. `match="pair"`: per earlier kept triplet the larger of the
        reference-reference and target-target distances, minimised over triplets; otherwise the smallest
        distance of either image to any earlier kept reference or target (`match="either"`).
        """
        if len(self._ref) == 0:
            return None
        d_ref, d_tgt = hamming(ref[None], self._ref), hamming(tgt[None], self._tgt)
        if self.match == "pair":
            return int(np.maximum(d_ref, d_tgt).min())
        both = np.concatenate([self._ref, self._tgt])
        return int(min(hamming(ref[None], both).min(), hamming(tgt[None], both).min()))

    def __call__(self, batch: list[Candidate]) -> None:
        for c in sorted(batch, key=lambda c: (c.unit, c.j)):
            self._reset_if_new_unit(c)
            ref, tgt = phash(c.reference_image, self.channels), phash(c.target_image, self.channels)
            d = self.distance(ref, tgt)
            ok = d is None or d > self.max_distance
            c.scores["score_dedupe_phash"] = None if d is None else float(d)
            c.passes["pass_dedupe"] = ok
            if not ok:
                c.reject(NEAR_DUPLICATE)
            if c.kept:
                self._ref = np.concatenate([self._ref, ref[None]])
                self._tgt = np.concatenate([self._tgt, tgt[None]])


def cross_unit_report(out: Path, units: Sequence[int], max_distance: int = 4, match: str = "pair",
                      channels: str = "gray") -> dict:
    """Kept triplets that near-duplicate a kept triplet of a lower-numbered unit (nothing removed).

    Deterministic: computed from the shards after every unit is complete. O(n^2) Hamming
    comparisons in numpy blocks (about a second per 20k triplets on one core).
    """
    import pyarrow.parquet as pq

    ids, unit_of, refs, tgts = [], [], [], []
    for u in sorted(units):
        t = pq.read_table(shard_path(out, u), columns=["id", "reference_image", "target_image"])
        for row in t.to_pylist():
            ids.append(row["id"])
            unit_of.append(u)
            refs.append(phash(row["reference_image"]["bytes"], channels))
            tgts.append(phash(row["target_image"]["bytes"], channels))
    dups: list[str] = []
    if ids:
        R, T, U = np.stack(refs), np.stack(tgts), np.asarray(unit_of)
        starts = np.searchsorted(U, np.unique(U))          # rows are grouped by unit, ascending
        ends = list(starts[1:]) + [len(U)]
        for s, e in zip(starts, ends):
            for q in range(s, e, 64):                        # earlier units = rows [0, s)
                b = slice(q, min(q + 64, e))
                if match == "pair":
                    d = np.maximum(hamming(R[b, None], R[None, :s]), hamming(T[b, None], T[None, :s]))
                else:
                    both = np.concatenate([R[:s], T[:s]])[None]
                    d = np.minimum(hamming(R[b, None], both), hamming(T[b, None], both))
                hit = (d <= max_distance).any(1) if s else np.zeros(b.stop - b.start, bool)
                dups += [ids[i] for i in np.flatnonzero(hit) + q]
    return {"scope": "report only: within-unit duplicates are rejected, cross-unit ones listed here",
            "max_distance": max_distance, "match": match, "channels": channels,
            "checked": len(ids), "count": len(dups), "ids": dups}
