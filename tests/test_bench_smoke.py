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
    r = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--only", "stage2,retrieval",
                        "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    parts = json.loads(out.read_text())["parts"]
    assert set(parts) == {"stage2", "retrieval"}
    assert not any("error" in p for p in parts.values()), parts
    assert {"bare", "full", "low-rank", "bottleneck", "lora"} <= set(parts["stage2"]["results"])
