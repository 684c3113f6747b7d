"""The generation pipeline: plan work units, run the stages in batches, write shards, resume.

A run of `n` triplets is `ceil(n / unit_size)` work units; unit u holds kept triplets
`[u*unit_size, min(n, (u+1)*unit_size))` and draws its candidates from its own seeded stream, so
units can run in any order, on any number of processes, and a rerun skips the units whose shard
is complete. A larger `n` adds units (and completes a partial last unit with the same records).

Several processes may work on one folder at once (`--shard I/N`, or Ray actors): each writes only
whole files by atomic rename, and a unit's files are the same whoever writes them.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .base.errors import CirgenError
from .base.io import write_atomic
from .candidate import Candidate, candidate_seed
from .captions import build_captions
from .config import to_dict
from .dedupe import cross_unit_report
from .edits import build_edits
from .filters import build_filters
from .images import build_images
from .recipe import GenRecipe
from .schema import build_schema
from .stats import DatasetStats, UnitStats
from .store import (aggregate_stats, check_overwrite, check_request, check_unit, clean_temp_files,
                    open_dataset, probe_writable, read_run_json, remove_file, set_target, shard_path,
                    to_table, write_card, write_table)

MAX_CANDIDATES_PER_KEPT = 50  # give up on a unit whose filters reject (almost) everything


class PipelineError(CirgenError, RuntimeError):
    pass


def iter_units(n: int, unit_size: int) -> Iterator[tuple[int, int]]:
    """(unit, kept count) of every unit of an `n`-triplet dataset, in order, without a list."""
    for u in range((n + unit_size - 1) // unit_size):
        yield u, min(unit_size, n - u * unit_size)


@dataclass
class Plan:
    """The work of one run: the dataset's size and unit size, and the units still to run."""
    n: int
    unit_size: int
    todo: list[tuple[int, int]]       # the units still to run
    damaged: list[str] = field(default_factory=list)       # one line per damaged file (unit redone)
    empty_rejects: list[Path] = field(default_factory=list)  # 0-row rejects files of older cirgen

    @property
    def num_units(self) -> int:
        return (self.n + self.unit_size - 1) // self.unit_size


def plan(out: Path, n: int, unit_size: int, seed: int | None = None, recipe_hash: str | None = None) -> Plan:
    """Which units of an `n`-triplet dataset still need running (see `store.check_unit`)."""
    p = Plan(n, unit_size, [])
    for u, c in iter_units(n, unit_size):
        st = check_unit(out, u, c, seed, recipe_hash)
        if not st.done:
            p.todo.append((u, c))
            if st.problem:
                p.damaged.append(st.problem)
        elif st.empty_rejects is not None:
            p.empty_rejects.append(st.empty_rejects)
    return p


class Stages:
    """The four stages assembled from the recipe (diffusers-style interchangeable components)."""

    def __init__(self, recipe: GenRecipe, seed: int | None = None):
        self.recipe = recipe
        self.captions = build_captions(recipe, seed)
        self.edits = build_edits(recipe)
        diffusion = recipe.images.diffusion
        best_of_k = recipe.images.backend != "shapes" and diffusion.samples_per_prompt > 1
        # Best-of-k ranks samples with the CLIP filter's model (one shared scorer per process).
        self.images = build_images(recipe, scorer=_LazyScorer(recipe) if best_of_k else None)
        self.filters = build_filters(recipe)

    @property
    def schema(self):
        scores = [c for f in self.filters for c in f.score_columns]
        passes = [c for f in self.filters for c in f.pass_columns]
        return build_schema(scores, passes)

    def run(self, batch: list[Candidate]) -> None:
        """Run the stages in order. A candidate rejected by the text or image stage skips the
        later (expensive) stages; every filter scores every candidate that reached the filters,
        so all scores are stored even when an earlier criterion already failed."""
        steps = [("captions", [self.captions]), ("edits", [self.edits]), ("images", [self.images]),
                 ("filters", self.filters)]
        for stage, components in steps:
            todo = [c for c in batch if c.kept]
            if not todo or not components:
                continue
            t0 = time.perf_counter()
            for comp in components:
                comp(todo)
            per = (time.perf_counter() - t0) / len(todo)
            for c in todo:
                c.seconds[stage] = per
                c.generator.setdefault(stage, {}).setdefault("backend", getattr(components[0], "name", None))


class _LazyScorer:
    """Loads the CLIP scorer of `filters.clip` on first use (not in the parent process)."""

    def __init__(self, recipe: GenRecipe):
        self.cfg = recipe.filters.clip

    def directional(self, *args, **kwargs):
        from .filters import load_scorer

        return load_scorer(self.cfg).directional(*args, **kwargs)


def run_unit(recipe: GenRecipe, seed: int, unit: int, count: int, out: Path,
             stages: Stages | None = None) -> UnitStats:
    """Generate unit `unit` until it holds `count` kept triplets; write rejects, then the shard."""
    stages = stages or Stages(recipe, seed)
    kept: list[Candidate] = []
    rejected: list[Candidate] = []
    j = 0
    B = recipe.pipeline.batch_size
    while len(kept) < count:
        if j >= MAX_CANDIDATES_PER_KEPT * count:
            raise PipelineError(f"unit {unit}: only {len(kept)} of {count} candidates passed the filters "
                                f"after {j} attempts; loosen the filters or check the generators")
        # Never generate past what the unit still needs: the unit's content is then independent
        # of batch size (candidate j is the same whichever batch it falls in).
        size = min(B, count - len(kept))
        batch = [Candidate(unit, j + k, candidate_seed(seed, unit, j + k)) for k in range(size)]
        j += size
        stages.run(batch)
        for c in batch:
            (kept if c.kept else rejected).append(c)
    stats = UnitStats.from_candidates(unit, seed, recipe.hash(), kept, rejected)
    schema = stages.schema
    quality = recipe.quality.tier
    check_overwrite(out, unit, count)
    # Rejects first, then the shard that marks the unit done. A unit without rejects writes no
    # rejects file: 0-row parquet files break readers such as `datasets.load_dataset`.
    if rejected:
        write_table(to_table(rejected, schema, recipe.pipeline.unit_size, quality, False),
                    shard_path(out, unit, rejects=True), stats.to_dict())
    else:
        remove_file(shard_path(out, unit, rejects=True))
    write_table(to_table(kept, schema, recipe.pipeline.unit_size, quality, True), shard_path(out, unit), stats.to_dict())
    return stats


# Worker processes build their stages once and reuse them for every unit they get.
_WORKER: dict = {}


def _init_worker(recipe_dict: dict, seed: int, out: str) -> None:
    from .config import from_dict

    recipe = from_dict(GenRecipe, recipe_dict)
    _WORKER.update(recipe=recipe, seed=seed, out=Path(out), stages=Stages(recipe, seed))


def _work(task: tuple[int, int]) -> UnitStats:
    w = _WORKER
    return run_unit(w["recipe"], w["seed"], task[0], task[1], w["out"], w["stages"])


def generate(recipe: GenRecipe, out: str | Path, n: int, seed: int | None = None,
             workers: int | None = None, recipe_path: str = "", progress: bool = True,
             log: Callable[[str], None] = print, shard: tuple[int, int] | None = None,
             ray_address: str | None = None) -> dict:
    """Make (or complete, or extend) the dataset in `out`; return the summary (stats.json).

    `ray_address`: run the work units on Ray ("local" starts a local instance); see ray_runner."""
    out = Path(out)
    seed = recipe.seed if seed is None else seed
    check_request(recipe, seed, n)      # before anything is written
    if recipe.images.backend == "shapes":
        from .images import ShapesImages

        ShapesImages.check(recipe)      # before anything is written
    run = open_dataset(out, recipe, seed, n, recipe_path)
    removed = clean_temp_files(out)
    if removed:
        log(f"removed {removed} temp file(s) left by an interrupted run")
    us = recipe.pipeline.unit_size
    p = plan(out, n, us, seed, run["recipe_hash"])
    for line in p.damaged:
        log(f"{line}; its unit is regenerated")
    todo = p.todo
    if shard is not None:
        i, k = shard
        todo = [t for t in todo if t[0] % k == i]
    if todo or n != run["n"]:
        # Only once the run can write its files does the folder's target change (an extension
        # into a read-only or full folder leaves run.json as it was).
        probe_writable(out)
        run = set_target(out, recipe, seed, n)
    _drop_empty_rejects(p.empty_rejects, log)
    t0 = time.time()
    if todo:
        total = n
        done_before = total - sum(c for _, c in p.todo)
        if ray_address is None:
            workers = workers if workers is not None else (recipe.pipeline.workers or os.cpu_count() or 1)
            workers = max(1, min(workers, len(todo)))
            log(f"{out}: {len(todo)} of {p.num_units} work units to run "
                f"({done_before} triplets already there), {workers} worker(s)")
        else:
            workers = workers or recipe.pipeline.workers or None     # None: Ray sizes the actor pool
        _run_units(recipe, seed, out, todo, workers, progress, total, done_before, ray_address, log)
    else:
        log(f"{out}: all {p.num_units} work units are complete; nothing to do")
    left = plan(out, n, us).todo
    if shard is not None and left:
        log(f"shard {shard[0]}/{shard[1]} done; stats are written when every unit is complete")
        return {}
    if left:
        raise PipelineError(f"{out}: {len(left)} work unit(s) are not complete after this run (first: "
                            f"{shard_path(out, left[0][0])}); another process may be writing into "
                            f"this folder; rerun the same command")
    if read_run_json(out / "run.json")["n"] != n:
        log(f"{out}: another run changed the target meanwhile; that run writes stats.json")
        return {}
    stats = aggregate_stats(out, list(range(p.num_units)))
    dd = recipe.filters.dedupe
    if dd.enabled and dd.cross_unit_report:
        stats.near_duplicates_cross_unit = cross_unit_report(out, range(p.num_units), dd.max_distance,
                                                             dd.match, dd.channels)
    write_atomic(out / "stats.json", json.dumps(stats.to_dict(), indent=2, sort_keys=True) + "\n")
    write_card(out, run, stats)
    return {**stats.to_dict(), "wall_seconds": round(time.time() - t0, 3)}


def _drop_empty_rejects(paths: list[Path], log: Callable[[str], None]) -> None:
    """Remove 0-row rejects files an older cirgen wrote for units without rejects: they hold no
    rows (their unit's statistics are in its shard) and `datasets.load_dataset` cannot read them.
    Best effort: a read-only dataset keeps them."""
    removed = 0
    for path in paths:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError:
            break
    if removed:
        log(f"removed {removed} empty rejects file(s) (0-row parquet files break datasets.load_dataset)")


def _run_units(recipe, seed, out, todo, workers, progress, total, done_before, ray_address, log) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done_before, unit="triplet", disable=not progress,
               desc="triplets", smoothing=0.1, dynamic_ncols=True)
    try:
        if ray_address is not None:
            from .ray_runner import run_units_ray

            run_units_ray(recipe, seed, out, todo, ray_address, workers, bar.update, log)
        elif workers == 1:
            stages = Stages(recipe, seed)
            for u, c in todo:
                run_unit(recipe, seed, u, c, out, stages)
                bar.update(c)
        else:
            # fork is fast, but a process that already ran torch's OpenMP can deadlock its forked
            # children; start fresh interpreters then.
            import sys

            method = "fork" if hasattr(os, "fork") and "torch" not in sys.modules else "spawn"
            ctx = mp.get_context(method)
            with ctx.Pool(workers, initializer=_init_worker, initargs=(to_dict(recipe), seed, str(out))) as pool:
                for st in pool.imap_unordered(_work, todo):
                    bar.update(st.kept)
    finally:
        bar.close()


def summary_lines(stats: dict) -> list[str]:
    """The lines `cirgen triplets` prints for `generate`'s summary (stats.json plus wall time)."""
    lines = DatasetStats.from_dict(stats).summary_lines()
    if "wall_seconds" in stats:
        lines.append(f"wall time this run: {stats['wall_seconds']:.1f} s")
    return lines
