"""Text stage: (source caption[, scene]) -> (modification text, edited caption).

`rules` on the shapes world edits the ground-truth scene and, for the `low` tier, injects the
failure modes of real generators at the recipe's rates, labelling each triplet. The backends for
real captions (keywords, transformers, vllm, openai) live in `datagen.text`; `build_edits` is the
one registry.
"""
from __future__ import annotations

from .candidate import Candidate
from .base.config import ConfigError
from .recipe import GenRecipe
from .world.editor import FAILURES, inject_failure, sample_edit
from .world.phrases import load_phrases
from .world.scene import is_heldout

_MAX_TRIES = 16


class RulesSceneEditor:
    """The `rules` edit backend: samples an edit of each candidate's ground-truth scene (up to 16 tries for a
    target outside the held-out partition), writes the instruction and target caption, and injects a labelled
    failure at the recipe's `quality.failure_rates`."""

    name = "rules"

    def __init__(self, recipe: GenRecipe):
        self.max_objects = recipe.captions.max_objects
        self.types = tuple(recipe.edits.types)
        self.phrases = load_phrases(recipe.captions.phrases)
        self.rates = [(f, recipe.quality.failure_rates.get(f, 0.0)) for f in FAILURES]

    def _draw_failure(self, u: float) -> str | None:
        acc = 0.0
        for f, r in self.rates:
            acc += r
            if u < acc:
                return f
        return None

    def __call__(self, batch: list[Candidate]) -> None:
        for c in batch:
            rng = c.rng("edits")
            # Edited scenes stay in the training partition, so benchmarks remain disjoint.
            for _ in range(_MAX_TRIES):
                edit = sample_edit(c.source_scene, rng, self.phrases, self.max_objects, self.types)
                if not is_heldout(edit.target):
                    break
            c.edit_type = edit.type
            c.intended_scene = edit.target
            c.target_scene = edit.target
            c.modification_text = edit.instruction
            failure = self._draw_failure(float(rng.random()))
            if failure is not None:
                failure, c.target_scene, c.modification_text = inject_failure(
                    edit, failure, rng, self.phrases, self.max_objects)
            c.failure = failure
            c.target_caption = self.phrases.caption(edit.target, rng)


def build_edits(recipe: GenRecipe):
    """The text-stage backend of the recipe (the one registry of edit backends):

    rules         shapes-world scene edits (needs captions.source: shapes)
    keywords      keyword substitution in real captions, CompoDiff-style (no model)
    transformers  any causal LM through transformers (CPU/GPU)
    vllm          offline batched vLLM with JSON-schema output (the `vllm` extra)
    openai        any OpenAI-compatible server, e.g. `vllm serve`

    Raises ConfigError for `rules` without `captions.source: shapes`, ValueError for an unknown backend.
    """
    backend = recipe.edits.backend
    if backend == "rules":
        if recipe.captions.source != "shapes":
            raise ConfigError(f"edits.backend rules edits shapes-world scenes, but captions.source is "
                              f"{recipe.captions.source!r}; use keywords or an LLM backend for real captions")
        return RulesSceneEditor(recipe)
    if backend == "keywords":
        from .text.keywords import KeywordEditor
        return KeywordEditor(recipe)
    if backend in ("transformers", "vllm", "openai"):
        from .text.llm import LLMEditor
        return LLMEditor(recipe)
    raise ValueError(f"unknown edits backend {backend!r}")
