"""Per-sample guidance scales in one batched diffusers call.

diffusers pipelines take one `guidance_scale` per call, but the IP2P recipe draws CFG per sample.
A forward hook on the UNet rewrites the branch predictions so that the pipeline's own scalar
combination yields each sample's scale exactly (up to rounding):

* 2-way CFG [uncond, cond], pipeline `u + G (c - u)`: c' = u + (g_i / G)(c - u).
* IP2P 3-way [text, image, uncond], pipeline `u + G (t - i) + H (i - u)`:
  i' = u + (h_i / H)(i - u), t' = i' + (g_i / G)(t - i).

With G = max_i g_i the ratios are <= 1. A sample with g_i <= 1 gets ratio 1 / G (output = cond,
what diffusers does when CFG is off). Guidance-embedding models (LCM, `time_cond_proj_dim`) read
the scalar and are not covered.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch


def guidance_ratios(scales: Sequence[float], pipeline_scale: float, floor: float | None = 1.0) -> torch.Tensor | None:
    """g_i / G per sample (g_i raised to `floor` first), or None when all ratios are 1.

    Returns a float32 [n] tensor, n = len(scales); G = `pipeline_scale`."""
    r = torch.tensor([(max(float(g), floor) if floor is not None else float(g)) / pipeline_scale
                      for g in scales], dtype=torch.float32)
    return None if bool((r == 1.0).all()) else r


@contextmanager
def per_sample_guidance(unet, text: torch.Tensor | None, image: torch.Tensor | None = None) -> Iterator[None]:
    """Hook the UNet for the block so the pipeline's scalar CFG yields each sample's scale (formulas above).

    `text` / `image`: [n] ratios g_i / G and h_i / H (None: 1; both None: no hook). UNet batches of 2n
    (2-way CFG), 3n (IP2P 3-way) and n (no CFG, left alone) are handled; another batch size makes the
    forward raise RuntimeError."""
    if text is None and image is None:
        yield
        return
    n = len(text) if text is not None else len(image)

    def scale(r: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | float:
        return 1.0 if r is None else r.to(x.device).view(-1, *([1] * (x.ndim - 1)))

    def hook(module, args, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        b = sample.shape[0]
        x = sample.float()
        if b == 2 * n:
            u, c = x.chunk(2)
            new = torch.cat([u, u + scale(text, x) * (c - u)])
        elif b == 3 * n:
            t, i, u = x.chunk(3)
            i2 = u + scale(image, x) * (i - u)
            new = torch.cat([i2 + scale(text, x) * (t - i), i2, u])
        elif b == n:
            return None                       # no CFG in this call: nothing to rescale
        else:
            raise RuntimeError(f"per-sample guidance: UNet batch {b} does not match {n} samples")
        new = new.to(sample.dtype)
        if isinstance(output, tuple):
            return (new,) + tuple(output[1:])
        output.sample = new
        return output

    handle = unet.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
