"""Caption sources: where the source captions (and, in the shapes world, scenes) come from.

Registry: `shapes` (here), `file` / `hf_disk` / `llm` (datagen.text.sources).
"""
from __future__ import annotations

from .candidate import Candidate
from .recipe import GenRecipe
from .world.phrases import load_phrases
from .world.scene import sample_scene


class ShapesCaptions:
    """Samples a training-partition scene and describes it with the recipe's phrase set."""

    name = "shapes"

    def __init__(self, recipe: GenRecipe):
        self.cfg = recipe.captions
        self.phrases = load_phrases(self.cfg.phrases)

    def __call__(self, batch: list[Candidate]) -> None:
        for c in batch:
            rng = c.rng("captions")
            c.source_scene = sample_scene(rng, self.cfg.min_objects, self.cfg.max_objects, split="train")
            c.source_caption = self.phrases.caption(c.source_scene, rng)


def build_captions(recipe: GenRecipe, seed: int | None = None):
    """The caption source of the recipe. `seed` (the run's seed; default: the recipe's) keys
    which pool caption or topic each candidate gets (datagen.text.assign). Raises ValueError for an
    unknown `captions.source`."""
    source = recipe.captions.source
    if source == "shapes":
        return ShapesCaptions(recipe)
    from .text.sources import LLMCaptions, PoolCaptions   # light; LLM engines load lazily inside

    if source in ("file", "hf_disk"):
        return PoolCaptions(recipe, seed)
    if source == "llm":
        return LLMCaptions(recipe, seed)
    raise ValueError(f"unknown caption source {source!r}")
