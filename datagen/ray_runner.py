"""Run generation work units on a Ray cluster through Ray Data (the `ray` extra).

Each work unit is one row of a Ray Dataset; a pool of actors (`ActorPoolStrategy`) builds the
stages once per actor, so the LLM and the diffusion pipeline are loaded once per GPU, and runs
`run_unit` on every unit it is handed. An actor writes its unit's shard to the dataset folder
itself (atomically, as a local worker does), so the folder must be on storage every node sees.
The records are those of a single process: a unit's content depends only on (recipe, seed, unit).
Progress is counted as the actors report finished units.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .base.device import DeviceError, check_device_name
from .base.config import from_dict, to_dict
from .recipe import GenRecipe
from .unit import PipelineError, Stages, run_unit


def model_devices(recipe: GenRecipe) -> list[tuple[str, str]]:
    """(recipe field, device name) of every stage that loads a neural model in this process (an
    openai-compatible server runs elsewhere; vLLM always runs on CUDA)."""
    out = []
    if recipe.captions.source == "llm" and recipe.captions.llm_backend != "openai":
        out.append(("captions.llm_backend", "cuda") if recipe.captions.llm_backend == "vllm"
                   else ("captions.llm.runtime.device", recipe.captions.llm.runtime.device))
    if recipe.edits.backend in ("transformers", "vllm"):
        out.append(("edits.backend", "cuda") if recipe.edits.backend == "vllm"
                   else ("edits.llm.runtime.device", recipe.edits.llm.runtime.device))
    if recipe.images.backend != "shapes":
        out.append(("images.diffusion.device", recipe.images.diffusion.device))
    if recipe.filters.clip.enabled:
        out.append(("filters.clip.device", recipe.filters.clip.device))
    return out


def gpus_per_worker(recipe: GenRecipe, cluster_gpus: float) -> float:
    """GPUs each actor asks Ray for: 1 when a model stage names `cuda`/`cuda:N` (or is vLLM), or
    says `auto` on a cluster that has GPUs; else 0 (`auto` on a CPU-only cluster is the CPU).
    Raises DeviceError when a stage names CUDA and the cluster has no GPU (Ray would wait forever), or
    when a stage's device is not a valid device name."""
    devices = [(f, check_device_name(d)) for f, d in model_devices(recipe)]
    explicit = [(f, d) for f, d in devices if d.startswith("cuda")]
    if explicit and cluster_gpus < 1:
        f, d = explicit[0]
        raise DeviceError(f"{f} is {d!r} but the Ray cluster has no GPU; use auto or cpu, or add GPU nodes")
    if explicit or (cluster_gpus >= 1 and any(d == "auto" for _, d in devices)):
        return 1.0
    return 0.0


class _UnitActor:
    def __init__(self, recipe_dict: dict, seed: int, out: str):
        self.recipe = from_dict(GenRecipe, recipe_dict)
        self.seed, self.out = seed, Path(out)
        self.stages = Stages(self.recipe, seed)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        kept = [run_unit(self.recipe, self.seed, int(u), int(c), self.out, self.stages).kept
                for u, c in zip(batch["unit"], batch["count"])]
        return {"unit": np.asarray(batch["unit"]), "kept": np.asarray(kept)}


def run_units_ray(recipe: GenRecipe, seed: int, out: Path, todo: list[tuple[int, int]], address: str,
                  workers: int | None, on_unit_done: Callable[[int], None],
                  log: Callable[[str], None] = print) -> None:
    """Run `todo` units on Ray: `address` "local" starts a local instance, else it is joined.

    `todo`: (unit, count) pairs; `workers`: actor pool size (default: the cluster's GPUs when the stages need
    one, else its CPUs; never more than the units). `on_unit_done` is called with each finished unit's kept
    count. Raises PipelineError when ray is not installed, DeviceError from `gpus_per_worker`, and whatever
    a unit raises inside an actor (as Ray re-raises it). A Ray instance this call started is shut down after.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise PipelineError("--ray needs the ray extra: pip install 'cirgen[ray]'") from None
    started = False
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        started = True
    try:
        res = ray.cluster_resources()
        gpus = gpus_per_worker(recipe, res.get("GPU", 0))
        default = int(res.get("GPU", 0)) if gpus else int(res.get("CPU", 1))
        size = max(1, min(workers or default or 1, len(todo)))
        log(f"ray: {len(todo)} work units on {size} actor(s), {gpus:g} GPU each "
            f"(cluster: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU)")
        ds = ray.data.from_items([{"unit": u, "count": c} for u, c in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(_UnitActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=size),
                            fn_constructor_kwargs={"recipe_dict": to_dict(recipe), "seed": seed, "out": str(out)},
                            num_gpus=gpus, num_cpus=1)
        for row in ds.iter_rows():
            on_unit_done(int(row["kept"]))
    finally:
        if started:
            ray.shutdown()
