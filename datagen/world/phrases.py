"""Turn scenes and edits into text, with the training or the held-out phrase set."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import yaml

from ..base.assets import asset_path
from .scene import CELLS, Obj, Scene

SPLITS = ("train", "heldout")
EDIT_TYPES = ("recolor", "reshape", "resize", "add", "remove", "move", "background", "count")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURALS = {"cross": "crosses"}


def plural(shape: str) -> str:
    """Plural of a shape name ("crosses", else + "s")."""
    return PLURALS.get(shape, shape + "s")


@dataclass(frozen=True)
class PhraseSet:
    """The phrase templates of one split (`load_phrases`), drawn from with the caller's rng."""

    split: str
    position: tuple[str, ...]
    object: tuple[str, ...]
    scene: tuple[str, ...]
    edits: dict[str, tuple[str, ...]]

    def pos(self, cell: int, rng: np.random.Generator) -> str:
        """A position phrase for `cell` (index into `CELLS`), e.g. "in the top left" (train set)."""
        return _pick(self.position, rng).format(cell=CELLS[cell])

    def describe_obj(self, obj: Obj, rng: np.random.Generator, omit: frozenset = frozenset()) -> str:
        """A phrase for `obj`; `omit` leaves out "size", "color" and/or "position" (gaps tidied)."""
        text = _pick(self.object, rng).format(
            size="" if "size" in omit else obj.size, color="" if "color" in omit else obj.color,
            shape=obj.shape, pos="" if "position" in omit else self.pos(obj.cell, rng), cell=CELLS[obj.cell])
        return _tidy(text) if omit else text

    def caption(self, scene: Scene, rng: np.random.Generator, omit: frozenset = frozenset()) -> str:
        """A description of every object (in random order) and the background.

        `omit` leaves attributes out ("size", "color", "position", "background"): a *partial*
        caption. Complete captions are the default and what benchmarks use.
        """
        order = rng.permutation(len(scene.objects))
        parts = [self.describe_obj(scene.objects[i], rng, omit) for i in order]
        objects = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        if "background" in omit:
            return objects
        return _pick(self.scene, rng).format(objects=objects, bg=scene.background)

    def refer(self, obj: Obj, scene: Scene, rng: np.random.Generator) -> str:
        """The shortest unambiguous way to name `obj` within `scene`."""
        others = [o for o in scene.objects if o.cell != obj.cell]
        if not any((o.color, o.shape) == (obj.color, obj.shape) for o in others):
            return f"{obj.color} {obj.shape}"
        if not any(o.kind == obj.kind for o in others):
            return f"{obj.size} {obj.color} {obj.shape}"
        return f"{obj.color} {obj.shape} {self.pos(obj.cell, rng)}"

    def instruction(self, edit_type: str, slots: dict, rng: np.random.Generator) -> str:
        """An instruction template of `edit_type` filled with `slots`; KeyError for an unknown edit type
        or a slot the template needs that `slots` lacks."""
        return _pick(self.edits[edit_type], rng).format(**slots)


def _tidy(text: str) -> str:
    """Collapse the gaps an omitted slot leaves ("a  red circle placed " -> "a red circle")."""
    words = text.replace(" ,", ",").split()
    while words and words[-1] in ("placed", "at", "in", "the"):
        words.pop()
    return " ".join(words).rstrip(",")


def _pick(options, rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


@lru_cache(maxsize=None)
def load_phrases(split: str = "train", path: str | None = None) -> PhraseSet:
    """The phrase set `split` ("train" or "heldout") of the YAML at `path` (default the shipped
    shapes.yaml). Raises ValueError for an unknown split or a set missing an entry or an edit type
    of `EDIT_TYPES`; OSError for an unreadable file, yaml.YAMLError for invalid YAML."""
    if split not in SPLITS:
        raise ValueError(f"unknown phrase split {split!r}; expected one of {SPLITS}")
    file = path or str(asset_path("phrases", "shapes.yaml"))
    with open(file) as f:
        data = yaml.safe_load(f)
    try:
        d = data[split]
        edits = {k: tuple(v) for k, v in d["edits"].items()}
        missing = set(EDIT_TYPES) - set(edits)
        if missing:
            raise KeyError(f"edits.{sorted(missing)[0]}")
        return PhraseSet(split, tuple(d["position"]), tuple(d["object"]), tuple(d["scene"]), edits)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{file}: phrase set {split!r} is missing {e}") from None
