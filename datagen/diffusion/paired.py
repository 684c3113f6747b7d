"""`diffusers-paired` image backend: one text-to-image model renders the source and the edited
caption from the same seed, sharing self-attention for the first fraction p of the steps
(InstructPix2Pix's paired generation; what is shared is documented in `attention.py`).

Per sample, from the candidate's seeded rng: seed, p ~ U(share_fraction), text CFG ~ U(guidance).
"""
from __future__ import annotations

import numpy as np

from ..candidate import Candidate
from ..recipe import GenRecipe
from .backend import SEED_RANGE, DiffusionImages, DirectionalScorer, Sample, uniform
from .generate import generate_pairs


def model_name(pipe, configured: str, loaded: bool) -> str:
    """The model name to record: `configured` if the backend loads it, else the prebuilt pipeline's
    `name_or_path` or "prebuilt:<class name>"."""
    return configured if loaded else (getattr(pipe, "name_or_path", None) or f"prebuilt:{type(pipe).__name__}")


def dtype_name(pipe) -> str:
    """The UNet's dtype without the "torch." prefix, e.g. "float16"."""
    return str(pipe.unet.dtype).replace("torch.", "")


class DiffusersPaired(DiffusionImages):
    """`diffusers-paired`: source and edited caption from one seed with shared self-attention (IP2P).

    `pipe`: a prebuilt text-to-image pipeline, else loaded from `images.diffusion.model`. Raises
    ValueError as `DiffusionImages` does (best-of-k without a scorer), before any model is loaded."""

    name = "diffusers-paired"

    def __init__(self, recipe: GenRecipe, pipe=None, scorer: DirectionalScorer | None = None):
        super().__init__(recipe, scorer)     # checks the scorer before any model is loaded
        cfg = self.cfg
        loaded = pipe is None
        if loaded:
            from .loading import load_pipeline

            pipe = load_pipeline(cfg.model, "t2i", cfg.dtype, cfg.device, cfg.variant, cfg.scheduler,
                                 cfg.safety_checker)
        self.pipe = pipe
        self.model = model_name(pipe, cfg.model, loaded)

    def draw(self, rng: np.random.Generator, cand: int, index: int, attempt: int) -> Sample:
        """Draw, in this order: seed in [0, 2^31), p ~ U(share_fraction), guidance ~ U(guidance)."""
        seed = int(rng.integers(SEED_RANGE))
        return Sample(cand, index, attempt, seed, p=uniform(rng, self.cfg.share_fraction),
                      guidance=uniform(rng, self.cfg.guidance))

    def generate(self, samples: list[Sample], batch: list[Candidate]) -> None:
        """Both images of every sample in one paired call (float [H, W, 3] in [0, 1], H = W =
        `images.resolution` pixels) and `shared_steps`; an NSFW flag on either image sets `error`."""
        r = self.images_cfg.resolution
        src, tgt, flags, shared = generate_pairs(
            self.pipe, [batch[s.cand].source_caption for s in samples], [batch[s.cand].target_caption for s in samples],
            [s.seed for s in samples], [s.p for s in samples], [s.guidance for s in samples], self.cfg.steps, r, r,
            self.cfg.share, self.cfg.negative_prompt, guidance_scale=self.cfg.guidance[1])
        for j, s in enumerate(samples):
            s.ref, s.tgt, s.shared_steps = src[j], tgt[j], shared[j]
            if flags is not None and flags[j]:
                s.error = "image_nsfw"

    def settings(self) -> dict:
        """Model, steps, scheduler class, dtype, resolution (pixels) and share mode for the record."""
        return {"model": self.model, "steps": self.cfg.steps, "scheduler": type(self.pipe.scheduler).__name__,
                "dtype": dtype_name(self.pipe), "resolution": self.images_cfg.resolution, "share": self.cfg.share}
