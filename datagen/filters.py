"""Filters: score every candidate, record pass/fail per criterion, reject with a reason.

Every score and every pass/fail is stored on the triplet (kept or rejected), so quality can be
re-cut later without regenerating.
"""
from __future__ import annotations

import re

from .candidate import Candidate
from .recipe import GenRecipe

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


def build_filters(recipe: GenRecipe) -> list:
    filters = []
    if recipe.filters.text.enabled:
        filters.append(TextFilter(recipe))
    return filters
