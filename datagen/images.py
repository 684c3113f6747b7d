"""Image stage: (caption, edited caption[, scenes]) -> (reference image, target image) bytes.

Backends: `shapes` (the procedural renderer, here), `diffusers-paired` and `diffusers-edit`
(datagen.diffusion, imported only when chosen).
"""
from __future__ import annotations

from .candidate import Candidate
from .recipe import GenRecipe
from .world.render import RenderConfig, encode, render


class ShapesImages:
    """Renders both scenes; objects keep their poses across the pair, pixel noise differs."""

    name = "shapes"

    @staticmethod
    def check(recipe: GenRecipe) -> None:
        """Raise ConfigError unless `captions.source` is `shapes` and `edits.backend` is `rules`."""
        if recipe.captions.source != "shapes" or recipe.edits.backend != "rules":
            from .base.config import ConfigError

            raise ConfigError("images.backend shapes renders shapes-world scenes: it needs captions.source "
                              "shapes and edits.backend rules (use a diffusers backend for real captions)")

    def __init__(self, recipe: GenRecipe):
        self.check(recipe)
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


def _diffusers_paired(recipe: GenRecipe, scorer=None, **components):
    from .diffusion.paired import DiffusersPaired    # lazy: torch/diffusers only when asked for

    return DiffusersPaired(recipe, scorer=scorer, **components)


def _diffusers_edit(recipe: GenRecipe, scorer=None, **components):
    from .diffusion.edit import DiffusersEdit

    return DiffusersEdit(recipe, scorer=scorer, **components)


BACKENDS = {"diffusers-paired": _diffusers_paired, "diffusers-edit": _diffusers_edit}


def build_images(recipe: GenRecipe, scorer=None, **components):
    """The image-stage component of `recipe.images.backend`.

    `scorer` (an object with `directional(ref_images, tgt_images, src_captions, tgt_captions)`)
    ranks the `samples_per_prompt` samples of the diffusers backends; `components` are prebuilt
    pipelines (`pipe=`, and `edit_pipe=` for diffusers-edit) used instead of loading the models.
    Raises ConfigError when `shapes` is combined with non-shapes captions/edits, KeyError for an unknown backend.
    """
    backend = recipe.images.backend
    if backend == "shapes":
        return ShapesImages(recipe)
    return BACKENDS[backend](recipe, scorer=scorer, **components)
