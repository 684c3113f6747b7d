"""The report folder: static viewer files, the row index and the lazily loaded row chunks.

Layout of a report folder (opens from disk, no server, nothing fetched from the network):

    index.html  report.js  report.css   the viewer (copied from datagen/report/static/)
    report.json                         manifest: kind, row count, sources (marks the folder as ours)
    data/index.js                       every row's filter/sort fields (columnar), charts, titles
    data/chunk-NNNNN.js                 card details (texts, thumbnail names) of `chunk_size` rows
    thumbs/<hash>.jpg                   thumbnails (see thumbs.py)

Data files are JavaScript (`CIRGEN_INDEX = {...}` / `CIRGEN_CHUNK(k, [...])`) rather than JSON,
because Chromium blocks fetch()/XHR of file:// URLs while <script src> still loads; the viewer
adds chunk scripts on demand. Every file is replaced only when its content changes, so a rerun on
the same data rewrites nothing.
"""
from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from ..base.errors import CirgenError
from ..base.io import write_atomic

REPORT_FORMAT = "cirgen-report"
STATIC_FILES = ("index.html", "report.js", "report.css")


class ReportError(CirgenError, ValueError):
    """The report cannot be written (bad input or output folder); nothing was changed."""


def js_json(obj: Any) -> str:
    """JSON that is also safe to embed in HTML/JS: no raw `<`, `>`, `&`, U+2028/9, no NaN.
    Raises ValueError for NaN/inf and TypeError for a value JSON cannot hold.

    Dataset text is untrusted (an LLM wrote it): escaping `<` means a caption holding
    `</script><script>...` can never close a script element, wherever this text ends up.
    """
    s = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def clean_float(x: Any, digits: int = 4) -> float | None:
    """A finite float rounded for the index, or None (NaN/inf/missing would break JSON)."""
    if x is None:
        return None
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def write_if_changed(path: Path, text: str | bytes) -> bool:
    """Write via temp file + rename unless `path` already holds exactly this; True if written.
    Raises MachineError (an OSError) naming `path` on an OS error."""
    return write_atomic(path, text)


def check_sizes(thumb_size: int, chunk_size: int) -> None:
    """Raise ReportError for a thumbnail side under 16 pixels or a chunk size under 1 row."""
    if thumb_size < 16:
        raise ReportError(f"thumbnail size must be at least 16 px, got {thumb_size}")
    if chunk_size <= 0:
        raise ReportError(f"chunk size must be positive, got {chunk_size}")


def prepare_out(out: Path) -> Path:
    """Create `out` or reopen a report folder; refuse a non-empty folder that is not a report.
    Raises ReportError for a file at `out`, a non-empty folder without report.json, or a folder
    that cannot be created."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").exists():
        raise ReportError(f"{out}: folder is not empty and holds no cirgen report (no report.json); "
                          f"choose an empty or new folder")
    try:
        (out / "data").mkdir(parents=True, exist_ok=True)
        (out / "thumbs").mkdir(exist_ok=True)
    except OSError as e:
        raise ReportError(f"{out}: cannot create folder ({e.strerror})") from None
    return out


class ChunkWriter:
    """Collects card rows and writes them as `data/chunk-NNNNN.js`, `chunk_size` rows per file."""

    def __init__(self, out: Path, chunk_size: int):
        self.out, self.chunk_size = out, chunk_size
        self.rows: list[dict] = []
        self.n_chunks = 0
        self.files_written = 0

    def add(self, row: dict) -> None:
        """Queue one card row; a full chunk is written at once."""
        self.rows.append(row)
        if len(self.rows) == self.chunk_size:
            self.flush()

    def flush(self) -> None:
        """Write the queued rows as the next chunk file (unless unchanged on disk); nothing if none."""
        if not self.rows:
            return
        text = f"CIRGEN_CHUNK({self.n_chunks},{js_json(self.rows)});\n"
        self.files_written += write_if_changed(self.out / "data" / chunk_name(self.n_chunks), text)
        self.n_chunks += 1
        self.rows = []

    def finish(self) -> int:
        """Write the last partial chunk and delete chunks a larger earlier report left behind."""
        self.flush()
        for p in (self.out / "data").glob("chunk-*.js"):
            number = p.stem.split("-", 1)[1]
            if number.isdigit() and int(number) >= self.n_chunks:     # a stray chunk-old.js stays
                p.unlink()
        return self.n_chunks


def chunk_name(k: int) -> str:
    """File name of chunk `k`: chunk-NNNNN.js."""
    return f"chunk-{k:05d}.js"


def write_viewer(out: Path, index: dict, manifest: dict) -> int:
    """Write the static viewer, data/index.js and report.json; return how many files changed."""
    n = 0
    static = resources.files("datagen.report") / "static"
    for name in STATIC_FILES:
        n += write_if_changed(out / name, (static / name).read_bytes())
    n += write_if_changed(out / "data" / "index.js", f"CIRGEN_INDEX = {js_json(index)};\n")
    manifest = {"format": REPORT_FORMAT, "version": 1, **manifest}
    n += write_if_changed(out / "report.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return n


def facet(key: str, label: str, values: Iterable[str | None], order: list[str] | None = None,
          none_label: str = "none") -> dict:
    """A categorical column for the viewer: distinct labels plus one small int code per row."""
    labels = [none_label if v is None else str(v) for v in values]
    uniq = list(order or [])
    uniq += sorted(set(labels) - set(uniq))
    code = {v: i for i, v in enumerate(uniq)}
    return {"key": key, "label": label, "values": uniq, "codes": [code[v] for v in labels]}


def number(key: str, label: str, values: list[float | None], digits: int = 4) -> dict:
    """A numeric column for the viewer (sortable, histogrammed); None where missing."""
    return {"key": key, "label": label, "values": [clean_float(v, digits) for v in values]}
