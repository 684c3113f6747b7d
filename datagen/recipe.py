"""Generation recipes: which caption source, edit backend, image backend, quality and filters.

A recipe is a YAML file (see `recipes/gen/`); `load_gen_recipe` resolves a name or a path, applies
`--set key=value` overrides and validates every key. `identity()` is the part that decides the
data: two runs with the same identity and seed write the same records, whatever the worker count.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .config import ConfigError, apply_overrides, from_dict, read_yaml, stable_hash, to_dict
from .world.editor import FAILURES
from .world.phrases import EDIT_TYPES


@dataclass
class CaptionsConfig:
    source: Literal["shapes"] = "shapes"
    phrases: Literal["train", "heldout"] = "train"
    min_objects: int = 1
    max_objects: int = 4

    def validate(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 9, got "
                             f"{self.min_objects}..{self.max_objects}")


@dataclass
class EditsConfig:
    backend: Literal["rules"] = "rules"
    types: list[str] = field(default_factory=lambda: list(EDIT_TYPES))

    def validate(self) -> None:
        bad = [t for t in self.types if t not in EDIT_TYPES]
        if bad or not self.types:
            raise ValueError(f"types: unknown edit type {bad[0]!r}; known: {list(EDIT_TYPES)}"
                             if bad else "types: must name at least one edit type")


@dataclass
class ImagesConfig:
    backend: Literal["shapes"] = "shapes"
    resolution: int = 128
    format: Literal["png", "jpeg", "webp"] = "jpeg"
    jitter: float = 0.08
    rotation: float = 12.0
    scale_jitter: float = 0.08
    color_jitter: int = 12
    noise: float = 4.0

    def validate(self) -> None:
        if not 16 <= self.resolution <= 2048:
            raise ValueError(f"resolution: {self.resolution} is outside 16..2048")


@dataclass
class QualityConfig:
    tier: str = "high"
    # Probability that a triplet carries each generator failure (see datagen.world.editor).
    failure_rates: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        for k, v in self.failure_rates.items():
            if k not in FAILURES:
                raise ValueError(f"failure_rates: unknown failure {k!r}; known: {list(FAILURES)}")
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"failure_rates.{k}: {v} is not a probability")
        if sum(self.failure_rates.values()) > 1.0 + 1e-9:
            raise ValueError("failure_rates: the rates add up to more than 1")


@dataclass
class TextFilterConfig:
    enabled: bool = True
    max_words: int = 40            # longer instructions are rejected as over-long


@dataclass
class FiltersConfig:
    text: TextFilterConfig = field(default_factory=TextFilterConfig)


@dataclass
class PipelineConfig:
    unit_size: int = 500           # kept triplets per work unit (= per shard)
    batch_size: int = 100          # candidates per stage call; does not change the data
    workers: int = 0               # processes; 0 = one per CPU core; does not change the data

    def validate(self) -> None:
        if self.unit_size < 1 or self.batch_size < 1 or self.workers < 0:
            raise ValueError("unit_size and batch_size must be >= 1, workers >= 0")


@dataclass
class GenRecipe:
    kind: Literal["gen"] = "gen"
    name: str = "shapes-high"
    description: str = ""
    expected_cost: str = ""
    seed: int = 0
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    edits: EditsConfig = field(default_factory=EditsConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def identity(self) -> dict:
        """What decides the records (not the name, the prose, the seed or the worker count)."""
        d = to_dict(self)
        for k in ("name", "description", "expected_cost", "seed", "kind"):
            d.pop(k)
        d["pipeline"] = {"unit_size": self.pipeline.unit_size}
        return d

    def hash(self) -> str:
        return stable_hash(self.identity())


def recipes_root() -> Path:
    try:
        import cirgen_recipes

        root = Path(cirgen_recipes.__file__).resolve().parent
        if root.is_dir():
            return root
    except ImportError:
        pass
    return Path(__file__).resolve().parents[1] / "recipes"


def resolve_recipe_path(name_or_path: str, kind: str) -> Path:
    """A path as given, or a shipped recipe by name (`shapes-high` -> recipes/gen/shapes-high.yaml)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"{p}: recipe file not found")
        return p
    shipped = recipes_root() / kind / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    known = sorted(q.stem for q in (recipes_root() / kind).glob("*.yaml"))
    raise ConfigError(f"no recipe named {name_or_path!r} in recipes/{kind}/ (known: {', '.join(known)})")


def load_gen_recipe(name_or_path: str = "shapes-high", overrides: list[str] | None = None) -> GenRecipe:
    path = resolve_recipe_path(name_or_path, "gen")
    data = apply_overrides(read_yaml(path), list(overrides or []))
    if data.get("kind", "gen") != "gen":
        raise ConfigError(f"{path}: kind is {data.get('kind')!r}, expected 'gen'")
    try:
        return from_dict(GenRecipe, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
