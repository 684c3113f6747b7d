"""Generation on a local Ray instance writes exactly the records of a single process."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import SMALL, dataset_content
from datagen.pipeline import generate
from datagen.ray_runner import gpus_per_worker
from datagen.recipe import load_gen_recipe


def test_ray_cli_matches_single_process_records(tmp_path):
    sets = SMALL + ["pipeline.unit_size=40"]
    generate(load_gen_recipe("shapes-low", sets), tmp_path / "local", 120, workers=1, progress=False,
             log=lambda s: None)
    cmd = [sys.executable, "-m", "cir.cli", "triplets", "--n", "120", "--out", str(tmp_path / "ray"),
           "--recipe", "shapes-low", "--ray", "--workers", "2", "--json"]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["kept"] == 120
    assert dataset_content(tmp_path / "ray") == dataset_content(tmp_path / "local")
    assert len(list((tmp_path / "ray" / "shards").glob("*.parquet"))) == 3


def test_gpu_actors_only_for_model_stages():
    assert gpus_per_worker(load_gen_recipe("shapes-high")) == 0
    assert gpus_per_worker(load_gen_recipe("real-high")) == 1
    cpu = ["images.diffusion.device=cpu", "filters.clip.device=cpu", "edits.llm.runtime.device=cpu"]
    assert gpus_per_worker(load_gen_recipe("real-low", cpu)) == 0          # transformers on the CPU
    assert gpus_per_worker(load_gen_recipe("real-high", cpu)) == 1         # vLLM always wants a GPU
    assert gpus_per_worker(load_gen_recipe("real-high", cpu + ["edits.backend=openai"])) == 0
