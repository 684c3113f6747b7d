"""Image-caption sources for stage I (and image loading for the feature cache).

Every source exposes the same small interface: `ids` (stable string ids), `caption(i)`,
`image(i)` (a PIL image) and `dataset_id` (what the content is, for cache keys). Sources:
the shapes world, Parquet, CSV + image folder, WebDataset tars and a HF dataset saved on disk.
Bad rows are an error naming file and row, or a counted skip when `bad_rows="skip"`.
"""
from __future__ import annotations

import csv
import glob
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from datagen.base.errors import CirgenError, os_error_line
from datagen.base.images import ImageError
from datagen.base.images import open_image as _open_image


class DataError(CirgenError, ValueError):
    """Unusable input data; the message names the file and the row/key."""


@dataclass
class DataConfig:
    """The `data` section of a stage-I recipe: which image-caption source `open_source` opens."""

    source: Literal["shapes", "parquet", "csv", "webdataset", "hf_disk"] = "shapes"
    path: str | None = None            # file, folder or glob for the non-shapes sources
    image_root: str | None = None      # CSV: folder the image paths are relative to
    image_column: str = "image"
    caption_column: str = "caption"
    n: int = 20000                     # shapes: number of image-caption pairs
    seed: int = 0
    resolution: int = 128
    bad_rows: Literal["error", "skip"] = "error"


def open_image(data: bytes | str | Path, where: str) -> Image.Image:
    """RGB pixels of an image (bytes or path) by the project's one loader
    (`datagen.base.images.open_image`: EXIF orientation, 16-bit, alpha on white, truncation);
    raises `DataError` naming `where`."""
    try:
        return _open_image(data, where)
    except ImageError as e:
        raise DataError(str(e)) from None


class ShapesImageCaptions:
    """n training-partition scenes, rendered and captioned deterministically from (seed, i)."""

    def __init__(self, n: int, seed: int = 0, resolution: int = 128):
        from datagen.world.phrases import load_phrases

        self.n, self.seed, self.resolution = n, seed, resolution
        self.phrases = load_phrases("train")
        self.ids = [f"shapes-{seed}-{i}" for i in range(n)]
        self.dataset_id = f"shapes-s{seed}-n{n}-r{resolution}"
        self.skipped = 0

    def __len__(self) -> int:
        return self.n

    def _scene(self, i: int):
        from datagen.world.scene import sample_scene

        rng = np.random.default_rng([self.seed, i, 11])
        return sample_scene(rng, 1, 4, split="train"), rng

    def caption(self, i: int) -> str:
        """The caption of pair `i` (the train phrase set describing `scene(i)`)."""
        scene, rng = self._scene(i)
        return self.phrases.caption(scene, rng)

    def scene(self, i: int):
        """The ground-truth scene of pair `i`: 1 to 4 objects, training partition, seeded by (seed, i)."""
        return self._scene(i)[0]

    def image(self, i: int) -> Image.Image:
        """`scene(i)` rendered as an RGB image of `resolution` x `resolution` pixels."""
        from datagen.world.render import RenderConfig, render

        scene, _ = self._scene(i)
        return render(scene, int(np.random.default_rng([self.seed, i, 12]).integers(2**31)),
                      RenderConfig(resolution=self.resolution))


class _TableSource:
    """Rows of (image bytes or path, caption) held in memory as Python lists (captions) and
    lazily decoded images."""

    def __init__(self, name: str, images: list, captions: list, ids: list[str], bad_rows: str,
                 where: list[str], image_root: Path | None = None):
        self.bad_rows = bad_rows
        self.skipped = 0
        keep = []
        for k, (img, cap) in enumerate(zip(images, captions)):
            if img is None or not isinstance(cap, str) or not cap.strip():
                problem = "empty caption" if img is not None else "no image"
                if bad_rows == "error":
                    raise DataError(f"{where[k]}: {problem}")
                self.skipped += 1
                continue
            keep.append(k)
        self._images = [images[k] for k in keep]
        self._captions = [captions[k].strip() for k in keep]
        self._where = [where[k] for k in keep]
        self.ids = [ids[k] for k in keep]
        self.image_root = image_root
        self._name = name
        self._content_id: str | None = None

    @property
    def dataset_id(self) -> str:
        """What the images are (their bytes, in order), for feature-cache keys: not the file or
        row names, which another dataset can share."""
        if self._content_id is None:
            from .features import content_id

            items = []
            for i in range(len(self.ids)):
                try:
                    items.append(self._source(i))
                except DataError:
                    items.append(None)      # escapes its root: reported when the row is read
            self._content_id = f"{self._name}-{content_id(items)}"
        return self._content_id

    def __len__(self) -> int:
        return len(self.ids)

    def caption(self, i: int) -> str:
        return self._captions[i]

    def _source(self, i: int) -> bytes | Path:
        data = self._images[i]
        if isinstance(data, dict):
            data = data.get("bytes") or data.get("path")
        if isinstance(data, str):
            p = Path(data)
            if self.image_root is not None:
                p = (self.image_root / data).resolve()
                if self.image_root.resolve() not in p.parents:
                    raise DataError(f"{self._where[i]}: image path {data!r} escapes {self.image_root}")
            data = p
        return data

    def image(self, i: int) -> Image.Image:
        return open_image(self._source(i), self._where[i])


def _parquet(cfg: DataConfig) -> _TableSource:
    import pyarrow.parquet as pq

    images, caps, ids, where = [], [], [], []
    for f in _files(cfg.path):
        try:
            t = pq.read_table(f, columns=[cfg.image_column, cfg.caption_column])
        except Exception as e:
            raise DataError(f"{f}: cannot read columns {cfg.image_column!r}, {cfg.caption_column!r} ({e})") from None
        for r, (img, cap) in enumerate(zip(t.column(0).to_pylist(), t.column(1).to_pylist())):
            images.append(img)
            caps.append(cap)
            ids.append(f"{f.name}:{r}")
            where.append(f"{f} row {r}")
    return _TableSource("parquet", images, caps, ids, cfg.bad_rows, where)


def _csv(cfg: DataConfig) -> _TableSource:
    path = Path(cfg.path)
    root = Path(cfg.image_root) if cfg.image_root else path.parent
    images, caps, ids, where = [], [], [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for col in (cfg.image_column, cfg.caption_column):
            if col not in (reader.fieldnames or []):
                raise DataError(f"{path}: no column {col!r} (columns: {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            images.append(row.get(cfg.image_column) or None)
            caps.append(row.get(cfg.caption_column))
            ids.append(row.get(cfg.image_column) or f"line{line}")
            where.append(f"{path} line {line}")
    return _TableSource("csv", images, caps, ids, cfg.bad_rows, where, image_root=root)


def _webdataset(cfg: DataConfig) -> _TableSource:
    images, caps, ids, where = [], [], [], []
    for f in _files(cfg.path):
        samples: dict[str, dict] = {}
        try:
            tar = tarfile.open(f)
        except tarfile.TarError as e:
            raise DataError(f"{f}: not a readable tar archive ({e})") from None
        with tar:
            for m in tar.getmembers():
                if not m.isfile() or "." not in Path(m.name).name:
                    continue
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext.lower()] = tar.extractfile(m).read()
        for key, s in samples.items():
            img = next((s[e] for e in ("jpg", "jpeg", "png", "webp") if e in s), None)
            cap = s.get("txt", s.get("caption"))
            images.append(img)
            caps.append(cap.decode("utf-8", "replace") if cap is not None else None)
            ids.append(f"{f.name}:{key}")
            where.append(f"{f} sample {key}")
    return _TableSource("wds", images, caps, ids, cfg.bad_rows, where)


def _hf_disk(cfg: DataConfig) -> _TableSource:
    from datasets import load_from_disk

    ds = load_from_disk(cfg.path)
    ds = ds.cast_column(cfg.image_column, ds.features[cfg.image_column].__class__(decode=False)) \
        if hasattr(ds.features[cfg.image_column], "decode") else ds
    images, caps = ds[cfg.image_column], ds[cfg.caption_column]
    n = len(caps)
    return _TableSource("hf", images, caps, [f"{cfg.path}:{i}" for i in range(n)], cfg.bad_rows,
                        [f"{cfg.path} row {i}" for i in range(n)])


def open_source(cfg: DataConfig):
    """The image-caption source `cfg.source` names (`ShapesImageCaptions` or a table source).

    Raises DataError (one line naming the file) when `path` is missing for a non-shapes source or
    matches no file, a file cannot be read (missing, unreadable, not a Parquet file, tar archive or
    `datasets` folder), a column is missing, or (with `bad_rows="error"`) a row has no image or an
    empty caption.
    """
    if cfg.source == "shapes":
        return ShapesImageCaptions(cfg.n, cfg.seed, cfg.resolution)
    if not cfg.path:
        raise DataError(f"data.path is required for source {cfg.source!r}")
    read = {"parquet": _parquet, "csv": _csv, "webdataset": _webdataset, "hf_disk": _hf_disk}[cfg.source]
    try:
        return read(cfg)
    except CirgenError:
        raise
    except OSError as e:
        raise DataError(f"data.path: {os_error_line(e, e.filename or cfg.path)}") from None
    except (tarfile.TarError, KeyError, ValueError, TypeError) as e:
        # the libraries' own errors for a file that is not what `source` says (tar, datasets)
        raise DataError(f"{cfg.path}: cannot read as {cfg.source} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def _files(pattern: str) -> list[Path]:
    """The files a `data.path` names: a glob pattern's matches (sorted), or the one path; DataError
    when a pattern matches nothing (never an empty dataset)."""
    if not any(c in pattern for c in "*?["):
        return [Path(pattern)]
    files = sorted(Path(f) for f in glob.glob(pattern))     # absolute patterns too (Path.glob refuses them)
    if not files:
        raise DataError(f"data.path {pattern!r} matches no file")
    return files
