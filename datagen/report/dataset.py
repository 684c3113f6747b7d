"""`cirgen browse`: the HTML report of one or more triplet datasets (kept and rejected rows).

Each row becomes a card (reference and target thumbnails, modification text, captions, every
`score_*` / `pass_*` value, quality tier, failure label, reject reason); the index carries the
columns the viewer filters and sorts on, and per-dataset budget charts come from stats.json.
Each folder is checked against its run.json first (`TripletReader`): a damaged shard, a stray
copy or a damaged rejects file stops the report with one line naming the file; an unfinished
dataset is shown as it is and marked incomplete.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Sequence

from ..schema import STAGES, TripletReader, read_batches, read_schema, read_stats
from ..stats import DatasetStats
from .result import ReportResult
from .thumbs import ThumbCache
from .writer import ChunkWriter, ReportError, check_sizes, facet, number, prepare_out, write_viewer

TEXT_COLUMNS = ["id", "modification_text", "source_caption", "target_caption", "edit_type", "quality",
                "failure", "reject_reason", "kept"]
IMAGE_COLUMNS = ["reference_image", "target_image"]
SECONDS_COLUMNS = [f"seconds_{s}" for s in STAGES]


def _filter_columns(readers: list[TripletReader], rejects: bool) -> tuple[list[str], list[str]]:
    """Union of the score_*/pass_* columns over all shards, in first-seen order."""
    scores: list[str] = []
    passes: list[str] = []
    for r in readers:
        for p in r.shard_paths() + (r.shard_paths(rejects=True) if rejects else []):
            for name in read_schema(p).names:
                if name.startswith("score_") and name not in scores:
                    scores.append(name)
                elif name.startswith("pass_") and name not in passes:
                    passes.append(name)
    return scores, passes


def _records(path: Path, columns: list[str]) -> Iterator[dict]:
    """Rows of one shard with those of `columns` it has, streamed (image bytes stay bounded);
    DatasetError names the file when it cannot be read."""
    for batch in read_batches(path, columns, batch_size=256, present_only=True):
        yield from batch.to_pylist()


def _dataset_names(roots: list[Path]) -> list[str]:
    names = [r.resolve().name or str(r) for r in roots]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]


def _budget_chart(name: str, stats: DatasetStats | None, row_seconds: dict[str, float]) -> dict:
    if stats is not None and stats.budget is not None:
        per = stats.budget.seconds_per_stage
        src = "stats.json"
    else:  # incomplete dataset (no stats.json yet): sum the rows' own timings instead
        per, src = row_seconds, "rows"
    return {"title": f"Budget: seconds per stage — {name} ({src})", "unit": "s",
            "bars": [[s, round(float(per.get(s, 0.0)), 3)] for s in STAGES]}


def write_dataset_report(datasets: str | Path | Sequence[str | Path], out: str | Path, *,
                         rejects: bool = True, thumb_size: int = 128, chunk_size: int = 100,
                         title: str | None = None, workers: int = 0) -> ReportResult:
    """Write a static HTML report of the triplet dataset folder(s) into `out` (layout: writer.py).

    `rejects` adds the rejected candidates of rejects/; `workers` processes make thumbnails
    (0: one per core). Rerunning into the same folder reuses every thumbnail already there.
    `thumb_size`: longest thumbnail side in pixels. Raises ReportError for no folder, `thumb_size`
    < 16 or `chunk_size` < 1, or an unusable `out`; DatasetError naming a folder that is not a
    dataset or a damaged file."""
    t0 = time.perf_counter()
    roots = [Path(datasets)] if isinstance(datasets, (str, Path)) else [Path(d) for d in datasets]
    if not roots:
        raise ReportError("no dataset folder given")
    check_sizes(thumb_size, chunk_size)
    # DatasetError names the folder that is not a dataset, or the damaged file; unfinished
    # datasets are shown as they are (marked incomplete).
    readers = [TripletReader(r, allow_incomplete=True) for r in roots]
    out = prepare_out(Path(out))
    names = _dataset_names(roots)
    scores, passes = _filter_columns(readers, rejects)
    chunks = ChunkWriter(out, chunk_size)
    cols: dict[str, list] = {k: [] for k in ["dataset", "quality", "status", "failure", "reject_reason",
                                             "edit_type", "seconds", *scores, *passes]}
    sources, charts = [], []
    with ThumbCache(out / "thumbs", thumb_size, workers) as thumbs:  # exit waits for the files
        for name, reader in zip(names, readers):
            src, chart = _read_dataset(name, reader, rejects, thumbs, chunks, cols, scores, passes)
            sources.append(src)
            charts.append(chart)
    n_chunks = chunks.finish()
    n = len(cols["status"])
    facets = [
        facet("status", "Status", cols["status"], order=["kept", "rejected"]),
        facet("quality", "Quality tier", cols["quality"], none_label="unknown"),
        facet("failure", "Failure label", cols["failure"], order=["none"]),
        facet("reject_reason", "Reject reason", cols["reject_reason"], order=["none"]),
        facet("edit_type", "Edit type", cols["edit_type"], none_label="unknown"),
    ] + [facet(p, p.removeprefix("pass_"), cols[p], order=["pass", "fail"], none_label="not scored")
         for p in passes]
    if len(roots) > 1:
        facets.insert(0, facet("dataset", "Dataset", cols["dataset"], order=names))
    numbers = [number(s, s.removeprefix("score_"), cols[s]) for s in scores]
    numbers.append(number("seconds", "seconds (all stages)", cols["seconds"], digits=5))
    index = {
        "kind": "triplets", "title": title or f"cirgen triplets: {', '.join(names)}", "n": n,
        "chunk_size": chunk_size, "n_chunks": n_chunks, "facets": facets, "numbers": numbers,
        "pass_facets": passes, "score_numbers": scores, "charts": charts, "sources": sources,
    }
    manifest = {"kind": "triplets", "rows": n, "chunks": n_chunks, "thumb_size": thumb_size,
                "sources": [s["path"] for s in sources]}
    files = write_viewer(out, index, manifest) + chunks.files_written
    kept = cols["status"].count("kept")
    return ReportResult(out=out, rows=n, kept=kept, rejected=n - kept, chunks=n_chunks,
                        thumbs_written=thumbs.written, thumbs_reused=thumbs.reused,
                        images_unreadable=thumbs.unreadable, thumb_cpu_seconds=thumbs.worker_cpu_seconds,
                        files_written=files + thumbs.written,
                        seconds=time.perf_counter() - t0)


def _read_dataset(name: str, reader: TripletReader, rejects: bool, thumbs: ThumbCache,
                  chunks: ChunkWriter, cols: dict[str, list], scores: list[str],
                  passes: list[str]) -> tuple[dict, dict]:
    """Add one dataset's rows (kept, then rejected); return its summary row and budget chart."""
    raw = read_stats(reader.root)
    stats = DatasetStats.from_dict(raw) if raw else None
    row_seconds = {s: 0.0 for s in STAGES}
    counts = {"kept": 0, "rejected": 0}
    for rej in ([False, True] if rejects else [False]):
        for path in reader.shard_paths(rej):
            for rec in _records(path, TEXT_COLUMNS + IMAGE_COLUMNS + SECONDS_COLUMNS + scores + passes):
                _add_row(rec, name, rej, thumbs, chunks, cols, scores, passes, row_seconds)
                counts["rejected" if rej else "kept"] += 1
    run = reader.run
    source = {
        "name": name, "path": str(reader.root.resolve()), "recipe": run.get("recipe_name"),
        "tier": (run.get("recipe") or {}).get("quality", {}).get("tier"), "seed": run.get("seed"),
        "target_n": run.get("n"), "kept_rows": counts["kept"], "rejected_rows": counts["rejected"],
        "generated": stats.generated if stats else None,
        "yield": stats.yield_ if stats else None,
        "seconds_per_1k_kept": stats.budget.seconds_per_1k_kept if stats and stats.budget else None,
        "complete": reader.layout.complete and stats is not None and stats.kept == run.get("n"),
    }
    return source, _budget_chart(name, stats, row_seconds)


def _add_row(rec: dict, name: str, rejected: bool, thumbs: ThumbCache, chunks: ChunkWriter,
             cols: dict[str, list], scores: list[str], passes: list[str], row_seconds: dict) -> None:
    kept = rec.get("kept")
    kept = (not rejected) if kept is None else bool(kept)
    cols["dataset"].append(name)
    cols["quality"].append(rec.get("quality"))
    cols["status"].append("kept" if kept else "rejected")
    cols["failure"].append(rec.get("failure"))
    cols["reject_reason"].append(rec.get("reject_reason"))
    cols["edit_type"].append(rec.get("edit_type"))
    secs = 0.0
    for c in SECONDS_COLUMNS:
        v = rec.get(c) or 0.0
        row_seconds[c.removeprefix("seconds_")] += v
        secs += v
    cols["seconds"].append(secs)
    for s in scores:
        cols[s].append(rec.get(s))
    for p in passes:
        v = rec.get(p)
        cols[p].append(None if v is None else ("pass" if v else "fail"))
    chunks.add({
        "id": rec.get("id"), "ref": thumbs.add(rec.get("reference_image")),
        "tgt": thumbs.add(rec.get("target_image")), "mod": rec.get("modification_text"),
        "src": rec.get("source_caption"), "dst": rec.get("target_caption"),
    })
