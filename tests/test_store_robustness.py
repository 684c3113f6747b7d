"""The dataset writer under kills, full disks, damaged folders, hostile inputs and concurrent runs.

Each test is one of the shared failure cases turned into a check on small datasets made here
(04 empty rejects, 05 damaged rejects, 20 kill during setup, 24 disk full, 25 read-only shards/,
28 huge --n, 31 concurrent temp files, 33 edited run.json).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import dataset_content, file_states
from datagen.base.errors import CirgenError, MachineError
from datagen.base.io import temp_path, write_atomic, write_atomic_with
from datagen.pipeline import PipelineError, generate, iter_units
from datagen.recipe import load_gen_recipe
from datagen.schema import DatasetError, TripletReader
from datagen.store import MAX_UNITS, StoreError, check_unit, clean_temp_files, read_run_json

TINY = ["images.resolution=32", "pipeline.unit_size=4", "pipeline.batch_size=4"]
REJECTING = ["filters.text.max_words=6"]      # the text filter then rejects about half the candidates


def recipe(*extra: str, name: str = "shapes-high"):
    return load_gen_recipe(name, TINY + list(extra))


def run(out: Path, n: int = 16, *extra: str, lines: list | None = None, **kw) -> dict:
    log = lines.append if lines is not None else (lambda s: None)
    return generate(recipe(*extra), out, n, workers=1, progress=False, log=log, **kw)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cir.cli", *args], capture_output=True, text=True)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), lines
    return lines[-1]


# --- 04: every parquet file the dataset holds loads with `datasets` ---------------------------

def test_units_without_rejects_write_no_rejects_file_and_everything_loads(tmp_path):
    from datasets import load_dataset

    out = tmp_path / "ds"
    run(out, 8)
    assert list((out / "rejects").iterdir()) == []        # nothing rejected: no 0-row files
    rej = tmp_path / "rej"
    run(rej, 8, *REJECTING)
    assert list((rej / "rejects").glob("*.parquet"))
    cache = str(tmp_path / "hf")
    for files, rows in ((sorted((out / "shards").glob("*.parquet")), 8),
                        (sorted((rej / "rejects").glob("*.parquet")), None),
                        (sorted((rej / "shards").glob("*.parquet")) + sorted((rej / "rejects").glob("*.parquet")), None)):
        ds = load_dataset("parquet", data_files=[str(f) for f in files], split="train", cache_dir=cache)
        assert len(ds) == (rows if rows is not None else sum(pq.read_metadata(f).num_rows for f in files))


def test_an_older_datasets_empty_rejects_files_are_removed_on_rerun(tmp_path):
    out = tmp_path / "ds"
    run(out, 8)
    shard = pq.read_table(out / "shards" / "000000.parquet")
    pq.write_table(shard.slice(0, 0), out / "rejects" / "000000.parquet")   # what cirgen wrote before
    lines: list[str] = []
    run(out, 8, lines=lines)
    assert not (out / "rejects" / "000000.parquet").exists()
    assert any("empty rejects" in x for x in lines)


# --- 05: damaged files that resume trusts are named and their unit redone ---------------------

def test_truncated_or_missing_rejects_and_shards_are_named_and_regenerated(tmp_path):
    out, ref = tmp_path / "ds", tmp_path / "ref"
    run(ref, 16, *REJECTING)
    run(out, 16, *REJECTING)
    rejects = sorted((out / "rejects").glob("*.parquet"))
    assert len(rejects) >= 2
    cut, gone = rejects[0], rejects[1]
    data = cut.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    gone.unlink()
    shard = out / "shards" / "000003.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    lines: list[str] = []
    stats = run(out, 16, *REJECTING, lines=lines)
    assert stats["kept"] == 16
    damaged = [x for x in lines if "regenerated" in x]
    assert any(str(cut) in x for x in damaged) and any(str(gone) in x and "missing" in x for x in damaged)
    assert any(str(shard) in x for x in damaged)
    assert dataset_content(out) == dataset_content(ref)


def test_a_shard_from_another_unit_or_with_a_wrong_row_count_is_not_done(tmp_path):
    out = tmp_path / "ds"
    run(out, 8)
    a, b = out / "shards" / "000000.parquet", out / "shards" / "000001.parquet"
    a.write_bytes(b.read_bytes())                      # a copy of unit 1 under unit 0's name
    st = check_unit(out, 0, 4)
    assert not st.done and "holds unit 1" in st.problem


# --- 20: a kill while a new folder is set up ---------------------------------------------------

@pytest.mark.parametrize("leftovers", ["temp-run-json", "empty-subfolders", "run-json-and-shards"])
def test_a_folder_killed_during_setup_is_continued_by_the_same_command(tmp_path, leftovers):
    out = tmp_path / "ds"
    ref = tmp_path / "ref"
    run(ref, 8)
    out.mkdir()
    if leftovers == "temp-run-json":       # killed before the rename of run.json (dead PID)
        (out / ".run.json~somehost~999999999~0123abcd.tmp").write_text("{")
        (out / ".run.json.999999999.tmp").write_text("{")    # an older cirgen's temp name
    elif leftovers == "empty-subfolders":  # an older cirgen made these before run.json
        (out / "shards").mkdir()
        (out / "rejects").mkdir()
    else:                                  # killed at mkdir rejects/
        (out / "shards").mkdir()
        (out / "run.json").write_bytes((ref / "run.json").read_bytes())
    assert run(out, 8)["kept"] == 8
    assert dataset_content(out) == dataset_content(ref)
    assert not list(out.rglob("*.tmp")) or leftovers == "temp-run-json" and \
        [p.name for p in out.rglob("*.tmp")] == [".run.json~somehost~999999999~0123abcd.tmp"]


def test_a_folder_with_other_files_and_no_run_json_is_still_refused(tmp_path):
    out = tmp_path / "ds"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "000000.parquet").write_bytes(b"x")
    with pytest.raises(StoreError, match="not empty"):
        run(out, 8)
    assert sorted(p.name for p in out.rglob("*")) == ["000000.parquet", "shards"]


# --- 24: disk full ---------------------------------------------------------------------------

def _enospc_after(monkeypatch, ok_calls: int) -> None:
    """Every fsync after the first `ok_calls` fails as on a full disk (a write fsyncs its file, then
    its folder)."""
    real, calls = os.fsync, [0]

    def fsync(fd):
        calls[0] += 1
        if calls[0] > ok_calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_while_creating_a_folder_leaves_nothing_and_names_the_file(tmp_path, monkeypatch):
    out = tmp_path / "new" / "ds"
    _enospc_after(monkeypatch, 0)
    with pytest.raises(MachineError) as e:
        run(out, 8)
    msg = str(e.value)
    assert "run.json" in msg and "No space left on device (ENOSPC)" in msg and "\n" not in msg
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    assert run(out, 8)["kept"] == 8


def test_a_full_disk_mid_run_names_the_shard_and_the_rerun_finishes(tmp_path, monkeypatch):
    out, ref = tmp_path / "ds", tmp_path / "ref"
    run(ref, 16, *REJECTING)
    _enospc_after(monkeypatch, 4)      # run.json and one unit file, then full
    with pytest.raises(MachineError, match=r"(shards|rejects)/00000\d\.parquet: No space left on device \(ENOSPC\)"):
        run(out, 16, *REJECTING)
    assert not list(out.rglob("*.tmp")) and not (out / "stats.json").exists()
    monkeypatch.undo()
    assert run(out, 16, *REJECTING)["kept"] == 16
    assert dataset_content(out) == dataset_content(ref)


def test_write_atomic_fsyncs_skips_identical_content_and_cleans_up_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "f.json"
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    assert write_atomic(p, b"abc") and p.read_bytes() == b"abc" and synced
    assert not write_atomic(p, b"abc")
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(MachineError, match="f.json: Read-only file system"):
        write_atomic(p, b"new")
    assert p.read_bytes() == b"abc" and [x.name for x in tmp_path.iterdir()] == ["f.json"]


def test_write_atomic_takes_text_and_a_writer_callback_with_the_same_guarantees(tmp_path, monkeypatch):
    p = tmp_path / "m.txt"
    assert write_atomic(p, "é\n") and p.read_bytes() == "é\n".encode()
    assert not write_atomic(p, "é\n")                     # same text: file untouched
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    q = tmp_path / "w.bin"
    write_atomic_with(q, lambda tmp: tmp.write_bytes(b"xyz"))
    assert q.read_bytes() == b"xyz" and len(synced) == 2      # the file, then its folder

    def half_then_fail(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("writer broke")
    with pytest.raises(RuntimeError, match="writer broke"):
        write_atomic_with(q, half_then_fail)

    def disk_full(tmp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(MachineError, match=r"w\.bin: No space left on device \(ENOSPC\); free some space"):
        write_atomic_with(q, disk_full)
    assert q.read_bytes() == b"xyz" and sorted(x.name for x in tmp_path.iterdir()) == ["m.txt", "w.bin"]


# --- 25: an unwritable shards/ is found before run.json changes -------------------------------

def test_extending_into_an_unwritable_shards_folder_changes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    run(out, 16)
    before = file_states(out)
    real_open = os.open

    def ro_open(path, flags, *a, **k):
        if "/shards/" in str(path) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", ro_open)
    with pytest.raises(MachineError, match=r"shards: Read-only file system \(EROFS\)"):
        run(out, 24)
    monkeypatch.undo()
    assert file_states(out) == before and read_run_json(out / "run.json")["n"] == 16
    assert run(out, 16)["kept"] == 16


# --- 28: a huge --n is refused before anything is written --------------------------------------

def test_a_huge_n_is_refused_at_once_and_writes_nothing(tmp_path):
    out = tmp_path / "ds"
    t0 = time.time()
    with pytest.raises(StoreError, match="work units"):
        run(out, 10 ** 12)
    assert time.time() - t0 < 5 and not out.exists()
    with pytest.raises(StoreError, match="--seed"):
        run(out, 8, seed=-1)
    assert not out.exists()
    r = _cli("triplets", "--n", str(10 ** 12), "--out", str(out), *[x for s in TINY for x in ("--set", s)])
    assert "work units" in _one_line_error(r) and not out.exists()
    run(out, 8)
    # The plan is lazy: the largest allowed dataset is iterated without a list of all its units.
    assert next(iter_units(MAX_UNITS * 4, 4)) == (0, 4)


# --- 31: temp files of live processes survive a starting run -----------------------------------

def test_a_starting_run_removes_only_temp_files_of_dead_processes(tmp_path):
    out = tmp_path / "ds"
    run(out, 8)
    shards = out / "shards"
    mine = temp_path(shards / "000000.parquet")                       # this (live) process
    dead = shards / ".000001.parquet~{}~999999999~0badc0de.tmp".format(mine.name.split("~")[1])
    old_form = shards / ".000001.parquet.999999999.tmp"
    stale = temp_path(shards / "000002.parquet")
    other_host = shards / ".000003.parquet~elsewhere~1~00000000.tmp"
    foreign = shards / ".notes.tmp"
    for p in (mine, dead, old_form, stale, other_host, foreign):
        p.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert clean_temp_files(out) == 3
    assert sorted(p.name for p in shards.glob(".*")) == sorted([mine.name, other_host.name, foreign.name])


def test_shard_processes_started_together_cooperate(tmp_path):
    out, ref = tmp_path / "ds", tmp_path / "ref"
    run(ref, 32)
    sets = [x for s in TINY for x in ("--set", s)]
    args = [sys.executable, "-m", "cir.cli", "triplets", "--n", "32", "--out", str(out), "--workers", "1",
            "--quiet", *sets]
    procs = [subprocess.Popen(args + ["--shard", f"{i}/2"], stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "Traceback" not in "".join(errs)
    if not (out / "stats.json").exists():      # both finished their half at the same moment
        run(out, 32)
    assert dataset_content(out) == dataset_content(ref)


# --- 33: an edited run.json ------------------------------------------------------------------

def _edit(out: Path, change) -> None:
    p = out / "run.json"
    data = json.loads(p.read_text())
    p.write_text(json.dumps(change(data)))


def test_an_edited_seed_cannot_mix_runs(tmp_path):
    out = tmp_path / "ds"
    run(out, 16)
    _edit(out, lambda d: dict(d, seed=1))
    before = file_states(out)
    with pytest.raises(StoreError, match=r"000000\.parquet: made with seed 0, but run.json says seed 1"):
        run(out, 24, seed=1)
    assert file_states(out) == before


@pytest.mark.parametrize("content, field", [
    ([1, 2], "got a JSON list"),
    ({"format": "cirgen-triplets"}, "missing field(s) schema_version"),
    ("seed-as-text", "field 'seed' must be a JSON integer"),
    ("n-zero", "field 'n' must be >= 1"),
    ("recipe-edited", "field 'recipe' does not match field 'recipe_hash'"),
    ("n-huge", "field 'n'"),
])
def test_a_malformed_run_json_gets_one_line_naming_the_file_and_field(tmp_path, content, field):
    out = tmp_path / "ds"
    run(out, 8)
    if content == "seed-as-text":
        _edit(out, lambda d: dict(d, seed="0"))
    elif content == "n-zero":
        _edit(out, lambda d: dict(d, n=0))
    elif content == "recipe-edited":
        _edit(out, lambda d: {**d, "recipe": {**d["recipe"], "images": {**d["recipe"]["images"], "noise": 9.0}}})
    elif content == "n-huge":
        _edit(out, lambda d: dict(d, n=10 ** 12))
    else:
        (out / "run.json").write_text(json.dumps(content))
    before = file_states(out)
    with pytest.raises(CirgenError) as e:
        run(out, 8)
    assert str(out / "run.json") in str(e.value) and field in str(e.value)
    assert file_states(out) == before
    if content in ([1, 2], "seed-as-text"):
        with pytest.raises(DatasetError, match="run.json"):
            TripletReader(out)
        assert "run.json" in _one_line_error(_cli("inspect", str(out)))


def test_a_lowered_target_never_overwrites_a_larger_shard(tmp_path):
    out = tmp_path / "ds"
    run(out, 16)
    _edit(out, lambda d: dict(d, n=14))
    before = file_states(out)
    with pytest.raises(StoreError, match=r"000003\.parquet: holds 4 triplets, more than the 2"):
        run(out, 14)
    assert file_states(out) == before


def test_units_left_incomplete_by_another_process_are_reported(tmp_path, monkeypatch):
    import datagen.pipeline as pl

    out = tmp_path / "ds"
    monkeypatch.setattr(pl, "_run_units", lambda *a, **k: None)      # as if another run undid them
    with pytest.raises(PipelineError, match="not complete after this run"):
        run(out, 8)
