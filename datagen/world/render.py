"""PIL renderer for shapes-world scenes, with nuisance variation.

Each object is drawn in its grid cell with a jitter, rotation and scale drawn from its own `pose`
seed, so an edit that keeps an object keeps its pose (like paired diffusion from shared latents).
Per-image colour jitter and pixel noise come from the image seed.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .scene import Obj, Scene

RGB = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225),
    "yellow": (240, 210, 40), "purple": (145, 60, 185), "orange": (250, 140, 30),
    "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128),
}
# Radius as a fraction of the cell size. Large is ~1.6x small: far enough apart to be learnable
# at 64 px, small still spanning more than one 8-px patch there.
RADIUS = {"small": 0.27, "large": 0.43}


@dataclass(frozen=True)
class RenderConfig:
    """Rendering of shapes-world images (`render`): size in pixels and the nuisance ranges."""

    resolution: int = 128
    jitter: float = 0.08       # max centre offset, fraction of the cell
    rotation: float = 12.0     # max rotation in degrees (a diamond stays distinct from a square)
    scale_jitter: float = 0.08
    color_jitter: int = 12     # max per-channel offset
    noise: float = 4.0         # std of the uniform pixel noise (0-255 scale)


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    if shape == "square":
        s = 0.8
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    if shape == "cross":
        w, e = 0.32, 0.95
        return [(-w, -e), (w, -e), (w, -w), (e, -w), (e, w), (w, w), (w, e), (-w, e),
                (-w, w), (-e, w), (-e, -w), (-w, -w)]
    raise ValueError(f"unknown shape {shape!r}")


_POLYS = {s: _unit_polygon(s) for s in ("square", "triangle", "diamond", "star", "cross")}


def _jitter_rgb(rgb, rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    if amount <= 0:
        return rgb
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(min(255, max(0, c + int(x)))) for c, x in zip(rgb, d))


def _draw_obj(draw: ImageDraw.ImageDraw, obj: Obj, cfg: RenderConfig, fill) -> None:
    cell = cfg.resolution / 3.0
    pose = np.random.default_rng(obj.pose)
    dx, dy = pose.uniform(-cfg.jitter, cfg.jitter, size=2) * cell
    angle = math.radians(pose.uniform(-cfg.rotation, cfg.rotation))
    scale = 1.0 + pose.uniform(-cfg.scale_jitter, cfg.scale_jitter)
    r = RADIUS[obj.size] * cell * scale
    cx = (obj.cell % 3 + 0.5) * cell + dx
    cy = (obj.cell // 3 + 0.5) * cell + dy
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    ca, sa = math.cos(angle), math.sin(angle)
    pts = [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in _POLYS[obj.shape]]
    draw.polygon(pts, fill=fill)


def render(scene: Scene, seed: int, cfg: RenderConfig = RenderConfig()) -> Image.Image:
    """Render `scene` as an RGB image; the same (scene, seed, cfg) gives the same pixels.

    The image is `cfg.resolution` x `cfg.resolution` pixels, 3x3 cells. KeyError for a colour,
    background, size or shape not in `RGB` / `RADIUS` / the known shapes."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (cfg.resolution, cfg.resolution),
                    _jitter_rgb(RGB[scene.background], rng, cfg.color_jitter))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_obj(draw, obj, cfg, _jitter_rgb(RGB[obj.color], rng, cfg.color_jitter))
    if cfg.noise > 0:
        # Uniform integer noise with the configured std: 4x cheaper than Gaussian, same role.
        a = max(1, round(cfg.noise * math.sqrt(3)))
        arr = np.asarray(img, dtype=np.int16)
        arr += rng.integers(-a, a + 1, size=arr.shape, dtype=np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def encode(img: Image.Image, fmt: str = "png") -> bytes:
    """Deterministic image bytes: JPEG q95 (fast, small; IP2P ships JPEG), PNG or WebP lossless.
    `fmt`: "png", "jpeg"/"jpg" or "webp"; ValueError for another."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    elif fmt in ("jpeg", "jpg"):
        img.save(buf, format="JPEG", quality=95)
    elif fmt == "webp":
        img.save(buf, format="WEBP", lossless=True, method=0)
    else:
        raise ValueError(f"unknown image format {fmt!r} (png, jpeg, webp)")
    return buf.getvalue()
