"""`diffusers-edit` image backend: a text-to-image model renders the source caption (the
reference), then an instruction-editing model (InstructPix2Pix) turns the reference and the
modification text into the target.

Per sample, from the candidate's seeded rng: reference seed and text CFG ~ U(guidance), then edit
seed, edit text CFG ~ U(edit_guidance) and image CFG ~ U(image_guidance) (higher stays closer to
the reference; drawing it per sample sweeps edit strength, and best-of-k keeps the best).
"""
from __future__ import annotations

import numpy as np

from ..candidate import Candidate
from ..recipe import GenRecipe
from .backend import SEED_RANGE, DiffusionImages, DirectionalScorer, Sample, uniform
from .generate import check_image, edit_images, text_to_image, to_pil
from .paired import dtype_name, model_name


class DiffusersEdit(DiffusionImages):
    """`diffusers-edit`: a text-to-image reference, then an InstructPix2Pix edit by the modification text.

    `pipe` / `edit_pipe`: prebuilt pipelines, else loaded from `images.diffusion.model` / `edit_model`.
    Raises ValueError as `DiffusionImages` does (best-of-k without a scorer)."""

    name = "diffusers-edit"

    def __init__(self, recipe: GenRecipe, pipe=None, edit_pipe=None, scorer: DirectionalScorer | None = None):
        super().__init__(recipe, scorer)
        cfg = self.cfg
        from .loading import load_pipeline

        self.model = model_name(pipe, cfg.model, pipe is None)
        self.edit_model = model_name(edit_pipe, cfg.edit_model, edit_pipe is None)
        self.pipe = pipe if pipe is not None else load_pipeline(
            cfg.model, "t2i", cfg.dtype, cfg.device, cfg.variant, cfg.scheduler, cfg.safety_checker)
        self.edit_pipe = edit_pipe if edit_pipe is not None else load_pipeline(
            cfg.edit_model, "edit", cfg.dtype, cfg.device, cfg.variant, cfg.scheduler, cfg.safety_checker)

    def ready(self, c: Candidate) -> str | None:
        """Why this candidate cannot be generated (no source caption or no modification text), or None."""
        return None if c.source_caption and c.modification_text else "missing source caption or instruction"

    def draw(self, rng: np.random.Generator, cand: int, index: int, attempt: int) -> Sample:
        """Draw, in this order: seed, guidance ~ U(guidance), edit seed, edit guidance ~ U(edit_guidance),
        image guidance ~ U(image_guidance); seeds in [0, 2^31)."""
        seed = int(rng.integers(SEED_RANGE))
        guidance = uniform(rng, self.cfg.guidance)
        edit_seed = int(rng.integers(SEED_RANGE))
        return Sample(cand, index, attempt, seed, guidance, edit_seed=edit_seed,
                      edit_guidance=uniform(rng, self.cfg.edit_guidance),
                      image_guidance=uniform(rng, self.cfg.image_guidance))

    def generate(self, samples: list[Sample], batch: list[Candidate]) -> None:
        """References from the source captions, then targets by editing them; images float [H, W, 3] in
        [0, 1], H = W = `images.resolution` pixels. A NaN/black or NSFW reference sets `error` and is not
        edited; an NSFW target sets `error`. RuntimeError from the pipelines propagates."""
        r, cfg = self.images_cfg.resolution, self.cfg
        refs, flags = text_to_image(self.pipe, [batch[s.cand].source_caption for s in samples],
                                    [s.seed for s in samples], [s.guidance for s in samples], cfg.steps, r, r,
                                    cfg.negative_prompt, guidance_scale=cfg.guidance[1])
        ok = []
        for j, s in enumerate(samples):
            s.ref = refs[j]
            s.error = check_image(s.ref) or ("image_nsfw" if flags is not None and flags[j] else None)
            if s.error is None:
                ok.append(s)
        if not ok:
            return
        # The edit call gets as many rows as the reference call (the last good one repeated), so
        # its shape, and with it a target's last bits, does not depend on how many refs failed.
        run = ok + [ok[-1]] * (len(samples) - len(ok))
        tgts, flags = edit_images(self.edit_pipe, [batch[s.cand].modification_text for s in run],
                                  [to_pil(s.ref) for s in run], [s.edit_seed for s in run],
                                  [s.edit_guidance for s in run], [s.image_guidance for s in run], cfg.edit_steps,
                                  cfg.negative_prompt, guidance_scale=cfg.edit_guidance[1],
                                  image_guidance_scale=cfg.image_guidance[1])
        for j, s in enumerate(ok):
            s.tgt = tgts[j]
            if flags is not None and flags[j]:
                s.error = "image_nsfw"

    def settings(self) -> dict:
        """Both models, step counts and schedulers, the dtype and the resolution (pixels) for the record."""
        return {"model": self.model, "steps": self.cfg.steps, "edit_model": self.edit_model,
                "edit_steps": self.cfg.edit_steps, "scheduler": type(self.pipe.scheduler).__name__,
                "edit_scheduler": type(self.edit_pipe.scheduler).__name__, "dtype": dtype_name(self.pipe),
                "resolution": self.images_cfg.resolution}
