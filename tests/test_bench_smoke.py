"""Benchmarks run in their quick smoke mode (CI): they work and write the JSON they promise."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent / "bench"


@pytest.mark.parametrize("script,keys", [
    ("bench_triplets.py", ["wall_seconds", "triplets_per_second", "peak_rss_mb", "stage_triplets_per_cpu_second"]),
    ("bench_eval.py", []),
    ("bench_browse.py", []),
    ("bench_stage1.py", ["cached", "recompute", "speedup_cached_vs_recompute"]),
    ("bench_stage2.py", ["results", "target_ratio_full_vs_bare"]),
    ("bench_load_triplets.py", ["peak_rss_mb", "above_imports_mb", "rss_ratio_all_vs_subsample"]),
    ("bench_decode.py", ["runs", "cpu_count"]),
])
def test_bench_quick_mode_writes_json(tmp_path, script, keys):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    for k in keys:
        assert k in data, k


def test_gpu_check_dry_run_runs_every_part_and_records_errors_per_part(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--only", "stage2,retrieval,decode",
                        "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    parts = json.loads(out.read_text())["parts"]
    assert set(parts) == {"stage2", "retrieval", "decode"}
    assert not any("error" in p for p in parts.values()), parts
    assert {"bare", "full", "low-rank", "bottleneck", "lora"} <= set(parts["stage2"]["results"])
    assert [r["workers"] for r in parts["decode"]["runs"]] == [0, 1, 2]


def test_bench_decode_counts_every_image_for_each_worker_count(tmp_path):
    out = tmp_path / "d.json"
    r = subprocess.run([sys.executable, str(BENCH / "bench_decode.py"), "--n", "40", "--workers", "0,2",
                        "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(x["workers"], x["images"]) for x in runs] == [(0, 40), (2, 40)]
    assert all(x["images_per_second"] > 0 and x["load_average_1min_before"] >= 0 for x in runs)


def test_gpu_check_dry_run_drives_the_real_commands(tmp_path):
    """stage1 -> stage2 -> eval (val, and test with --submission) as subprocesses, each timed."""
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--only", "commands",
                        "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    part = json.loads(out.read_text())["parts"]["commands"]
    assert part["failed"] == [], {k: s.get("stderr_tail") for k, s in part["steps"].items()}
    steps = part["steps"]
    assert list(steps) == ["benchmark", "triplets", "stage1", "stage2", "eval_val", "eval_test"]
    assert all(s["returncode"] == 0 and s["wall_seconds"] > 0 for s in steps.values())
    assert "--device cpu" in steps["stage2"]["command"] and steps["stage2"]["train_samples_per_second"] > 0
    assert steps["stage1"]["images_encoded"] > 0 and "R@1" in steps["eval_val"]["output"]["metrics"]
    assert len(steps["eval_test"]["output"]["submission"]) == 2
