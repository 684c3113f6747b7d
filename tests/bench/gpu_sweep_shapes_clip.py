"""Train several shapes-CLIP recipes side by side on one CUDA GPU, within a wall-clock deadline.

    python tests/bench/gpu_sweep_shapes_clip.py --out sweep --deadline 420 \\
        base=shapes-clip:stop_after=null neg=shapes-clip-neg 96=shapes-clip-96-neg

Each run is `cirgen pretrain-clip --recipe R --set device=cuda` (data rendering in loader worker
processes on the CPU cores; the tiny models leave the GPU mostly idle, so runs share it). A run
still going at the deadline is stopped and its last checkpoint exported (the file name says the
step). Every exported model is then measured with `cirgen eval-clip` on the GPU. This is how the
recipes were compared; the recipes themselves are the reproducible artefact.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "cir.cli"]
# The sweep's candidate recipes and architecture configs live beside this script, not in the
# package: recipes are passed by path, configs registered through $CIRGEN_MODEL_CONFIGS.
SWEEP = Path(__file__).resolve().parent / "shapes_clip_sweep"
os.environ["CIRGEN_MODEL_CONFIGS"] = os.pathsep.join(filter(None, [str(SWEEP), os.environ.get("CIRGEN_MODEL_CONFIGS")]))


def _recipe(name: str) -> str:
    """A sweep recipe's path (`shapes-clip-neg` -> shapes_clip_sweep/shapes-clip-neg.yaml), else as given."""
    path = SWEEP / f"{name}.yaml"
    return str(path) if path.exists() else name


def _export_checkpoint(run: Path) -> Path | None:
    import torch

    from cir.shapes_clip import build_model, export

    cfg = json.loads((run / "config.json").read_text())
    if not (run / "state.pt").exists():
        return None
    st = torch.load(run / "state.pt", map_location="cpu", weights_only=True)
    model, _, _ = build_model(cfg["seed"], cfg.get("model", "shapes-clip"))
    model.load_state_dict(st["model"])
    return export(model, cfg["seed"], run / f"shapes-clip-step{st['step']}.safetensors",
                  {"steps_done": str(st["step"]), "steps_scheduled": str(cfg["steps"]),
                   "architecture": cfg.get("model", "shapes-clip"), "stopped_by": "deadline"})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline", type=float, default=420, help="seconds of training before runs are stopped")
    ap.add_argument("--loader-workers", type=int, default=3)
    ap.add_argument("--eval-scenes", type=int, default=1000)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the driver")
    ap.add_argument("runs", nargs="+", help="NAME=RECIPE[:key=value[:key=value...]]")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    t0 = time.time()
    for spec in args.runs:
        name, rest = spec.split("=", 1)
        recipe, *sets = rest.split(":")
        cmd = CLI + ["pretrain-clip", "--recipe", _recipe(recipe), "--out", str(out / name),
                     "--set", f"device={args.device}", "--set", f"loader_workers={args.loader_workers}", "--set", "threads=1"]
        for s in sets:
            cmd += ["--set", s]
        log = open(out / f"{name}.log", "w")
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while time.time() - t0 < args.deadline and any(p.poll() is None for p in procs.values()):
        time.sleep(2)
    status = {}
    for name, p in procs.items():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait()
            path = _export_checkpoint(out / name)
            status[name] = {"stopped_at_deadline": True, "weights": str(path)}
        else:
            files = sorted((out / name).glob("shapes-clip*.safetensors"))
            status[name] = {"returncode": p.returncode, "weights": str(files[-1]) if files else None}
    print(json.dumps({"train_seconds": round(time.time() - t0, 1), "runs": status}), flush=True)
    evals = {}
    for name, st in status.items():
        if st["weights"] and st["weights"] != "None":
            arch = json.loads((out / name / "config.json").read_text()).get("model", "shapes-clip")
            evals[name] = subprocess.Popen(CLI + ["eval-clip", "--model", arch, "--weights", st["weights"],
                                                  "--device", args.device, "--scenes", str(args.eval_scenes)],
                                           stdout=open(out / f"{name}.eval.json", "w"),
                                           stderr=open(out / f"{name}.eval.log", "w"))
    for name, p in evals.items():
        p.wait()
        try:
            status[name]["eval"] = json.loads((out / f"{name}.eval.json").read_text())
        except (OSError, json.JSONDecodeError):
            status[name]["eval"] = None
    (out / "sweep.json").write_text(json.dumps(status, indent=2))
    for name, st in status.items():
        ev = (st.get("eval") or {}).get("retrieval", {})
        print(name, st["weights"], ev.get("t2i_top1"), ev.get("probe"), flush=True)


if __name__ == "__main__":
    main()
