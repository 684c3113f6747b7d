"""Feature cache: the frozen image tower runs once per image, not once per epoch or run.

Features are keyed by what they depend on: the model (name, weights content hash, preprocessing,
image loader version: `FeatureCache.model_key`) and the dataset's content id (`dataset_id`, made
from the images' bytes: `content_id`, never from path strings, so a second copy of a benchmark with
the same file names, or images replaced in place, get their own entry). Files are hashed once per
version: `FileDigests` remembers each file's content hash keyed on (absolute path, inode, size,
mtime, ctime) in `<cache>/.file-digests.sqlite`; a rewritten file changes its ctime, so it is
hashed again. Entries are `.npy` files (global embeddings fp32, patch tokens fp16,
memory-mapped on read). An entry is written to a temp folder `<name>.tmp<pid>@<host>` and
renamed when complete, so an interrupted computation never leaves a half entry behind; the temp
folder is removed on any exception, and the temp folders of processes that died (SIGKILL, power
loss) are removed when a cache is opened. Images that fail to decode are an error, or with
`bad_rows="skip"` are marked invalid in `valid.npy` and counted.

Decoding and preprocessing run in `torch.utils.data.DataLoader` worker processes (forked, so the
image functions need not pickle; `num_workers`, by default none for a few hundred images and
min(4, CPUs - 1) above), so a GPU encoder is not held up by JPEG decoding; batches arrive in
order and workers only decode, so features are the same with any number of them. On CUDA the
image and text towers run under bf16 autocast (stored as today: global fp32, patches fp16) and
the entries are keyed apart from the CPU's fp32 ones, so a CPU run never reads GPU features.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from datagen.base.images import LOADER_VERSION, ImageError
from datagen.base.config import stable_hash

_HOST = socket.gethostname()
_TMP = re.compile(r"\.tmp(\d+)(?:@(.+?))?(?:\.npy)?$")
# Workers are forked: the image functions (closures over in-memory sources) need not pickle.
# Where fork is not the safe default (macOS, Windows) decoding stays in the process.
_FORK = sys.platform.startswith("linux")
SMALL_SET = 512          # images below which decoding stays in the process (a worker's start costs more)


def default_cache_root() -> Path:
    """`$CIRGEN_CACHE/features`, or `~/.cache/cirgen/features` when CIRGEN_CACHE is unset."""
    return Path(os.environ.get("CIRGEN_CACHE", Path.home() / ".cache" / "cirgen")) / "features"


def _tmp_suffix() -> str:
    return f".tmp{os.getpid()}@{_HOST}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by someone else
        return True
    return True


def remove_dead_temps(folder: Path) -> list[Path]:
    """Remove `*.tmp<pid>[@host]` entries in `folder` left by processes of this host that are gone.

    Entries of live processes (another run filling the cache now) and of other hosts (a cache on a
    shared disk) are kept. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TMP.search(e.name)
        if not m or (m.group(2) or _HOST) != _HOST or int(m.group(1)) == os.getpid() \
                or _pid_alive(int(m.group(1))):
            continue
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            try:
                os.unlink(e.path)
            except OSError:
                continue
        removed.append(Path(e.path))
    return removed


def digest_bytes(data: bytes) -> str:
    """Content hash of encoded image bytes (hex, 32 chars)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class FileDigests:
    """Content hashes of files, each computed once per file version.

    The memo (`<root>/.file-digests.sqlite`, a dot name beside the model folders) maps an absolute
    path to (inode, size, mtime_ns, ctime_ns, digest); a row is used only while all four still
    match, so a file replaced or rewritten in place (its ctime changes even when size and mtime are
    restored) is hashed again.
    Without a writable cache folder it hashes every time (still correct, only slower).
    """

    def __init__(self, root: str | Path | None = None):
        self.path = Path(root or default_cache_root()) / ".file-digests.sqlite"
        self.hashed = 0          # files read and hashed by this instance (for tests)

    def _connect(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=60)
            db.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, ino INTEGER, "
                       "size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, digest TEXT)")
            return db
        except (OSError, sqlite3.Error):
            return None

    def digests(self, paths: list[Path], strict: bool = True) -> list[str]:
        """One content hash per path (same order). A file that cannot be read raises `ImageError`
        naming it, or with `strict=False` gets the digest "unreadable" (its row is skipped later)."""
        db = self._connect()
        out, new = [], []
        try:
            for p in paths:
                full = os.path.abspath(p)
                try:
                    st = os.stat(full)
                except OSError as e:
                    if not strict:
                        out.append("unreadable")
                        continue
                    why = "image file not found" if isinstance(e, FileNotFoundError) else \
                        f"image cannot be read ({e.strerror or e})"
                    raise ImageError(f"{p}: {why}") from None
                version = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                row = None
                if db is not None:
                    row = db.execute("SELECT ino, size, mtime_ns, ctime_ns, digest FROM digests WHERE path=?",
                                     (full,)).fetchone()
                if row is not None and tuple(row[:4]) == version:
                    out.append(row[4])
                    continue
                try:
                    with open(full, "rb") as f:
                        h = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
                except OSError as e:
                    if not strict:
                        out.append("unreadable")
                        continue
                    raise ImageError(f"{p}: image cannot be read ({e.strerror or e})") from None
                self.hashed += 1
                out.append(h)
                new.append((full, *version, h))
            if db is not None and new:
                try:
                    with db:
                        db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)", new)
                except sqlite3.Error:
                    pass         # read-only or locked memo: the digests are still right
        finally:
            if db is not None:
                db.close()
        return out


def content_id(items: list, memo_root: str | Path | None = None) -> str:
    """A dataset content id from its images in order: each item is encoded bytes, a path, or an HF
    `Image()` struct {bytes, path}. Same images in the same order -> same id, wherever they live.
    Unreadable files count as "unreadable" (the row's reader reports or skips them)."""
    digests: list[str | None] = [None] * len(items)
    files: dict[int, Path] = {}
    for i, it in enumerate(items):
        if isinstance(it, dict):
            it = it.get("bytes") or it.get("path")
        if isinstance(it, (bytes, bytearray, memoryview)):
            digests[i] = digest_bytes(bytes(it))
        elif it is not None:
            files[i] = Path(it)
    if files:
        for i, d in zip(files, FileDigests(memo_root).digests(list(files.values()), strict=False)):
            digests[i] = d
    return stable_hash(digests, 24)


def default_decode_workers(n: int) -> int:
    """Decoding processes for `n` images: 0 below `SMALL_SET` images or off Linux, else
    min(4, CPUs available to this process - 1) (one core stays with the encoder)."""
    if n < SMALL_SET or not _FORK:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus - 1))


def _portable(e: BaseException) -> BaseException:
    """`e` if it survives pickling (a worker sends it to the main process, which raises it as the
    in-process path would), else an exception of the same kind with the same one-line message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return ImageError(str(e)) if isinstance(e, ValueError) else RuntimeError(f"{type(e).__name__}: {e}")


class _Decoded(torch.utils.data.Dataset):
    """Item i -> (preprocessed image tensor or None, the exception `image(i)` or the preprocessing
    raised, or None). Errors travel as values so the main process applies `bad_rows` in order,
    exactly as decoding in the process did."""

    def __init__(self, n: int, image: Callable[[int], object], preprocess: Callable):
        self.n, self.image, self.preprocess = n, image, preprocess

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        try:
            return self.preprocess(self.image(i)), None
        except BaseException as e:
            if torch.utils.data.get_worker_info() is None:
                if not isinstance(e, Exception):
                    raise                     # Ctrl-C in the process: as before
                return None, e
            return None, _portable(e)         # a worker: the main process raises it


def _collate(items):
    """[(x or None, error or None)] -> (stacked [B, C, H, W] with zeros where an image failed, or
    None when every image of the batch failed; errors in batch order)."""
    xs, errs = zip(*items)
    ref = next((x for x in xs if x is not None), None)
    if ref is None:
        return None, list(errs)
    return torch.stack([torch.zeros_like(ref) if x is None else x for x in xs]), list(errs)


def decoded_batches(n: int, image: Callable[[int], object], preprocess: Callable, batch_size: int,
                    num_workers: int = 0, pin_memory: bool = False):
    """Batches of preprocessed images 0..n-1 in order: an iterator of (x [B, C, H, W] or None,
    [error or None] * B); see `_Decoded` and `_collate`. `num_workers` > 0 decodes in that many
    forked processes (0 off Linux)."""
    from torch.utils.data import DataLoader

    workers = num_workers if _FORK else 0
    loader = DataLoader(_Decoded(n, image, preprocess), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, pin_memory=pin_memory,
                        multiprocessing_context="fork" if workers else None,
                        prefetch_factor=4 if workers else None)
    return loader if workers else _one_thread(loader)


def _one_thread(loader):
    """Batches made in this process with one torch thread (as a DataLoader worker makes them),
    the thread count restored for whatever runs between batches (the encoder). The per-image
    tensor ops are too small to share out: on a busy machine, a pool of threads waiting on each
    other made decoding ~8x slower (tests/bench/bench_decode.py). Elementwise ops, same pixels."""
    it = iter(loader)
    while True:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            batch = next(it)
        except StopIteration:
            return
        finally:
            torch.set_num_threads(threads)
        yield batch


@dataclass
class Features:
    """One dataset's cached features as `FeatureCache.image_features` returns them (N images, D = the
    embedding width, P visual tokens of width W each)."""

    global_: np.ndarray               # [N, D] float32, L2-normalised
    patch: np.ndarray | None          # [N, P, W] float16 (memmap) or None
    valid: np.ndarray                 # [N] bool
    ids: list[str]

    def tensors(self, idx) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(global [B, D], patch [B, P, W] or None) as float32 CPU tensors copied out of the arrays for rows
        `idx` (an index array or slice selecting B rows)."""
        g = torch.from_numpy(np.array(self.global_[idx], dtype=np.float32))
        p = None if self.patch is None else torch.from_numpy(np.asarray(self.patch[idx], dtype=np.float32))
        return g, p


class FeatureCache:
    """Cached frozen features of `clip` (a `CIRClip`) under `root` (default `default_cache_root()`).

    `num_workers`: decoding processes for image features (None = `default_decode_workers(n)`).
    The encoder runs where `clip` lives, under bf16 autocast on CUDA."""

    def __init__(self, clip, root: str | Path | None = None, num_workers: int | None = None):
        self.clip = clip
        self.root = Path(root) if root else default_cache_root()
        self.num_workers = num_workers
        self.computed = 0   # images encoded by this instance (for tests and benchmarks)
        # A killed run's temp entries (and caption-feature temp files inside entries) go now.
        folder = self.root / self.model_key
        self.removed_temps = remove_dead_temps(folder)
        if folder.is_dir():
            for sub in folder.iterdir():
                if sub.is_dir() and not _TMP.search(sub.name):
                    self.removed_temps += remove_dead_temps(sub)

    @property
    def device(self) -> torch.device:
        """Where the CLIP towers live (the device of its first parameter), i.e. where encoding runs."""
        return next(self.clip.clip.parameters()).device

    @property
    def autocast(self) -> bool:
        """bf16 autocast: on CUDA only (the CPU computes in fp32, bitwise reproducibly)."""
        return self.device.type == "cuda"

    def _precision(self):
        """bf16 autocast on CUDA; nothing elsewhere (autocast refuses some device types, e.g. meta)."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    @property
    def model_key(self) -> str:
        """What features depend on: model, weights, preprocessing, loader and (on CUDA) bf16."""
        key = {"model": self.clip.name, "weights": self.clip.weights_id,
               "preprocess": repr(self.clip.preprocess), "loader": LOADER_VERSION}
        if self.autocast:
            key["precision"] = "bf16-autocast"      # CPU keys stay as they were
        return stable_hash(key)

    def files_features(self, paths: list[Path], image: Callable[[int], object], patches: bool = False,
                       **kw) -> Features:
        """Features of image files, keyed on their content (see `FileDigests`), not on their paths.
        `image(i)` decodes `paths[i]`; `kw` go to `image_features`. Raises ImageError naming a file that cannot
        be read (while hashing), and `image_features`' errors."""
        digests = FileDigests(self.root).digests(paths)
        return self.image_features(f"files-{stable_hash(digests, 24)}", len(paths), image, digests,
                                   patches=patches, **kw)

    def entry(self, dataset_id: str) -> Path:
        """The cache folder of `dataset_id` for this model: `<root>/<model_key>/<dataset_id>`."""
        return self.root / self.model_key / dataset_id

    @torch.no_grad()
    def image_features(self, dataset_id: str, n: int, image: Callable[[int], object], ids: list[str],
                       patches: bool = False, batch_size: int = 128, bad_rows: str = "error",
                       progress: bool = False, num_workers: int | None = None) -> Features:
        """Features of images `image(0..n-1)` (PIL images), cached under `dataset_id`.

        A decode error (`ValueError`, e.g. `ImageError`/`DataError`) is raised as is, or with
        `bad_rows="skip"` the row is marked invalid (`Features.valid`). `num_workers` overrides the
        cache's decoding processes; results do not depend on it.

        Returns `global_` [n, D] float32 L2-normalised and, with `patches`, `patch` [n, P, W] float16
        (memory-mapped; unnormalised visual tokens, see `CIRClip.image_features`). A cached entry is used
        when it has the same n (and patches when asked for); ValueError when its stored ids differ from `ids`.
        Other exceptions of `image(i)` are raised whatever `bad_rows` says.
        """
        entry = self.entry(dataset_id)
        if (entry / "meta.json").exists():
            meta = json.loads((entry / "meta.json").read_text())
            if meta["n"] == n and (meta["patches"] or not patches):
                return self._open(entry, ids, patches)
        tmp = entry.with_name(entry.name + _tmp_suffix())
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            workers = next(w for w in (num_workers, self.num_workers, default_decode_workers(n)) if w is not None)
            self._compute(tmp, n, image, ids, patches, batch_size, bad_rows, progress, workers)
            shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)   # an error or Ctrl-C leaves nothing behind
            raise
        return self._open(entry, ids, patches)

    def _compute(self, tmp: Path, n: int, image: Callable[[int], object], ids: list[str], patches: bool,
                 batch_size: int, bad_rows: str, progress: bool, num_workers: int) -> None:
        from tqdm import tqdm

        g_out = np.lib.format.open_memmap(tmp / "global.npy", "w+", np.float32, (n, self.clip.embed_dim))
        valid = np.ones(n, dtype=bool)
        bar = tqdm(total=n, desc="image features", unit="img", disable=not progress)
        batches = iter(decoded_batches(n, image, self.clip.preprocess, batch_size, num_workers,
                                       pin_memory=self.device.type == "cuda"))
        try:
            p_out = self._encode(batches, tmp, n, batch_size, patches, bad_rows, valid, g_out, bar)
        finally:
            # Stop the workers now, also while an error propagates (its traceback keeps the
            # iterator alive, so waiting for garbage collection could leave them running).
            getattr(batches, "_shutdown_workers", lambda: None)()
            bar.close()
        g_out.flush()
        if p_out is not None:
            p_out.flush()
        del g_out, p_out
        np.save(tmp / "valid.npy", valid)
        (tmp / "ids.json").write_text(json.dumps(ids))
        (tmp / "meta.json").write_text(json.dumps({"n": n, "patches": patches, "model": self.clip.name,
                                                   "weights": self.clip.weights_id,
                                                   "invalid": int((~valid).sum())}))

    def _encode(self, batches, tmp: Path, n: int, batch_size: int, patches: bool, bad_rows: str,
                valid: np.ndarray, g_out: np.ndarray, bar):
        """Encode decoded batches in order into `g_out` (and a patch memmap, returned); failed
        images are raised or, with bad_rows="skip", marked in `valid`."""
        clip, dev = self.clip, self.device
        p_out = None
        for start, (x, errors) in zip(range(0, n, batch_size), batches):
            stop = min(n, start + batch_size)
            for i, e in enumerate(errors, start):
                if e is None:
                    continue
                if bad_rows == "error" or not isinstance(e, ValueError):
                    raise e
                valid[i] = False
            if x is not None:            # else every image of the batch failed: its rows stay zero
                x = x.to(dev, non_blocking=True)
                with self._precision():
                    g, p = clip.image_features(x, patches=True) if patches else (clip.image_features(x), None)
                if p is not None:
                    if p_out is None:
                        p_out = np.lib.format.open_memmap(tmp / "patch.npy", "w+", np.float16,
                                                          (n,) + tuple(p.shape[1:]))
                    p_out[start:stop] = p.float().cpu().numpy().astype(np.float16)
                g_out[start:stop] = torch.nn.functional.normalize(g.float(), dim=-1).cpu().numpy()
            self.computed += stop - start
            bar.update(stop - start)
        return p_out

    def _open(self, entry: Path, ids: list[str], patches: bool) -> Features:
        stored = json.loads((entry / "ids.json").read_text())
        if stored != ids:
            raise ValueError(f"{entry}: cached ids differ from the dataset's (same content id, other ids)")
        g = np.load(entry / "global.npy", mmap_mode="r")
        p = np.load(entry / "patch.npy", mmap_mode="r") if patches and (entry / "patch.npy").exists() else None
        return Features(np.asarray(g), p, np.load(entry / "valid.npy"), stored)

    @torch.no_grad()
    def text_features(self, dataset_id: str, texts: list[str], batch_size: int = 512) -> np.ndarray:
        """Frozen caption features [N, D] float32 (L2-normalised; N = len(texts)), cached as one `.npy` in the
        `dataset_id` entry, keyed by a hash of `texts`; written via a temp file + rename."""
        entry = self.entry(dataset_id) / f"text-{stable_hash(texts)}.npy"
        if entry.exists():
            return np.load(entry)
        clip = self.clip
        with self._precision():
            # Tokens stay on the CPU: encode_text moves them to the tower's device.
            out = [torch.nn.functional.normalize(clip.encode_text(clip.tokenize(texts[i:i + batch_size])).float(),
                                                 dim=-1).cpu()
                   for i in range(0, len(texts), batch_size)]
        arr = torch.cat(out).numpy()
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(entry.name + _tmp_suffix() + ".npy")
        try:
            np.save(tmp, arr)
            os.replace(tmp, entry)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return arr
