"""`cirgen inspect`: what a triplet dataset holds, from its footers and a few rows, checked against
the plan in its run.json (missing, stray, unreadable or mismatched shard files are listed, and
such a dataset is never called complete)."""
from __future__ import annotations

from pathlib import Path

from .schema import DatasetError, read_batches, read_stats, validate_dataset
from .stats import DatasetStats


def inspect_dataset(root: str | Path, examples: int = 3) -> dict:
    """The report `cirgen inspect` prints (also its `--json`).

    `complete` is true only when every planned shard is present, readable and full, rejects/ has
    no problem and stats.json is there; `problems` holds one line per problem, naming the file,
    `missing`/`unexpected` the shard files absent or not planned. `rows` and `examples` come from
    the sound planned shards only. Raises DatasetError when run.json cannot be used."""
    layout = validate_dataset(root)
    problems = layout.problems()
    try:
        stats = read_stats(root)
    except DatasetError as e:
        stats = None
        problems.append(str(e))
    else:
        if stats is None:
            problems.append(f"{Path(root) / 'stats.json'}: missing (written when every work unit is "
                            f"complete; rerun `cirgen triplets` to write it)")
        elif layout.complete and stats.get("kept") != layout.rows:
            problems.append(f"{Path(root) / 'stats.json'}: counts {stats.get('kept')} kept, the shards "
                            f"hold {layout.rows}; rerun `cirgen triplets` to rewrite it")
    rows = []
    cols = ["id", "edit_type", "modification_text", "source_caption", "target_caption", "failure",
            "reject_reason"]
    for path in layout.shards:
        if len(rows) >= examples:
            break
        for batch in read_batches(path, cols, batch_size=max(examples, 1), present_only=True):
            rows.extend(batch.to_pylist()[:examples - len(rows)])
            break
    run = layout.run
    return {
        "path": str(root), "recipe": run["recipe_name"], "recipe_hash": run["recipe_hash"],
        "seed": run["seed"], "target_n": run["n"], "rows": layout.rows,
        "shards": len(layout.shards), "planned_shards": len(layout.units),
        "complete": not problems,
        "missing": [p.name for p in layout.missing],
        "unexpected": [str(p.relative_to(root)) for p in layout.unexpected],
        "problems": problems, "stats": stats, "examples": rows,
    }


def render_text(report: dict) -> str:
    """The human-readable form of `inspect_dataset`'s report."""
    out = [f"{report['path']}: recipe {report['recipe']} ({report['recipe_hash']}), seed {report['seed']}",
           f"rows {report['rows']} of {report['target_n']} in {report['shards']} of "
           f"{report['planned_shards']} planned shards"
           + ("" if report["complete"] else "  (incomplete or damaged: see the problems below)")]
    st = DatasetStats.from_dict(report["stats"] or {})
    if st.budget is not None:
        out.append(f"generated {st.generated}, kept {st.kept} (yield {100 * st.yield_:.1f}%)"
                   + ("" if report["complete"] else " (from stats.json)"))
        if st.pass_rates:
            out.append("pass rates: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in st.pass_rates.items()))
        if st.rejected:
            out.append("rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(st.rejected.items())))
        out.append("failure labels (kept): " + ", ".join(
            f"{k} {v}" for k, v in sorted(st.failures_kept.items(), key=lambda kv: -kv[1])))
        out.append("edit types (kept): " + ", ".join(
            f"{k} {v}" for k, v in sorted(st.edit_types.items(), key=lambda kv: -kv[1])))
        b = st.budget
        out.append("budget: " + ", ".join(f"{k} {v:.2f}s" for k, v in b.seconds_per_stage.items())
                   + f"; {b.seconds_per_1k_kept:.2f} s per 1k kept ({b.device})")
    for r in report["examples"]:
        out.append(f"- [{r.get('id')}] {r.get('edit_type')}: \"{r.get('modification_text')}\""
                   + (f"  (failure: {r['failure']})" if r.get("failure") else ""))
        out.append(f"    {r.get('source_caption')}\n    -> {r.get('target_caption')}")
    if report["problems"]:
        out.append(f"problems ({len(report['problems'])}):")
        out += [f"  {line}" for line in report["problems"]]
    return "\n".join(out)
