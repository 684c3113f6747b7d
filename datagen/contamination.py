"""Benchmark contamination check: no generated image may be a near-copy of a benchmark image.

A gallery is any folder of images, searched recursively (so CIRCO's `unlabeled2017/`, CIRR's
`dev/ test1/ train/` and FashionIQ's `images/` all work, as do the shapes benchmarks). Its pHashes
(and, when asked, CLIP features) are computed once and cached in `<gallery>/.cirgen-cache/` (or
`cache_dir`, or ~/.cache/cirgen/contamination when the gallery is read-only), keyed by the folder's
listing (absolute folder; per file: relative path, inode, size, mtime, ctime), the image loader
version and the hash settings: any added, removed, replaced or rewritten image (ctime changes even
when size and mtime are restored), or another copy of the gallery, makes a new key. Concurrent
workers compute a gallery once: the first takes a file lock.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .base.io import write_atomic
from .candidate import Candidate
from .dedupe import nearest, phashes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CACHE_VERSION = 1
CONTAMINATED = "contaminated"


def gallery_files(folder: str | Path) -> list[Path]:
    """The image files under `folder` (recursively, by suffix in `IMAGE_SUFFIXES`, case-insensitive), sorted,
    skipping anything inside a `.cirgen-cache/`. Raises FileNotFoundError when `folder` is not a directory."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: benchmark gallery folder not found")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and ".cirgen-cache" not in p.parts)


def listing_key(folder: Path, files: list[Path], extra: dict) -> str:
    """20 hex digits of SHA-256 over `CACHE_VERSION`, the image loader version, `folder`, `extra` (the hash
    settings) and each file's relative path, inode, size, mtime and ctime (ns). `files` must lie under `folder`
    (else ValueError); a file that vanished raises FileNotFoundError."""
    from .base.images import LOADER_VERSION

    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "loader": LOADER_VERSION, "folder": str(folder),
                                   **extra}, sort_keys=True).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()[:20]


def _cache_dir(folder: Path, cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    own = folder / ".cirgen-cache"
    if os.access(folder, os.W_OK) or own.is_dir():
        return own
    return Path.home() / ".cache" / "cirgen" / "contamination"


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _cached(path: Path, compute) -> dict:
    """Load `path` (npz) or compute it once under a file lock and write it atomically."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                arrays = compute()
                write_atomic(path, _npz_bytes(arrays))
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@dataclass
class Gallery:
    """One benchmark gallery as `load_gallery` returns it: its files, their pHashes and optional CLIP features."""

    folder: Path
    files: list[str]               # paths relative to the folder
    hashes: np.ndarray             # [n, words] uint64
    features: np.ndarray | None = None   # [n, d] float16 unit vectors (CLIP)


def load_gallery(folder: str | Path, channels: str = "gray", cache_dir: str | None = None,
                 scorer=None) -> Gallery:
    """The gallery's pHashes (and CLIP features when `scorer` is given), from the cache if fresh.

    `channels` is the pHash mode (`gray`: one uint64 word per image, `rgb`: three); features are computed 256 images
    at a time with `scorer.image_features` and stored as float16 [n, d] (shape [0, 1] for an empty gallery).
    Raises FileNotFoundError when `folder` is not a directory; cache write errors propagate as OSError.
    """
    folder = Path(folder).resolve()
    files = gallery_files(folder)
    rel = [str(p.relative_to(folder)) for p in files]
    cache = _cache_dir(folder, cache_dir)
    key = listing_key(folder, files, {"phash": channels})
    z = _cached(cache / f"phash-{key}.npz", lambda: {
        "hashes": phashes((p.read_bytes() for p in files), channels), "files": np.array(rel, dtype=str)})
    feats = None
    if scorer is not None:
        fkey = listing_key(folder, files, {"clip": scorer.model_id})

        def compute_features() -> dict:
            out = [scorer.image_features([p.read_bytes() for p in files[i:i + 256]])
                   for i in range(0, len(files), 256)]
            return {"features": (np.concatenate(out) if out else np.zeros((0, 1))).astype(np.float16)}

        feats = _cached(cache / f"clip-{fkey}.npz", compute_features)["features"]
    return Gallery(folder, list(z["files"]), z["hashes"].astype(np.uint64), feats)


class ContaminationFilter:
    """Rejects `contaminated` candidates: reference or target within `max_distance` pHash bits of a
    gallery image (or, with `clip_threshold`, at CLIP cosine >= it). Stores the nearest distance.

    Galleries load at the first batch; a missing gallery folder raises ConfigError then. With no gallery
    images at all, `score_contamination_phash` is null and every candidate passes.
    """

    name = "contamination"

    def __init__(self, galleries: Sequence[str], max_distance: int = 4, channels: str = "gray",
                 cache_dir: str | None = None, clip_threshold: float | None = None, scorer_factory=None):
        self.galleries, self.max_distance, self.channels = list(galleries), int(max_distance), channels
        self.cache_dir, self.clip_threshold = cache_dir, clip_threshold
        self._scorer_factory = scorer_factory
        self._gallery: tuple[np.ndarray, np.ndarray | None] | None = None
        self.score_columns = ["score_contamination_phash"] + (
            ["score_contamination_clip"] if clip_threshold is not None else [])
        self.pass_columns = ["pass_contamination"]

    @classmethod
    def from_recipe(cls, recipe, scorer_factory=None) -> "ContaminationFilter":
        """The filter configured by `recipe.filters.contamination`; `scorer_factory` builds the CLIP scorer
        (needed only when `clip_threshold` is set). Galleries are read lazily, at the first batch."""
        c = recipe.filters.contamination
        return cls(c.galleries, c.max_distance, c.channels, c.cache_dir, c.clip_threshold, scorer_factory)

    def _load(self) -> tuple[np.ndarray, np.ndarray | None]:
        # Lazily, at the first batch: a worker pool's initializer must not fail (it would respawn).
        if self._gallery is None:
            from .base.config import ConfigError

            scorer = self._scorer_factory() if self.clip_threshold is not None else None
            try:
                gs = [load_gallery(g, self.channels, self.cache_dir, scorer) for g in self.galleries]
            except FileNotFoundError as e:
                raise ConfigError(f"filters.contamination: {e}") from None
            hashes = np.concatenate([g.hashes for g in gs])
            feats = np.concatenate([g.features for g in gs]).astype(np.float32) if scorer else None
            self._gallery = (hashes, feats)
        return self._gallery

    def __call__(self, batch: list[Candidate]) -> None:
        hashes, feats = self._load()
        refs = phashes((c.reference_image for c in batch), self.channels)
        tgts = phashes((c.target_image for c in batch), self.channels)
        d_ref, _ = nearest(refs, hashes)
        d_tgt, _ = nearest(tgts, hashes)
        sims = None
        if feats is not None and len(feats):
            scorer = self._scorer_factory()
            f_ref = scorer.image_features([c.reference_image for c in batch])
            f_tgt = scorer.image_features([c.target_image for c in batch])
            sims = np.maximum((f_ref @ feats.T).max(1, initial=-1.0), (f_tgt @ feats.T).max(1, initial=-1.0))
        for k, c in enumerate(batch):
            d = int(min(d_ref[k], d_tgt[k])) if len(hashes) else None
            ok = d is None or d > self.max_distance
            c.scores["score_contamination_phash"] = None if d is None else float(d)
            if sims is not None:
                c.scores["score_contamination_clip"] = float(sims[k])
                ok = ok and sims[k] < self.clip_threshold
            c.passes["pass_contamination"] = bool(ok)
            if not ok:
                c.reject(CONTAMINATED)
