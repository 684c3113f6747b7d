"""One candidate triplet as it moves through the stages (captions -> edits -> images -> filters).

Every stage fills its own fields. Randomness is per candidate and per stage (`stage_rng`), so a
candidate's content never depends on batch size, worker count or what other stages draw.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

STAGE_IDS = {"captions": 1, "edits": 2, "images": 3, "filters": 4}


def candidate_seed(seed: int, unit: int, j: int) -> int:
    """The seed of candidate `j` of `unit` under run seed `seed`: a non-negative 63-bit int from numpy's
    `SeedSequence([seed, unit, j])`, so it depends on nothing but those three numbers."""
    state = np.random.SeedSequence([int(seed), int(unit), int(j)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@dataclass
class Candidate:
    """One candidate triplet (reference, modification text, target) and everything the stages record about it:
    captions, scenes, encoded image bytes, scores, pass flags, rejection reason and per-stage seconds."""

    unit: int
    j: int                                  # candidate number within its unit
    seed: int
    source_caption: str = ""
    modification_text: str = ""
    target_caption: str = ""
    edit_type: str = ""
    failure: str | None = None
    source_scene: object = None             # shapes world ground truth (Scene), else None
    target_scene: object = None             # what the target image shows
    intended_scene: object = None           # what the instruction asks for
    reference_image: bytes = b""
    target_image: bytes = b""
    generator: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    passes: dict = field(default_factory=dict)
    reject_reason: str | None = None
    seconds: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        """`<unit>-<j>`, both zero-padded to 6 digits (e.g. `000012-000003`)."""
        return f"{self.unit:06d}-{self.j:06d}"

    @property
    def kept(self) -> bool:
        """True while no stage has rejected the candidate."""
        return self.reject_reason is None

    def rng(self, stage: str) -> np.random.Generator:
        """A fresh generator for `stage`, seeded by (candidate seed, stage id); the same on every call.
        Raises KeyError when `stage` is not one of `STAGE_IDS` (captions, edits, images, filters)."""
        return np.random.default_rng([self.seed, STAGE_IDS[stage]])

    def reject(self, reason: str) -> None:
        """Mark the candidate rejected for `reason`; the first reason sticks, later ones are ignored."""
        if self.reject_reason is None:
            self.reject_reason = reason
