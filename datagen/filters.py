"""Filters: score every candidate, record pass/fail per criterion, reject with a reason.

Every score and every pass/fail is stored on the triplet (kept or rejected), so quality can be
re-cut later without regenerating. Order (`build_filters`): text, CLIP, contamination, dedupe;
each filter scores every candidate it is given, and a candidate's reject reason is the first
failed criterion in that order. Dedupe runs last so only fully kept triplets enter its index.

A filter has `name`, `score_columns` (float, `score_*`), `pass_columns` (bool, `pass_*`) and
`__call__(batch)`, which writes `c.scores` / `c.passes` and calls `c.reject(reason)`.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable

import numpy as np

from .candidate import Candidate
from .recipe import ClipFilterConfig, ClipThresholds, GenRecipe

if TYPE_CHECKING:
    from .clip_scores import ClipScorer

_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (the IP2P no-op comparison)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


class TextFilter:
    """Rejects empty or over-long modification texts and no-op edits (edited caption == input)."""

    name = "text"
    score_columns: list[str] = []
    pass_columns = ["pass_text"]

    def __init__(self, recipe: GenRecipe):
        self.max_words = recipe.filters.text.max_words

    def check(self, c: Candidate) -> str | None:
        """The reject reason for `c`, or None: `text_empty` (no words in the modification text, or an empty
        target caption), `text_too_long` (more than `filters.text.max_words` whitespace-separated words) or
        `text_noop` (target caption equals the source caption after `normalise`)."""
        words = c.modification_text.split()
        if not words:
            return "text_empty"
        if len(words) > self.max_words:
            return "text_too_long"
        if not c.target_caption.strip():
            return "text_empty"
        if normalise(c.target_caption) == normalise(c.source_caption):
            return "text_noop"
        return None

    def __call__(self, batch: list[Candidate]) -> None:
        for c in batch:
            reason = self.check(c)
            c.passes["pass_text"] = reason is None
            if reason:
                c.reject(reason)


# criterion -> (score columns it compares, pass column); the order is the reject order.
CLIP_CRITERIA = {
    "img_img": (["score_clip_img_img"], "pass_clip_img_img"),
    "img_cap": (["score_clip_img_cap_ref", "score_clip_img_cap_tgt"], "pass_clip_img_cap"),
    "dir": (["score_clip_dir"], "pass_clip_dir"),
    "instr_tgt": (["score_clip_instr_tgt"], "pass_clip_instr_tgt"),
}


def clip_thresholds(recipe: GenRecipe) -> ClipThresholds:
    """The thresholds of the recipe's quality tier (`filters.clip.tiers`), else the default set."""
    c = recipe.filters.clip
    return c.tiers.get(recipe.quality.tier, c.thresholds)


class ClipFilter:
    """IP2P's CLIP filter: image-image, image-caption (both images) and directional similarity,
    plus CompoDiff's instruction-vs-target score when asked. Pass = score >= threshold (raw cosines in
    [-1, 1], compared in float32); a null threshold stores the score without a pass column. Reject reason:
    `clip_<first failed>`. Source: InstructPix2Pix (Brooks et al., 2023) section 3.1.

    The scorer is built at the first batch (in the worker process that uses it) and shared with
    anything else in that process that asks `shared_scorer` for the same model (best-of-k)."""

    name = "clip"

    def __init__(self, recipe: GenRecipe, scorer=None):
        self.cfg = recipe.filters.clip
        self.thresholds = clip_thresholds(recipe)
        self._scorer = scorer
        self.use_instruction = self.cfg.score_instruction or self.thresholds.instr_tgt is not None
        active = [k for k in CLIP_CRITERIA if k != "instr_tgt" or self.use_instruction]
        self.score_columns = [col for k in active for col in CLIP_CRITERIA[k][0]]
        self.pass_columns = [CLIP_CRITERIA[k][1] for k in active if getattr(self.thresholds, k) is not None]

    @property
    def scorer(self):
        """The scorer given at construction, else the process's shared one (`load_scorer`, built on first use;
        raises ConfigError when CLIP cannot load)."""
        if self._scorer is None:
            self._scorer = load_scorer(self.cfg)
        return self._scorer

    def __call__(self, batch: list[Candidate]) -> None:
        s = self.scorer.pair_scores([c.reference_image for c in batch], [c.target_image for c in batch],
                                    [c.source_caption for c in batch], [c.target_caption for c in batch],
                                    [c.modification_text for c in batch] if self.use_instruction else None)
        info = {"model": getattr(self.scorer, "model_id", "?"), "device": getattr(self.scorer, "device", "cpu")}
        for i, c in enumerate(batch):
            for col in self.score_columns:
                c.scores[col] = float(s[col.removeprefix("score_clip_")][i])
            first_failed = None
            for k, (cols, pcol) in CLIP_CRITERIA.items():
                t = getattr(self.thresholds, k)
                if pcol not in self.pass_columns:
                    continue
                # In float32, the scores' precision (0.7 as a score passes 0.7); NaN never passes.
                ok = all(np.float32(c.scores[col]) >= np.float32(t) for col in cols)
                c.passes[pcol] = bool(ok)
                if not ok and first_failed is None:
                    first_failed = k
            c.generator.setdefault("filters", {})["clip"] = info
            if info["device"] != "cpu":
                c.generator["filters"]["device"] = info["device"]
            if first_failed:
                c.reject(f"clip_{first_failed}")


def load_scorer(cfg: ClipFilterConfig) -> "ClipScorer":
    """The process's shared scorer for `filters.clip`, with a clear error when it cannot load.

    Raises ConfigError when loading fails with RuntimeError, OSError or ValueError (which includes cirgen's
    InputError, InputNotFound, MachineError and DeviceError), naming the model and `pretrained`.
    """
    from .base.clip_loader import SHAPES_CLIP, shipped_weights
    from .clip_scores import shared_scorer
    from .base.config import ConfigError

    if cfg.model == SHAPES_CLIP and cfg.pretrained is None and not cfg.random_init \
            and not shipped_weights().exists():
        raise ConfigError(f"filters.clip: shapes-CLIP weights not found at {shipped_weights()}; train them "
                          f"with `cirgen pretrain-clip`, or set filters.clip.pretrained to a weights file")
    try:
        return shared_scorer(cfg.model, cfg.pretrained, cfg.device, cfg.batch_size, cfg.random_init)
    except (RuntimeError, OSError, ValueError) as e:
        raise ConfigError(f"filters.clip: cannot load CLIP {cfg.model!r} (pretrained {cfg.pretrained!r}): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def build_filters(recipe: GenRecipe, scorer=None) -> list:
    """The recipe's filters in reject order. `scorer` replaces the CLIP model (tests, a CLI that
    already holds one); otherwise CLIP loads lazily, once per process, at the first batch."""
    from .contamination import ContaminationFilter
    from .dedupe import DedupeFilter

    f = recipe.filters
    filters: list = []
    if f.text.enabled:
        filters.append(TextFilter(recipe))
    clip = ClipFilter(recipe, scorer) if f.clip.enabled else None
    if clip is not None:
        filters.append(clip)
    if f.contamination.enabled:
        filters.append(ContaminationFilter.from_recipe(recipe, _scorer_factory(recipe, clip, scorer)))
    if f.dedupe.enabled:
        filters.append(DedupeFilter.from_recipe(recipe))
    return filters


def _scorer_factory(recipe: GenRecipe, clip: ClipFilter | None, scorer) -> Callable:
    if clip is not None:
        return lambda: clip.scorer
    return lambda: scorer if scorer is not None else load_scorer(recipe.filters.clip)
