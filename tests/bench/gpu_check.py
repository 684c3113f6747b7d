"""The CUDA check (issues 8 and 19), one JSON file: the real commands, paired generation, stage II
step, large-gallery retrieval, the image data path.

    python tests/bench/gpu_check.py --json gpu-check.json          # on a CUDA machine, no internet
    python tests/bench/gpu_check.py --dry-run --json /tmp/dry.json  # CPU, tiny sizes (CI smoke)

Real-size architectures with random weights (weights do not change speed):
- diffusion: SD 1.5-size UNet/VAE/text encoder, paired generation at 512 px vs the plain
  pipeline (`gpu_check_diffusion.py`: images/s, overhead ratio, sharing invariants);
- stage2: ViT-L/14 text tower, the stage II step in bf16 autocast vs a plain open_clip text
  forward/backward (`bench_stage2.py`: samples/s, ratio, model FLOP utilisation);
- retrieval: 1,000 queries over a CIRCO-size gallery of 123,403 768-d features, top-50
  (`bench_eval.py` on the GPU);
- commands: `cirgen benchmark shapes` (CIRR layout) -> `cirgen triplets` -> `cirgen stage1` ->
  `cirgen stage2` -> `cirgen eval` on val and on test with `--submission`, as subprocesses with
  `--device cuda` on a randomly initialised ViT-L/14, each timed (`gpu_check_commands.py`);
- decode: images/s decoded + preprocessed for the feature cache with 0, 1, 2, 4, 8 DataLoader
  workers (`bench_decode.py`).
`--dry-run` runs every part on the CPU at tiny sizes (shapes-CLIP for the commands).
A part that fails is recorded with its error and the others still run.
"""
from __future__ import annotations

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _emit import emit  # noqa: E402

import argparse
import json
import platform
import time
import traceback
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--only", default="commands,stage2,retrieval,decode,diffusion")
    args = ap.parse_args(argv)

    import torch

    import bench_decode
    import bench_eval
    import bench_stage2
    import gpu_check_commands
    import gpu_check_diffusion

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU smoke mode")
    only = set(args.only.split(","))
    parts: dict = {}
    result = {"bench": "gpu-check", "dry_run": args.dry_run,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "parts": parts}

    def _part(name: str, fn) -> None:
        t = time.perf_counter()
        try:
            parts[name] = fn()
        except Exception as e:  # one broken part must not lose the others' figures
            parts[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        parts[name]["wall_seconds"] = round(time.perf_counter() - t, 1)
        print(f"[gpu_check] {name} done in {parts[name]['wall_seconds']} s", file=_sys.stderr, flush=True)
        if args.json_out:                  # figures so far survive a later part's hang or a timeout
            Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")

    if "commands" in only:               # first: the figures a user sees, on a fresh machine
        _part("commands", lambda: gpu_check_commands.main(["--dry-run"] if args.dry_run else []))
    if "retrieval" in only:
        ev = (["--quick"] if args.dry_run else
              ["--device", "cuda", "--gallery", "123403", "--queries", "1000", "--k", "50", "--repeats", "5"])
        _part("retrieval", lambda: bench_eval.main(ev))
    if "stage2" in only:
        s2 = (["--quick"] if args.dry_run else
              ["--model", "ViT-L-14", "--random-init", "--device", "cuda", "--dtype", "bfloat16",
               "--batch", "256", "--negatives", "16", "--steps", "10"])
        _part("stage2", lambda: bench_stage2.main(s2))
    if "decode" in only:
        _part("decode", lambda: bench_decode.main(["--quick"] if args.dry_run else ["--workers", "0,1,2,4,8"]))
    if "diffusion" in only:
        _part("diffusion", lambda: gpu_check_diffusion.main(["--dry-run"] if args.dry_run else []))
    return emit(result, args.json_out)


if __name__ == "__main__":
    main()
