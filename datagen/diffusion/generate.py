"""Batched generation calls on diffusers pipelines: text-to-image, paired (shared self-attention),
instruction editing. Each returns float images [n, H, W, 3] in [0, 1] (NaNs kept, so bad outputs
can be detected) and per-image NSFW flags (None when the pipeline has no safety checker).

Determinism: one CPU `torch.Generator` per image, seeded from the sample's seed; both images of a
pair get generators with the *same* seed, so they start from the same latents and, with an
ancestral sampler, receive the same noise at every step. The backends pass the recipe's guidance
upper bounds as the pipeline's scalars, so the per-image rescaling (guidance.py) does not depend
on which samples share a call.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .attention import ShareState, shared_self_attention
from .guidance import guidance_ratios, per_sample_guidance


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU `torch.Generator` per seed, seeded with it."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def _flags(out, n: int) -> list[bool] | None:
    f = getattr(out, "nsfw_content_detected", None)
    return None if f is None else [bool(x) for x in f][:n]


def _pipeline_scale(scales: Sequence[float], fixed: float | None) -> float:
    """The scalar the pipeline is called with: `fixed` (the recipe's upper bound: an image then
    does not depend on which other samples share its call) or, without one, the call's maximum."""
    top = max(float(g) for g in scales)
    if fixed is None:
        return top
    if top > fixed:
        raise ValueError(f"guidance {top} is above the pipeline scale {fixed}")
    return float(fixed)


def text_to_image(pipe, prompts: Sequence[str], seeds: Sequence[int], guidance: Sequence[float], steps: int,
                  height: int, width: int, negative_prompt: str = "",
                  share: ShareState | None = None,
                  guidance_scale: float | None = None) -> tuple[np.ndarray, list[bool] | None]:
    """One batched call of a text-to-image pipeline (SD 1.x/2.x, SDXL), guidance per image.
    `guidance_scale`: the pipeline's scalar (>= every per-image scale); default their maximum.

    n = len(prompts); `height`/`width` in pixels. Returns (images float32 [n, H, W, 3] in [0, 1], NSFW
    flags [n] or None). Raises ValueError when a per-image scale is above `guidance_scale`."""
    n = len(prompts)
    g_max = _pipeline_scale(guidance, guidance_scale)
    kw = {}
    if share is not None:
        kw["callback_on_step_end"] = share.callback
    if negative_prompt:       # else the pipeline's own default (SDXL: zero embeddings)
        kw["negative_prompt"] = [negative_prompt] * n
    with ExitStack() as stack:
        if share is not None:
            stack.enter_context(shared_self_attention(pipe.unet, share))
        if g_max > 1:
            stack.enter_context(per_sample_guidance(pipe.unet, guidance_ratios(guidance, g_max)))
        out = pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=g_max, height=height,
                   width=width, generator=generators(seeds), output_type="np", **kw)
    return np.asarray(out.images, dtype=np.float32), _flags(out, n)


def generate_pairs(pipe, sources: Sequence[str], targets: Sequence[str], seeds: Sequence[int],
                   fractions: Sequence[float], guidance: Sequence[float], steps: int, height: int, width: int,
                   mode: str = "attention", negative_prompt: str = "", guidance_scale: float | None = None):
    """IP2P paired generation of n pairs in one call. Returns (sources [n,H,W,3], targets, nsfw flags
    [n] or None, shared steps per pair).

    Images float32 in [0, 1]; a pair is flagged if either image is. Raises ValueError for an unknown
    `mode` or a per-pair scale above `guidance_scale`."""
    prompts = [p for pair in zip(sources, targets) for p in pair]      # adjacent pairs, see attention.py
    share = ShareState(fractions, mode)
    imgs, flags = text_to_image(pipe, prompts, [s for s in seeds for _ in (0, 1)],
                                [g for g in guidance for _ in (0, 1)], steps, height, width, negative_prompt, share,
                                guidance_scale)
    pair_flags = None if flags is None else [a or b for a, b in zip(flags[0::2], flags[1::2])]
    return imgs[0::2], imgs[1::2], pair_flags, share.shared_steps(steps)


def edit_images(pipe, instructions: Sequence[str], images: Sequence[Image.Image], seeds: Sequence[int],
                guidance: Sequence[float], image_guidance: Sequence[float], steps: int,
                negative_prompt: str = "", guidance_scale: float | None = None,
                image_guidance_scale: float | None = None) -> tuple[np.ndarray, list[bool] | None]:
    """One batched InstructPix2Pix call; text and image guidance per image (the pipeline's
    scalars: `guidance_scale` / `image_guidance_scale`, default the per-image maxima).

    Returns (images float32 [n, H, W, 3] in [0, 1], NSFW flags [n] or None), n = len(instructions).
    Raises ValueError when a per-image scale is above its pipeline scalar."""
    n = len(instructions)
    g_max = _pipeline_scale(guidance, guidance_scale)
    h_max = _pipeline_scale(image_guidance, image_guidance_scale)
    kw = {"negative_prompt": [negative_prompt] * n} if negative_prompt else {}
    with ExitStack() as stack:
        if g_max > 1 and h_max >= 1:          # the pipeline's own condition for 3-way CFG
            stack.enter_context(per_sample_guidance(pipe.unet, guidance_ratios(guidance, g_max),
                                                    guidance_ratios(image_guidance, h_max, floor=None)))
        out = pipe(prompt=list(instructions), image=list(images), num_inference_steps=steps, guidance_scale=g_max,
                   image_guidance_scale=h_max, generator=generators(seeds), output_type="np", **kw)
    return np.asarray(out.images, dtype=np.float32), _flags(out, n)


def check_image(img: np.ndarray) -> str | None:
    """'image_nan' for non-finite or all-black output (fp16 overflow, safety-checker blackout), else None.

    `img`: float [H, W, 3] in [0, 1]; all-black means max <= 1/255."""
    if not np.isfinite(img).all():
        return "image_nan"
    if float(img.max()) <= 1.0 / 255:
        return "image_nan"
    return None


def to_pil(img: np.ndarray) -> Image.Image:
    """diffusers' own float -> uint8 conversion (numpy_to_pil): [H, W, 3] in [0, 1] -> RGB image."""
    return Image.fromarray((img * 255).round().astype("uint8"))
