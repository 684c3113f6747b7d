"""The GPU check's `commands` part: the real commands, one after the other, each timed.

    python tests/bench/gpu_check_commands.py --json commands.json              # CUDA, ViT-L/14 (random)
    python tests/bench/gpu_check_commands.py --dry-run --json /tmp/c.json      # CPU, shapes-CLIP, tiny

In a fresh work folder (a temp folder unless --workdir):
1. `cirgen benchmark shapes --format cirr` writes a benchmark in the exact CIRR layout (val + test);
2. `cirgen triplets` makes a small shapes triplet dataset;
3. `cirgen stage1 --device D` trains stage I on a randomly initialised CLIP (--model; ViT-L/14 on
   the GPU: weights do not change speed) over shapes images, features cached in the work folder;
4. `cirgen stage2 --device D` trains stage II from that run on the triplets;
5. `cirgen eval --device D --dataset cirr` on val (metrics) and on test (`--submission DIR`).
Each command runs as a subprocess, as a user runs it: its wall time includes Python start, the
model build and the feature extraction. Each step records its exit status, wall seconds, what the
command printed (JSON where it prints JSON), and for training the images encoded per second and the
training samples per second from the run folder. A failed step is recorded with the end of its
stderr, and the steps that need it are skipped.
"""
from __future__ import annotations

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from _emit import emit  # noqa: E402

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REAL = {"model": "ViT-L-14", "device": "cuda", "images": 4096, "stage1_epochs": 2, "stage1_batch": 256,
        "triplets": 1024, "stage2_epochs": 3, "stage2_batch": 256, "queries": 256, "resolution": 224}
DRY = {"model": "shapes-clip", "device": "cpu", "images": 64, "stage1_epochs": 1, "stage1_batch": 32,
       "triplets": 48, "stage2_epochs": 1, "stage2_batch": 16, "queries": 8, "resolution": 64}


def _json_tail(text: str):
    """The last JSON value a command printed (a whole-output document or a last line), or None."""
    text = text.strip()
    for cand in (text, text.splitlines()[-1] if text else ""):
        try:
            return json.loads(cand)
        except ValueError:
            continue
    return None


def _train_rates(run: Path, batch: int) -> dict:
    """Feature extraction images/s and training samples/s of a run folder (result.json, metrics.jsonl)."""
    out = {}
    try:
        res = json.loads((run / "result.json").read_text())
    except (OSError, ValueError):
        return out
    fs, n = res.get("feature_seconds") or 0, res.get("images_encoded") or 0
    out.update(feature_seconds=fs, images_encoded=n,
               feature_images_per_second=round(n / fs, 1) if fs and n else None)
    steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    if steps:
        last = steps[-1]
        out.update(steps=last["step"], train_seconds=last.get("seconds"),
                   train_samples_per_second=round(last["step"] * batch / last["seconds"], 1)
                   if last.get("seconds") else None, last_loss=round(last["loss"], 4))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, shapes-CLIP, tiny sizes (CI smoke)")
    ap.add_argument("--workdir", default=None, help="keep everything here (default: a temp folder, removed)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per command")
    ap.add_argument("--json", dest="json_out", default=None)
    for k, v in REAL.items():
        ap.add_argument(f"--{k.replace('_', '-')}", dest=k, type=type(v), default=None,
                        help=f"default {v} (dry run: {DRY[k]})")
    args = ap.parse_args(argv)
    cfg = {k: (getattr(args, k) if getattr(args, k) is not None else (DRY if args.dry_run else REAL)[k])
           for k in REAL}

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="gpu-check-commands-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CIRGEN_CACHE=str(cache))
    steps: dict = {}
    result = {"part": "commands", "dry_run": args.dry_run, "config": cfg, "workdir": str(work), "steps": steps}

    def run(name: str, *cli: str, needs: tuple[str, ...] = ()) -> dict | None:
        if any(steps.get(n, {}).get("returncode") != 0 for n in needs):
            steps[name] = {"skipped": f"needs {', '.join(needs)}"}
            return None
        cmd = [sys.executable, "-m", "cir.cli", *cli]
        t = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            rc, out, err = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", e.stdout or "", e.stderr or ""
            out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
        rec = {"command": "cirgen " + " ".join(cli), "returncode": rc, "wall_seconds": round(time.perf_counter() - t, 2)}
        if rc != 0:
            rec["stderr_tail"] = err[-3000:]
        else:
            rec["output"] = _json_tail(out)
        steps[name] = rec
        print(f"[commands] {name}: rc {rc}, {rec['wall_seconds']} s", file=sys.stderr, flush=True)
        return rec

    dev, model, res = cfg["device"], cfg["model"], cfg["resolution"]
    bench, trips, s1, s2 = work / "cirr", work / "triplets", work / "stage1", work / "stage2"
    try:
        run("benchmark", "benchmark", "shapes", "--format", "cirr", "--out", str(bench), "--queries",
            str(cfg["queries"]), "--resolution", str(res), "--split", "val", "--split", "test", "--overwrite")
        r = run("triplets", "triplets", "--n", str(cfg["triplets"]), "--out", str(trips), "--recipe", "shapes-low",
                "--workers", str(min(8, os.cpu_count() or 1)), "--quiet", "--json",
                "--set", f"images.resolution={res}")
        if r and isinstance(r.get("output"), dict):
            r["output"] = {k: r["output"].get(k) for k in ("kept", "generated", "wall_seconds")}
        sets1 = [f"clip.name={model}", "clip.random_init=true", f"data.n={cfg['images']}",
                 f"data.resolution={res}", f"train.epochs={cfg['stage1_epochs']}",
                 f"train.batch_size={cfg['stage1_batch']}", "eval.scenes=200" if not args.dry_run else "eval.scenes=10",
                 f"cache_dir={cache}"]
        r = run("stage1", "stage1", "--out", str(s1), "--device", dev, *[x for s in sets1 for x in ("--set", s)])
        if r and r["returncode"] == 0:
            r.update(_train_rates(s1, cfg["stage1_batch"]))
        sets2 = [f"train.epochs={cfg['stage2_epochs']}", f"train.batch_size={cfg['stage2_batch']}",
                 f"cache_dir={cache}"]
        r = run("stage2", "stage2", "--triplets", str(trips), "--stage1", str(s1), "--out", str(s2),
                "--device", dev, *[x for s in sets2 for x in ("--set", s)], needs=("stage1", "triplets"))
        if r and r["returncode"] == 0:
            r.update(_train_rates(s2, cfg["stage2_batch"]))
        for split in ("val", "test"):
            extra = ["--submission", str(work / "submission")] if split == "test" else []
            r = run(f"eval_{split}", "eval", "--model", str(s2), "--dataset", "cirr", "--root", str(bench),
                    "--split", split, "--device", dev, "--json", *extra, needs=("stage2", "benchmark"))
            if r and r.get("returncode") == 0 and isinstance(r.get("output"), dict):
                o = r.pop("output")        # the whole result is long: keep the figures
                r["output"] = {k: o.get(k) for k in ("metrics", "n_queries", "gallery_size", "seconds", "submission")}
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["total_command_seconds"] = round(sum(s.get("wall_seconds", 0) for s in steps.values()), 1)
    result["failed"] = [k for k, s in steps.items() if s.get("returncode", 0) != 0 or "skipped" in s]
    return emit(result, args.json_out)


if __name__ == "__main__":
    main()
