"""One atomic write for both packages: temp file beside the target, fsync, rename, fsync the folder.

A killed process leaves either the old file or the new one under the final name, never half of
one. Temp files are named `.NAME~HOST~PID~TOKEN.tmp` (created exclusively), so a process that
cleans up leftovers can tell whose they are (`temp_owner`) and concurrent writers never share one.
An OSError (disk full, read-only folder) removes the temp file and becomes one `MachineError` line
naming the target; the old file, if any, is untouched.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Callable

from .errors import InputError, MachineError, os_error_line

HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def machine_error(e: OSError, path: Path | str) -> MachineError:
    """One-line `MachineError` for an OSError while writing `path` (what to do when it is space)."""
    hint = ("; free some space and rerun the same command to continue"
            if e.errno in (errno.ENOSPC, errno.EDQUOT) else "")
    return MachineError(os_error_line(e, path) + hint)


def temp_path(path: Path) -> Path:
    """A fresh temp name beside `path`: `.NAME~HOST~PID~TOKEN.tmp` (owner recognisable, unique)."""
    path = Path(path)
    return path.with_name(f".{path.name}~{HOST}~{os.getpid()}~{secrets.token_hex(4)}.tmp")


def temp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temp file name made by `temp_path`, or None when the name is not one.
    Also reads the older form `.NAME.PID.tmp` (this host)."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    stem = name[1:-4]
    parts = stem.rsplit("~", 3)
    if len(parts) == 4 and parts[2].isdigit():
        return parts[1], int(parts[2])
    m = re.fullmatch(r".+\.(\d+)", stem)
    return (HOST, int(m[1])) if m else None


def write_atomic(path: Path, data: bytes | str | memoryview) -> bool:
    """Write `data` (bytes-like, or str as UTF-8) to `path` via a fsync'ed temp file + rename;
    skip (return False) if the file already holds exactly `data`. The folder must exist.
    Raises `MachineError` naming `path` on an OS error."""
    path = Path(path)
    data = memoryview(data.encode() if isinstance(data, str) else data)
    try:
        if path.is_file() and path.stat().st_size == data.nbytes and path.read_bytes() == data:
            return False
    except OSError:
        pass                 # unreadable old file: replace it

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(fd, "wb", closefd=True) as f:
            f.write(data)

    write_atomic_with(path, write, _created=True)
    return True


def write_atomic_with(path: Path, write: Callable[[Path], None], *, _created: bool = False) -> None:
    """Atomic write through a writer that takes a file name: `write(tmp)` must write the whole
    file at `tmp` (e.g. `lambda p: torch.save(obj, p)`, safetensors' `save_file`, `np.save`);
    the file is then fsync'ed and renamed onto `path`. Raises `MachineError` naming `path` on an
    OS error; any other exception of `write` propagates, and the temp file is removed either way."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        if not _created:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # claim the name
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise machine_error(e, path) from None
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every file system lets a folder be
    fsync'ed)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: Path, expect: type, error: type[Exception] = InputError, what: str = ""):
    """The JSON value in `path`, of type `expect` (dict or list), or one line naming the file:
    `error(...)` for a missing or unreadable file, non-UTF-8 text, malformed JSON (line and column)
    or another top-level type (`what` says what the file should hold)."""
    import json

    kind = {dict: "object", list: "list"}.get(expect, expect.__name__)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise error(os_error_line(e, path)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, expect):
        got = {dict: "object", list: "list"}.get(type(data), type(data).__name__)
        raise error(f"{path}: expected a JSON {kind}{what} at the top level, got a JSON {got}")
    return data
