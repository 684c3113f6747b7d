"""Benchmark: the feature cache's image data path, images/s decoded + preprocessed with 0, 1, 2 workers.

    python tests/bench/bench_decode.py --json bench-decode.json     # 2,000 JPEGs at 256 px
    python tests/bench/bench_decode.py --workers 0,1,2,4,8          # on a machine with more cores
    python tests/bench/bench_decode.py --quick                      # smoke mode (100 JPEGs)

It writes a folder of JPEGs (smooth colour fields with fine noise, quality 90: decoding cost like a
photograph's, not a flat image's), reads every file once so the page cache holds them, then runs
exactly what `FeatureCache.image_features` runs before the image tower: `cir.features.decoded_batches`
over the project's one loader (`datagen.base.images.open_image`) and CLIP's eval preprocessing
(resize to 224 bicubic, centre crop, to tensor, normalise), in batches of 128, with 0 (in the
process, with one torch thread while a batch is made, as the cache does), 1, 2, ... DataLoader workers. No model runs: the figure is the rate a GPU encoder could
be fed at. The time includes starting the workers. The machine's 1-minute load average before and
after each run is recorded: on a shared machine, workers compete with other processes for cores.
"""
from __future__ import annotations

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _emit import emit  # noqa: E402

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def write_jpegs(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """n JPEGs of size x size px: a bilinear-upscaled 8x8 colour field plus pixel noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
        px = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
        p = folder / f"{i:06d}.jpg"
        Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="JPEGs to write and decode")
    ap.add_argument("--size", type=int, default=256, help="JPEG side, px")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--folder", default=None, help="reuse/keep the JPEGs here (default: a temp folder)")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.n = 100

    import open_clip
    import torch

    from cir.features import decoded_batches
    from datagen.base.images import open_image

    preprocess = open_clip.image_transform(224, is_train=False)       # ViT-L/14's eval transform
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "jpegs"
        t = time.perf_counter()
        paths = sorted(folder.glob("*.jpg"))[:args.n] if folder.is_dir() else []
        if len(paths) < args.n:
            paths = write_jpegs(folder, args.n, args.size)
        write_s = time.perf_counter() - t
        mb = sum(p.stat().st_size for p in paths) / 1e6
        for p in paths:                    # into the page cache: the figure is decoding, not the disk
            p.read_bytes()

        def image(i):
            return open_image(paths[i], str(paths[i]))

        runs = []
        shape = None
        for w in (int(x) for x in args.workers.split(",")):
            load_before = _load()
            t = time.perf_counter()
            n = 0
            for x, errors in decoded_batches(len(paths), image, preprocess, args.batch, w):
                assert not any(errors), errors
                n += x.shape[0]
                shape = tuple(x.shape[1:])
            s = time.perf_counter() - t
            ips = n / s
            runs.append({"workers": w, "images": n, "seconds": round(s, 2), "images_per_second": round(ips, 1),
                         "images_per_second_per_worker": round(ips / w, 1) if w else None,
                         "load_average_1min_before": load_before, "load_average_1min_after": _load()})
            print(f"[bench_decode] {w} workers: {ips:.1f} images/s ({s:.2f} s)", file=_sys.stderr, flush=True)
    base = runs[0]["images_per_second"] if runs and runs[0]["workers"] == 0 else None
    for r in runs:
        r["speedup_vs_in_process"] = round(r["images_per_second"] / base, 2) if base else None
    result = {"bench": "decode", "n": args.n, "jpeg_px": args.size, "jpeg_mb": round(mb, 1), "batch": args.batch,
              "tensor_shape": list(shape) if shape else None, "write_seconds": round(write_s, 1),
              "runs": runs, "cpu_count": os.cpu_count(),
              "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
              "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
              "torch": torch.__version__, "machine": platform.machine(), "quick": args.quick}
    return emit(result, args.json_out)


if __name__ == "__main__":
    main()
