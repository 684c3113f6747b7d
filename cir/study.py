"""The data-efficiency study: stage II gain as a function of triplet count, quality tier and seed.

`cirgen study RECIPE --out DIR` runs a grid (quantity x quality tier x seed):
1. each tier's triplets are generated once, at the largest quantity (`DIR/data/<tier>/`), and
   every smaller cell trains on a deterministic, nested subsample of them;
2. one stage-I run is shared by all cells (`DIR/stage1/`), and it is also the "0 triplets" row;
3. one benchmark is written (`DIR/bench/`, held-out scenes and phrasing, CIRR layout);
4. every cell trains stage II (`DIR/cells/<cell>/`) and is evaluated there (`metrics.json`).
Every step is skipped when its output is complete and was made by the same configuration (each
output records the hash of what made it), so rerunning a finished study does no work, and
deleting one cell's folder recomputes only that cell. The table (`results.csv`, `results.md`)
and the plots (`plots/*.png`) are rebuilt from the cells' files.

Cost of a point: the generation seconds of its triplets (the tier's measured seconds per kept
triplet x count, from the dataset's stats) plus its stage II training seconds.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from datagen.base.io import write_atomic
from datagen.base.clip_loader import weights_identity
from datagen.base.config import ConfigError, stable_hash, to_dict
from datagen.base.recipes import PROSE_FIELDS, RecipeProse, load_recipe
from datagen.stats import DatasetStats

STUDY_METRICS = ("R@1", "R@5", "R@10", "R@50")


@dataclass
class Tier:
    """One quality tier of a study: a generation recipe, its overrides and stage II row conditions."""

    name: str
    gen: str                                   # a recipe in recipes/gen/ or a path
    overrides: list[str] = field(default_factory=list)
    conditions: list[str] = field(default_factory=list)   # stage II conditions on stored scores/columns


@dataclass
class StageSpec:
    """A training recipe (name or path) and its overrides, for the study's stage I or stage II."""

    recipe: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class BenchSpec:
    """A shapes benchmark written for the study, or (`root`) an existing benchmark folder."""
    format: str = "cirr"                       # shapes benchmark layout: cirr | circo
    queries: int = 1000
    seed: int = 0
    resolution: int = 128
    root: str = ""                             # e.g. a CIRR/FashionIQ/CIRCO folder (real runs)
    dataset: str = ""                          # with root: cirr | fashioniq | circo | shapes-cirr ...
    split: str = "val"
    protocol: list[str] = field(default_factory=list)   # protocol overrides, e.g. [template=pic2word]

    def validate(self) -> None:
        """Check `format` (cirr or circo) and that `root` and `dataset` come together; ValueError otherwise."""
        if self.format not in ("cirr", "circo"):
            raise ValueError(f"format: {self.format!r} is not cirr or circo")
        if bool(self.root) != bool(self.dataset):
            raise ValueError("root and dataset go together (an existing benchmark folder and its name)")

    @property
    def name(self) -> str:
        """The dataset name the harness evaluates (`dataset`, or `shapes-<format>`)."""
        return self.dataset or f"shapes-{self.format}"


@dataclass
class StudyRecipe(RecipeProse):
    """A data-efficiency study (`Study`): the grid (quantities x tiers x seeds), the stage recipes
    and the benchmark; a recipe in recipes/study/ (`load_study_recipe`)."""
    kind: str = "study"
    name: str = "study"
    gen_seed: int = 0
    quantities: list[int] = field(default_factory=lambda: [250, 500, 1000, 2000])
    tiers: list[Tier] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    stage1: StageSpec = field(default_factory=lambda: StageSpec("stage1-shapes"))
    stage2: StageSpec = field(default_factory=lambda: StageSpec("stage2-shapes"))
    benchmark: BenchSpec = field(default_factory=BenchSpec)
    primary_metric: str = "R@1"
    workers: int = 2                           # generation processes (does not change the data)
    # Where stage I, stage II and the evaluations run (auto = the GPU when there is one); not part
    # of any output's key, like `workers`.
    device: str = "auto"

    def validate(self) -> None:
        """Check kind, at least one tier (unique names), positive quantities, at least one seed,
        `primary_metric` and the device name; ValueError (DeviceError for the device) otherwise."""
        if self.kind != "study":
            raise ValueError("kind must be 'study'")
        if not self.tiers:
            raise ValueError("tiers: at least one quality tier is needed")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tiers: duplicate tier names {names}")
        if not self.quantities or min(self.quantities) < 1:
            raise ValueError("quantities: positive triplet counts are needed")
        if not self.seeds:
            raise ValueError("seeds: at least one seed is needed")
        if self.primary_metric not in STUDY_METRICS:
            raise ValueError(f"primary_metric: {self.primary_metric!r} is not one of {STUDY_METRICS}")
        from datagen.base.device import check_device_name

        check_device_name(self.device)


def load_study_recipe(name_or_path: str = "shapes", overrides: list[str] | None = None) -> StudyRecipe:
    """A `StudyRecipe` from a name in recipes/study/ or a path, with `key=value` overrides.
    Errors: ConfigError naming the file for a missing recipe or an invalid value."""
    return load_recipe(StudyRecipe, name_or_path, "study", overrides)


@dataclass
class Cell:
    """One point of the grid: a tier, a triplet count and a seed (tier None: the stage I row)."""

    tier: Tier | None          # None: the stage-I row (0 triplets)
    quantity: int
    seed: int

    @property
    def name(self) -> str:
        """Folder name under `cells/`: `stage1` or `<tier>-n<quantity>-s<seed>`."""
        return "stage1" if self.tier is None else f"{self.tier.name}-n{self.quantity}-s{self.seed}"


# ----------------------------------------------------------------------------- the steps

def _what_is_learned(recipe) -> dict:
    """A training recipe without its prose and its feature-cache folder (they change no result)."""
    d = to_dict(recipe)
    for k in (*PROSE_FIELDS, "cache_dir", "device", "decode_workers"):
        d.pop(k, None)
    d.get("clip", {}).pop("device", None)      # stage I's device
    return d


def _done(folder: Path, marker: str, key: str) -> bool:
    """`folder/marker` exists and records configuration hash `key`."""
    try:
        return json.loads((folder / marker).read_text()).get("study_key") == key
    except (OSError, json.JSONDecodeError):
        return False


def _clear_stale(folder: Path, marker: str, key: str, log) -> None:
    """Remove a study output made by another configuration (only ever inside the study folder)."""
    try:
        prev = json.loads((folder / marker).read_text()).get("study_key")
    except (OSError, json.JSONDecodeError):
        return
    if prev != key:
        log(f"[study] {folder} was made by another configuration; recomputing it")
        shutil.rmtree(folder)


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class Study:
    """One study folder; `run()` does whatever is missing."""

    def __init__(self, recipe: StudyRecipe, out: str | Path, log: Callable[[str], None] = print):
        self.r, self.out, self.log = recipe, Path(out), log
        ident = to_dict(recipe)
        ident.pop("device")                    # where it runs, not what it computes
        self.recipe_hash = stable_hash(ident)
        self.work_done: list[str] = []

    # --- identities: each output is keyed by what makes it, so a changed recipe redoes only
    # the outputs it affects (adding a quantity or a seed adds cells and leaves the rest).
    def _gen_recipe(self, tier: Tier):
        from datagen.recipe import load_gen_recipe

        return load_gen_recipe(tier.gen, list(tier.overrides))

    def _gen_key(self, tier: Tier) -> str:
        recipe = self._gen_recipe(tier)
        key = {"gen": recipe.identity(), "seed": self.r.gen_seed, "n": max(self.r.quantities)}
        clip = recipe.filters.clip
        if clip.enabled:      # the filter's weights decide what is kept
            key["filter_weights"] = weights_identity(clip.model, clip.pretrained, clip.random_init)
        return stable_hash(key)

    def _stage1_recipe(self):
        from cir.stage1 import load_stage1_recipe

        return load_stage1_recipe(self.r.stage1.recipe, list(self.r.stage1.overrides) + [f"clip.device={self.r.device}"])

    def _stage2_recipe(self, cell: Cell):
        from cir.stage2 import load_stage2_recipe

        sets = list(self.r.stage2.overrides) + [
            f"triplets.path={self.out / 'data' / cell.tier.name}",
            f"triplets.max_triplets={cell.quantity}", f"train.seed={cell.seed}", f"device={self.r.device}"]
        r = load_stage2_recipe(self.r.stage2.recipe, sets)
        r.triplets.conditions = list(r.triplets.conditions) + list(cell.tier.conditions)
        return r

    def _stage1_key(self) -> str:
        r = self._stage1_recipe()
        # Stage II and the evaluation run on stage I's CLIP, so its weights key every cell.
        return stable_hash({"stage1": _what_is_learned(r),
                            "weights": weights_identity(r.clip.name, r.clip.pretrained, r.clip.random_init)})

    def _bench_key(self) -> str:
        return stable_hash(to_dict(self.r.benchmark))

    def _cell_key(self, cell: Cell) -> str:
        base = {"stage1": self._stage1_key(), "bench": self._bench_key()}
        if cell.tier is None:
            return stable_hash(base)
        s2 = _what_is_learned(self._stage2_recipe(cell))
        s2["triplets"].pop("path")             # the folder's name is not its content
        return stable_hash({**base, "gen": self._gen_key(cell.tier), "stage2": s2})

    def cells(self) -> list[Cell]:
        """The stage I row, then every (tier, quantity ascending, seed) cell."""
        out = [Cell(None, 0, 0)]
        for tier in self.r.tiers:
            for q in sorted(self.r.quantities):
                for s in self.r.seeds:
                    out.append(Cell(tier, q, s))
        return out

    # --- steps
    def generate(self, tier: Tier) -> dict:
        """Generate `tier`'s triplets once, at the largest quantity, into `data/<tier>/` (skipped
        when done by this configuration); returns the dataset's stats. Errors: ConfigError when
        generation keeps fewer triplets than the largest quantity."""
        from datagen.pipeline import generate

        folder = self.out / "data" / tier.name
        key = self._gen_key(tier)
        if _done(folder, "study-done.json", key):
            return json.loads((folder / "stats.json").read_text())
        _clear_stale(folder, "study-done.json", key, self.log)
        n = max(self.r.quantities)
        self.log(f"[study] generating {n} {tier.name} triplets ({tier.gen})")
        stats = generate(self._gen_recipe(tier), folder, n, seed=self.r.gen_seed, workers=self.r.workers,
                         recipe_path=tier.gen, progress=True, log=self.log)
        if stats.get("kept", n) < n:
            raise ConfigError(f"tier {tier.name}: generation kept {stats.get('kept')} of {n} triplets")
        _write_json(folder / "study-done.json", {"study_key": key})
        self.work_done.append(f"data/{tier.name}")
        return stats

    def stage1(self) -> Path:
        """Train (or resume) the shared stage I run in `stage1/` unless done; returns the folder."""
        from cir.stage1 import run_stage1

        folder = self.out / "stage1"
        key = self._stage1_key()
        if not _done(folder, "study-done.json", key):
            _clear_stale(folder, "study-done.json", key, self.log)
            self.log("[study] training the shared stage-I run")
            run_stage1(self._stage1_recipe(), folder, resume=(folder / "recipe.json").exists(), log=self.log,
                       evaluate_after=False)
            _write_json(folder / "study-done.json", {"study_key": key})
            self.work_done.append("stage1")
        return folder

    def benchmark(self) -> Path:
        """The benchmark folder: `benchmark.root` as given, or the shapes benchmark written to
        `bench/` (unless done by this configuration)."""
        from datagen.world.benchmark import write_shapes_benchmark

        if self.r.benchmark.root:
            return Path(self.r.benchmark.root)
        folder = self.out / "bench"
        key = self._bench_key()
        if not _done(folder, "study-done.json", key):
            b = self.r.benchmark
            self.log(f"[study] writing the shapes-{b.format} benchmark ({b.queries} queries)")
            write_shapes_benchmark(folder, b.format, b.queries, b.seed, b.resolution, ("val",), overwrite=True)
            _write_json(folder / "study-done.json", {"study_key": key})
            self.work_done.append("bench")
        return folder

    def run_cell(self, cell: Cell, stage1: Path, bench: Path, gen_stats: dict) -> dict:
        """Train stage II for `cell` (none for the stage I row), evaluate it and write
        `cells/<cell>/metrics.json`; returns that row (metrics in percent, `gen_seconds` and
        `train_seconds` in seconds). Skipped when done by this configuration. Errors: ConfigError
        when stage II trained on another number of triplets than the cell's."""
        from cir.eval.baselines import resolve_model
        from cir.eval.harness import EvalOptions, evaluate
        from cir.eval.protocol import build_protocol
        from cir.stage2 import run_stage2

        folder = self.out / "cells" / cell.name
        key = self._cell_key(cell)
        if _done(folder, "metrics.json", key):
            return json.loads((folder / "metrics.json").read_text())
        # cell.json is written first: an interrupted cell resumes only if this configuration started it.
        _clear_stale(folder, "cell.json", key, self.log)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "cell.json", {"study_key": key, "cell": cell.name})
        train_s, run = 0.0, stage1
        if cell.tier is not None:
            self.log(f"[study] cell {cell.name}: stage II on {cell.quantity} {cell.tier.name} triplets")
            t = time.time()
            run = folder / "run"
            res = run_stage2(self._stage2_recipe(cell), stage1, run, resume=(run / "recipe.json").exists(),
                             log=self.log)
            train_s = time.time() - t
            if res["triplets"] != cell.quantity:
                raise ConfigError(f"cell {cell.name}: trained on {res['triplets']} triplets, "
                                  f"expected {cell.quantity} (see the tier's filters)")
        b = self.r.benchmark
        protocol = build_protocol(list(b.protocol))
        model = resolve_model(str(run), preprocess=protocol.preprocess, target_ratio=protocol.target_ratio,
                              device=self.r.device)
        result = evaluate(model, b.name, bench, b.split, protocol, EvalOptions(device=self.r.device),
                          log=lambda s: None)
        per_kept = (0.0 if cell.tier is None
                    else DatasetStats.from_dict(gen_stats[cell.tier.name]).budget.seconds_per_kept)
        row = {"study_key": key, "recipe_hash": self.recipe_hash, "cell": cell.name,
               "tier": "stage1" if cell.tier is None else cell.tier.name, "quantity": cell.quantity,
               "seed": cell.seed, "gen_seconds": round(per_kept * cell.quantity, 2),
               "train_seconds": round(train_s, 1),
               "metrics": {k: round(v, 4) for k, v in result.metrics.items()}}
        _write_json(folder / "metrics.json", row)
        self.work_done.append(f"cells/{cell.name}")
        return row

    def run(self) -> dict:
        """Do whatever is missing (data, stage I, benchmark, cells) and rebuild the results when
        anything changed; returns {cells, work_done, files}. Errors: DeviceError, before any work,
        for a device this machine lacks; the steps' errors."""
        from datagen.base.device import resolve_device

        resolve_device(self.r.device)        # a GPU this machine lacks: an error before hours of generation
        self.out.mkdir(parents=True, exist_ok=True)
        _write_json(self.out / "study.json", {"recipe_hash": self.recipe_hash, "recipe": to_dict(self.r)})
        gen_stats = {t.name: self.generate(t) for t in self.r.tiers}
        stage1, bench = self.stage1(), self.benchmark()
        cells = self.cells()
        t0, rows = time.time(), []
        for i, cell in enumerate(cells):
            rows.append(self.run_cell(cell, stage1, bench, gen_stats))
            done = i + 1
            eta = (time.time() - t0) / done * (len(cells) - done)
            self.log(f"[study] {done}/{len(cells)} cells ready (eta {eta:.0f} s)")
        files = [self.out / "results.csv", self.out / "results.md"]
        if self.work_done or not all(f.exists() for f in files):
            files = write_results(rows, self.out, self.r.primary_metric, self.recipe_hash)
        return {"cells": len(rows), "work_done": self.work_done, "files": [str(f) for f in files]}


# ----------------------------------------------------------------------------- results

def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5


def summarise(rows: list[dict], metric: str) -> list[dict]:
    """One line per (tier, quantity): mean and std over seeds, gain over stage I, cost."""
    base = [r for r in rows if r["tier"] == "stage1"]
    base_v = base[0]["metrics"][metric] if base else float("nan")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["tier"] != "stage1":
            groups.setdefault((r["tier"], r["quantity"]), []).append(r)
    out = [{"tier": "stage1", "quantity": 0, "seeds": 1, "mean": base_v, "std": 0.0, "gain": 0.0,
            "gen_seconds": 0.0, "train_seconds": 0.0}] if base else []
    for (tier, q), rs in groups.items():
        m, s = _mean_std([r["metrics"][metric] for r in rs])
        out.append({"tier": tier, "quantity": q, "seeds": len(rs), "mean": m, "std": s, "gain": m - base_v,
                    "gen_seconds": rs[0]["gen_seconds"],
                    "train_seconds": sum(r["train_seconds"] for r in rs) / len(rs)})
    return out


def write_results(rows: list[dict], out: Path, metric: str, recipe_hash: str) -> list[Path]:
    """results.csv (one row per cell: this study's recipe hash, and the cell's own config key),
    results.md (the summary table) and the plots."""
    out = Path(out)
    metric_names = sorted({k for r in rows for k in r["metrics"]})
    csv_path = out / "results.csv"
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["cell", "tier", "quantity", "seed", "gen_seconds", "train_seconds", "recipe_hash", "cell_key"]
               + metric_names)
    for r in rows:
        w.writerow([r["cell"], r["tier"], r["quantity"], r["seed"], r["gen_seconds"], r["train_seconds"],
                    recipe_hash, r["study_key"]] + [r["metrics"].get(m, "") for m in metric_names])
    write_atomic(csv_path, buf.getvalue())
    summary = summarise(rows, metric)
    # The harness reports recalls in percent.
    lines = [f"# Study results ({metric} in %, mean over seeds ± std where there are several; "
             "gain = over stage I alone)", "",
             f"| tier | triplets | seeds | {metric} | gain | generation s | stage II s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s in sorted(summary, key=lambda s: (s["tier"] != "stage1", s["tier"], s["quantity"])):
        spread = f" ± {s['std']:.1f}" if s["seeds"] > 1 else ""    # no spread from one seed
        lines.append(f"| {s['tier']} | {s['quantity']} | {s['seeds']} | {s['mean']:.1f}{spread} "
                     f"| {s['gain']:+.1f} | {s['gen_seconds']:.1f} | {s['train_seconds']:.1f} |")
    md = out / "results.md"
    write_atomic(md, "\n".join(lines) + "\n")
    return [csv_path, md] + plot(summary, out / "plots", metric)


def plot(summary: list[dict], folder: Path, metric: str) -> list[Path]:
    """`metric` (percent, mean over seeds with std error bars) against triplet count and against
    generation seconds, one line per tier and the stage I level dashed, log x axis; writes two
    PNGs into `folder` and returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    base = next((s for s in summary if s["tier"] == "stage1"), None)
    tiers = sorted({s["tier"] for s in summary if s["tier"] != "stage1"})
    files = []
    for x_key, x_label, name in (("quantity", "triplets", "metric_vs_triplets.png"),
                                 ("gen_seconds", "generation seconds (CPU)", "metric_vs_generation_seconds.png")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        for tier in tiers:
            pts = sorted((s[x_key], s["mean"], s["std"]) for s in summary if s["tier"] == tier)
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=tier)
        if base is not None:
            ax.axhline(base["mean"], color="gray", linestyle="--", label="stage I only")
        ax.set_xscale("log")
        if x_key == "quantity":
            qs = sorted({s["quantity"] for s in summary if s["tier"] != "stage1"})
            ax.set_xticks(qs, [str(q) for q in qs])
            ax.minorticks_off()
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = folder / name
        fig.savefig(path)
        plt.close(fig)
        files.append(path)
    return files
