"""The HTML report of a retrieval run: each query's reference image and text, its top-k results
with scores, and the hits marked.

The eval harness (cir/eval/) builds `RetrievalQuery` items and calls `write_retrieval_report`;
the report uses the same viewer as `cirgen browse` (filters, sorting, lazy loading, charts).

    from datagen.report import RetrievalQuery, RetrievalResult, write_retrieval_report
    q = RetrievalQuery("q0", reference_image="ref.png", text="make it red", target_ids=["g7"],
                       results=[RetrievalResult("g7", "gallery/g7.png", 0.83), ...])
    write_retrieval_report("runs/eval/report", [q, ...], title="CIRR val", metrics={"R@1": 0.31})
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from .result import ReportResult
from .thumbs import ImageSource, ThumbCache
from .writer import ChunkWriter, ReportError, check_sizes, clean_float, facet, number, prepare_out, write_viewer

DEFAULT_KS = (1, 5, 10, 50)


@dataclass
class RetrievalResult:
    """One ranked gallery item. `is_hit` None: a hit iff `id` is one of the query's target ids."""
    id: str
    image: ImageSource = None          # file path or encoded bytes (None: no thumbnail)
    score: float | None = None
    is_hit: bool | None = None


@dataclass
class RetrievalQuery:
    """One composed query and its ranking, best first (pass only the top-k you want shown).

    `target_ids` holds every ground truth (one for CIRR/FashionIQ, several for CIRCO); `group`
    is an optional facet such as the FashionIQ category or the benchmark split.
    """
    query_id: str
    reference_image: ImageSource
    text: str
    target_ids: list[str]
    results: list[RetrievalResult]
    reference_id: str | None = None
    group: str | None = None
    target_image: ImageSource = None   # shown beside the reference when given
    extra: dict[str, str] = field(default_factory=dict)  # free-form fields shown on the card

    def hits(self) -> list[bool]:
        """Per result, in rank order: its `is_hit`, or when that is None whether its id is a target id."""
        targets = set(self.target_ids)
        return [r.is_hit if r.is_hit is not None else r.id in targets for r in self.results]


def _first_hit(hits: list[bool]) -> int | None:
    return next((i + 1 for i, h in enumerate(hits) if h), None)


def write_retrieval_report(out_dir: str | Path, queries: Iterable[RetrievalQuery], *,
                           title: str = "cirgen retrieval", metrics: Mapping[str, float] | None = None,
                           ks: Iterable[int] = DEFAULT_KS, thumb_size: int = 128,
                           chunk_size: int = 50, workers: int = 0) -> ReportResult:
    """Write a static HTML report of ranked retrieval results into `out_dir` (see module doc).

    `metrics` (e.g. the harness's Recall@K / mAP@K) is charted as given; Recall@K over the
    shown results is recomputed from `is_hit` for each k in `ks` no larger than the longest list.
    `thumb_size`: longest thumbnail side in pixels. Raises ReportError for no queries, an item that
    is not a `RetrievalQuery`, `thumb_size` < 16 or `chunk_size` < 1, or an unusable `out_dir`.
    """
    t0 = time.perf_counter()
    queries = list(queries)
    if not queries:
        raise ReportError("no queries to report")
    bad = next((q for q in queries if not isinstance(q, RetrievalQuery)), None)
    if bad is not None:
        raise ReportError(f"expected RetrievalQuery items, got {type(bad).__name__}")
    check_sizes(thumb_size, chunk_size)
    out = prepare_out(Path(out_dir))
    chunks = ChunkWriter(out, chunk_size)
    groups, first, top1, n_results = [], [], [], []
    with ThumbCache(out / "thumbs", thumb_size, workers) as thumbs:  # exit waits for the files
        for q in queries:
            hits = q.hits()
            groups.append(q.group)
            first.append(_first_hit(hits))
            top1.append(q.results[0].score if q.results else None)
            n_results.append(len(q.results))
            chunks.add({
                "id": q.query_id, "ref_id": q.reference_id, "ref": thumbs.add(q.reference_image),
                "tgt": thumbs.add(q.target_image), "text": q.text, "targets": list(q.target_ids),
                "extra": {str(k): str(v) for k, v in q.extra.items()},
                "results": [{"id": r.id, "img": thumbs.add(r.image), "score": clean_float(r.score), "hit": h}
                            for r, h in zip(q.results, hits)],
            })
    n_chunks = chunks.finish()
    n = len(first)
    kmax = max(n_results)
    ks = sorted({k for k in ks if 0 < k <= kmax} | ({kmax} if kmax else set()))
    facets = [facet(f"hit@{k}", f"Hit in top {k}",
                    ["yes" if f is not None and f <= k else "no" for f in first], order=["yes", "no"])
              for k in ks]
    if any(g is not None for g in groups):
        facets.insert(0, facet("group", "Group", groups, none_label="(none)"))
    numbers = [number("first_hit", "rank of first hit", first, digits=0),
               number("top1_score", "top-1 score", top1)]
    recall = [[f"R@{k}", round(sum(f is not None and f <= k for f in first) / n, 4)] for k in ks]
    charts = [{"title": "Recall@K over the shown results", "unit": "", "max": 1, "bars": recall}]
    if metrics:
        charts.append({"title": "Metrics reported by the harness", "unit": "",
                       "bars": [[str(k), clean_float(v)] for k, v in metrics.items()]})
    index = {"kind": "retrieval", "title": title, "n": n, "chunk_size": chunk_size, "n_chunks": n_chunks,
             "facets": facets, "numbers": numbers, "pass_facets": [], "score_numbers": [],
             "charts": charts, "sources": [], "ks": ks}
    manifest = {"kind": "retrieval", "rows": n, "chunks": n_chunks, "thumb_size": thumb_size,
                "sources": []}
    files = write_viewer(out, index, manifest) + chunks.files_written
    hit_any = sum(f is not None for f in first)
    return ReportResult(out=out, rows=n, kept=hit_any, rejected=n - hit_any, chunks=n_chunks,
                        thumbs_written=thumbs.written, thumbs_reused=thumbs.reused,
                        images_unreadable=thumbs.unreadable, thumb_cpu_seconds=thumbs.worker_cpu_seconds,
                        files_written=files + thumbs.written,
                        seconds=time.perf_counter() - t0)

