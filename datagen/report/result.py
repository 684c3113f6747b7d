"""What writing a report did: rows, thumbnails written vs reused, files changed, seconds."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ReportResult:
    """What `write_dataset_report` / `write_retrieval_report` did (`cirgen browse --json` prints `to_dict()`)."""

    out: Path
    rows: int
    kept: int               # triplets: kept rows; retrieval: queries with a hit in the top-k shown
    rejected: int           # triplets: rejected rows; retrieval: queries without
    chunks: int
    thumbs_written: int
    thumbs_reused: int
    images_unreadable: int  # missing image files or undecodable bytes (cards show a placeholder)
    thumb_cpu_seconds: float  # CPU spent making thumbnail files (worker processes included)
    files_written: int      # files created or changed, thumbnails included (0 on an identical rerun)
    seconds: float

    @property
    def index_html(self) -> Path:
        """The report's entry page, `out/index.html`."""
        return self.out / "index.html"

    def to_dict(self) -> dict:
        """JSON-ready fields plus `index_html`; paths as strings, seconds rounded to 3 decimals."""
        d = asdict(self)
        d.update(out=str(self.out), index_html=str(self.index_html), seconds=round(self.seconds, 3),
                 thumb_cpu_seconds=round(self.thumb_cpu_seconds, 3))
        return d
