"""Benchmark: the stage II training step vs a plain open_clip text forward/backward on the same batch.

    python tests/bench/bench_stage2.py --json bench-stage2.json                 # shapes-CLIP, CPU
    python tests/bench/bench_stage2.py --model ViT-B-32 --random-init --batch 64
    python tests/bench/bench_stage2.py --model ViT-L-14 --random-init --device cuda --dtype bfloat16
    python tests/bench/bench_stage2.py --quick                                  # smoke mode

Both steps see the same prompts (`a photo of * that <modification>`), tokenize them, run the text
tower, score the same cached target image features with TSCIR's composed contrastive loss (10 mixed
hard negatives), run backward and an AdamW step:
- bare: open_clip's own `encode_text` with every text-tower weight trainable (a plain fine-tuning
  step; `*` is just a token here);
- stage II `full`: the same trainable weights, through cirgen's query path (token learner,
  pseudo-word injection, VSI injectors, hooks) — its ratio to bare is the toolkit's overhead
  (target <= 1.10);
- stage II `low-rank` (TSCIR's composing adapters, the default), `bottleneck`, `lora`: fewer weight
  gradients, so they may run faster than bare.
Times are the median of --steps steps after two warm-up steps (CUDA: synchronised). On CUDA the
model FLOP utilisation counts 6 x text parameters x tokens per step against --peak-tflops.
"""
from __future__ import annotations

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _emit import emit, machine  # noqa: E402

import argparse
import resource
import statistics
import time

WORDS = ("make", "the", "dress", "red", "and", "sleeveless", "with", "a", "bigger", "collar", "remove",
         "stripes", "change", "background", "to", "beach", "add", "dog", "on", "left")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-clip")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--negatives", type=int, default=10, help="mixed hard negatives per query (TSCIR: 10)")
    ap.add_argument("--modes", default="full,low-rank,bottleneck,lora")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="bfloat16 = torch.autocast (CUDA)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100 SXM dense bf16)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.negatives = 16, 2, 2

    import numpy as np
    import torch

    from cir.adapters import ComposeConfig
    from cir.clip import CIRClip
    from cir.losses import composed_contrastive
    from cir.mapping import MappingConfig
    from cir.model import CIRModel

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    rng = np.random.default_rng(0)
    prompts = ["a photo of * that " + " ".join(rng.choice(WORDS, size=int(rng.integers(6, 16))))
               for _ in range(args.batch)]
    bare_prompts = [p.replace("*", "thing") for p in prompts]

    def features(*shape):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        return torch.nn.functional.normalize(x, dim=-1).to(dev)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(step) -> dict:
        for _ in range(2):
            step()
        sync()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        return {"step_seconds": round(med, 5), "samples_per_second": round(args.batch / med, 1)}

    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else torch.autocast(dev.type, enabled=False))
    results, text_params, tokens_per_step = {}, 0, 0
    for mode in ["bare"] + [m for m in args.modes.split(",") if m]:
        clip = CIRClip.load(args.model, random_init=args.random_init, device=args.device)
        D, Wv = clip.embed_dim, clip.vision_width
        size = clip.clip.visual.image_size
        size = size if isinstance(size, int) else size[0]
        with torch.no_grad():                            # the model's own visual-token grid
            n_patch = clip.image_features(torch.zeros(1, 3, size, size, device=dev), patches=True)[1].shape[1]
        g = features(args.batch, D)
        patches = torch.randn(args.batch, n_patch, Wv, device=dev)
        tgt = features(args.batch, D + 0)
        scale = clip.logit_scale
        text_params = sum(p.numel() for n, p in clip.clip.named_parameters()
                          if not n.startswith("visual."))
        tokens_per_step = args.batch * clip.tokenizer(["x"]).shape[1]
        if mode == "bare":
            oc = clip.clip
            params = [p for n, p in oc.named_parameters() if not n.startswith("visual.")]
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, 1e-5)

            def step():
                with autocast:
                    q = oc.encode_text(clip.tokenizer(bare_prompts).to(dev), normalize=True)
                    loss = composed_contrastive(q.float(), tgt, scale, args.negatives)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        else:
            model = CIRModel(clip, MappingConfig()).to(dev)
            model.add_composer(ComposeConfig(mode=mode))
            model.to(dev)
            model.mapping.requires_grad_(False)          # stage II default: stage-I modules frozen
            params = [p for p in model.parameters() if p.requires_grad]
            if mode == "full":
                for p in model.composer.text_params:
                    p.requires_grad_(True)
                params = list({id(p): p for p in params + model.composer.text_params}.values())
            opt = torch.optim.AdamW(params, 1e-5)

            def step():
                with autocast:
                    q = model.encode_query(g, patches, prompts)
                    loss = composed_contrastive(q.float(), tgt, scale, args.negatives)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        r = timed(step)
        r["trainable_params"] = sum(p.numel() for p in params)
        if cuda:
            r["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            r["mfu"] = round(6 * text_params * tokens_per_step / r["step_seconds"] / (args.peak_tflops * 1e12), 4)
        results[mode] = r
        del clip, opt, params
        if cuda:
            torch.cuda.empty_cache()
    bare = results["bare"]["step_seconds"]
    for mode, r in results.items():
        if mode != "bare":
            r["ratio_vs_bare"] = round(r["step_seconds"] / bare, 3)
    result = {
        "bench": "stage2-step", "model": args.model, "random_init": args.random_init, "batch": args.batch,
        "negatives": args.negatives, "device": args.device, "dtype": args.dtype, "steps": args.steps,
        "text_params": text_params, "tokens_per_step": tokens_per_step, "results": results,
        "target_ratio_full_vs_bare": 1.10,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": machine(torch_threads=torch.get_num_threads(), torch=torch.__version__,
                           gpu=torch.cuda.get_device_name() if cuda else None),
    }
    return emit(result, args.json_out)


if __name__ == "__main__":
    main()
