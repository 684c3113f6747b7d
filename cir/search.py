"""Retrieval API: index a folder of images once (features cached), query with (image, text).

Images are read by the project's one loader (through `RunModel`: EXIF orientation, 16-bit,
transparency on white) and their features cached by content, so a changed file is re-encoded."""
from __future__ import annotations

from pathlib import Path

import torch

from datagen.base.errors import InputNotFound

from .model import RunModel, load_run
from .prompts import fill_template

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class GalleryIndex:
    """A gallery's image files and their unit-norm global features [N, D] (N images, D = the CLIP embedding
    width), with the run model that encodes queries against them."""

    def __init__(self, model: RunModel, paths: list[Path], features: torch.Tensor):
        self.model, self.paths, self.features = model, paths, features

    @classmethod
    def build(cls, run: str | Path, gallery: str | Path, model: RunModel | None = None,
              device: str = "auto") -> "GalleryIndex":
        """Index every image file under `gallery` (recursively, sorted) with the run's model loaded on
        `device` (auto = the GPU when there is one; see `load_run`). Raises InputError when `gallery` is not a
        folder, InputNotFound when it holds no image file (by suffix), and `load_run`'s errors."""
        from datagen.base.errors import InputError

        gallery = Path(gallery)
        if not gallery.is_dir():
            raise InputError(f"{gallery}: gallery folder not found")
        paths = sorted(p for p in gallery.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise InputNotFound(f"{gallery}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        model = model or load_run(run, device)
        return cls(model, paths, model.encode_images(paths))

    @torch.no_grad()
    def query(self, image: str | Path, text: str, top_k: int = 10,
              prompt: str = "a photo of * that {}") -> list[tuple[Path, float]]:
        """The `top_k` gallery images nearest the composed query (reference `image`, modification `text` in
        `prompt`'s `{}`; `*` is the pseudo-word), best first, as (path, cosine similarity in [-1, 1] rounded to
        6 places). Raises PromptError when `prompt` has no placeholder (or more than one) before `{}`."""
        # The template's placeholder takes the pseudo-word; a `*` or `$` in `text` stays text.
        q = self.model.encode_queries([Path(image)], [fill_template(prompt, text)])
        scores = (q @ self.features.T)[0]
        top = scores.topk(min(top_k, len(self.paths)))
        return [(self.paths[int(i)], round(float(s), 6)) for s, i in zip(top.values, top.indices)]
