"""Benchmark: shapes-world triplet generation, wall time, triplets/s per stage, peak memory.

    python tests/bench/bench_triplets.py --n 20000 --workers 2 --json bench-triplets.json
    python tests/bench/bench_triplets.py --quick          # smoke mode (CI)

Peak RSS is reported for the main process and for the largest worker (ru_maxrss), and their
sum over all workers as an upper bound of the whole run's resident memory.
"""
from __future__ import annotations

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _emit import emit  # noqa: E402

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--recipe", default="shapes-high")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=None, help="dataset folder (default: a temp folder, removed)")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--quick", action="store_true", help="smoke mode: 500 triplets")
    args = ap.parse_args(argv)
    if args.quick:
        args.n = 500

    from datagen.pipeline import generate
    from datagen.recipe import load_gen_recipe

    recipe = load_gen_recipe(args.recipe, args.overrides)
    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cirgen-bench-")) / "ds"
    t0 = time.perf_counter()
    stats = generate(recipe, tmp, args.n, workers=args.workers, progress=False, log=lambda s: None)
    wall = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    per_stage = stats["budget"]["seconds_per_stage"]
    result = {
        "bench": "triplets", "recipe": args.recipe, "overrides": args.overrides, "n": args.n,
        "workers": args.workers, "resolution": recipe.images.resolution, "format": recipe.images.format,
        "wall_seconds": round(wall, 2), "triplets_per_second": round(args.n / wall, 1),
        "stage_triplets_per_cpu_second": {s: round(args.n / v, 1) if v else None for s, v in per_stage.items()},
        "peak_rss_mb": {"main": round(self_kb / 1024, 1), "largest_worker": round(child_kb / 1024, 1),
                        "upper_bound_total": round((self_kb + args.workers * child_kb) / 1024, 1)},
        "dataset_mb": round(size / 2**20, 1),
    }
    if not args.out:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return emit(result, args.json_out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
