"""Writing the dataset folder: run.json, atomic shard writes, stats.json and the dataset card.

Every file is written to a temporary name and renamed into place, so a killed run leaves either
the old file or the new one, never half of one; files whose content would not change are not
touched (a rerun with nothing to do changes no file).
"""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .base.errors import CirgenError
from .candidate import Candidate
from .recipe import GenRecipe
from .schema import FORMAT, SCHEMA_VERSION, STAGES

ROW_GROUP = 100  # rows per parquet row group: readers stream ~100 image pairs at a time


class StoreError(CirgenError, ValueError):
    """The output folder cannot be used; nothing in it was changed."""


def write_atomic(path: Path, data: bytes) -> bool:
    """Write `data` to `path` via a temp file + rename; skip (return False) if already identical."""
    if path.exists() and path.read_bytes() == data:
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("cirgen", "numpy", "pillow", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def open_dataset(out: Path, recipe: GenRecipe, seed: int, n: int, recipe_path: str) -> dict:
    """Create or reopen `out` for (recipe, seed) aiming at `n` triplets; return run.json's content.

    Refuses (StoreError, nothing changed) a foreign non-empty folder, an unwritable one, a dataset
    of another recipe or seed, and an `n` below what the folder already holds.
    """
    if n <= 0:
        raise StoreError(f"--n must be a positive number of triplets, got {n}")
    run_path = out / "run.json"
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: exists and is not a folder")
    if out.is_dir() and not run_path.exists() and any(out.iterdir()):
        raise StoreError(f"{out}: folder is not empty and holds no cirgen dataset (no run.json); "
                         f"choose an empty or new folder")
    parent = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("/"))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"{out}: folder is not writable")
    if run_path.exists():
        try:
            run = json.loads(run_path.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{run_path}: malformed JSON at line {e.lineno}: {e.msg}") from None
        if run.get("format") != FORMAT:
            raise StoreError(f"{run_path}: not a cirgen triplet dataset (format {run.get('format')!r})")
        if run.get("recipe_hash") != recipe.hash():
            raise StoreError(f"{out}: made by a different recipe (hash {run.get('recipe_hash')} from "
                             f"{run.get('recipe_name')!r}, now {recipe.hash()} from {recipe.name!r}); "
                             f"use a new --out")
        if run.get("seed") != seed:
            raise StoreError(f"{out}: made with seed {run.get('seed')}, not {seed}; use a new --out")
        if n < run.get("n", 0):
            raise StoreError(f"{out}: already holds a dataset of {run['n']} triplets; --n {n} would "
                             f"shrink it (subsample when training instead, e.g. --max-triplets)")
        if n == run["n"]:
            return run
        run = dict(run, n=n)
    else:
        from .config import to_dict

        run = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "recipe_name": recipe.name,
               "recipe_path": recipe_path, "recipe_hash": recipe.hash(), "seed": seed, "n": n,
               "recipe": to_dict(recipe), "versions": _versions()}
    try:
        (out / "shards").mkdir(parents=True, exist_ok=True)
        (out / "rejects").mkdir(exist_ok=True)
    except OSError as e:
        raise StoreError(f"{out}: cannot create folder ({e.strerror})") from None
    write_atomic(run_path, (json.dumps(run, indent=2, sort_keys=True) + "\n").encode())
    return run


def clean_temp_files(out: Path) -> int:
    """Remove temp files a killed run left behind; return how many."""
    n = 0
    for sub in (out, out / "shards", out / "rejects"):
        for p in sub.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def shard_path(out: Path, unit: int, rejects: bool = False) -> Path:
    return out / ("rejects" if rejects else "shards") / f"{unit:06d}.parquet"


def unit_done(out: Path, unit: int, count: int) -> bool:
    """A unit is done when its shard exists with exactly `count` rows."""
    p = shard_path(out, unit)
    if not p.exists():
        return False
    try:
        return pq.ParquetFile(p).metadata.num_rows == count
    except (pa.ArrowInvalid, OSError):
        return False


def _scene_json(scene) -> str | None:
    return None if scene is None else scene.to_json()


def to_table(cands: list[Candidate], schema: pa.Schema, unit_size: int, quality: str, kept: bool) -> pa.Table:
    rows: dict[str, list] = {f.name: [] for f in schema}
    for k, c in enumerate(cands):
        rows["id"].append(c.id)
        rows["index"].append(c.unit * unit_size + k if kept else -1)
        rows["reference_image"].append({"bytes": c.reference_image, "path": None})
        rows["target_image"].append({"bytes": c.target_image, "path": None})
        rows["modification_text"].append(c.modification_text)
        rows["source_caption"].append(c.source_caption)
        rows["target_caption"].append(c.target_caption)
        rows["edit_type"].append(c.edit_type)
        rows["quality"].append(quality)
        rows["failure"].append(c.failure)
        rows["kept"].append(c.kept)
        rows["reject_reason"].append(c.reject_reason)
        rows["seed"].append(c.seed)
        rows["generator"].append(json.dumps(c.generator, sort_keys=True))
        rows["source_scene"].append(_scene_json(c.source_scene))
        rows["target_scene"].append(_scene_json(c.target_scene))
        rows["intended_scene"].append(_scene_json(c.intended_scene))
        for s in STAGES:
            rows[f"seconds_{s}"].append(c.seconds.get(s, 0.0))
        for f in schema.names:
            if f.startswith("score_"):
                rows[f].append(c.scores.get(f))
            elif f.startswith("pass_"):
                rows[f].append(c.passes.get(f))
    return pa.table(rows, schema=schema)


def write_table(table: pa.Table, path: Path, unit_stats: dict) -> None:
    meta = dict(table.schema.metadata or {})
    meta[b"cirgen"] = json.dumps(unit_stats, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP, compression="zstd")
    os.replace(tmp, path)


def unit_stats(out: Path, unit: int) -> dict:
    md = pq.ParquetFile(shard_path(out, unit)).schema_arrow.metadata or {}
    return json.loads(md.get(b"cirgen", b"{}"))


def _device_type(device: str | None) -> str:
    return (device or "cpu").split(":")[0]


def _scan_rows(out: Path, unit: int) -> tuple[dict, dict]:
    """From a unit's kept and rejected rows (small columns only): per pass column (evaluated,
    passed), and per stage the device it ran on. A component that runs a stage on an accelerator
    records it as `generator[stage]["device"]`; absent means cpu."""
    crit: dict[str, list[int]] = {}
    devices: dict[str, dict[str, int]] = {}
    for path in (shard_path(out, unit), shard_path(out, unit, rejects=True)):
        if not path.exists():
            continue
        names = pq.read_schema(path).names
        cols = [c for c in names if c.startswith("pass_")] + (["generator"] if "generator" in names else [])
        t = pq.read_table(path, columns=cols)
        for c in cols:
            if c == "generator":
                continue
            vals = t.column(c).to_pylist()
            e = crit.setdefault(c, [0, 0])
            e[0] += sum(v is not None for v in vals)
            e[1] += sum(v is True for v in vals)
        if "generator" in cols:
            for g in t.column("generator").to_pylist():
                g = json.loads(g) if g else {}
                for s in STAGES:
                    d = _device_type((g.get(s) or {}).get("device"))
                    ds = devices.setdefault(s, {})
                    ds[d] = ds.get(d, 0) + 1
    return crit, devices


def aggregate_stats(out: Path, units: list[int]) -> dict:
    """stats.json from the per-unit statistics stored in each shard's footer.

    Budget: seconds per stage (summed over every candidate, kept or rejected), per generated and
    per kept triplet, split by the device each stage ran on (`seconds_by_device`, GPU seconds).
    Pass rates per criterion are over the candidates that criterion scored (`criteria`).
    """
    total = {"kept": 0, "generated": 0, "rejected": {}, "failures_kept": {}, "failures_generated": {},
             "edit_types": {}, "passes": {}, "seconds": {s: 0.0 for s in STAGES}}
    crit: dict[str, list[int]] = {}
    by_device: dict[str, float] = {}
    stage_devices: dict[str, set] = {s: set() for s in STAGES}
    for u in units:
        st = unit_stats(out, u)
        total["kept"] += st["kept"]
        total["generated"] += st["generated"]
        for key in ("rejected", "failures_kept", "failures_generated", "edit_types", "passes"):
            for k, v in st[key].items():
                total[key][k] = total[key].get(k, 0) + v
        unit_crit, unit_dev = _scan_rows(out, u)
        for k, (e, p) in unit_crit.items():
            c = crit.setdefault(k, [0, 0])
            c[0] += e
            c[1] += p
        for s in STAGES:
            sec = st["seconds"].get(s, 0.0)
            total["seconds"][s] += sec
            # A unit runs in one process, so a stage has one device per unit: take the majority.
            counts = unit_dev.get(s) or {"cpu": 1}
            dev = max(sorted(counts), key=counts.get)
            stage_devices[s].add(dev)
            by_device[dev] = by_device.get(dev, 0.0) + sec
    sec = sum(total["seconds"].values())
    gen, kept = max(total["generated"], 1), max(total["kept"], 1)
    total["criteria"] = {k.removeprefix("pass_"): {"evaluated": e, "passed": p,
                                                   "pass_rate": round(p / e, 4) if e else None}
                         for k, (e, p) in sorted(crit.items())}
    # Pass rate of a criterion = passed / candidates it scored (= generated when nothing is
    # rejected before the filters, which is what older datasets without pass columns assume).
    total["pass_rates"] = {k: round(v / (crit.get(k, [gen])[0] or gen), 4)
                           for k, v in sorted(total["passes"].items())}
    total["yield"] = round(total["kept"] / gen, 4)
    gpu = sum(v for d, v in by_device.items() if d != "cpu")
    total["budget"] = {
        "seconds_total": round(sec, 3),
        "seconds_per_stage": {s: round(v, 3) for s, v in total["seconds"].items()},
        "seconds_per_generated": round(sec / gen, 6),
        "seconds_per_kept": round(sec / kept, 6),
        "seconds_per_1k_kept": round(1000 * sec / kept, 3),
        "stage_seconds_per_generated": {s: round(v / gen, 6) for s, v in total["seconds"].items()},
        "stage_seconds_per_kept": {s: round(v / kept, 6) for s, v in total["seconds"].items()},
        "device_per_stage": {s: "+".join(sorted(d)) for s, d in stage_devices.items()},
        "seconds_by_device": {d: round(v, 3) for d, v in sorted(by_device.items())},
        "gpu_seconds": round(gpu, 3),
        "gpu_seconds_per_1k_kept": round(1000 * gpu / kept, 3),
        "device": "+".join(sorted({d for ds in stage_devices.values() for d in ds})) or "cpu",
    }
    del total["seconds"]
    dd = _dedupe_settings(out)
    if dd is not None:
        from .dedupe import cross_unit_report

        total["near_duplicates_cross_unit"] = cross_unit_report(
            out, units, dd["max_distance"], dd["match"], dd["channels"])
    return total


def _dedupe_settings(out: Path) -> dict | None:
    """The dataset's dedupe section when its cross-unit report is on (read from run.json)."""
    try:
        dd = json.loads((out / "run.json").read_text())["recipe"]["filters"]["dedupe"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None
    return dd if dd.get("enabled") and dd.get("cross_unit_report") else None


CARD = """---
license: cc-by-4.0
task_categories: [image-to-image, image-retrieval]
tags: [composed-image-retrieval, synthetic, cirgen]
configs:
- config_name: default
  data_files: shards/*.parquet
---
# {name}: {kept} synthetic CIR triplets

Made by `cirgen triplets` with recipe `{name}` (hash `{hash}`), seed {seed}.
{description}

| | |
|---|---|
| kept triplets | {kept} |
| generated candidates | {generated} (yield {yield_pct:.1f}%) |
| rejected | {rejected} |
| injected failures among kept | {failures} |
| quality tier | {tier} |
| CPU/GPU seconds per 1k kept | {per1k} ({device}; GPU seconds per 1k kept {gpu1k}) |
| pass rate per criterion | {pass_rates} |

Each row: `reference_image`, `modification_text`, `target_image` (HF `Image()`), `source_caption`,
`target_caption`, `edit_type`, `failure` (injected generator failure, if any), every filter score
(`score_*`) and pass/fail (`pass_*`), seconds per stage, and for the shapes world the ground-truth
scenes as JSON. Rejected candidates are kept apart in `rejects/`.

```python
from datasets import load_dataset
ds = load_dataset("parquet", data_files="{root}/shards/*.parquet", split="train")
```
"""


def write_card(out: Path, run: dict, stats: dict) -> None:
    recipe = run["recipe"]
    text = CARD.format(
        name=run["recipe_name"], hash=run["recipe_hash"], seed=run["seed"],
        description=(recipe.get("description") or "").strip(), kept=stats["kept"],
        generated=stats["generated"], yield_pct=100 * stats["yield"],
        rejected=json.dumps(stats["rejected"], sort_keys=True) or "{}",
        failures=json.dumps(stats["failures_kept"], sort_keys=True),
        tier=recipe["quality"]["tier"], per1k=stats["budget"]["seconds_per_1k_kept"], root=".",
        device=stats["budget"].get("device", "cpu"), gpu1k=stats["budget"].get("gpu_seconds_per_1k_kept", 0.0),
        pass_rates=", ".join(f"{k} {100 * v['pass_rate']:.1f}%" for k, v in stats.get("criteria", {}).items()
                             if v["pass_rate"] is not None) or "-")
    write_atomic(out / "README.md", text.encode())
