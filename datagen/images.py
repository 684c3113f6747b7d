"""Image stage: (caption, edited caption[, scenes]) -> (reference image, target image) bytes."""
from __future__ import annotations

from .candidate import Candidate
from .recipe import GenRecipe
from .world.render import RenderConfig, encode, render


class ShapesImages:
    """Renders both scenes; objects keep their poses across the pair, pixel noise differs."""

    name = "shapes"

    def __init__(self, recipe: GenRecipe):
        c = recipe.images
        self.fmt = c.format
        self.cfg = RenderConfig(c.resolution, c.jitter, c.rotation, c.scale_jitter, c.color_jitter, c.noise)

    def __call__(self, batch: list[Candidate]) -> None:
        for c in batch:
            rng = c.rng("images")
            s_ref, s_tgt = (int(x) for x in rng.integers(2**31, size=2))
            c.reference_image = encode(render(c.source_scene, s_ref, self.cfg), self.fmt)
            c.target_image = encode(render(c.target_scene, s_tgt, self.cfg), self.fmt)
            c.generator["images"] = {"backend": "shapes", "resolution": self.cfg.resolution,
                                     "seeds": [s_ref, s_tgt]}


def build_images(recipe: GenRecipe):
    return {"shapes": ShapesImages}[recipe.images.backend](recipe)
