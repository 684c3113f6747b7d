"""`cirgen inspect`: what a triplet dataset holds, from its footers and a few rows."""
from __future__ import annotations

import json
from pathlib import Path

from .schema import TripletReader


def inspect_dataset(root: str | Path, examples: int = 3) -> dict:
    reader = TripletReader(root)
    stats_path = Path(root) / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    rows = []
    cols = ["id", "edit_type", "modification_text", "source_caption", "target_caption", "failure",
            "reject_reason"]
    for rec in reader.iter_records(columns=cols):
        rows.append(rec)
        if len(rows) >= examples:
            break
    run = reader.run
    return {
        "path": str(root), "recipe": run["recipe_name"], "recipe_hash": run["recipe_hash"],
        "seed": run["seed"], "target_n": run["n"], "rows": len(reader),
        "shards": len(reader.shard_paths()), "complete": stats is not None and stats["kept"] == run["n"],
        "stats": stats, "examples": rows,
    }


def render_text(report: dict) -> str:
    out = [f"{report['path']}: recipe {report['recipe']} ({report['recipe_hash']}), seed {report['seed']}",
           f"rows {report['rows']} of {report['target_n']} in {report['shards']} shards"
           + ("" if report["complete"] else "  (incomplete: rerun `cirgen triplets` to finish)")]
    st = report["stats"]
    if st:
        out.append(f"generated {st['generated']}, kept {st['kept']} (yield {100 * st['yield']:.1f}%)")
        if st["pass_rates"]:
            out.append("pass rates: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in st["pass_rates"].items()))
        if st["rejected"]:
            out.append("rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(st["rejected"].items())))
        out.append("failure labels (kept): " + ", ".join(
            f"{k} {v}" for k, v in sorted(st["failures_kept"].items(), key=lambda kv: -kv[1])))
        out.append("edit types (kept): " + ", ".join(
            f"{k} {v}" for k, v in sorted(st["edit_types"].items(), key=lambda kv: -kv[1])))
        b = st["budget"]
        out.append("budget: " + ", ".join(f"{k} {v:.2f}s" for k, v in b["seconds_per_stage"].items())
                   + f"; {b['seconds_per_1k_kept']:.2f} s per 1k kept ({b['device']})")
    for r in report["examples"]:
        out.append(f"- [{r['id']}] {r['edit_type']}: \"{r['modification_text']}\""
                   + (f"  (failure: {r['failure']})" if r["failure"] else ""))
        out.append(f"    {r['source_caption']}\n    -> {r['target_caption']}")
    return "\n".join(out)
