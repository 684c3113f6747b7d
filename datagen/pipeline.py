"""The generation driver (`cirgen triplets`): plan work units, run the missing ones (in this process,
a process pool, or on Ray), resume, then write stats.json and the dataset card.

A run of `n` triplets is `ceil(n / unit_size)` work units; unit u holds kept triplets
`[u*unit_size, min(n, (u+1)*unit_size))` and draws its candidates from its own seeded stream, so
units can run in any order, on any number of processes, and a rerun skips the units whose shard
is complete. A larger `n` adds units (and completes a partial last unit with the same records).

Several processes may work on one folder at once (`--shard I/N`, or Ray actors): each writes only
whole files by atomic rename, and a unit's files are the same whoever writes them (`unit.run_unit`).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .base.io import write_atomic
from .base.config import to_dict
from .dedupe import cross_unit_report
from .recipe import GenRecipe
from .schema import iter_units
from .stats import DatasetStats, UnitStats
from .ray_runner import run_units_ray
from .store import (aggregate_stats, check_request, check_unit, clean_temp_files, open_dataset,
                    probe_writable, read_run_json, set_target, shard_path, write_card)
from .unit import PipelineError, Stages, run_unit



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
        """ceil(n / unit_size): the units of the whole dataset, done or not."""
        return (self.n + self.unit_size - 1) // self.unit_size


def plan(out: Path, n: int, unit_size: int, seed: int | None = None, recipe_hash: str | None = None) -> Plan:
    """Which units of an `n`-triplet dataset still need running (see `store.check_unit`).
    Raises StoreError when a shard was made with another `seed` or `recipe_hash` (when given)."""
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


# Worker processes build their stages once and reuse them for every unit they get.
_WORKER: dict = {}


def _init_worker(recipe_dict: dict, seed: int, out: str) -> None:
    from .base.config import from_dict

    recipe = from_dict(GenRecipe, recipe_dict)
    _WORKER.update(recipe=recipe, seed=seed, out=Path(out), stages=Stages(recipe, seed))


def _work(task: tuple[int, int]) -> UnitStats:
    w = _WORKER
    return run_unit(w["recipe"], w["seed"], task[0], task[1], w["out"], w["stages"])


def generate(recipe: GenRecipe, out: str | Path, n: int, seed: int | None = None,
             workers: int | None = None, recipe_path: str = "", progress: bool = True,
             log: Callable[[str], None] = print, shard: tuple[int, int] | None = None,
             ray_address: str | None = None) -> dict:
    """Make (or complete, or extend) the `n`-triplet dataset in `out`; return its summary
    (stats.json's fields plus `wall_seconds`), or {} when this process does not write the stats
    (a `shard` (i, k) of a run that others finish, or a target another run raised meanwhile).

    `seed`: None = the recipe's; `workers`: processes (None = the recipe's, else the CPU count);
    `ray_address`: run the work units on Ray ("local" starts a local instance; see ray_runner).
    Errors (all `CirgenError`, one line): a bad request or input file (before anything is
    written), a folder of another recipe or seed, an unwritable folder, `PipelineError` when
    units are still missing after the run."""
    out = Path(out)
    seed = recipe.seed if seed is None else seed
    # 1. Check the request and every input file before anything is written.
    pool_report = _check_inputs(recipe, seed, n, log)
    # 2. Open the dataset folder (run.json first) and clear what killed runs left behind.
    run = open_dataset(out, recipe, seed, n, recipe_path)
    removed = clean_temp_files(out)
    if removed:
        log(f"removed {removed} temp file(s) left by an interrupted run")
    # 3. Plan: the work units missing or damaged (with --shard I/N: the ones of this shard).
    p = plan(out, n, recipe.pipeline.unit_size, seed, run["recipe_hash"])
    for line in p.damaged:
        log(f"{line}; its unit is regenerated")
    todo = p.todo if shard is None else [t for t in p.todo if t[0] % shard[1] == shard[0]]
    # 4. Raise the folder's target only once it can be written (an extension into a read-only or
    #    full folder leaves run.json as it was).
    if todo or n != run["n"]:
        probe_writable(out)
        run = set_target(out, recipe, seed, n)
    _drop_empty_rejects(p.empty_rejects, log)
    # 5. Run the missing units: in this process, a process pool or on Ray, with a progress bar.
    t0 = time.time()
    if todo:
        left = sum(c for _, c in todo)         # the bar counts the whole dataset, or this shard's part
        total, before = (n, n - left) if shard is None else (left, 0)
        _run_units(recipe, seed, out, todo, workers, progress, total, before, ray_address, p.num_units, log)
    else:
        log(f"{out}: all {p.num_units} work units are complete; nothing to do")
    # 6. Every unit complete? (Other processes may share the folder.)
    if not _complete(out, n, recipe.pipeline.unit_size, shard, log):
        return {}
    # 7. Aggregate the units' statistics; write stats.json and the dataset card.
    stats = _write_stats(out, run, recipe, p.num_units, pool_report)
    return {**stats.to_dict(), "wall_seconds": round(time.time() - t0, 3)}


def _check_inputs(recipe: GenRecipe, seed: int, n: int, log: Callable[[str], None]) -> dict:
    """Step 1 of `generate`: the request (n, seed), the shapes renderer's settings and every text
    input file (captions, topics, vocabulary, few-shot examples); returns the caption pool's
    counts ({} when the recipe reads no caption file). Raises the checks' one-line errors."""
    check_request(recipe, seed, n)
    if recipe.images.backend == "shapes":
        from .images import ShapesImages

        ShapesImages.check(recipe)
    from .text.sources import check_text_inputs, pool_counts

    pool_report = check_text_inputs(recipe)
    if pool_report:
        log(f"caption pool {pool_report['source']}: {pool_counts(pool_report)}")
    return pool_report


def _complete(out: Path, n: int, unit_size: int, shard: tuple[int, int] | None,
              log: Callable[[str], None]) -> bool:
    """Step 6 of `generate`: True when every unit is complete and the target is still `n`;
    False when another process finishes (a shard's units done, others missing; or a target
    raised meanwhile). PipelineError when units are missing without --shard."""
    left = plan(out, n, unit_size).todo
    if shard is not None and left:
        log(f"shard {shard[0]}/{shard[1]} done; stats are written when every unit is complete")
        return False
    if left:
        raise PipelineError(f"{out}: {len(left)} work unit(s) are not complete after this run (first: "
                            f"{shard_path(out, left[0][0])}); another process may be writing into "
                            f"this folder; rerun the same command")
    if read_run_json(out / "run.json")["n"] != n:
        log(f"{out}: another run changed the target meanwhile; that run writes stats.json")
        return False
    return True


def _write_stats(out: Path, run: dict, recipe: GenRecipe, num_units: int, pool_report: dict) -> DatasetStats:
    """Step 7 of `generate`: the dataset's statistics from its units' shard footers (plus the
    cross-unit near-duplicate report and the caption pool's counts), written to stats.json and
    the dataset card README.md."""
    stats = aggregate_stats(out, list(range(num_units)))
    dd = recipe.filters.dedupe
    if dd.enabled and dd.cross_unit_report:
        stats.near_duplicates_cross_unit = cross_unit_report(out, range(num_units), dd.max_distance,
                                                             dd.match, dd.channels)
    if pool_report:
        stats.caption_pool = pool_report
    write_atomic(out / "stats.json", json.dumps(stats.to_dict(), indent=2, sort_keys=True) + "\n")
    write_card(out, run, stats)
    return stats


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


def _run_units(recipe: GenRecipe, seed: int, out: Path, todo: list[tuple[int, int]], workers: int | None,
               progress: bool, total: int, done_before: int, ray_address: str | None, num_units: int,
               log: Callable[[str], None]) -> None:
    """Step 5 of `generate`: run the `todo` units (unit index, triplet count) in this process
    (`workers` 1), a process pool or on Ray, with a progress bar over kept triplets."""
    if ray_address is None:
        workers = recipe.pipeline.workers if workers is None else workers
        workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))     # 0 = one per CPU core
        log(f"{out}: {len(todo)} of {num_units} work units to run "
            f"({done_before} triplets already there), {workers} worker(s)")
    else:
        workers = workers or recipe.pipeline.workers or None     # None: Ray sizes the actor pool

    from tqdm import tqdm

    bar = tqdm(total=total, initial=done_before, unit="triplet", disable=not progress,
               desc="triplets", smoothing=0.1, dynamic_ncols=True)
    try:
        if ray_address is not None:
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
