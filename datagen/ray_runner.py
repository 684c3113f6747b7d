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

from .recipe import GenRecipe


def gpus_per_worker(recipe: GenRecipe) -> float:
    """One GPU per actor when a stage runs a neural model on an accelerator, else none."""
    models = []     # devices of the stages that load a model in-process (an openai server is elsewhere)
    if recipe.captions.source == "llm" and recipe.captions.llm_backend != "openai":
        models.append("cuda" if recipe.captions.llm_backend == "vllm" else recipe.captions.llm.runtime.device)
    if recipe.edits.backend in ("transformers", "vllm"):
        models.append("cuda" if recipe.edits.backend == "vllm" else recipe.edits.llm.runtime.device)
    if recipe.images.backend != "shapes":
        models.append(recipe.images.diffusion.device)
    if recipe.filters.clip.enabled:
        models.append(recipe.filters.clip.device)
    return 1.0 if any(d != "cpu" for d in models) else 0.0


class _UnitActor:
    def __init__(self, recipe_dict: dict, seed: int, out: str):
        from .config import from_dict
        from .pipeline import Stages

        self.recipe = from_dict(GenRecipe, recipe_dict)
        self.seed, self.out = seed, Path(out)
        self.stages = Stages(self.recipe, seed)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from .pipeline import run_unit

        kept = [run_unit(self.recipe, self.seed, int(u), int(c), self.out, self.stages)["kept"]
                for u, c in zip(batch["unit"], batch["count"])]
        return {"unit": np.asarray(batch["unit"]), "kept": np.asarray(kept)}


def run_units_ray(recipe: GenRecipe, seed: int, out: Path, todo: list[tuple[int, int]], address: str,
                  workers: int | None, on_unit_done: Callable[[int], None],
                  log: Callable[[str], None] = print) -> None:
    """Run `todo` units on Ray: `address` "local" starts a local instance, else it is joined."""
    try:
        import ray
        import ray.data
    except ImportError:
        from .pipeline import PipelineError

        raise PipelineError("--ray needs the ray extra: pip install 'cirgen[ray]'") from None
    from .config import to_dict

    started = False
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        started = True
    try:
        gpus = gpus_per_worker(recipe)
        res = ray.cluster_resources()
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
