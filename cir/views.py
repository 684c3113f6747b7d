"""Augmented views for stage I, made once per image and cached with its features.

TSCIR (`src/data.py`) trains stage I on two random views of each image per step: a *reference*
view (RandomResizedCrop scale 0.8-1.0 + horizontal flip) that makes the pseudo-word token, and a
*target* view (RandomResizedCrop scale 0.9-1.0) that it must match. Re-drawing views every epoch
would mean running the frozen image tower every epoch, which the feature cache exists to avoid.
So cirgen draws a fixed number of views of each kind per image (default 2 + 2), each from its own
seed (dataset seed, image id, kind, view index), caches their features like any image, and every
step picks one reference and one target view per image at random (seeded by epoch and item). With
V views per kind, an image is seen in V x V view pairs; the image tower runs 2V times per image in
all instead of 2 x epochs times.

Augmentation is switched off only by `augment: false`, which the stage-I log says aloud.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from PIL import Image


@dataclass
class ViewsConfig:
    """The `views` section of a stage-I recipe: the cached augmented views per image (TSCIR's reference and
    target crops), used by stage I (`cir.stage1`) to make the views whose features it caches."""

    augment: bool = True              # false: both views are the image itself (logged)
    reference: int = 2                # cached reference views per image
    target: int = 2                   # cached target views per image
    reference_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])   # RandomResizedCrop area
    target_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    reference_flip: bool = True       # horizontal flip, p = 0.5 (reference view only, as released)

    def validate(self) -> None:
        """Raise ValueError unless both view counts are >= 1 and each scale is [low, high] with
        0 < low <= high <= 1 (`from_dict` turns it into a ConfigError)."""
        if self.reference < 1 or self.target < 1:
            raise ValueError("views.reference and views.target must be >= 1")
        for name in ("reference_scale", "target_scale"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
                raise ValueError(f"views.{name}: expected [low, high] with 0 < low <= high <= 1, got {lo_hi}")


def view_seed(dataset_seed: int, image_id: str, kind: str, index: int) -> int:
    """A 63-bit seed for one view, stable across processes and platforms."""
    h = hashlib.sha256(f"{dataset_seed}|{image_id}|{kind}|{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def make_view(img: Image.Image, seed: int, scale: list[float], flip: bool) -> Image.Image:
    """RandomResizedCrop(scale, ratio 3/4-4/3) back to the image's size, then (if `flip`) a
    horizontal flip with p = 0.5, drawn from `seed` only (torchvision's transforms under a forked,
    seeded torch RNG, so the global RNG is untouched)."""
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop((img.height, img.width), scale=tuple(scale), antialias=True)]
    if flip:
        ops.append(v2.RandomHorizontalFlip(0.5))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return v2.Compose(ops)(img)
