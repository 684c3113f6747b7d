"""Turn an evaluation's rankings into the HTML retrieval report (datagen.report)."""
from __future__ import annotations

from pathlib import Path

from .benchmarks import load_benchmark


def write_eval_report(result, root: str | Path, out: str | Path, top_k: int = 10):
    """One card per query: reference, query text, target(s), the top-k results with hits marked.

    result: the harness's `EvalResult` (with rankings); root: the benchmark folder it ran on;
    out: the report folder. Queries dropped by the integrity check are left out. Returns
    `write_retrieval_report`'s `ReportResult`. Errors: ValueError when the result kept no
    rankings; EvalError when the benchmark cannot be read again."""
    from datagen.report import RetrievalQuery, RetrievalResult, write_retrieval_report

    if not result.rankings:
        raise ValueError("the evaluation kept no rankings (EvalOptions.keep_rankings)")
    bench = load_benchmark(result.dataset, root, result.split, result.protocol)
    queries = []
    for task in bench.tasks:
        for q in task.queries:
            ranked = result.rankings.get(q.qid)
            if ranked is None:      # dropped by the integrity check
                continue
            targets = list(q.gt or ((q.target,) if q.target else ()))
            queries.append(RetrievalQuery(
                query_id=q.qid, reference_image=task.paths.get(q.reference), reference_id=q.reference,
                text=" and ".join(q.captions), target_ids=targets,
                target_image=task.paths.get(targets[0]) if targets else None,
                group=task.name if len(bench.tasks) > 1 else None,
                results=[RetrievalResult(id=g, image=task.paths.get(g)) for g in ranked[:top_k]]))
    return write_retrieval_report(out, queries, title=f"{result.model} on {result.dataset} {result.split}",
                                  metrics=result.metrics)
