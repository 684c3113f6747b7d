"""Generation pipeline: format, resume, extension, determinism, kill-safety and bad input."""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from PIL import Image

from conftest import SMALL, dataset_content, file_states
from datagen.pipeline import generate
from datagen.schema import TripletReader
from datagen.store import StoreError
from datagen.world.scene import Scene, is_heldout

QUIET = {"progress": False, "log": lambda s: None}


def test_dataset_loads_with_hf_datasets_and_images_decode(tmp_path, small_recipe):
    from datasets import load_dataset

    out = tmp_path / "ds"
    stats = generate(small_recipe(), out, 120, workers=1, **QUIET)
    assert stats["kept"] == 120
    ds = load_dataset("parquet", data_files=str(out / "shards" / "*.parquet"), split="train",
                      cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 120
    row = ds[0]
    assert isinstance(row["reference_image"], Image.Image) and row["reference_image"].size == (32, 32)
    assert isinstance(row["target_image"], Image.Image)
    assert row["modification_text"] and row["source_caption"] and row["target_caption"]
    assert row["pass_text"] is True and row["kept"] is True
    assert Scene.from_json(row["source_scene"])
    for rec in TripletReader(out).iter_records(columns=["reference_image", "target_image", "index"]):
        for key in ("reference_image", "target_image"):
            Image.open(io.BytesIO(rec[key]["bytes"])).load()
    assert sorted(r["index"] for r in TripletReader(out).iter_records(columns=["index"])) == list(range(120))
    run = json.loads((out / "run.json").read_text())
    assert run["recipe_hash"] and run["seed"] == 0 and run["versions"]["python"]
    st = json.loads((out / "stats.json").read_text())
    assert st["kept"] == 120 and set(st["budget"]["seconds_per_stage"]) == {"captions", "edits", "images", "filters"}
    assert "load_dataset" in (out / "README.md").read_text()


def test_generated_scenes_stay_out_of_the_heldout_partition(tmp_path, small_recipe):
    out = tmp_path / "ds"
    generate(small_recipe(), out, 200, workers=1, **QUIET)
    for rec in TripletReader(out).iter_records(columns=["source_scene", "intended_scene"]):
        assert not is_heldout(Scene.from_json(rec["source_scene"]))
        assert not is_heldout(Scene.from_json(rec["intended_scene"]))


def test_rerun_does_nothing_and_extension_adds_exactly(tmp_path, small_recipe):
    out = tmp_path / "ds"
    generate(small_recipe(), out, 120, workers=1, **QUIET)
    before = file_states(out)
    time.sleep(0.01)
    generate(small_recipe(), out, 120, workers=1, **QUIET)
    assert file_states(out) == before
    # 120 -> 230: the partial last unit (20 of 50) is completed, new units are added.
    stats = generate(small_recipe(), out, 230, workers=1, **QUIET)
    assert stats["kept"] == 230 and len(TripletReader(out)) == 230
    direct = tmp_path / "direct"
    generate(small_recipe(), direct, 230, workers=1, **QUIET)
    assert dataset_content(out) == dataset_content(direct)


def test_same_records_on_any_number_of_workers(tmp_path, small_recipe):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(small_recipe(), a, 200, workers=1, **QUIET)
    generate(small_recipe(), b, 200, workers=2, **QUIET)
    assert dataset_content(a) == dataset_content(b)
    c = tmp_path / "c"
    generate(small_recipe(), c, 200, seed=1, workers=1, **QUIET)
    assert dataset_content(a) != dataset_content(c)


def test_batch_size_does_not_change_the_data(tmp_path, small_recipe):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(small_recipe(), a, 60, workers=1, **QUIET)
    generate(small_recipe(extra=["pipeline.batch_size=7"]), b, 60, workers=1, **QUIET)
    assert dataset_content(a) == dataset_content(b)


def test_shards_partition_the_work(tmp_path, small_recipe):
    out, ref = tmp_path / "ds", tmp_path / "ref"
    assert generate(small_recipe(), out, 200, workers=1, shard=(0, 2), **QUIET) == {}
    assert not (out / "stats.json").exists()
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["000000.parquet", "000002.parquet"]
    generate(small_recipe(), out, 200, workers=1, shard=(1, 2), **QUIET)
    assert (out / "stats.json").exists()
    generate(small_recipe(), ref, 200, workers=1, **QUIET)
    assert dataset_content(out) == dataset_content(ref)


def test_low_quality_labels_failures_at_the_configured_rates(tmp_path, small_recipe):
    out = tmp_path / "low"
    stats = generate(small_recipe("shapes-low"), out, 600, workers=1, **QUIET)
    labels = Counter(r["failure"] for r in TripletReader(out).iter_records(columns=["failure"]))
    injected = sum(v for k, v in labels.items() if k is not None)
    assert 0.25 < injected / 600 < 0.45  # 5 x 0.07 = 0.35
    assert {k for k in labels if k} == {"wrong_object", "extra_change", "noop_target", "mismatch", "resampled"}
    assert stats["failures_kept"]["none"] == labels[None]
    for rec in TripletReader(out).iter_records(columns=["failure", "target_scene", "intended_scene",
                                                         "source_scene"]):
        tgt, want = Scene.from_json(rec["target_scene"]), Scene.from_json(rec["intended_scene"])
        if rec["failure"] in (None, "mismatch"):
            assert tgt == want
        else:
            assert tgt != want
        if rec["failure"] == "noop_target":
            assert tgt == Scene.from_json(rec["source_scene"])


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "cir.cli", *args], capture_output=True, text=True, **kw)


def test_sigkill_at_a_random_moment_then_resume_gives_identical_records(tmp_path):
    args = ["triplets", "--n", "3000", "--quiet", "--workers", "2"] + [x for s in SMALL for x in ("--set", s)]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert _cli(*args, "--out", str(ref)).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "cir.cli", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # Kill at a random moment once shards are being written, so the run is really cut mid-way.
    deadline = time.time() + 60
    while not list((out / "shards").glob("*.parquet")) if (out / "shards").exists() else True:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.4))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list((out / "shards").glob("*.parquet")))
    assert not (out / "stats.json").exists() and 0 < written < 60, written
    r = _cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert dataset_content(out) == dataset_content(ref), f"killed with {written} of 60 shards written"
    assert not list(out.rglob("*.tmp"))


def test_bad_input_gets_one_clear_line_and_changes_nothing(tmp_path):
    base = [x for s in SMALL for x in ("--set", s)]
    r = _cli("triplets", "--n", "0", "--out", str(tmp_path / "x"), *base)
    assert r.returncode != 0 and "--n must be a positive" in r.stderr and not (tmp_path / "x").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    r = _cli("triplets", "--n", "10", "--out", str(foreign), *base)
    assert r.returncode != 0 and "not empty" in r.stderr
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    ds = tmp_path / "ds"
    assert _cli("triplets", "--n", "60", "--out", str(ds), "--quiet", *base).returncode == 0
    before = file_states(ds)
    r = _cli("triplets", "--n", "60", "--out", str(ds), "--quiet", *base, "--set", "images.noise=9")
    assert r.returncode != 0 and "different recipe" in r.stderr
    r = _cli("triplets", "--n", "60", "--out", str(ds), "--quiet", "--seed", "3", *base)
    assert r.returncode != 0 and "seed" in r.stderr
    r = _cli("triplets", "--n", "30", "--out", str(ds), "--quiet", *base)
    assert r.returncode != 0 and "shrink" in r.stderr
    assert file_states(ds) == before

    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: gen\nimages: {resolution: 32\n")
    r = _cli("triplets", "--n", "10", "--out", str(tmp_path / "y"), "--recipe", str(bad))
    assert r.returncode != 0 and "bad.yaml" in r.stderr and "malformed YAML" in r.stderr
    bad.write_text("kind: gen\nimages: {resolutoin: 32}\n")
    r = _cli("triplets", "--n", "10", "--out", str(tmp_path / "y"), "--recipe", str(bad))
    assert r.returncode != 0 and "images.resolutoin" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "y").exists()

    r = _cli("triplets", "--n", "10", "--out", "/proc/cirgen-cannot-write-here", *base)
    assert r.returncode != 0 and "cirgen-cannot-write-here" in r.stderr
    assert "Traceback" not in r.stderr


def test_store_refuses_a_file_as_output(tmp_path, small_recipe):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        generate(small_recipe(), f, 10, workers=1, **QUIET)
    assert f.read_text() == "x"


def test_inspect_reports_counts_and_examples(tmp_path, small_recipe):
    out = tmp_path / "ds"
    generate(small_recipe("shapes-low"), out, 100, workers=1, **QUIET)
    r = _cli("inspect", str(out), "--json")
    rep = json.loads(r.stdout)
    assert rep["rows"] == 100 and rep["complete"] and len(rep["examples"]) == 3
    assert sum(rep["stats"]["failures_kept"].values()) == 100
    text = _cli("inspect", str(out)).stdout
    assert "failure labels" in text and "s per 1k kept" in text


def test_shapes_images_refuse_real_caption_text(tmp_path, small_recipe):
    from datagen.base.config import ConfigError

    r = small_recipe(extra=["edits.backend=keywords"])
    with pytest.raises(ConfigError, match="needs captions.source shapes and edits.backend rules"):
        generate(r, tmp_path / "x", 10, workers=1, **QUIET)
    assert not (tmp_path / "x").exists()
