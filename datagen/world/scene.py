"""Scenes of the shapes world: a background and 1-4 objects on a 3x3 grid.

A scene is the ground truth behind every shapes image and caption. Two scenes are the same
*description* when their backgrounds and their multisets of (shape, colour, size, cell) agree;
each object also carries a `pose` seed (jitter, rotation) that is rendering nuisance only and is
ignored by equality, so one description maps to many images.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
BACKGROUNDS = ("white", "black", "gray")
# Cells in reading order; the names are also the position words used in captions.
CELLS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
MAX_OBJECTS = len(CELLS)


@dataclass(frozen=True, order=True)
class Obj:
    """One object: shape, colour, size, grid cell (index into `CELLS`, 0-8 in reading order) and a
    `pose` seed that rendering uses and equality ignores."""

    shape: str
    color: str
    size: str
    cell: int
    pose: int = field(default=0, compare=False)

    @property
    def kind(self) -> tuple[str, str, str]:
        """What the object is, independent of where it is."""
        return (self.shape, self.color, self.size)

    def to_dict(self) -> dict:
        """JSON-ready fields, the cell by its name ("top left", ...)."""
        return {"shape": self.shape, "color": self.color, "size": self.size,
                "cell": CELLS[self.cell], "pose": self.pose}

    @staticmethod
    def from_dict(d: dict) -> "Obj":
        """Inverse of `to_dict` (pose defaults to 0). KeyError for a missing field, ValueError for an
        unknown cell name."""
        return Obj(d["shape"], d["color"], d["size"], CELLS.index(d["cell"]), int(d.get("pose", 0)))


@dataclass(frozen=True)
class Scene:
    """A background and its objects, kept sorted by cell; equality and hash by `key()` (pose ignored).
    Raises ValueError when two objects share a cell."""

    objects: tuple[Obj, ...]
    background: str

    def __post_init__(self) -> None:
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {cells}")
        # Canonical order (by cell) so equal descriptions compare equal.
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: o.cell)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scene) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def key(self) -> tuple:
        """Description-level identity: what a complete caption can say about the scene."""
        return (self.background, tuple((o.shape, o.color, o.size, o.cell) for o in self.objects))

    @property
    def free_cells(self) -> list[int]:
        """Indices of the empty cells, ascending."""
        used = {o.cell for o in self.objects}
        return [c for c in range(len(CELLS)) if c not in used]

    def with_objects(self, objects) -> "Scene":
        """The same background with `objects` (ValueError when two share a cell)."""
        return replace(self, objects=tuple(objects))

    def to_json(self) -> str:
        """JSON with sorted keys: background and objects (`Obj.to_dict`, poses included)."""
        return json.dumps({"background": self.background,
                           "objects": [o.to_dict() for o in self.objects]}, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Scene":
        """Inverse of `to_json`. ValueError for bad JSON or an unknown cell, KeyError for a missing field."""
        d = json.loads(text)
        return Scene(tuple(Obj.from_dict(o) for o in d["objects"]), d["background"])


HELDOUT_PERCENT = 10  # share of the scene space reserved for benchmarks


def is_heldout(scene: Scene) -> bool:
    """Stable partition of the scene space: held-out scenes never appear in training data."""
    digest = hashlib.sha1(repr(scene.key()).encode()).hexdigest()
    return int(digest[:8], 16) % 100 < HELDOUT_PERCENT


def random_obj(rng: np.random.Generator, cell: int) -> Obj:
    """An object in `cell` with uniformly drawn shape, colour and size and a pose seed in [0, 2^31)."""
    return Obj(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=COLORS[rng.integers(len(COLORS))],
        size=SIZES[rng.integers(len(SIZES))],
        cell=int(cell),
        pose=int(rng.integers(2**31)),
    )


def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 4,
                 split: str | None = None) -> Scene:
    """A random scene; with `split` ("train"/"heldout") only from that part of the scene space.
    The object count is uniform in [min_objects, max_objects], in distinct random cells. Raises
    ValueError unless 1 <= min_objects <= max_objects <= `MAX_OBJECTS` (9)."""
    while True:
        scene = _sample_scene(rng, min_objects, max_objects)
        if split is None or is_heldout(scene) == (split == "heldout"):
            return scene


def _sample_scene(rng: np.random.Generator, min_objects: int, max_objects: int) -> Scene:
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                         f"got {min_objects}, {max_objects}")
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(len(CELLS), size=n, replace=False)
    objs = [random_obj(rng, c) for c in cells]
    return Scene(tuple(objs), BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
