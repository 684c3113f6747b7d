"""One error base for every user-facing error of `datagen` and `cir`.

A `CirgenError` means "the input (an argument, a recipe, a file, a folder) is wrong, or the machine
refused (disk full, permission)": the CLI prints its message as one line, `error: ...`, and exits
non-zero, with no traceback. Anything else escaping to the CLI is a bug and keeps its traceback.

Messages say what is wrong and where: the file (and line, entry or field) and the value.
"""
from __future__ import annotations


class CirgenError(Exception):
    """Base of every error a user can cause and fix. Subclasses keep `ValueError` ancestry where
    callers already catch `ValueError`."""


class InputError(CirgenError, ValueError):
    """A bad argument, recipe value or input file (generic; prefer a module's own subclass)."""


class InputNotFound(CirgenError, FileNotFoundError):
    """A named input (a file, a folder, a model run) is missing or holds nothing usable."""


class MachineError(CirgenError, OSError):
    """The machine refused: disk full, permission denied, read-only file system. The message names
    the path and the errno's meaning."""


def os_error_line(e: OSError, path: object | None = None) -> str:
    """One line for an OSError: `PATH: <strerror> (errno NAME)`, e.g. `out/shards/x: No space left
    on device (ENOSPC)`."""
    import errno as _errno

    where = path if path is not None else (e.filename or "")
    name = _errno.errorcode.get(e.errno or 0, "")
    what = e.strerror or str(e)
    return f"{where}: {what}" + (f" ({name})" if name else "")
