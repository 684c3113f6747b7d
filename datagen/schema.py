"""The triplet record and the dataset folder: the contract `cir` and every other reader rely on.

A dataset is a folder:

    run.json             resolved recipe, seed, target size, package versions, recipe hash
    shards/NNNNNN.parquet  kept triplets of work unit NNNNNN (HF `Image()` columns)
    rejects/NNNNNN.parquet candidates of that unit the filters rejected (same columns; absent if none)
    stats.json           counts, pass rates, failure labels, seconds per stage
    README.md            dataset card

`datasets.load_dataset("parquet", data_files="DIR/shards/*.parquet")` reads it with decoded
images; `TripletReader` reads it without `datasets`, after `validate_dataset` has checked the folder
against the plan in run.json (which shard files, how many rows, which ids, which seed): every
reader (`cirgen inspect`, `cirgen browse`, stage II training, calibration) sees the same verdict.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from .base.errors import CirgenError, os_error_line
from .base.io import read_json

SCHEMA_VERSION = 1
FORMAT = "cirgen-triplets"
STAGES = ("captions", "edits", "images", "filters")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

_HF_DTYPE = {pa.string(): "string", pa.int64(): "int64", pa.bool_(): "bool", pa.float64(): "float64"}


def column(name: str, arrow: pa.DataType) -> tuple[str, pa.DataType, dict]:
    """(name, arrow type, Hugging Face `datasets` feature) of one column: `IMAGE_TYPE` columns are
    `Image()` features, the others `Value(dtype)` (string, int64, bool or float64)."""
    feature = {"_type": "Image"} if arrow == IMAGE_TYPE else {"dtype": _HF_DTYPE[arrow], "_type": "Value"}
    return name, arrow, feature


# The columns every dataset has, in order; filters add score_* (float64) and pass_* (bool).
_TEXT, _INT = pa.string(), pa.int64()
CORE_COLUMNS: list[tuple[str, pa.DataType, dict]] = [column(name, arrow) for name, arrow in [
    ("id", _TEXT), ("index", _INT),
    ("reference_image", IMAGE_TYPE), ("target_image", IMAGE_TYPE),
    ("modification_text", _TEXT), ("source_caption", _TEXT), ("target_caption", _TEXT),
    ("edit_type", _TEXT), ("quality", _TEXT), ("failure", _TEXT),
    ("kept", pa.bool_()), ("reject_reason", _TEXT),
    ("seed", _INT), ("generator", _TEXT), ("source_scene", _TEXT), ("target_scene", _TEXT), ("intended_scene", _TEXT),
]] + [column(f"seconds_{s}", pa.float64()) for s in STAGES]

# Columns that are measurements of this run rather than data: excluded from determinism checks.
TIMING_COLUMNS = tuple(f"seconds_{s}" for s in STAGES)


def build_schema(score_columns: list[str], pass_columns: list[str]) -> pa.Schema:
    """The arrow schema of a shard: the core columns, then `score_columns` (float64) and
    `pass_columns` (bool), with the Hugging Face features in the `huggingface` metadata so
    `datasets.load_dataset("parquet", ...)` reads images as `Image()`."""
    cols = list(CORE_COLUMNS)
    cols += [column(c, pa.float64()) for c in score_columns]
    cols += [column(c, pa.bool_()) for c in pass_columns]
    features = {name: feat for name, _, feat in cols}
    hf = json.dumps({"info": {"features": features}})
    return pa.schema([pa.field(n, t) for n, t, _ in cols], metadata={"huggingface": hf})


class DatasetError(CirgenError, ValueError):
    """A dataset folder that cannot be read as a triplet dataset; says which file and why."""


RUN_FIELDS: dict[str, type] = {"format": str, "schema_version": int, "recipe_name": str,
                               "recipe_hash": str, "seed": int, "n": int, "recipe": dict}
RUN_OPTIONAL_FIELDS: dict[str, type] = {"recipe_path": str, "versions": dict}


def read_run_json(path: Path) -> dict:
    """Read and check a dataset's run.json: a JSON object of the cirgen format whose fields have
    the right types and ranges. Raises `DatasetError` naming the file and the field."""
    run = read_json(path, dict, DatasetError, " with the dataset's fields")
    if run.get("format") != FORMAT:
        raise DatasetError(f"{path}: not a cirgen triplet dataset (format {run.get('format')!r}, "
                           f"expected {FORMAT!r})")
    missing = [k for k in RUN_FIELDS if k not in run]
    if missing:
        raise DatasetError(f"{path}: missing field(s) {', '.join(missing)} (was the file edited? "
                           f"restore it, or use a new folder)")
    for k, t in {**RUN_FIELDS, **RUN_OPTIONAL_FIELDS}.items():
        v = run.get(k)
        if k in run and (not isinstance(v, t) or (t is int and isinstance(v, bool))):
            raise DatasetError(f"{path}: field {k!r} must be a JSON {_JSON_NAMES[t]}, got {v!r:.60}")
    if not 1 <= run["schema_version"] <= SCHEMA_VERSION:
        raise DatasetError(f"{path}: field 'schema_version' is {run['schema_version']}; this cirgen "
                           f"reads 1..{SCHEMA_VERSION} (made by a newer cirgen?)")
    if run["seed"] < 0:
        raise DatasetError(f"{path}: field 'seed' must be >= 0, got {run['seed']}")
    if run["n"] < 1:
        raise DatasetError(f"{path}: field 'n' must be >= 1, got {run['n']}")
    return run


_JSON_NAMES = {str: "string", int: "integer", dict: "object"}



def shard_path(out: Path, unit: int, rejects: bool = False) -> Path:
    """Where unit `unit`'s kept shard (`out/shards/NNNNNN.parquet`) or, with `rejects`, its rejects shard
    (`out/rejects/NNNNNN.parquet`) lives; the path only, nothing is checked."""
    return out / ("rejects" if rejects else "shards") / f"{unit:06d}.parquet"


def iter_units(n: int, unit_size: int) -> Iterator[tuple[int, int]]:
    """(unit, kept count) of every unit of an `n`-triplet dataset, in order, without a list."""
    for u in range((n + unit_size - 1) // unit_size):
        yield u, min(unit_size, n - u * unit_size)


_REGENERATE = "rerun the `cirgen triplets` command that made it (same --out) to regenerate it"


def read_run(root: str | Path) -> dict:
    """run.json of the dataset folder `root`, checked field by field (`read_run_json`, the
    writer's own check too) and for what readers need to plan its shards (`recipe.pipeline.unit_size`).

    Raises DatasetError naming run.json."""
    root = Path(root)
    path = root / "run.json"
    if not path.is_file():
        raise DatasetError(f"{root}: not a triplet dataset (no run.json)")
    run = read_run_json(path)
    pipeline = run["recipe"].get("pipeline")
    size = pipeline.get("unit_size") if isinstance(pipeline, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DatasetError(f"{path}: 'recipe.pipeline.unit_size' should be a positive integer, found {size!r}")
    return run


def read_stats(root: str | Path) -> dict | None:
    """stats.json of a dataset folder, or None when it is not there (yet); DatasetError names a
    malformed one."""
    path = Path(root) / "stats.json"
    if not path.exists():
        return None
    return read_json(path, dict, DatasetError)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _unreadable(path: Path, e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        return os_error_line(e, path)
    return f"{path}: unreadable parquet file ({_first_line(e)})"


def read_batches(path: Path, columns: list[str] | None = None, batch_size: int = 256,
                 present_only: bool = False) -> Iterator[pa.RecordBatch]:
    """Stream one shard's rows; DatasetError names the file when it cannot be read.

    `present_only`: read those of `columns` the file has (others are left out, not an error)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if present_only and columns is not None:
            have = set(pf.schema_arrow.names)
            columns = [c for c in columns if c in have]
        yield from pf.iter_batches(batch_size=batch_size, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(_unreadable(path, e)) from None


def read_schema(path: Path) -> pa.Schema:
    """The arrow schema in one shard's footer; DatasetError names the file when it cannot be read."""
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(_unreadable(path, e)) from None


@dataclass
class DatasetLayout:
    """What a dataset folder holds, checked against the plan in its run.json (`validate_dataset`).

    Problem lists hold one line each, naming the file. `missing` and `unfinished` make a dataset
    incomplete (a rerun of `cirgen triplets` finishes it); `damaged` (kept side) and
    `rejects_damaged` are files a reader must not use as they are."""
    root: Path
    run: dict
    units: list[tuple[int, int]]                         # planned (unit, kept rows)
    shards: list[Path] = field(default_factory=list)     # planned kept shards present and sound
    rejects: list[Path] = field(default_factory=list)    # planned rejects shards present and sound
    rows: int = 0                                        # kept rows in `shards`
    missing: list[Path] = field(default_factory=list)    # planned kept shards that are absent
    unfinished: list[str] = field(default_factory=list)  # planned kept shards with fewer rows than planned
    damaged: list[str] = field(default_factory=list)     # unreadable, stray, wrong rows/ids/seed, run.json
    rejects_damaged: list[str] = field(default_factory=list)
    unexpected: list[Path] = field(default_factory=list)  # stray *.parquet files (also in a damaged line)

    @property
    def target_n(self) -> int:
        """Planned number of kept triplets (run.json's `n`)."""
        return self.run["n"]

    @property
    def complete(self) -> bool:
        """Every planned kept shard is present, sound and full (rejects are judged apart)."""
        return not (self.missing or self.unfinished or self.damaged)

    def incomplete_lines(self) -> list[str]:
        """Lines for what is missing (the first with planned/present counts) and unfinished; damage not included."""
        planned = len(self.units)
        return ([f"{p}: missing ({len(self.missing)} of {planned} planned shards absent; "
                 f"{self.rows} of {self.target_n} rows present)" for p in self.missing[:1]]
                + [f"{p}: missing" for p in self.missing[1:]] + self.unfinished)

    def problems(self) -> list[str]:
        """Every problem line: damage first, then what is missing or unfinished, then rejects."""
        return self.damaged + self.incomplete_lines() + self.rejects_damaged


def _summary(lines: list[str], root: Path, hint: str = "") -> str:
    """One line: the first problem, what to do (`hint`), and how many more there are."""
    more = len(lines) - 1
    return lines[0] + hint + (f" (and {more} more problem{'s' * (more > 1)}; `cirgen inspect {root}` "
                              f"lists them)" if more else "")


def _check_recipe_hash(run: dict, run_path: Path) -> str | None:
    """A line when run.json's recipe_hash is not the hash of the recipe it holds (a hand edit)."""
    from .base.config import ConfigError, from_dict
    from .recipe import GenRecipe

    try:
        actual = from_dict(GenRecipe, run["recipe"]).hash()
    except (ConfigError, ValueError, TypeError, KeyError) as e:
        return f"{run_path}: its 'recipe' is not a valid gen recipe ({_first_line(e)})"
    if actual != run["recipe_hash"]:
        return (f"{run_path}: recipe_hash {run['recipe_hash']!r} is not the hash of the recipe it holds "
                f"({actual!r}); the file was edited")
    return None


def _footer_stats(pf) -> dict:
    try:
        st = json.loads((pf.schema_arrow.metadata or {}).get(b"cirgen", b"{}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return st if isinstance(st, dict) else {}


def _rejected(stats: dict) -> int | None:
    """How many candidates a unit rejected, from the statistics in its shards' footer (None: unknown)."""
    g, k = stats.get("generated"), stats.get("kept")
    return g - k if isinstance(g, int) and isinstance(k, int) else None


def _first(mask) -> int | None:
    """Index of the first True in a boolean numpy array, or None."""
    import numpy as np

    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def _check_shard(path: Path, unit: int, run: dict, unit_size: int, planned: int | None,
                 kept_ids: pa.ChunkedArray | None = None) -> tuple[pa.ChunkedArray | None, dict, list[str], bool]:
    """Check one shard of unit `unit` (kept when `planned` is its planned row count, else rejects,
    whose ids must not be among the unit's `kept_ids`).

    Returns (ids, footer statistics, damage lines, short) where `short` means a sound kept shard
    with fewer rows than planned. Reads the footer and the small `id`/`index`/`seed` columns only,
    and checks them with vectorised arrow/numpy operations (a million rows in well under a
    second). Ids are bound to the file name (`{unit:06d}-NNNNNN`), so two planned files can never
    share an id; only a unit's kept and rejected rows could, and that is checked too."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .candidate import candidate_seed

    try:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        if "id" not in names or not pa.types.is_string(pf.schema_arrow.field("id").type):
            return None, {}, [f"{path}: no 'id' column of text; not a cirgen shard"], False
        cols = [c for c in ("id", "index", "seed") if c in names]
        t = pf.read(columns=cols)
    except (pa.ArrowException, OSError) as e:
        # `cirgen triplets` regenerates a unit whose kept shard it cannot read (store.unit_done).
        return None, {}, [_unreadable(path, e) + (f"; {_REGENERATE}" if planned is not None else "")], False
    rows, stats = t.num_rows, _footer_stats(pf)
    kept = planned is not None
    ids = t.column("id")

    def bad(line: str) -> tuple[None, dict, list[str], bool]:
        return None, stats, [f"{path}: {line}"], False

    if stats.get("unit", unit) != unit:
        return bad(f"its footer says work unit {stats['unit']}, but the file name says unit {unit} "
                   f"(a renamed copy?)")
    if kept and rows > planned:
        return bad(f"{rows} rows, but run.json plans {planned} for unit {unit}")
    if not kept and _rejected(stats) is not None and rows != _rejected(stats):
        return bad(f"{rows} rows, but its footer counts {_rejected(stats)} rejected")
    ok = pc.fill_null(pc.match_substring_regex(ids, rf"^{unit:06d}-\d{{6}}$"), False)
    k = _first(~ok.to_numpy(zero_copy_only=False))
    if k is not None:
        return bad(f"row {k} has id {ids[k].as_py()!r}, but unit {unit}'s ids are {unit:06d}-NNNNNN "
                   f"(a copy of another shard?)")
    if kept and "index" in cols:
        want = unit * unit_size + np.arange(rows)
        k = _first(t.column("index").to_numpy(zero_copy_only=False) != want)
        if k is not None:
            return bad(f"row {k} has index {t.column('index')[k].as_py()}, expected {want[k]} "
                       f"(unit {unit} of size {unit_size} in run.json)")
    if pc.count_distinct(ids).as_py() != rows:
        values, counts = pc.value_counts(ids).flatten()
        dup = values[_first(counts.to_numpy() > 1)].as_py()
        return bad(f"id {dup!r} is in more than one row")
    if kept_ids is not None and len(kept_ids):
        k = _first(pc.is_in(ids, value_set=kept_ids).to_numpy(zero_copy_only=False))
        if k is not None:
            return bad(f"row {k} has id {ids[k].as_py()!r}, which is also a kept triplet of unit {unit}")
    if rows and "seed" in cols:
        # The first row's candidate seed tells which dataset seed made the shard (one per file
        # keeps the check cheap).
        first = ids[0].as_py()
        if t.column("seed")[0].as_py() != candidate_seed(run["seed"], unit, int(first.split("-")[1])):
            return bad(f"row 0 (id {first}) was not made with run.json's seed {run['seed']}")
    return ids, stats, [], kept and rows < planned


def validate_dataset(root: str | Path) -> DatasetLayout:
    """Check a dataset folder against the plan in its run.json; report, never raise for shards.

    Planned: `ceil(n / unit_size)` units, unit u in `shards/{u:06d}.parquet` with
    `min(unit_size, n - u*unit_size)` rows whose ids are `{u:06d}-NNNNNN` and `index` counts from
    `u*unit_size`, made with run.json's seed; its rejected candidates in `rejects/{u:06d}.parquet`
    (as many rows as its footer counts rejected; the file may be absent when there are none).
    Found and reported: absent shards, stray `*.parquet` files (copies), unreadable or truncated
    files, wrong row counts, ids or seeds, ids in two files, and a run.json whose recipe_hash does
    not match its recipe. Temp files of a running or killed generation (`.*.tmp`) are ignored.

    Raises DatasetError only when run.json itself cannot be used (see `read_run`).
    """
    root = Path(root)
    run = read_run(root)
    size = run["recipe"]["pipeline"]["unit_size"]
    layout = DatasetLayout(root=root, run=run, units=list(iter_units(run["n"], size)))
    line = _check_recipe_hash(run, root / "run.json")
    if line:
        layout.damaged.append(line)
    planned = {shard_path(root, u).name for u, _ in layout.units}
    first, last = shard_path(root, 0).name, shard_path(root, len(layout.units) - 1).name
    plan_text = f"1 shard, {last}" if len(planned) == 1 else f"{len(planned)} shards, {first}..{last}"
    footers: dict[int, dict] = {}                 # unit -> statistics in its kept shard's footer
    kept_ids: dict[int, pa.ChunkedArray] = {}     # unit -> ids of its kept rows
    for rejects in (False, True):
        folder = root / ("rejects" if rejects else "shards")
        sink = layout.rejects_damaged if rejects else layout.damaged
        for p in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
            if p.name not in planned:
                layout.unexpected.append(p)
                sink.append(f"{p}: not a shard of this dataset (run.json plans {plan_text}); "
                            f"move it out of {folder.name}/")
        for u, c in layout.units:
            p = shard_path(root, u, rejects)
            if not p.exists():
                if not rejects:
                    layout.missing.append(p)
                elif _rejected(footers.get(u, {})):
                    # A unit that rejected nothing may leave no rejects file; one that did must.
                    sink.append(f"{p}: missing, but {shard_path(root, u)} counts {_rejected(footers[u])} "
                                f"rejected candidates in its footer")
                continue
            ids, stats, bad, short = _check_shard(p, u, run, size, None if rejects else c, kept_ids.get(u))
            if bad:
                sink.extend(bad)
                continue
            if rejects:
                layout.rejects.append(p)
                continue
            footers[u], kept_ids[u] = stats, ids
            layout.shards.append(p)
            layout.rows += len(ids)
            if short:
                layout.unfinished.append(f"{p}: {len(ids)} of {c} rows (unit {u} unfinished)")
    return layout


@dataclass
class TripletReader:
    """Streaming reader of a triplet dataset folder (kept triplets; rejects on request).

    Opening checks the folder (`validate_dataset`) and raises DatasetError, one line naming the
    file, when a kept shard is damaged or stray, or (unless `allow_incomplete`) when the dataset
    is incomplete: training on part of a dataset must be asked for. Problems of rejects/ are
    raised when rejects are read. Only planned, checked shard files are ever read."""
    root: Path

    def __init__(self, root: str | Path, allow_incomplete: bool = False):
        self.root = Path(root)
        self.allow_incomplete = allow_incomplete
        self.layout = validate_dataset(self.root)
        self.run = self.layout.run
        if self.layout.damaged:
            raise DatasetError(_summary(self.layout.damaged, self.root))
        if not allow_incomplete and not self.layout.complete:
            raise DatasetError(_summary(
                self.layout.incomplete_lines(), self.root,
                "; the dataset is incomplete: rerun the `cirgen triplets` command that made it (same "
                "--out) to finish it, or read it as it is with allow_incomplete (stage II: "
                "--set triplets.allow_incomplete=true)"))

    def shard_paths(self, rejects: bool = False) -> list[Path]:
        """The checked shard files (kept, or rejects) in unit order; DatasetError for damaged rejects."""
        if rejects:
            if self.layout.rejects_damaged:
                raise DatasetError(_summary(self.layout.rejects_damaged, self.root))
            return list(self.layout.rejects)
        return list(self.layout.shards)

    def __len__(self) -> int:
        return self.layout.rows

    def iter_batches(self, columns: list[str] | None = None, rejects: bool = False,
                     batch_size: int = 256) -> Iterator[pa.RecordBatch]:
        """Stream `columns` (None: all) of the checked shards in unit order, up to `batch_size` rows a batch
        (a column a shard lacks is left out of its batches by pyarrow). Raises DatasetError for damaged
        rejects or an unreadable file."""
        for path in self.shard_paths(rejects):
            yield from read_batches(path, columns, batch_size)

    def iter_records(self, columns: list[str] | None = None, rejects: bool = False) -> Iterator[dict]:
        """One dict per row (column name -> Python value; images as {bytes, path}); errors as `iter_batches`."""
        for batch in self.iter_batches(columns, rejects):
            yield from batch.to_pylist()

    def table(self, columns: list[str] | None = None, rejects: bool = False) -> pa.Table:
        """Every checked shard in one in-memory arrow table (an empty table when there are none).
        Raises DatasetError for damaged rejects, an unreadable file or a column a shard lacks."""
        import pyarrow.parquet as pq

        paths = self.shard_paths(rejects)
        if not paths:
            return pa.table({})
        tables = []
        for p in paths:
            try:
                tables.append(pq.read_table(p, columns=columns))
            except (pa.ArrowException, OSError) as e:
                raise DatasetError(_unreadable(p, e)) from None
        return pa.concat_tables(tables)
