"""Benchmark: stage I training steps/s with the feature cache vs recomputing image features.

    python tests/bench/bench_stage1.py --json bench-stage1.json
    python tests/bench/bench_stage1.py --model ViT-B-32 --random-init --batch 64
    python tests/bench/bench_stage1.py --quick            # smoke mode

Both modes run the same stage-I step (token learner + VSI forward, `a photo of *` through the text
encoder, contrastive loss, backward, AdamW) on the same batch; "recompute" also runs the frozen
image tower (global + patch tokens) every step, which is what training without the cache costs.
"""
from __future__ import annotations

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _emit import emit, machine  # noqa: E402

import argparse
import resource
import sys
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-clip")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.random_init = 16, 2, True

    import numpy as np
    import torch

    from cir.clip import CIRClip
    from cir.losses import contrastive
    from cir.mapping import MappingConfig
    from cir.model import CIRModel
    from datagen.world.render import RenderConfig, render
    from datagen.world.scene import sample_scene

    if args.threads:
        torch.set_num_threads(args.threads)
    clip = CIRClip.load(args.model, random_init=args.random_init)
    model = CIRModel(clip, MappingConfig())            # TSCIR defaults: token learner + VSI injectors
    rng = np.random.default_rng(0)
    x = torch.stack([clip.preprocess(render(sample_scene(rng), i, RenderConfig(resolution=128)))
                     for i in range(args.batch)])
    with torch.no_grad():
        g0, p0 = clip.image_features(x, patches=True)
        g0 = torch.nn.functional.normalize(g0, dim=-1)
    opt = torch.optim.AdamW(model.mapping.parameters(), 1e-4)
    prompts = ["a photo of *"] * args.batch

    def step(recompute: bool) -> None:
        if recompute:
            with torch.no_grad():
                g, p = clip.image_features(x, patches=True)
                g = torch.nn.functional.normalize(g, dim=-1)
        else:
            g, p = g0, p0
        loss = contrastive(g, model.encode_query(g, p, prompts), clip.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()

    res = {}
    for mode in ("cached", "recompute"):
        step(mode == "recompute")                      # warm-up
        t = time.perf_counter()
        for _ in range(args.steps):
            step(mode == "recompute")
        dt = (time.perf_counter() - t) / args.steps
        res[mode] = {"seconds_per_step": round(dt, 4), "samples_per_second": round(args.batch / dt, 1)}
    result = {"bench": "stage1", "model": args.model, "batch": args.batch, "steps": args.steps, **res,
              "speedup_cached_vs_recompute": round(res["recompute"]["seconds_per_step"]
                                                   / res["cached"]["seconds_per_step"], 2),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "machine": machine(torch_threads=torch.get_num_threads())}
    return emit(result, args.json_out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
