"""CUDA check of paired generation at SD 1.5 size: throughput, overhead and sharing invariants.

    python tests/bench/gpu_check_diffusion.py --json gpu-diffusion.json            # on a CUDA GPU
    python tests/bench/gpu_check_diffusion.py --dry-run --json /tmp/dry.json       # CPU, tiny sizes

The UNet, VAE and text encoder are built from SD 1.5's own config dicts with random weights (no
download), in the chosen dtype (auto: bf16 where supported, else fp16), 512 px, Euler ancestral.
Measured: plain `pipe(...)` vs `generate_pairs` (p ~ U(0.1, 0.9), CFG ~ U(7.5, 15) per pair) on the
same batch, alternating, median of --repeats; images/s, overhead ratio (target <= 1.10) and peak
memory. Checks (on the same GPU and dtype): p = 1 with identical prompts gives identical 8-bit
images; p = 0 gives the plain pipeline's images. Random weights make the pictures meaningless,
and may overflow to NaN in half precision; neither affects timing. `--dry-run` runs the same code
on CPU with tiny configs so CI can check that the script works.
"""
from __future__ import annotations

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _emit import emit  # noqa: E402

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

TARGET = 1.10


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=4, help="image pairs per call (UNet batch = 4 x pairs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    ap.add_argument("--share", default="attention", choices=["attention", "kv"])
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 32 px, 2 steps, 1 repeat")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from datagen.diffusion import tiny
    from datagen.diffusion.generate import generate_pairs, generators
    from datagen.base.device import resolve_dtype

    if args.dry_run:
        device = "cpu"
        args.resolution, args.steps, args.pairs, args.repeats = 32, 2, 2, 1
        torch.set_num_threads(1)           # tiny models: one thread is fastest on a shared CPU
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU smoke mode")
    else:
        device = "cuda"
    dtype = resolve_dtype(args.dtype, device)
    tok = Path(tempfile.mkdtemp(prefix="cirgen-gpu-check-")) / "tokenizer"
    t0 = time.perf_counter()
    if args.dry_run:
        pipe = tiny.build_sd_pipeline(tok, device=device, dtype=dtype)
    else:
        pipe = tiny.build_sd15_random(tok, device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    params = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "vae", "text_encoder")}

    n, r = args.pairs, args.resolution
    rng = np.random.default_rng(0)
    src = [f"a photo of a {c} car in the city" for c in ["red", "green", "blue", "white", "black", "grey"] * n][:n]
    tgt = [s.replace("car", "bicycle") for s in src]
    seeds = [int(s) for s in rng.integers(2**31, size=n)]
    ps = [float(p) for p in rng.uniform(0.1, 0.9, n)]
    gs = [float(g) for g in rng.uniform(7.5, 15.0, n)]
    prompts = [p for pair in zip(src, tgt) for p in pair]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def plain():
        return pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=float(np.mean(gs)), height=r,
                    width=r, generator=generators([x for x in seeds for _ in (0, 1)]), output_type="np").images

    def paired():
        return generate_pairs(pipe, src, tgt, seeds, ps, gs, args.steps, r, r, mode=args.share)

    runs = {"plain": plain, "paired": paired}
    for fn in runs.values():
        fn()                                   # warm-up: cuDNN/cuBLAS autotuning, allocator
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {k: [] for k in runs}
    peak: dict[str, float] = {}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
            if device == "cuda":
                peak[k] = max(peak.get(k, 0.0), torch.cuda.max_memory_allocated() / 2**30)
                torch.cuda.reset_peak_memory_stats()
    med = {k: statistics.median(v) for k, v in times.items()}

    # Invariants on this device and dtype.
    g = 9.0
    s1, t1, _, _ = generate_pairs(pipe, [src[0]], [src[0]], seeds[:1], [1.0], [g], args.steps, r, r, mode=args.share)
    s0, t0_, _, _ = generate_pairs(pipe, src[:1], tgt[:1], seeds[:1], [0.0], [g], args.steps, r, r)
    ref = pipe(prompt=[src[0], tgt[0]], num_inference_steps=args.steps, guidance_scale=g, height=r, width=r,
               generator=generators([seeds[0]] * 2), output_type="np").images

    def u8(x):
        return np.nan_to_num((np.asarray(x) * 255).round(), nan=-1)

    checks = {
        "p1_identical_prompts_identical_8bit": bool(np.array_equal(u8(s1), u8(t1))),
        "p1_identical_prompts_max_abs_diff": float(np.nanmax(np.abs(s1 - t1))) if np.isfinite(s1).any() else None,
        "p0_equals_plain_pipeline": bool(np.array_equal(u8(s0[0]), u8(ref[0]))
                                         and np.array_equal(u8(t0_[0]), u8(ref[1]))),
        "outputs_finite": bool(np.isfinite(s0).all() and np.isfinite(t0_).all()),
    }
    images = 2 * n
    result = {
        "check": "gpu-diffusion-paired", "dry_run": args.dry_run, "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "model": "tiny random SD" if args.dry_run else "SD 1.5 configs, random weights",
        "params_millions": {k: round(v / 1e6, 2) for k, v in params.items()}, "dtype": str(dtype).replace("torch.", ""),
        "resolution": r, "steps": args.steps, "pairs_per_call": n, "images_per_call": images, "repeats": args.repeats,
        "share": args.share, "scheduler": type(pipe.scheduler).__name__, "build_seconds": round(build_s, 2),
        **{k: {"seconds_median": round(med[k], 4), "seconds": [round(t, 4) for t in times[k]],
               "images_per_second": round(images / med[k], 3), "peak_memory_gib": round(peak.get(k, 0.0), 2)}
           for k in runs},
        "overhead_ratio": round(med["paired"] / med["plain"], 4), "target_ratio": TARGET,
        "meets_target": med["paired"] / med["plain"] <= TARGET, "checks": checks,
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
    }
    return emit(result, args.json_out)


if __name__ == "__main__":
    main()
