"""Writing the dataset folder: run.json, atomic shard writes, stats.json and the dataset card.

Every file is written to a temporary name and renamed into place (`base.io.write_atomic`, fsync'ed), so a
killed run leaves either the old file or the new one, never half of one; files whose content would
not change are not touched (a rerun with nothing to do changes no file).

Crash and concurrency rules this module keeps:
- a new folder gets `run.json` before anything else, so a folder killed while being set up holds
  only cirgen leftovers (a temp file, empty `shards/`/`rejects/`), which the same command accepts;
- run.json is read through `read_run_json`, which checks every field and names the file and field;
- a unit counts as done only when its shard's footer, row count, origin (seed, recipe hash) and
  its rejects file agree (`check_unit`); a damaged unit is reported by file name and redone;
- temp files carry host, PID and a random token; a starting run removes only those of dead
  processes (or stale ones), so `--shard` processes writing into one folder keep cooperating;
- an OS error (disk full, read-only folder) becomes one `MachineError` line naming the file.
"""
from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .base.errors import CirgenError
from .base.io import HOST, machine_error, temp_owner, temp_path, write_atomic
from .candidate import Candidate
from .recipe import GenRecipe
from .schema import FORMAT, SCHEMA_VERSION, STAGES, DatasetError, read_run_json, shard_path
from .stats import Budget, DatasetStats, UnitStats

ROW_GROUP = 100  # rows per parquet row group: readers stream ~100 image pairs at a time
# Shard files and candidate ids name a unit with six digits, so that name order is unit order.
MAX_UNITS = 1_000_000
# A temp file lives for one write (seconds); one older than this is a leftover whatever its PID
# says (PIDs are reused, e.g. after a container restart, and other hosts' PIDs cannot be checked).
STALE_TEMP_SECONDS = 3600


class StoreError(CirgenError, ValueError):
    """The output folder cannot be used; nothing in it was changed."""


# ---------------------------------------------------------------------------------------------
# Temp files (written by `base.io.write_atomic`) left by killed runs

def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # EPERM: alive, someone else's
        return True
    return True


def clean_temp_files(out: Path) -> int:
    """Remove temp files that killed runs left behind; return how many. A temp file of a live
    process (another `--shard` run writing into this folder) is left alone, unless it is older than
    `STALE_TEMP_SECONDS` (3600 s). Looks in `out`, `out/shards` and `out/rejects`. MachineError naming the
    file when the OS refuses a removal."""
    n = 0
    now = time.time()
    for sub in (out, out / "shards", out / "rejects"):
        if not sub.is_dir():
            continue
        for p in sub.iterdir():
            owner = temp_owner(p.name)
            if owner is None or not p.is_file():
                continue
            try:
                stale = now - p.stat().st_mtime > STALE_TEMP_SECONDS
            except FileNotFoundError:
                continue
            if not stale and (owner[0] != HOST or _pid_alive(owner[1])):
                continue
            try:
                p.unlink()
                n += 1
            except FileNotFoundError:
                pass         # another starting run removed it first
            except OSError as e:
                raise machine_error(e, p) from None
    return n


def probe_writable(out: Path) -> None:
    """Check that a run can write its files (run.json, shards/, rejects/) before it changes any
    state: create and remove a temp file in each folder. Raises `MachineError` naming the folder."""
    for d in (out, out / "shards", out / "rejects"):
        p = temp_path(d / "probe")
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            p.unlink()
        except OSError as e:
            raise machine_error(e, d) from None


# ---------------------------------------------------------------------------------------------
# run.json

# Fields every run.json has (what readers rely on), then fields only the writer adds.
def _check_identity(run: dict, path: Path, recipe: GenRecipe, seed: int) -> None:
    """The dataset in `path` (run.json, already read) is (recipe, seed)'s, and its recorded recipe
    is the one its hash names (a hand-edit of either is caught)."""
    out = path.parent
    if run["recipe_hash"] != recipe.hash():
        raise StoreError(f"{out}: made by a different recipe (hash {run['recipe_hash']} from "
                         f"{run['recipe_name']!r}, now {recipe.hash()} from {recipe.name!r}); "
                         f"use a new --out")
    if run["seed"] != seed:
        raise StoreError(f"{out}: made with seed {run['seed']}, not {seed}; use a new --out")
    from .base.config import ConfigError, from_dict

    try:
        recorded = from_dict(GenRecipe, run["recipe"])
    except (ConfigError, TypeError, ValueError):
        return               # written by another cirgen version: the hash above is the check
    if recorded.hash() != run["recipe_hash"]:
        raise StoreError(f"{path}: field 'recipe' does not match field 'recipe_hash' "
                         f"({recorded.hash()} vs {run['recipe_hash']}); was the file edited?")
    units = -(-run["n"] // recorded.pipeline.unit_size)
    if units > MAX_UNITS:
        raise StoreError(f"{path}: field 'n' ({run['n']}) needs {units} work units, more than "
                         f"{MAX_UNITS}; was the file edited?")


def check_request(recipe: GenRecipe, seed: object, n: object) -> None:
    """Validate the arguments of a run before anything is written (StoreError, one line)."""
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise StoreError(f"--n must be a positive number of triplets, got {n}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise StoreError(f"--seed must be a whole number >= 0, got {seed}")
    us = recipe.pipeline.unit_size
    units = -(-n // us)
    if units > MAX_UNITS:
        raise StoreError(f"--n {n}: needs {units} work units of pipeline.unit_size {us}; a dataset "
                         f"holds at most {MAX_UNITS} units ({MAX_UNITS * us} triplets at this unit "
                         f"size); lower --n or raise pipeline.unit_size")


@contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder while run.json is checked and written, so two runs
    starting at once cannot both create (or retarget) the dataset. Best effort where the file
    system has no flock (the lock then is a no-op)."""
    try:
        import fcntl
    except ImportError:      # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(out, os.O_RDONLY)
    except OSError:          # a folder we may write but not read: no lock, the checks still run
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("cirgen", "numpy", "pillow", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _run_json_bytes(run: dict) -> bytes:
    return (json.dumps(run, indent=2, sort_keys=True) + "\n").encode()


def _leftovers_only(out: Path) -> bool:
    """True when a folder without run.json holds nothing but what an interrupted cirgen setup
    leaves: its temp files and empty (or temp-file-only) shards/ and rejects/."""
    try:
        for p in out.iterdir():
            if p.name in ("shards", "rejects") and p.is_dir():
                if any(temp_owner(q.name) is None for q in p.iterdir()):
                    return False
            elif temp_owner(p.name) is None:
                return False
    except OSError as e:
        raise machine_error(e, e.filename or out) from None
    return True


def _make_dirs(out: Path) -> list[Path]:
    """mkdir -p `out`; return the folders made (outermost first). MachineError naming `out`."""
    made = [p for p in [*reversed(out.parents), out] if not p.exists()]
    try:
        for p in made:
            p.mkdir()
    except FileExistsError:
        pass                 # made by a concurrent run meanwhile
    except OSError as e:
        _remove_empty(made)
        raise machine_error(e, out) from None
    return made


def _remove_empty(folders: list[Path]) -> None:
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            pass


def open_dataset(out: Path, recipe: GenRecipe, seed: int, n: int, recipe_path: str) -> dict:
    """Create or reopen `out` for (recipe, seed) aiming at `n` triplets; return run.json's content
    as it is on disk (an existing dataset's `n` is raised later, by `set_target`, once the run has
    checked it can write).

    Refuses (StoreError/DatasetError/MachineError, nothing changed) bad arguments, a foreign
    non-empty folder, a damaged or edited run.json, a dataset of another recipe or seed, and an `n`
    below what the folder already holds. A folder that holds only the leftovers of an interrupted
    setup is taken over. A new folder that cannot be set up (disk full) is removed again.
    """
    check_request(recipe, seed, n)
    run_path = out / "run.json"
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: exists and is not a folder")
    made = _make_dirs(out)
    wrote: list[Path] = []
    try:
        with _folder_lock(out):
            if run_path.exists() or run_path.is_symlink():
                run = read_run_json(run_path)
                _check_identity(run, run_path, recipe, seed)
                if n < run["n"]:
                    raise StoreError(f"{out}: already holds a dataset of {run['n']} triplets; --n {n} "
                                     f"would shrink it (subsample when training instead, e.g. "
                                     f"--max-triplets)")
            else:
                if not _leftovers_only(out):
                    raise StoreError(f"{out}: folder is not empty and holds no cirgen dataset (no "
                                     f"run.json); choose an empty or new folder")
                from .base.config import to_dict

                run = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "recipe_name": recipe.name,
                       "recipe_path": recipe_path, "recipe_hash": recipe.hash(), "seed": seed, "n": n,
                       "recipe": to_dict(recipe), "versions": _versions()}
                write_atomic(run_path, _run_json_bytes(run))
                wrote.append(run_path)
            for sub in ("shards", "rejects"):
                d = out / sub
                if d.is_dir():
                    continue
                if d.exists() or d.is_symlink():
                    raise StoreError(f"{d}: exists and is not a folder")
                try:
                    d.mkdir()
                except FileExistsError:
                    continue         # made by a concurrent run meanwhile
                except OSError as e:
                    raise machine_error(e, d) from None
                made.append(d)
    except BaseException:
        # Leave the folder as it was found: what this call wrote goes again (a new folder that
        # the full disk refused is removed, so the same command starts cleanly later).
        for p in wrote:
            try:
                p.unlink()
            except OSError:
                pass
        _remove_empty(made)
        raise
    return run


def set_target(out: Path, recipe: GenRecipe, seed: int, n: int) -> dict:
    """Raise the dataset's target to `n` in run.json (under the folder lock, rechecked: another
    run may have changed it meanwhile); return the new content. Raises StoreError for a dataset of
    another recipe or seed, or when another run raised the target above `n`; DatasetError for a damaged
    run.json; MachineError when run.json cannot be written."""
    run_path = out / "run.json"
    with _folder_lock(out):
        run = read_run_json(run_path)
        _check_identity(run, run_path, recipe, seed)
        if n < run["n"]:
            raise StoreError(f"{out}: another run raised its target to {run['n']} triplets meanwhile; "
                             f"--n {n} would shrink it")
        if n > run["n"]:
            run = dict(run, n=n)
            write_atomic(run_path, _run_json_bytes(run))
    return run


# ---------------------------------------------------------------------------------------------
# Shards

class _Damaged(Exception):
    pass


def _footer(path: Path) -> tuple[int, dict]:
    """(rows, cirgen unit statistics) from a parquet file's footer; `_Damaged` when unreadable."""
    try:
        with pq.ParquetFile(path) as pf:
            rows = pf.metadata.num_rows
            md = pf.schema_arrow.metadata or {}
    except (pa.ArrowException, OSError) as e:
        raise _Damaged(f"{path}: unreadable parquet ({' '.join(str(e).split())[:120]})") from None
    try:
        st = json.loads(md[b"cirgen"])
        if not (isinstance(st, dict) and isinstance(st.get("kept"), int)
                and isinstance(st.get("generated"), int)):
            raise ValueError
    except (KeyError, ValueError):
        raise _Damaged(f"{path}: no cirgen unit statistics in its footer") from None
    return rows, st


def _check_origin(path: Path, st: dict, unit: int, seed: int | None, recipe_hash: str | None) -> None:
    """A shard whose footer names another seed or recipe is not this dataset's: refuse (never
    overwrite it: it is somebody's data). Shards of older cirgen versions carry no seed in the
    footer; then the first row's candidate seed is checked."""
    if seed is not None:
        if "seed" in st:
            if st["seed"] != seed:
                raise StoreError(f"{path}: made with seed {st['seed']}, but run.json says seed {seed}; "
                                 f"this folder would mix two runs (was run.json edited?)")
        else:
            from .candidate import candidate_seed

            try:
                with pq.ParquetFile(path) as pf:
                    row = pf.read_row_group(0, columns=["id", "seed"]).slice(0, 1).to_pylist()
            except (pa.ArrowException, OSError, KeyError, IndexError):
                row = []
            if row:
                j = int(str(row[0]["id"]).rsplit("-", 1)[-1])
                if row[0]["seed"] != candidate_seed(seed, unit, j):
                    raise StoreError(f"{path}: its rows were not made with seed {seed} (run.json's "
                                     f"seed); this folder would mix two runs (was run.json edited?)")
    if recipe_hash is not None and st.get("recipe_hash", recipe_hash) != recipe_hash:
        raise StoreError(f"{path}: made by recipe {st['recipe_hash']}, but run.json says "
                         f"{recipe_hash}; this folder would mix two runs")


@dataclass
class UnitCheck:
    """What resume knows about one unit: `done`, else `problem` says what is damaged (None when
    the unit is just not written yet or is being extended). `empty_rejects`: a 0-row rejects
    file of an older cirgen that readers such as `datasets` cannot load (it carries nothing)."""
    done: bool
    problem: str | None = None
    empty_rejects: Path | None = None


def check_unit(out: Path, unit: int, count: int, seed: int | None = None,
               recipe_hash: str | None = None) -> UnitCheck:
    """Is unit `unit` complete with `count` kept triplets, and intact? Checks the shard's footer,
    its row count against its own statistics, where it came from (`seed`, `recipe_hash` when
    given), and the rejects file against the same statistics (present with exactly the rejected
    candidates, or absent when there were none). Raises StoreError for a shard of another run."""
    p, r = shard_path(out, unit), shard_path(out, unit, rejects=True)
    if not p.exists() and not p.is_symlink():
        return UnitCheck(False)
    try:
        rows, st = _footer(p)
        _check_origin(p, st, unit, seed, recipe_hash)
        if st.get("unit", unit) != unit:
            raise _Damaged(f"{p}: holds unit {st['unit']}, not unit {unit}")
        if rows != st["kept"]:
            raise _Damaged(f"{p}: holds {rows} rows, its footer says {st['kept']}")
        if rows > count:
            raise StoreError(_more_rows(p, rows, count))
        if rows != count:
            return UnitCheck(False)        # a smaller last unit, completed by an extension
        expected = st["generated"] - st["kept"]
        if r.exists() or r.is_symlink():
            rrows, rst = _footer(r)
            if rst != st:
                raise _Damaged(f"{r}: is not from the same run of unit {unit} as {p}")
            if rrows != expected:
                raise _Damaged(f"{r}: holds {rrows} rejected candidates, the unit's statistics say "
                               f"{expected}")
            return UnitCheck(True, empty_rejects=r if rrows == 0 else None)
        if expected:
            raise _Damaged(f"{r}: missing (unit {unit} rejected {expected} candidates)")
        return UnitCheck(True)
    except _Damaged as d:
        return UnitCheck(False, str(d))


def _more_rows(path: Path, rows: int, count: int) -> str:
    return (f"{path}: holds {rows} triplets, more than the {count} its unit has at this --n; the "
            f"target in run.json was lowered (edited?) or another run extends this folder at once; "
            f"refusing to overwrite it")


def check_overwrite(out: Path, unit: int, count: int) -> None:
    """Before a unit's files are written: never replace a shard that holds more triplets than
    this run's unit (written by a run with a larger --n). StoreError naming the shard."""
    p = shard_path(out, unit)
    try:
        with pq.ParquetFile(p) as pf:
            rows = pf.metadata.num_rows
    except (pa.ArrowException, OSError):
        return               # missing or unreadable: nothing to keep
    if rows > count:
        raise StoreError(_more_rows(p, rows, count))


def unit_done(out: Path, unit: int, count: int) -> bool:
    """A unit is done when its shard holds exactly `count` rows and its files are intact."""
    return check_unit(out, unit, count).done


def _scene_json(scene) -> str | None:
    return None if scene is None else scene.to_json()


def to_table(cands: list[Candidate], schema: pa.Schema, unit_size: int, quality: str, kept: bool) -> pa.Table:
    """The rows of `cands` as an Arrow table of `schema` (`datagen.schema.build_schema`).

    `index` is `unit * unit_size + k` (k: position in `cands`) for kept rows and -1 for rejects; images are
    HF `Image()` structs (`bytes`, `path` null); scenes are JSON (null outside the shapes world); `generator`
    is JSON with sorted keys; a stage that did not run has 0.0 seconds; a score or pass column the candidate
    has no value for is null. Raises KeyError when `schema` lacks a core column, and pyarrow's errors when a
    value does not fit its column type.
    """
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
    """Write a unit's table (kept or rejected candidates) to `path` atomically, with the unit's
    statistics in the footer (`cirgen` metadata key). MachineError naming `path` on an OS error."""
    meta = dict(table.schema.metadata or {})
    meta[b"cirgen"] = json.dumps(unit_stats, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, row_group_size=ROW_GROUP, compression="zstd")
    write_atomic(path, buf.getvalue())


def remove_file(path: Path) -> None:
    """Delete `path` if it is there; MachineError naming it when the OS refuses."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise machine_error(e, path) from None


def _damaged_error(path: Path, e: Exception) -> DatasetError:
    return DatasetError(f"{path}: unreadable ({' '.join(str(e).split())[:160]}); move the file away "
                        f"and rerun the same `cirgen triplets` command to regenerate its unit")


def unit_stats(out: Path, unit: int) -> UnitStats:
    """The unit's statistics from its shard's footer (DatasetError naming the file if damaged)."""
    p = shard_path(out, unit)
    try:
        return UnitStats.from_dict(_footer(p)[1])
    except _Damaged as d:
        raise DatasetError(f"{d}; rerun the same `cirgen triplets` command to regenerate unit {unit}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(f"{p}: its footer's unit statistics lack or mistype {e}; rerun the same "
                           f"`cirgen triplets` command to regenerate unit {unit}") from None


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
        try:
            names = pq.read_schema(path).names
            cols = [c for c in names if c.startswith("pass_")] + (["generator"] if "generator" in names else [])
            t = pq.read_table(path, columns=cols)
        except (pa.ArrowException, OSError) as e:
            raise _damaged_error(path, e) from None
        for c in cols:
            if c == "generator":
                continue
            vals = t.column(c).to_pylist()
            e = crit.setdefault(c, [0, 0])
            e[0] += sum(v is not None for v in vals)
            e[1] += sum(v is True for v in vals)
        if "generator" in cols:
            for g in t.column("generator").to_pylist():
                try:
                    g = json.loads(g) if g else {}
                except json.JSONDecodeError:
                    g = {}
                for s in STAGES:
                    d = _device_type((g.get(s) or {}).get("device"))
                    ds = devices.setdefault(s, {})
                    ds[d] = ds.get(d, 0) + 1
    return crit, devices


def aggregate_stats(out: Path, units: list[int]) -> DatasetStats:
    """stats.json's content from the per-unit statistics stored in each shard's footer, and the
    rows' pass columns and devices (see `DatasetStats.from_units`).

    Budget: seconds per stage (summed over every candidate, kept or rejected), per generated and
    per kept triplet, split by the device each stage ran on (`seconds_by_device`, GPU seconds).
    Pass rates per criterion are over the candidates that criterion scored (`criteria`).
    """
    crit: dict[str, list[int]] = {}
    per_unit = []
    for u in units:
        st = unit_stats(out, u)
        unit_crit, unit_dev = _scan_rows(out, u)
        for k, (e, p) in unit_crit.items():
            c = crit.setdefault(k, [0, 0])
            c[0] += e
            c[1] += p
        # A unit runs in one process, so a stage has one device per unit: take the majority.
        devices = {}
        for s in STAGES:
            counts = unit_dev.get(s) or {"cpu": 1}
            devices[s] = max(sorted(counts), key=counts.get)
        per_unit.append((st, devices))
    return DatasetStats.from_units(per_unit, {k: (e, p) for k, (e, p) in crit.items()})


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


def write_card(out: Path, run: dict, stats: DatasetStats) -> None:
    """README.md of the dataset folder (a Hugging Face dataset card) from run.json and the stats."""
    recipe = run["recipe"]
    b = stats.budget or Budget()
    text = CARD.format(
        name=run["recipe_name"], hash=run["recipe_hash"], seed=run["seed"],
        description=(recipe.get("description") or "").strip(), kept=stats.kept,
        generated=stats.generated, yield_pct=100 * stats.yield_,
        rejected=json.dumps(stats.rejected, sort_keys=True),
        failures=json.dumps(stats.failures_kept, sort_keys=True),
        tier=recipe["quality"]["tier"], per1k=b.seconds_per_1k_kept, root=".",
        device=b.device, gpu1k=b.gpu_seconds_per_1k_kept,
        pass_rates=", ".join(f"{k} {100 * c.pass_rate:.1f}%" for k, c in stats.criteria.items()
                             if c.pass_rate is not None) or "-")
    write_atomic(out / "README.md", text)
