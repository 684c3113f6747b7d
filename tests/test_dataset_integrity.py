"""Every reader checks a dataset folder against the plan in its run.json (issue 18, reader side).

A small real dataset (2 units of 8, some candidates rejected) is damaged in the ways a copy, a full
disk or a hand edit leave it: a truncated shard, a stray copy, a deleted shard, a shard under
another unit's name, an unfinished unit, a truncated or deleted rejects file, an edited run.json.
`TripletReader` (and so stage II), `cirgen inspect` and `cirgen browse` must each say which file,
in one line, and never call such a dataset complete.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SMALL
from datagen.inspect import inspect_dataset, render_text
from datagen.pipeline import generate
from datagen.recipe import load_gen_recipe
from datagen.report import write_dataset_report
from datagen.schema import DatasetError, TripletReader, validate_dataset

N, UNIT = 16, 8
# max_words=8 makes the text filter reject some candidates, so rejects/ holds rows.
RECIPE = SMALL + [f"pipeline.unit_size={UNIT}", "filters.text.max_words=8"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("made") / "ds"
    generate(load_gen_recipe("shapes-high", RECIPE), out, N, workers=1, progress=False, log=lambda s: None)
    return out


@pytest.fixture
def ds(made, tmp_path) -> Path:
    """A fresh copy of the made dataset, to damage."""
    return Path(shutil.copytree(made, tmp_path / "ds"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cir.cli", *args], capture_output=True, text=True, timeout=300)


def _one_line_error(r: subprocess.CompletedProcess, names: str) -> None:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], r.stderr


def test_an_intact_dataset_is_complete_for_every_reader(ds, tmp_path):
    layout = validate_dataset(ds)
    assert layout.complete and layout.problems() == [] and layout.rows == N
    assert [p.name for p in layout.shards] == ["000000.parquet", "000001.parquet"]
    assert sum(pq.read_metadata(p).num_rows for p in layout.rejects) > 0   # the fixture has rejects
    reader = TripletReader(ds)
    ids = [r["id"] for r in reader.iter_records(columns=["id"])]
    assert len(reader) == len(ids) == len(set(ids)) == N
    rep = inspect_dataset(ds)
    assert rep["complete"] and rep["problems"] == [] and (rep["rows"], rep["target_n"]) == (N, N)
    res = write_dataset_report(ds, tmp_path / "rep", workers=1)
    assert res.kept == N and res.rejected > 0


def test_truncated_kept_shard_is_named_by_reader_inspect_browse_and_stage2(ds, tmp_path):
    from cir.triplets import TripletsConfig, load_triplets

    _truncate(ds / "shards" / "000001.parquet")
    with pytest.raises(DatasetError, match=r"shards/000001\.parquet: unreadable parquet file .*regenerate"):
        TripletReader(ds)
    with pytest.raises(DatasetError, match=r"shards/000001\.parquet: unreadable"):
        TripletReader(ds, allow_incomplete=True)      # damage is never read, even when asked for part
    with pytest.raises(DatasetError, match=r"shards/000001\.parquet: unreadable"):
        load_triplets(TripletsConfig(path=str(ds)))  # what stage II reads through
    rep = inspect_dataset(ds)
    assert not rep["complete"] and rep["rows"] == UNIT
    assert len(rep["problems"]) == 1 and "shards/000001.parquet: unreadable" in rep["problems"][0]
    assert "shards/000001.parquet: unreadable" in render_text(rep).splitlines()[-1]
    with pytest.raises(DatasetError, match=r"shards/000001\.parquet: unreadable"):
        write_dataset_report(ds, tmp_path / "rep", workers=1)
    r = _cli("inspect", str(ds), "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["complete"] is False
    _one_line_error(_cli("browse", str(ds), "--out", str(tmp_path / "rep2")), "shards/000001.parquet")


def test_stray_copy_of_a_shard_is_refused_not_read_as_extra_rows(ds):
    shutil.copy(ds / "shards" / "000001.parquet", ds / "shards" / "000001 (copy).parquet")
    with pytest.raises(DatasetError, match=r"000001 \(copy\)\.parquet: not a shard of this dataset"):
        TripletReader(ds)
    rep = inspect_dataset(ds)
    assert rep["unexpected"] == ["shards/000001 (copy).parquet"]
    assert rep["rows"] == N and not rep["complete"]      # the copy's rows are not counted
    from cir.triplets import TripletsConfig, load_triplets

    with pytest.raises(DatasetError, match=r"000001 \(copy\)\.parquet"):
        load_triplets(TripletsConfig(path=str(ds)))  # stage II trains on no extra rows


def test_deleted_shard_makes_the_dataset_incomplete_and_training_refuses_unless_asked(ds):
    (ds / "shards" / "000001.parquet").unlink()
    with pytest.raises(DatasetError, match=r"shards/000001\.parquet: missing .*8 of 16 rows.*incomplete"
                                           r".*allow_incomplete"):
        TripletReader(ds)
    part = TripletReader(ds, allow_incomplete=True)
    assert len(part) == UNIT and {r["id"][:6] for r in part.iter_records(columns=["id"])} == {"000000"}
    rep = inspect_dataset(ds)
    assert (rep["rows"], rep["target_n"], rep["complete"]) == (UNIT, N, False)
    assert rep["missing"] == ["000001.parquet"]
    # rejects/000001.parquet stays beside its missing shard: read as it is when asked for part
    assert [p.name for p in part.shard_paths(rejects=True)] == ["000000.parquet", "000001.parquet"]


def test_unfinished_unit_is_incomplete(ds):
    # As an interrupted extension leaves it: n raised from 12 to 16, unit 1 still holds 4 rows.
    run = json.loads((ds / "run.json").read_text())
    path = ds / "shards" / "000001.parquet"
    t = pq.read_table(path)
    pq.write_table(t.slice(0, 4).replace_schema_metadata(t.schema.metadata), path)
    with pytest.raises(DatasetError, match=r"shards/000001\.parquet: 4 of 8 rows \(unit 1 unfinished\)"):
        TripletReader(ds)
    assert len(TripletReader(ds, allow_incomplete=True)) == 12
    assert run["n"] == N and not inspect_dataset(ds)["complete"]


def test_shard_under_another_units_name_is_damage(ds):
    shutil.copy(ds / "shards" / "000000.parquet", ds / "shards" / "000001.parquet")
    with pytest.raises(DatasetError, match=r"shards/000001\.parquet: its footer says work unit 0"):
        TripletReader(ds)
    layout = validate_dataset(ds)
    assert not layout.complete and any("row 0 has id '000000-" in line or "footer says" in line
                                       for line in layout.damaged)


def _set_id(path: Path, row: int, new_id: str) -> None:
    t = pq.read_table(path)
    ids = t.column("id").to_pylist()
    ids[row] = new_id
    t = t.set_column(t.schema.get_field_index("id"), "id", pa.array(ids, pa.string()))
    pq.write_table(t, path)   # keeps the footer's schema metadata (unit statistics)


def test_repeated_id_in_a_shard_and_kept_id_among_rejects_are_damage(ds):
    rej = next(p for p in sorted((ds / "rejects").glob("*.parquet")) if pq.read_metadata(p).num_rows)
    unit, other = int(rej.stem), 1 - int(rej.stem)    # the kept shard of `unit` must stay sound
    _set_id(ds / "shards" / f"{other:06d}.parquet", 1, f"{other:06d}-000000")
    with pytest.raises(DatasetError, match=rf"shards/{other:06d}\.parquet: id '{other:06d}-000000' is in more "
                                           r"than one row"):
        TripletReader(ds)
    kept0 = pq.read_table(ds / "shards" / rej.name, columns=["id"]).column("id")[0].as_py()
    _set_id(rej, 0, kept0)
    line = next(x for x in validate_dataset(ds).rejects_damaged if rej.name in x)
    assert f"row 0 has id {kept0!r}, which is also a kept triplet of unit {unit}" in line


def test_truncated_rejects_file_is_named_when_rejects_are_read(ds, tmp_path):
    rej = next(p for p in sorted((ds / "rejects").glob("*.parquet")) if pq.read_metadata(p).num_rows)
    _truncate(rej)
    name = f"rejects/{rej.name}"
    reader = TripletReader(ds)                       # kept triplets are sound: readable
    assert len(reader) == N
    with pytest.raises(DatasetError, match=rf"{name}: unreadable parquet file"):
        reader.shard_paths(rejects=True)
    with pytest.raises(DatasetError, match=rf"{name}: unreadable"):
        list(reader.iter_records(columns=["id"], rejects=True))
    rep = inspect_dataset(ds)
    assert not rep["complete"] and any(name in line for line in rep["problems"])
    _one_line_error(_cli("browse", str(ds), "--out", str(tmp_path / "rep")), name)
    assert write_dataset_report(ds, tmp_path / "rep3", rejects=False, workers=1).kept == N


def test_deleted_rejects_file_is_damage_only_when_it_held_rows(ds):
    full = [p for p in sorted((ds / "rejects").glob("*.parquet")) if pq.read_metadata(p).num_rows]
    full[0].unlink()
    with pytest.raises(DatasetError, match=rf"rejects/{full[0].name}: missing, but .* counts \d+ rejected"):
        TripletReader(ds).shard_paths(rejects=True)
    # An empty rejects file may be left out (a unit that rejected nothing): not a problem.
    empty = ds.parent / "empty"
    generate(load_gen_recipe("shapes-high", SMALL + [f"pipeline.unit_size={UNIT}"]), empty, 8, workers=1,
             progress=False, log=lambda s: None)
    assert not (empty / "rejects" / "000000.parquet").exists()    # the writer leaves it out
    assert validate_dataset(empty).problems() == [] and TripletReader(empty).shard_paths(rejects=True) == []


@pytest.mark.parametrize("edit, message", [
    (lambda run: [1, 2], r"run\.json: expected a JSON object .*got a JSON list"),
    (lambda run: {"format": run["format"]}, r"run\.json: missing field\(s\) .*\bn\b"),
    (lambda run: dict(run, seed=1), r"shards/000000\.parquet: row 0 .* not made with run\.json's seed 1"),
    (lambda run: dict(run, recipe_hash="0" * 16), r"run\.json: recipe_hash '0+' is not the hash"),
])
def test_edited_run_json_is_named(ds, edit, message):
    path = ds / "run.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(DatasetError, match=message):
        TripletReader(ds)


def test_inspect_cli_names_run_json_without_traceback(ds):
    (ds / "run.json").write_text("[1, 2]")
    _one_line_error(_cli("inspect", str(ds)), "run.json")
