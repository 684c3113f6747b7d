"""One work unit: the four stages assembled from a recipe (`Stages`), and `run_unit`, which draws a
unit's candidates from its own seeded stream, runs them through the stages in batches until the
unit holds its kept triplets, and writes its rejects file and then its shard.

Used by the local driver (`pipeline.generate`: in-process or a process pool) and by Ray actors
(`ray_runner`); a unit's files depend only on (recipe, seed, unit), whoever runs it.
"""
from __future__ import annotations

import time
from pathlib import Path

from .base.errors import CirgenError
from .candidate import Candidate, candidate_seed
from .captions import build_captions
from .edits import build_edits
from .filters import build_filters
from .images import build_images
from .recipe import GenRecipe
from .schema import build_schema, shard_path
from .stats import UnitStats
from .store import check_overwrite, remove_file, to_table, write_table

MAX_CANDIDATES_PER_KEPT = 50  # give up on a unit whose filters reject (almost) everything


class PipelineError(CirgenError, RuntimeError):
    """A run that cannot finish: a unit whose filters reject (almost) everything, a missing extra,
    units left incomplete by another process."""


class Stages:
    """The four stages assembled from the recipe (diffusers-style interchangeable components)."""

    def __init__(self, recipe: GenRecipe, seed: int | None = None):
        self.recipe = recipe
        self.captions = build_captions(recipe, seed)
        self.edits = build_edits(recipe)
        diffusion = recipe.images.diffusion
        best_of_k = recipe.images.backend != "shapes" and diffusion.samples_per_prompt > 1
        # Best-of-k ranks samples with the CLIP filter's model (one shared scorer per process).
        self.images = build_images(recipe, scorer=_LazyScorer(recipe) if best_of_k else None)
        self.filters = build_filters(recipe)

    @property
    def schema(self):
        """The shard's Arrow schema: the fixed columns plus every filter's `score_*` and `pass_*` columns."""
        scores = [c for f in self.filters for c in f.score_columns]
        passes = [c for f in self.filters for c in f.pass_columns]
        return build_schema(scores, passes)

    def run(self, batch: list[Candidate]) -> None:
        """Run the stages in order. A candidate rejected by the text or image stage skips the
        later (expensive) stages; every filter scores every candidate that reached the filters,
        so all scores are stored even when an earlier criterion already failed."""
        steps = [("captions", [self.captions]), ("edits", [self.edits]), ("images", [self.images]),
                 ("filters", self.filters)]
        for stage, components in steps:
            todo = [c for c in batch if c.kept]
            if not todo or not components:
                continue
            t0 = time.perf_counter()
            for comp in components:
                comp(todo)
            per = (time.perf_counter() - t0) / len(todo)
            for c in todo:
                c.seconds[stage] = per
                c.generator.setdefault(stage, {}).setdefault("backend", getattr(components[0], "name", None))


class _LazyScorer:
    """Loads the CLIP scorer of `filters.clip` on first use (not in the parent process)."""

    def __init__(self, recipe: GenRecipe):
        self.cfg = recipe.filters.clip

    def directional(self, *args, **kwargs):
        from .filters import load_scorer

        return load_scorer(self.cfg).directional(*args, **kwargs)


def run_unit(recipe: GenRecipe, seed: int, unit: int, count: int, out: Path,
             stages: Stages | None = None) -> UnitStats:
    """Generate unit `unit` until it holds `count` kept triplets; write rejects, then the shard.

    Candidates are drawn in batches of at most `pipeline.batch_size`, never more than the unit still needs.
    Raises PipelineError after `MAX_CANDIDATES_PER_KEPT * count` candidates without enough kept, StoreError
    when the existing shard holds more than `count` rows, MachineError when a file cannot be written.
    """
    stages = stages or Stages(recipe, seed)
    kept: list[Candidate] = []
    rejected: list[Candidate] = []
    j = 0
    B = recipe.pipeline.batch_size
    while len(kept) < count:
        if j >= MAX_CANDIDATES_PER_KEPT * count:
            raise PipelineError(f"unit {unit}: only {len(kept)} of {count} candidates passed the filters "
                                f"after {j} attempts; loosen the filters or check the generators")
        # Never generate past what the unit still needs: the unit's content is then independent
        # of batch size (candidate j is the same whichever batch it falls in).
        size = min(B, count - len(kept))
        batch = [Candidate(unit, j + k, candidate_seed(seed, unit, j + k)) for k in range(size)]
        j += size
        stages.run(batch)
        for c in batch:
            (kept if c.kept else rejected).append(c)
    stats = UnitStats.from_candidates(unit, seed, recipe.hash(), kept, rejected)
    schema = stages.schema
    quality = recipe.quality.tier
    check_overwrite(out, unit, count)
    # Rejects first, then the shard that marks the unit done. A unit without rejects writes no
    # rejects file: 0-row parquet files break readers such as `datasets.load_dataset`.
    if rejected:
        write_table(to_table(rejected, schema, recipe.pipeline.unit_size, quality, False),
                    shard_path(out, unit, rejects=True), stats.to_dict())
    else:
        remove_file(shard_path(out, unit, rejects=True))
    write_table(to_table(kept, schema, recipe.pipeline.unit_size, quality, True), shard_path(out, unit), stats.to_dict())
    return stats
