"""Content-addressed thumbnails for HTML reports: written once, reused on every rerun.

A thumbnail's file name is a hash of (thumbnail settings, source image bytes), so the same image
gets the same file in every report written into the same folder, and a rerun finds it already
there and neither decodes nor rewrites it. Small JPEG sources are copied byte for byte (nothing to
gain from re-encoding a 128 px JPEG); anything larger or in another format is scaled down.

Because the name is known before the file exists, making the files is deferred to worker
processes in batches (file creation and JPEG encoding dominate a 40,000-image report); the
caller gets names at once and `close()` waits for the files.
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from datagen.base.images import open_image

from ..base.io import write_atomic

THUMB_VERSION = 2  # bump when the thumbnail recipe changes: old files then stop matching
                   # (2: the project's image loader: EXIF orientation, 16-bit, alpha on white)
JPEG_QUALITY = 85
BATCH = 64         # images per worker task: amortises inter-process overhead
MAX_PENDING = 8    # batches in flight: bounds memory held by queued image bytes

ImageSource = bytes | str | os.PathLike | None


def read_image_source(img: ImageSource | dict) -> bytes | None:
    """Bytes of an image given as bytes, a file path, or an HF `Image()` struct {bytes, path}.
    None for None or empty input; OSError for a path that cannot be read."""
    if img is None:
        return None
    if isinstance(img, dict):
        data = img.get("bytes")
        if data:
            return bytes(data)
        img = img.get("path")
        if not img:
            return None
    if isinstance(img, (bytes, bytearray, memoryview)):
        return bytes(img) or None
    return Path(img).read_bytes()


def jpeg_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's SOF header, or None if `data` is not a JPEG.

    Ten times cheaper than PIL's header parse, which matters at 40,000 images per report."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 10 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h, data[i + 9]
        i += 2 + length
    return None


def placeholder(size: int) -> bytes:
    """The thumbnail of an image that cannot be decoded: grey with a red cross."""
    im = Image.new("RGB", (size, size), (220, 220, 220))
    d = ImageDraw.Draw(im)
    d.line((0, 0, size, size), fill=(200, 40, 40), width=3)
    d.line((0, size, size, 0), fill=(200, 40, 40), width=3)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def make_thumbnail(data: bytes, size: int) -> bytes:
    """JPEG bytes of `data` scaled so its longest side is at most `size` pixels (copied when it already
    fits). Raises ImageError (a ValueError) for bytes that are not a decodable image."""
    head = jpeg_size(data)
    if head and max(head[:2]) <= size and head[2] in (1, 3):  # grey or YCbCr: browsers show it as is
        return data
    # The project's loader (EXIF orientation, 16-bit, transparency on white); JPEGs decode at a
    # reduced scale (draft), much faster for large ones.
    im = open_image(data, "thumbnail source", draft=(size, size))
    im.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def write_thumbnails(jobs: list[tuple[bytes, int, str]]) -> tuple[int, float]:
    """Make and write each (source bytes, size, path); return (undecodable sources, CPU seconds).

    Runs in worker processes. Temp file + rename: a killed run never leaves a half-written file
    under a final name (which a rerun would then reuse)."""
    import time

    cpu0 = time.process_time()
    bad = 0
    for data, size, path in jobs:
        try:
            thumb = make_thumbnail(data, size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            thumb = placeholder(size)  # the right thumbnail for these bytes: shown, and cached
            bad += 1
        write_atomic(Path(path), thumb)
    return bad, time.process_time() - cpu0


@dataclass
class ThumbCache:
    """Hands out `root/<hash>.jpg` names (longest side <= `size`); makes the missing files in
    `workers` processes (1: in this process). Use as a context manager or call `close()`."""
    root: Path
    size: int = 128
    workers: int = 0                      # 0: one per CPU core
    written: int = 0
    reused: int = 0
    unreadable: int = 0                   # missing files or undecodable bytes (placeholder shown)
    worker_cpu_seconds: float = 0.0       # CPU spent making thumbnail files, in whichever process
    _have: set[str] = field(default_factory=set, repr=False)
    _batch: list = field(default_factory=list, repr=False)
    _pending: list[Future] = field(default_factory=list, repr=False)
    _pool: ProcessPoolExecutor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.workers = self.workers or os.cpu_count() or 1
        # One listdir instead of a stat per image: a 20k-triplet rerun checks 40k names.
        self._have = {p for p in os.listdir(self.root) if p.endswith(".jpg")}
        self._person = f"thumb{THUMB_VERSION}:{self.size}".encode()[:16]

    def __enter__(self) -> "ThumbCache":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        elif self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def key(self, data: bytes) -> str:
        """24 hex digits: blake2b of the image bytes, personalised by `THUMB_VERSION` and the size."""
        return hashlib.blake2b(data, digest_size=12, person=self._person).hexdigest()

    def add(self, img: ImageSource | dict) -> str | None:
        """File name (relative to `root`) of the thumbnail of `img`; None when there is no image."""
        try:
            data = read_image_source(img)
        except OSError:
            self.unreadable += 1
            return None
        if not data:
            return None
        name = self.key(data) + ".jpg"
        if name in self._have:
            self.reused += 1
            return name
        self._have.add(name)
        self.written += 1
        self._batch.append((data, self.size, str(self.root / name)))
        if len(self._batch) >= BATCH:
            self._submit()
        return name

    def _submit(self) -> None:
        batch, self._batch = self._batch, []
        if self.workers <= 1:
            self._done(write_thumbnails(batch))
            return
        if self._pool is None:  # started only once a full batch is due: small reports stay in-process
            import multiprocessing as mp

            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
        self._pending.append(self._pool.submit(write_thumbnails, batch))
        while len(self._pending) >= MAX_PENDING:
            self._done(self._pending.pop(0).result())

    def _done(self, res: tuple[int, float]) -> None:
        self.unreadable += res[0]
        self.worker_cpu_seconds += res[1]

    def close(self) -> None:
        """Make every file handed out so far; afterwards all names exist on disk."""
        if self._batch:
            if self._pool is None:
                self._done(write_thumbnails(self._batch))
                self._batch = []
            else:
                self._submit()
        for fut in self._pending:
            self._done(fut.result())
        self._pending = []
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
