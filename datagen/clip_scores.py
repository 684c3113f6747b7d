"""CLIP scores for filtering and best-of-k: image-image, image-text, text-text and directional.

Conventions (InstructPix2Pix's CLIP filter, Brooks et al., CVPR 2023): raw float32 cosines (not `100*cos`, not clamped),
features L2-normalised *before* any difference is taken, so directional similarity is IP2P's
`cos(E_img1 - E_img0, E_txt1 - E_txt0)`. A zero difference (identical images or captions) gives 0,
as `torch.nn.functional.cosine_similarity` does, never NaN.

One `ClipScorer` wraps one `LoadedClip` (datagen.base.clip_loader, the project's only loader). Build it
once per process and reuse it: `shared_scorer(...)` caches one per (model, weights, device) and per
process id, so a forked worker never inherits the parent's (possibly CUDA) model. torch is
imported lazily: `import datagen.pipeline` stays torch-free.

Scores do not depend on the process layout: the model is called on fixed-size row blocks
(`_fixed_rows`, whatever the batch sizes) and, on the CPU, on `RECORD_THREADS` threads whatever
the worker count (`datagen.base.threads`).
"""
from __future__ import annotations

import os
import sys
from typing import Sequence, Union

import numpy as np
from PIL import Image

from .base.device import resolve_device
from .base.threads import record_threads

ImageLike = Union[bytes, bytearray, "Image.Image", np.ndarray]


def to_pil(image: ImageLike) -> Image.Image:
    """Encoded bytes (any PIL format), a PIL image or an HxWx3 uint8 array -> RGB PIL image.

    Bytes go through the project's image loader (`datagen.base.images.open_image`: EXIF
    orientation, 16-bit, transparency on white; `ImageError` when unreadable). An HF `Image()` cell
    (a dict with `bytes`) is read the same way; any other type raises TypeError."""
    from datagen.base.images import open_image, to_rgb

    if isinstance(image, (bytes, bytearray, memoryview)):
        return open_image(bytes(image))
    if isinstance(image, dict) and "bytes" in image:   # an HF Image() cell
        return open_image(image["bytes"])
    if isinstance(image, np.ndarray):
        img = Image.fromarray(image)
    elif isinstance(image, Image.Image):
        img = image
    else:
        raise TypeError(f"cannot read an image from {type(image).__name__}")
    return img if img.mode == "RGB" else to_rgb(img)


def _broadcast(texts: str | Sequence[str], n: int) -> list[str]:
    return [texts] * n if isinstance(texts, str) else list(texts)


class ClipScorer:
    """Batched, no-grad CLIP similarities on one model. The similarity methods and `image_features` return
    float32 numpy; `encode_images` / `encode_texts` return torch tensors on the scorer's device."""

    def __init__(self, clip, batch_size: int = 64):
        import torch

        self.clip = clip
        self.model = clip.model
        self.batch_size = max(1, int(batch_size))
        self.device = str(next(self.model.parameters()).device)
        self._torch = torch

    @classmethod
    def load(cls, name: str, pretrained: str | None = None, device: str = "auto",
             batch_size: int = 64, random_init: bool = False) -> "ClipScorer":
        """A scorer on `load_clip(name, pretrained, device)` (`device`: a recipe device name, `auto` resolved).
        `random_init`: random weights from torch seed 0, without touching the caller's RNG. Raises DeviceError for
        an unusable device and `load_clip`'s errors (InputNotFound, InputError, MachineError) for bad weights."""
        _guard_forked_openmp()
        import torch

        from .base.clip_loader import load_clip

        if not random_init:
            return cls(load_clip(name, pretrained, str(resolve_device(device))), batch_size)
        # Random weights from a fixed seed, without touching the caller's RNG: every worker
        # process then scores with the same model, so the data never depends on worker count.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return cls(load_clip(name, pretrained, str(resolve_device(device)), random_init=True), batch_size)

    @property
    def model_id(self) -> str:
        """Model name and weights hash: what a stored score was computed with."""
        return f"{self.clip.name}@{self.clip.weights_id}"

    # ------------------------------------------------------------------ features (L2-normalised)

    def encode_images(self, images: Sequence[ImageLike]):
        """[n, d] float32 unit vectors (torch) on the scorer's device; n images, d = CLIP embedding width.
        Raises ImageError for unreadable image bytes."""
        torch = self._torch
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                x = torch.stack([self.clip.preprocess(to_pil(im)) for im in images[i:i + self.batch_size]])
                with record_threads(self.device):
                    f = _fixed_rows(self.model.encode_image, x.to(self.device)).float()
                out.append(torch.nn.functional.normalize(f, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self._dim(), device=self.device)

    def encode_texts(self, texts: Sequence[str]):
        """[n, d] float32 unit vectors (torch) on the scorer's device; each distinct string is encoded once
        per call."""
        torch = self._torch
        uniq = list(dict.fromkeys(texts))
        feats = []
        with torch.no_grad():
            for i in range(0, len(uniq), self.batch_size):
                tok = self.clip.tokenizer(uniq[i:i + self.batch_size])
                with record_threads(self.device):
                    f = _fixed_rows(self.model.encode_text, tok.to(self.device)).float()
                feats.append(torch.nn.functional.normalize(f, dim=-1))
        if not feats:
            return torch.zeros(0, self._dim(), device=self.device)
        table = torch.cat(feats)
        where = {t: k for k, t in enumerate(uniq)}
        return table[torch.tensor([where[t] for t in texts], device=self.device)]

    def image_features(self, images: Sequence[ImageLike]) -> np.ndarray:
        """[n, d] float32 unit vectors as numpy (e.g. a gallery to cache); `images` must not be empty
        (an empty list raises ValueError in the reshape)."""
        return self._np(self.encode_images(images)).reshape(len(images), -1)

    def _dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        return int(proj.shape[-1]) if proj is not None else 0

    # ------------------------------------------------------------------ similarities

    @staticmethod
    def _rowcos(a, b):
        return (a * b).sum(-1)

    def _dircos(self, i0, i1, t0, t1):
        # Differences of unit vectors; eps as in F.cosine_similarity so a zero change gives 0.
        di, dt = i1 - i0, t1 - t0
        denom = (di.norm(dim=-1) * dt.norm(dim=-1)).clamp_min(1e-8)
        return (di * dt).sum(-1) / denom

    @staticmethod
    def _np(x) -> np.ndarray:
        return x.detach().float().cpu().numpy().astype(np.float32)

    def image_image(self, a: Sequence[ImageLike], b: Sequence[ImageLike]) -> np.ndarray:
        """cos(E(a_i), E(b_i)) row by row: [n] float32 cosine similarities in [-1, 1].
        Raises ValueError when `a` and `b` differ in length."""
        _check_len(a, b)
        with record_threads(self.device):
            return self._np(self._rowcos(self.encode_images(a), self.encode_images(b)))

    def image_text(self, images: Sequence[ImageLike], texts: str | Sequence[str]) -> np.ndarray:
        """cos(E(image_i), E(text_i)) row by row (a single string is paired with every image): [n] float32
        cosines in [-1, 1]. Raises ValueError when `texts` is a list of another length."""
        texts = _broadcast(texts, len(images))
        _check_len(images, texts)
        with record_threads(self.device):
            return self._np(self._rowcos(self.encode_images(images), self.encode_texts(texts)))

    def text_text(self, a: str | Sequence[str], b: Sequence[str]) -> np.ndarray:
        """cos(E(a_i), E(b_i)) row by row, e.g. CompoDiff's keyword similarity band: [n] float32 cosines
        in [-1, 1]. Raises ValueError when `a` is a list of another length than `b`."""
        a = _broadcast(a, len(b))
        _check_len(a, b)
        with record_threads(self.device):
            return self._np(self._rowcos(self.encode_texts(a), self.encode_texts(b)))

    def directional(self, ref_images: Sequence[ImageLike], tgt_images: Sequence[ImageLike],
                    src_captions: str | Sequence[str], tgt_captions: str | Sequence[str]) -> np.ndarray:
        """IP2P directional similarity cos(E_img1 - E_img0, E_txt1 - E_txt0) per row.

        Captions may be single strings (shared by all rows): the best-of-k case, k samples of one
        prompt pair. Ranking k samples by this score is what IP2P's `--max-out-samples` does.
        Returns [n] float32 cosines in [-1, 1] (0 when either difference is zero). Source: directional CLIP
        similarity of StyleGAN-NADA (Gal et al., 2022), as used by InstructPix2Pix (Brooks et al., 2023).
        Raises ValueError when the inputs differ in length.
        """
        n = len(ref_images)
        src, tgt = _broadcast(src_captions, n), _broadcast(tgt_captions, n)
        _check_len(ref_images, tgt_images, src, tgt)
        with record_threads(self.device):
            return self._np(self._dircos(self.encode_images(ref_images), self.encode_images(tgt_images),
                                         self.encode_texts(src), self.encode_texts(tgt)))

    def pair_scores(self, ref_images: Sequence[ImageLike], tgt_images: Sequence[ImageLike],
                    src_captions: Sequence[str], tgt_captions: Sequence[str],
                    instructions: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Every filter score of n triplets, each image and text encoded once.

        Keys: img_img, img_cap_ref (reference vs source caption), img_cap_tgt (target vs target
        caption), dir, and instr_tgt (instruction vs target image, CompoDiff) when `instructions`.
        Each value is [n] float32 cosine similarities in [-1, 1]. Raises ValueError when the four required
        sequences differ in length.
        """
        _check_len(ref_images, tgt_images, src_captions, tgt_captions)
        with record_threads(self.device):
            i0, i1 = self.encode_images(ref_images), self.encode_images(tgt_images)
            texts = list(src_captions) + list(tgt_captions) + list(instructions or [])
            t = self.encode_texts(texts)
            n = len(ref_images)
            t0, t1 = t[:n], t[n:2 * n]
            out = {"img_img": self._rowcos(i0, i1), "img_cap_ref": self._rowcos(i0, t0),
                   "img_cap_tgt": self._rowcos(i1, t1), "dir": self._dircos(i0, i1, t0, t1)}
            if instructions is not None:
                out["instr_tgt"] = self._rowcos(i1, t[2 * n:])
            return {k: self._np(v) for k, v in out.items()}


ROWS_PER_CALL = 32


def _fixed_rows(fn, x):
    """`fn` over `x` in calls of exactly ROWS_PER_CALL rows (the last one padded by repeating a row).

    Kernels pick their algorithm and summation order by batch size (a batch of one takes a GEMV
    path; oneDNN convolutions block by batch), so a row's last bits would depend on how rows were
    batched. A fixed call size makes every score independent of the pipeline's and the filter's
    batch sizes; a row never depends on the other rows' values.
    """
    import torch

    out = []
    for j in range(0, len(x), ROWS_PER_CALL):
        part = x[j:j + ROWS_PER_CALL]
        n = len(part)
        if n < ROWS_PER_CALL:
            part = torch.cat([part, part[-1:].expand(ROWS_PER_CALL - n, *part.shape[1:])])
        out.append(fn(part)[:n])
    return torch.cat(out)


def _guard_forked_openmp() -> None:
    """Stay on one torch thread in a worker process that inherited torch from its parent.

    libgomp's thread pool does not survive fork: a forked child of a process that already ran
    a multi-threaded torch op deadlocks in its first parallel region (gomp_team_barrier_wait),
    unless it runs single-threaded. Call before this process first uses torch.
    """
    import multiprocessing as mp

    if mp.parent_process() is not None and "torch" in sys.modules:
        import torch

        torch.set_num_threads(1)


def _check_len(*seqs) -> None:
    lens = {len(s) for s in seqs}
    if len(lens) > 1:
        raise ValueError(f"inputs differ in length: {[len(s) for s in seqs]}")


_SHARED: dict[tuple, ClipScorer] = {}


def shared_scorer(name: str, pretrained: str | None = None, device: str = "auto", batch_size: int = 64,
                  random_init: bool = False) -> ClipScorer:
    """The process's one scorer for this model (the CLIP filter and best-of-k share it).

    The first caller's `batch_size` stays: chunking is part of what a score's last bits depend on.
    Keyed by (process id, name, pretrained, resolved device, random_init). Raises `ClipScorer.load`'s errors.
    """
    dev = str(resolve_device(device))
    key = (os.getpid(), name, pretrained, dev, random_init)
    if key not in _SHARED:
        _SHARED[key] = ClipScorer.load(name, pretrained, dev, batch_size, random_init)
    return _SHARED[key]
