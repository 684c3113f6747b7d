"""Caption sources: where the source captions (and, in the shapes world, scenes) come from."""
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


def build_captions(recipe: GenRecipe):
    return {"shapes": ShapesCaptions}[recipe.captions.source](recipe)
