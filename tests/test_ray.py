"""Generation on a local Ray instance writes exactly the records of a single process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import SMALL, dataset_content
from datagen.base.device import DeviceError
from datagen.pipeline import generate
from datagen.ray_runner import gpus_per_worker, model_devices
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


def test_gpu_actors_only_for_model_stages_that_need_one():
    assert gpus_per_worker(load_gen_recipe("shapes-high"), cluster_gpus=8) == 0
    assert gpus_per_worker(load_gen_recipe("real-high"), cluster_gpus=8) == 1
    cpu = ["images.diffusion.device=cpu", "filters.clip.device=cpu", "edits.llm.runtime.device=cpu"]
    assert gpus_per_worker(load_gen_recipe("real-low", cpu), cluster_gpus=8) == 0   # transformers on the CPU
    assert gpus_per_worker(load_gen_recipe("real-high", cpu), cluster_gpus=8) == 1  # vLLM always wants a GPU
    assert gpus_per_worker(load_gen_recipe("real-high", cpu + ["edits.backend=openai"]), cluster_gpus=8) == 0


def test_device_auto_asks_ray_for_a_gpu_only_where_the_cluster_has_one():
    auto = ["images.diffusion.device=auto", "filters.clip.device=auto", "edits.llm.runtime.device=auto"]
    r = load_gen_recipe("real-low", auto)
    assert {d for _, d in model_devices(r)} == {"auto"}
    assert gpus_per_worker(r, cluster_gpus=0) == 0        # CPU-only cluster (like this machine): auto = CPU
    assert gpus_per_worker(r, cluster_gpus=2) == 1
    with pytest.raises(DeviceError, match=r"^images\.diffusion\.device is 'cuda' but the Ray cluster has no GPU"):
        gpus_per_worker(load_gen_recipe("real-low", auto + ["images.diffusion.device=cuda"]), cluster_gpus=0)
    with pytest.raises(DeviceError, match="edits.backend is 'cuda'"):     # vLLM
        gpus_per_worker(load_gen_recipe("real-high"), cluster_gpus=0)
    with pytest.raises(DeviceError, match="device 'gpu': expected auto, cpu"):
        gpus_per_worker(load_gen_recipe("real-low", ["filters.clip.device=gpu"]), cluster_gpus=2)
