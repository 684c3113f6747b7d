"""Static HTML reports you open from disk: see what a dataset or a retrieval run holds.

- `write_dataset_report(dirs, out)` (`cirgen browse DIR --out report/`): triplet cards with
  images, texts, every filter score and pass/fail, failure labels and reject reasons (rejected
  candidates included), filters, sorting, paging and summary charts.
- `write_retrieval_report(out, queries)`: for the eval harness; one card per `RetrievalQuery`
  with its ranked `RetrievalResult`s, hits marked, Recall@K charted.

Reports need no server or network: open `out/index.html` (file://). Thumbnails are
content-addressed and reused across reruns; all dataset text is shown as text, never as HTML.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Lazy exports: thumbnail worker processes import datagen.report.thumbs, and must not pay for
# pyarrow (dataset.py) on start-up.
_EXPORTS = {
    "write_dataset_report": "dataset", "write_retrieval_report": "retrieval",
    "RetrievalQuery": "retrieval", "RetrievalResult": "retrieval", "ReportResult": "result",
    "ReportError": "writer",
}
__all__ = ["write_dataset_report", "write_retrieval_report", "RetrievalQuery", "RetrievalResult",
           "ReportResult", "ReportError"]

if TYPE_CHECKING:
    from .dataset import write_dataset_report
    from .result import ReportResult
    from .retrieval import RetrievalQuery, RetrievalResult, write_retrieval_report
    from .writer import ReportError


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
