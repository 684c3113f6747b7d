"""What the diffusers image backends share: per-sample draws from the candidate's seeded rng,
batched pipeline calls with bisection on runtime errors, NaN/black checks, retries, best-of-k
selection by directional similarity, encoding and the `c.generator["images"]` record.

A *sample* is one (reference, target) image pair of a candidate; a candidate gets
`samples_per_prompt` of them and keeps the best. Samples of all candidates in a stage batch are
generated together, `pairs_per_call` pairs per pipeline call.

Records do not depend on `pipeline.batch_size` or the worker layout: every call has exactly
`pairs_per_call` pairs (a short one is padded with copies whose output is thrown away), the
pipeline's guidance scalar is the recipe's upper bound (not the call's maximum), and CPU calls run
on a fixed thread count. A sample's images still depend on `pairs_per_call` itself (part of the
recipe) and, after a runtime error (e.g. CUDA OOM) made a call split in halves, on that split.
Padding costs compute: choose `pairs_per_call` to divide `batch_size * samples_per_prompt`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from ..base.threads import record_threads
from ..candidate import Candidate
from ..recipe import GenRecipe
from ..world.render import encode
from .generate import check_image, to_pil

log = logging.getLogger(__name__)

SEED_RANGE = 2**31            # seeds stay int32-safe for other tools
REJECT_ORDER = ("image_nan", "image_nsfw", "image_error")   # which failure names a rejected candidate


class DirectionalScorer(Protocol):
    """What best-of-k selection needs from a scorer (e.g. `datagen.clip_scores`' CLIP scorer)."""

    def directional(self, ref_images: list[Image.Image], tgt_images: list[Image.Image],
                    src_captions: list[str], tgt_captions: list[str]) -> np.ndarray:
        """IP2P directional similarity of n pairs, cos(E_img1 - E_img0, E_txt1 - E_txt0) in [-1, 1]:
        [n] scores (NaN allowed: that sample ranks last)."""
        ...


@dataclass
class Sample:
    """One (reference, target) image pair of a candidate: its draws, its outcome and its images."""

    cand: int                                 # candidate's position in the stage batch
    index: int                                # sample number within the candidate
    attempt: int                              # 0, then 1.. for retries of a failed sample
    seed: int
    guidance: float
    p: float | None = None                    # paired: fraction of steps with shared self-attention
    shared_steps: int | None = None
    edit_seed: int | None = None              # edit: the instruction-editing call
    edit_guidance: float | None = None
    image_guidance: float | None = None
    directional: float | None = None
    error: str | None = None
    detail: str | None = None
    ref: np.ndarray | None = None
    tgt: np.ndarray | None = None

    def record(self) -> dict:
        """The sample's entry in the `c.generator["images"]` record: fields that are set, less `cand`, `ref`, `tgt`."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("cand", "ref", "tgt") and getattr(self, f.name) is not None}


def uniform(rng: np.random.Generator, lo_hi: Sequence[float]) -> float:
    """One draw from U(lo, hi), `lo_hi` = (lo, hi), rounded to 4 decimals."""
    # Rounded before use, so the recorded value is exactly the one the image was made with.
    return round(float(rng.uniform(lo_hi[0], lo_hi[1])), 4)


class DiffusionImages:
    """Base of `diffusers-paired` and `diffusers-edit`; subclasses implement `draw` and `generate`.

    Raises ValueError when `images.diffusion.samples_per_prompt` > 1 and no `scorer` is given."""

    name = ""

    def __init__(self, recipe: GenRecipe, scorer: DirectionalScorer | None = None):
        self.images_cfg = recipe.images
        self.cfg = recipe.images.diffusion
        self.k = self.cfg.samples_per_prompt
        if self.k > 1 and scorer is None:
            raise ValueError(f"images.diffusion.samples_per_prompt = {self.k} needs a directional scorer to keep "
                             "the best sample: pass scorer=... (e.g. the filters' CLIP scorer) or set it to 1")
        self.scorer = scorer

    # -- subclass interface -------------------------------------------------------------------
    def ready(self, c: Candidate) -> str | None:
        """Why this candidate cannot be generated (missing text), or None."""
        return None if c.source_caption and c.target_caption else "missing source or target caption"

    def draw(self, rng: np.random.Generator, cand: int, index: int, attempt: int) -> Sample:
        """Draw sample `index` (try `attempt`) of candidate `cand` from the candidate's rng: seeds and scales."""
        raise NotImplementedError

    def generate(self, samples: list[Sample], batch: list[Candidate]) -> None:
        """Fill `ref`/`tgt` (float [H, W, 3] in [0, 1], H = W = `images.resolution` pixels) of every sample,
        or set `error`; may raise RuntimeError (the caller then splits the call in halves)."""
        raise NotImplementedError

    def settings(self) -> dict:
        """The backend's fixed settings (model, steps, scheduler, dtype, ...) for the `c.generator["images"]` record."""
        raise NotImplementedError

    # -- the stage ----------------------------------------------------------------------------
    def __call__(self, batch: list[Candidate]) -> None:
        rngs = [c.rng("images") for c in batch]
        todo = []
        for i, c in enumerate(batch):
            why = self.ready(c)
            if why:
                c.generator["images"] = {"backend": self.name, "error": why}
                c.reject("image_error")
            else:
                todo.append(i)
        current = {(i, s): self.draw(rngs[i], i, s, 0) for i in todo for s in range(self.k)}
        history: list[Sample] = []
        pending = list(current.values())
        for attempt in range(self.cfg.retries + 1):
            self._run(pending, batch)
            failed = [s for s in pending if s.error]
            if not failed or attempt == self.cfg.retries:
                break
            history += failed
            pending = [self.draw(rngs[s.cand], s.cand, s.index, attempt + 1) for s in failed]
            current.update({(s.cand, s.index): s for s in pending})
        self._score(list(current.values()), batch)
        for i in todo:
            self._store(batch[i], [current[i, s] for s in range(self.k)], [s for s in history if s.cand == i])

    def _run(self, samples: list[Sample], batch: list[Candidate]) -> None:
        n = max(1, self.cfg.pairs_per_call)
        for j in range(0, len(samples), n):
            self._call(samples[j:j + n], batch, n)

    def _call(self, chunk: list[Sample], batch: list[Candidate], rows: int | None = None) -> None:
        """Generate `chunk`, padded to `rows` samples (copies of the last one, discarded): kernels
        pick their algorithm and blocking by batch shape, so a short call (the end of a stage
        batch, retries, a batch_size of 1) would give other last bits than a full one."""
        pad = [replace(chunk[-1]) for _ in range((rows or 0) - len(chunk))]
        try:
            # On the CPU, a fixed thread count: images must not depend on the worker layout.
            with record_threads(getattr(getattr(self, "pipe", None), "device", "cpu")):
                self.generate(chunk + pad, batch)
        except RuntimeError as e:       # CUDA OOM, kernel or numeric errors: isolate the culprit by halving
            self._free_memory()
            for s in chunk:
                s.ref = s.tgt = s.error = None
            if len(chunk) > 1:
                h = len(chunk) // 2
                self._call(chunk[:h], batch)
                self._call(chunk[h:], batch)
                return
            if pad:                     # maybe the padding did not fit: try the sample alone
                self._call(chunk, batch)
                return
            s = chunk[0]
            s.error, s.detail = "image_error", f"{type(e).__name__}: {e}"[:300]
            log.warning("image stage: candidate %s sample %d failed: %s", batch[s.cand].id, s.index, s.detail)
            return
        for s in chunk:
            if s.error is None:
                s.error = check_image(s.ref) or check_image(s.tgt)

    @staticmethod
    def _free_memory() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _score(self, samples: list[Sample], batch: list[Candidate]) -> None:
        ok = [s for s in samples if s.error is None]
        if self.k == 1 or not ok:
            return
        scores = np.asarray(self.scorer.directional(
            [to_pil(s.ref) for s in ok], [to_pil(s.tgt) for s in ok],
            [batch[s.cand].source_caption for s in ok], [batch[s.cand].target_caption for s in ok]),
            dtype=np.float64).reshape(-1)
        if len(scores) != len(ok):
            raise ValueError(f"scorer.directional returned {len(scores)} scores for {len(ok)} pairs")
        for s, v in zip(ok, scores):
            s.directional = round(float(v), 6) if np.isfinite(v) else None

    def _store(self, c: Candidate, samples: list[Sample], failed: list[Sample]) -> None:
        rec = {"backend": self.name, **self.settings(),
               "samples": [s.record() for s in sorted(failed + samples, key=lambda s: (s.index, s.attempt))]}
        c.generator["images"] = rec
        good = [s for s in samples if s.error is None]
        if not good:
            errors = {s.error for s in samples}
            c.reject(next(r for r in REJECT_ORDER if r in errors))
            return
        # Best by directional similarity (k > 1; a sample the scorer gave NaN ranks last), else the only one.
        best = max(good, key=lambda s: -np.inf if s.directional is None else s.directional)
        try:
            fmt = self.images_cfg.format
            ref, tgt = encode(to_pil(best.ref), fmt), encode(to_pil(best.tgt), fmt)
        except Exception as e:          # noqa: BLE001 -- any encoder failure is this candidate's reject
            rec["error"] = f"encode: {type(e).__name__}: {e}"[:300]
            c.reject("image_error")
            return
        c.reference_image, c.target_image = ref, tgt
        rec.update({"sample": best.index, **{k: v for k, v in best.record().items() if k != "index"}})
