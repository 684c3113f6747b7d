"""Benchmark: peak memory of stage II's `load_triplets` for a small subsample vs the whole dataset.

    python tests/bench/bench_load_triplets.py --json bench-load-triplets.json   # 1k of 100k
    python tests/bench/bench_load_triplets.py --quick                            # smoke mode (CI)

Writes a real cirgen dataset folder (`cirgen triplets` with shapes-high at 16 px PNG: shards of 500
rows in row groups of 100) whose images are small, then loads it in fresh subprocesses and reports
each one's peak resident memory (VmHWM; ru_maxrss where /proc is absent): imports only (cirgen and torch, which stage II holds anyway), `max_triplets=K`, `max_triplets=K` with a
`where` filter, and everything. With the two-pass reader the subsample costs about the imports
plus K rows' bytes; the whole dataset costs its image bytes.
"""
from __future__ import annotations

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _emit import emit  # noqa: E402

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARD_ROWS = 500

# Runs in a fresh interpreter: load, then report peak RSS and wall time. VmHWM (Linux) is the peak
# of this process image only; ru_maxrss can carry the parent's resident size over fork + exec.
_CHILD = """
import json, resource, sys, time
from cir.triplets import TripletsConfig, load_triplets
import cir.features  # what stage II has loaded anyway (torch): the baseline, not part of the subsample's cost
cfg = json.loads(sys.argv[1])
t0 = time.perf_counter()
n = len(load_triplets(TripletsConfig(**cfg))) if cfg else 0
secs = time.perf_counter() - t0
try:
    kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"triplets": n, "seconds": round(secs, 2), "peak_rss_mb": round(kb / 1024, 1)}))
"""


def write_dataset(root: Path, n: int) -> float:
    """A real cirgen dataset of n kept triplets (`shapes-high` at 16 px, PNG, shards of 500 rows in
    row groups of 100, as datagen writes them, so every reader check passes); returns the mean
    image size in bytes."""
    import pyarrow.parquet as pq

    from datagen.pipeline import generate
    from datagen.recipe import load_gen_recipe

    recipe = load_gen_recipe("shapes-high", ["images.resolution=16", "images.format=png",
                                             f"pipeline.unit_size={SHARD_ROWS}"])
    generate(recipe, root, n, workers=os.cpu_count() or 1, progress=False, log=lambda s: None)
    total = 0
    for p in (root / "shards").glob("*.parquet"):
        t = pq.read_table(p, columns=["reference_image", "target_image"])
        total += sum(len(x["bytes"]) for c in t.columns for x in c.to_pylist())
    return total / (2 * n)


def measure(cfg: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"load_triplets({cfg}) failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="triplets in the dataset")
    ap.add_argument("--subsample", type=int, default=1000, help="max_triplets of the small load")
    ap.add_argument("--out", default=None, help="dataset folder (default: a temp folder, removed)")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--quick", action="store_true", help="smoke mode: 100 of 5,000 triplets")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.subsample = 5000, 100

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cirgen-bench-")) / "ds"
    t0 = time.perf_counter()
    if not (root / "run.json").exists():
        mean_img = write_dataset(root, args.n)
    else:
        mean_img = None
    write_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    path = str(root)
    runs = {
        "imports_only": measure({}),
        "subsample": measure({"path": path, "max_triplets": args.subsample}),
        "subsample_where": measure({"path": path, "max_triplets": args.subsample,
                                    "conditions": [f"index>={args.n // 2}"]}),
        "all": measure({"path": path}),
    }
    peak = {k: v["peak_rss_mb"] for k, v in runs.items()}
    base = peak["imports_only"]
    result = {
        "bench": "load_triplets", "n": args.n, "subsample": args.subsample,
        "image_bytes_mean": round(mean_img, 1) if mean_img else None,
        "dataset_mb_on_disk": round(size / 2**20, 1), "write_seconds": round(write_s, 1),
        "runs": runs, "peak_rss_mb": peak,
        "above_imports_mb": {k: round(v - base, 1) for k, v in peak.items() if k != "imports_only"},
        "rss_ratio_all_vs_subsample": round(peak["all"] / peak["subsample"], 2),
    }
    if not args.out:
        shutil.rmtree(root.parent, ignore_errors=True)
    return emit(result, args.json_out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
