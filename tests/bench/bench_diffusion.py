"""Benchmark: paired generation (shared self-attention, per-sample CFG and share fraction) against
a plain diffusers call with the same settings, on CPU with tiny random models (no download).

    python tests/bench/bench_diffusion.py --json bench-diffusion.json
    python tests/bench/bench_diffusion.py --quick          # smoke mode

Both sides run the same StableDiffusionPipeline on the same batch: 2 x pairs prompts, one CPU
generator per image, same steps, resolution and scheduler. `plain` is `pipe(...)` with one CFG
scale (the mean of the per-pair draws); `paired` is `generate_pairs` with p ~ U(0.1, 0.9) and
CFG ~ U(7.5, 15) per pair. Runs alternate (plain, paired, plain, ...) and the median is reported;
`overhead_ratio` = median paired / median plain (target <= 1.10), on process CPU seconds (stable on
a shared machine; with 1 thread it is the work done) and on wall seconds. The end-to-end image stage
(`diffusers-paired` backend on candidates, PNG encode included) is reported beside it.
"""
from __future__ import annotations

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _emit import emit  # noqa: E402

import argparse
import statistics
import tempfile
import time
from pathlib import Path

TARGET = 1.10


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4, help="image pairs per call")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a busy machine)")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--quick", action="store_true", help="smoke mode: 2 pairs, 3 steps, 32 px, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.steps, args.resolution, args.repeats = 2, 3, 32, 2

    import numpy as np
    import torch

    from datagen.candidate import Candidate, candidate_seed
    from datagen.diffusion import tiny
    from datagen.diffusion.generate import generate_pairs, generators
    from datagen.diffusion.paired import DiffusersPaired
    from datagen.recipe import load_gen_recipe

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="cirgen-bench-diffusion-"))
    pipe = tiny.build_sd_pipeline(tmp / "tokenizer")
    rng = np.random.default_rng(0)
    n, r = args.pairs, args.resolution
    src = [f"a photo of {c} cube number {i}" for i, c in enumerate(["red", "green", "blue", "white"] * n)][:n]
    tgt = [s.replace("cube", "sphere") for s in src]
    seeds = [int(s) for s in rng.integers(2**31, size=n)]
    ps = [float(p) for p in rng.uniform(0.1, 0.9, n)]
    gs = [float(g) for g in rng.uniform(7.5, 15.0, n)]
    prompts = [p for pair in zip(src, tgt) for p in pair]

    def plain():
        return pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=float(np.mean(gs)), height=r,
                    width=r, generator=generators([s for s in seeds for _ in (0, 1)]), output_type="np").images

    def paired():
        return generate_pairs(pipe, src, tgt, seeds, ps, gs, args.steps, r, r)

    recipe = load_gen_recipe("shapes-high", [
        "images.backend=diffusers-paired", f"images.resolution={r}", "images.format=png",
        f"images.diffusion.steps={args.steps}", f"images.diffusion.pairs_per_call={n}"])
    backend = DiffusersPaired(recipe, pipe=pipe)

    def stage():
        batch = [Candidate(0, j, candidate_seed(0, 0, j), source_caption=src[j], target_caption=tgt[j])
                 for j in range(n)]
        backend(batch)
        assert all(c.kept for c in batch)

    runs = {"plain": plain, "paired": paired, "image_stage": stage}
    for fn in runs.values():          # warm-up (allocator, oneDNN kernels)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    images = 2 * n
    result = {
        "bench": "diffusion-paired", "device": "cpu", "threads": args.threads, "model": "tiny random SD (tiny.py)",
        "pairs_per_call": n, "images_per_call": images, "steps": args.steps, "resolution": r,
        "repeats": args.repeats, "scheduler": type(pipe.scheduler).__name__,
        **{k: {"seconds_median": round(med[k], 4), "seconds": [round(t, 4) for t in times[k]],
               "cpu_seconds_median": round(med_cpu[k], 4),
               "images_per_second": round(images / med[k], 3),
               "images_per_cpu_second": round(images / med_cpu[k], 3)} for k in runs},
        "overhead_ratio": round(med_cpu["paired"] / med_cpu["plain"], 4),
        "overhead_ratio_wall": round(med["paired"] / med["plain"], 4),
        "image_stage_ratio": round(med_cpu["image_stage"] / med_cpu["plain"], 4),
        "target_ratio": TARGET,
        "meets_target": med_cpu["paired"] / med_cpu["plain"] <= TARGET,
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
    }
    return emit(result, args.json_out)


if __name__ == "__main__":
    main()
