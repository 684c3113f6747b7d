"""Benchmark: peak memory of stage II's `load_triplets` for a small subsample vs the whole dataset.

    python tests/bench/bench_load_triplets.py --json bench-load-triplets.json   # 1k of 100k
    python tests/bench/bench_load_triplets.py --quick                            # smoke mode (CI)

Writes a synthetic cirgen dataset folder (run.json + parquet shards of 500 rows in row groups of
100, as datagen writes them) whose images are small PNGs (16x16 noise, ~0.9 kB, each made unique by
a text chunk so parquet cannot deduplicate them), then loads it in fresh subprocesses and reports
each one's peak resident memory (VmHWM; ru_maxrss where /proc is absent): imports only, `max_triplets=K`, `max_triplets=K` with a
`where` filter, and everything. With the two-pass reader the subsample costs about the imports
plus K rows' bytes; the whole dataset costs its image bytes.
"""
from __future__ import annotations

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _emit import emit  # noqa: E402

import argparse
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

SHARD_ROWS = 500
ROW_GROUP = 100

# Runs in a fresh interpreter: load, then report peak RSS and wall time. VmHWM (Linux) is the peak
# of this process image only; ru_maxrss can carry the parent's resident size over fork + exec.
_CHILD = """
import json, resource, sys, time
from cir.triplets import TripletsConfig, load_triplets
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


def _unique_png(base: bytes, i: int) -> bytes:
    """`base` with a tEXt chunk holding `i` before IEND: a valid PNG whose bytes differ per row."""
    data = b"id\x00" + str(i).encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return base[:-12] + chunk + base[-12:]


def write_dataset(root: Path, n: int) -> float:
    """A cirgen dataset folder with n kept triplets; returns the mean image size in bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from datagen.schema import FORMAT, build_schema

    rng = np.random.default_rng(0)
    bases = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        bases.append(buf.getvalue())
    schema = build_schema(["score_clip_dir"], [])
    (root / "shards").mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({"format": FORMAT, "seed": 0, "recipe_hash": "bench"}))
    total = 0
    for s, start in enumerate(range(0, n, SHARD_ROWS)):
        idx = range(start, min(n, start + SHARD_ROWS))
        k = len(idx)
        imgs = {}
        for col, off in (("reference_image", 0), ("target_image", 1)):
            b = [_unique_png(bases[(2 * i + off) % 8], 2 * i + off) for i in idx]
            total += sum(map(len, b))
            imgs[col] = pa.StructArray.from_arrays([pa.array(b, pa.binary()), pa.nulls(k, pa.string())],
                                                   fields=list(schema.field(col).type))
        cols = {"id": pa.array([f"t{i}" for i in idx]), "index": pa.array(list(idx), pa.int64()),
                "modification_text": pa.array([f"add {i % 7} red circles" for i in idx]),
                "failure": pa.array(["none"] * k), "kept": pa.array([True] * k),
                "score_clip_dir": pa.array(rng.random(k)), **imgs}
        arrays = [cols[f.name] if f.name in cols else pa.nulls(k, f.type) for f in schema]
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), root / "shards" / f"{s:06d}.parquet",
                       row_group_size=ROW_GROUP, compression="zstd")
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
                                    "where": ["score_clip_dir>=0.5"]}),
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
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    if not args.out:
        shutil.rmtree(root.parent, ignore_errors=True)
    return emit(result, args.json_out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
