"""Retrieval API: index a folder of images once (features cached), query with (image, text)."""
from __future__ import annotations

from pathlib import Path

import torch

from datagen.base.errors import InputNotFound

from .model import RunModel, load_run

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class GalleryIndex:
    def __init__(self, model: RunModel, paths: list[Path], features: torch.Tensor):
        self.model, self.paths, self.features = model, paths, features

    @classmethod
    def build(cls, run: str | Path, gallery: str | Path, model: RunModel | None = None) -> "GalleryIndex":
        gallery = Path(gallery)
        paths = sorted(p for p in gallery.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise InputNotFound(f"{gallery}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        model = model or load_run(run)
        return cls(model, paths, model.encode_images(paths))

    @torch.no_grad()
    def query(self, image: str | Path, text: str, top_k: int = 10,
              prompt: str = "a photo of $ that {}") -> list[tuple[Path, float]]:
        q = self.model.encode_queries([Path(image)], [prompt.format(text)])
        scores = (q @ self.features.T)[0]
        top = scores.topk(min(top_k, len(self.paths)))
        return [(self.paths[int(i)], round(float(s), 6)) for s, i in zip(top.values, top.indices)]
