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
`on_error="skip"` are marked invalid in `valid.npy` and counted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from datagen.base.images import LOADER_VERSION, ImageError
from datagen.config import stable_hash

_HOST = socket.gethostname()
_TMP = re.compile(r"\.tmp(\d+)(?:@(.+?))?(?:\.npy)?$")


def default_cache_root() -> Path:
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


@dataclass
class Features:
    global_: np.ndarray               # [N, D] float32, L2-normalised
    patch: np.ndarray | None          # [N, P, W] float16 (memmap) or None
    valid: np.ndarray                 # [N] bool
    ids: list[str]

    def tensors(self, idx) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = torch.from_numpy(np.array(self.global_[idx], dtype=np.float32))
        p = None if self.patch is None else torch.from_numpy(np.asarray(self.patch[idx], dtype=np.float32))
        return g, p


class FeatureCache:
    def __init__(self, clip, root: str | Path | None = None):
        self.clip = clip
        self.root = Path(root) if root else default_cache_root()
        self.model_key = stable_hash({"model": clip.name, "weights": clip.weights_id,
                                      "preprocess": repr(clip.preprocess), "loader": LOADER_VERSION})
        self.computed = 0   # images encoded by this instance (for tests and benchmarks)
        # A killed run's temp entries (and caption-feature temp files inside entries) go now.
        folder = self.root / self.model_key
        self.removed_temps = remove_dead_temps(folder)
        if folder.is_dir():
            for sub in folder.iterdir():
                if sub.is_dir() and not _TMP.search(sub.name):
                    self.removed_temps += remove_dead_temps(sub)

    def files_features(self, paths: list[Path], image: Callable[[int], object], patches: bool = False,
                       **kw) -> Features:
        """Features of image files, keyed on their content (see `FileDigests`), not on their paths."""
        digests = FileDigests(self.root).digests(paths)
        return self.image_features(f"files-{stable_hash(digests, 24)}", len(paths), image, digests,
                                   patches=patches, **kw)

    def entry(self, dataset_id: str) -> Path:
        return self.root / self.model_key / dataset_id

    @torch.no_grad()
    def image_features(self, dataset_id: str, n: int, image: Callable[[int], object], ids: list[str],
                       patches: bool = False, batch_size: int = 128, on_error: str = "raise",
                       progress: bool = False) -> Features:
        entry = self.entry(dataset_id)
        if (entry / "meta.json").exists():
            meta = json.loads((entry / "meta.json").read_text())
            if meta["n"] == n and (meta["patches"] or not patches):
                return self._open(entry, ids, patches)
        tmp = entry.with_name(entry.name + _tmp_suffix())
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            self._compute(tmp, n, image, ids, patches, batch_size, on_error, progress)
            shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)   # an error or Ctrl-C leaves nothing behind
            raise
        return self._open(entry, ids, patches)

    def _compute(self, tmp: Path, n: int, image: Callable[[int], object], ids: list[str], patches: bool,
                 batch_size: int, on_error: str, progress: bool) -> None:
        clip = self.clip
        dev = next(clip.clip.parameters()).device
        g_out = np.lib.format.open_memmap(tmp / "global.npy", "w+", np.float32, (n, clip.embed_dim))
        p_out = None
        valid = np.ones(n, dtype=bool)
        from tqdm import tqdm

        bar = tqdm(total=n, desc="image features", unit="img", disable=not progress)
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            xs = []
            for i in idx:
                try:
                    xs.append(clip.preprocess(image(i)))
                except ValueError:
                    if on_error == "raise":
                        raise
                    valid[i] = False
                    xs.append(torch.zeros_like(xs[-1]) if xs else None)
            if any(x is None for x in xs):
                ref = next(x for x in xs if x is not None)
                xs = [torch.zeros_like(ref) if x is None else x for x in xs]
            x = torch.stack(xs).to(dev)
            if patches:
                g, p = clip.image_features(x, patches=True)
                if p_out is None:
                    p_out = np.lib.format.open_memmap(tmp / "patch.npy", "w+", np.float16, (n,) + tuple(p.shape[1:]))
                p_out[idx[0]:idx[-1] + 1] = p.float().cpu().numpy().astype(np.float16)
            else:
                g = clip.image_features(x)
            g_out[idx[0]:idx[-1] + 1] = torch.nn.functional.normalize(g.float(), dim=-1).cpu().numpy()
            self.computed += len(idx)
            bar.update(len(idx))
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

    def _open(self, entry: Path, ids: list[str], patches: bool) -> Features:
        stored = json.loads((entry / "ids.json").read_text())
        if stored != ids:
            raise ValueError(f"{entry}: cached ids differ from the dataset's (same content id, other ids)")
        g = np.load(entry / "global.npy", mmap_mode="r")
        p = np.load(entry / "patch.npy", mmap_mode="r") if patches and (entry / "patch.npy").exists() else None
        return Features(np.asarray(g), p, np.load(entry / "valid.npy"), stored)

    @torch.no_grad()
    def text_features(self, dataset_id: str, texts: list[str], batch_size: int = 512) -> np.ndarray:
        """Frozen caption features [N, D] (normalised), cached like image features."""
        entry = self.entry(dataset_id) / f"text-{stable_hash(texts)}.npy"
        if entry.exists():
            return np.load(entry)
        clip = self.clip
        dev = next(clip.clip.parameters()).device
        out = [clip.encode_text(clip.tokenize(texts[i:i + batch_size]).to(dev), normalize=True).float().cpu()
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
