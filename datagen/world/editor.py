"""Rule-based scene editor and the failure modes of real generators.

`sample_edit` draws one faithful edit of a scene (recolour, change shape, resize, add, remove,
move, change background, change count) with the slots its instruction needs. `inject_failure`
turns a faithful edit into what a real LLM + diffusion pipeline sometimes produces: the target
image shows the wrong object edited, an unintended extra change, no change at all, or a re-sampled
scene, or the instruction does not match the edited caption. Every failure is labelled.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .phrases import EDIT_TYPES, NUMBERS, PhraseSet, plural
from .scene import BACKGROUNDS, CELLS, COLORS, SHAPES, SIZES, Obj, Scene, random_obj, sample_scene

FAILURES = ("wrong_object", "extra_change", "noop_target", "mismatch", "resampled")
OBJECT_EDITS = ("recolor", "reshape", "resize", "move", "remove")
_ATTR = {"recolor": ("color", COLORS), "reshape": ("shape", SHAPES), "resize": ("size", SIZES)}


@dataclass
class Edit:
    """A source scene, the instruction that changes it, and the scene the instruction asks for."""
    type: str
    source: Scene
    target: Scene
    instruction: str
    obj: Obj | None = None          # the object the edit is about, where there is one
    value: object = None            # the new attribute value / cell / background / count
    details: dict = field(default_factory=dict)


def _other(values, current, rng):
    choices = [v for v in values if v != current]
    return choices[int(rng.integers(len(choices)))]


def _applicable(scene: Scene, max_objects: int) -> list[str]:
    n, free = len(scene.objects), bool(scene.free_cells)
    ok = ["recolor", "reshape", "resize", "background"]
    if free and n < max_objects:
        ok.append("add")
    if n >= 2:
        ok.append("remove")
    if free:
        ok.append("move")
    if (free and n < max_objects) or _has_duplicates(scene):
        ok.append("count")
    return [t for t in EDIT_TYPES if t in ok]


def _has_duplicates(scene: Scene) -> bool:
    kinds = [o.kind for o in scene.objects]
    return len(set(kinds)) < len(kinds)


def apply_obj_edit(scene: Scene, obj: Obj, edit_type: str, value) -> Scene:
    """`scene` with the object in `obj`'s cell removed, moved to cell `value` ("move"), or with its
    colour/shape/size set to `value` ("recolor"/"reshape"/"resize"). KeyError for another edit type,
    ValueError when a move lands on an occupied cell."""
    objs = [o for o in scene.objects if o.cell != obj.cell]
    if edit_type == "remove":
        return scene.with_objects(objs)
    if edit_type == "move":
        return scene.with_objects(objs + [replace(obj, cell=int(value))])
    attr = _ATTR[edit_type][0]
    return scene.with_objects(objs + [replace(obj, **{attr: value})])


def sample_edit(scene: Scene, rng: np.random.Generator, phrases: PhraseSet,
                max_objects: int = 4, types: tuple[str, ...] | None = None,
                exclude: tuple[str, ...] = ()) -> Edit:
    """Draw one faithful edit of `scene` among the applicable edit types.

    `types` restricts and `exclude` removes types; when none is left the edit is "background"
    (even if excluded). The scene must hold at least one object."""
    options = [t for t in _applicable(scene, max_objects)
               if (types is None or t in types) and t not in exclude]
    if not options:
        options = ["background"]
    et = options[int(rng.integers(len(options)))]
    objs = scene.objects
    if et in _ATTR:
        obj = objs[int(rng.integers(len(objs)))]
        attr, values = _ATTR[et]
        new = _other(values, getattr(obj, attr), rng)
        target = apply_obj_edit(scene, obj, et, new)
        slots = {"ref": phrases.refer(obj, scene, rng), "new": new, "old": getattr(obj, attr),
                 "color": obj.color}
        return Edit(et, scene, target, phrases.instruction(et, slots, rng), obj, new)
    if et in ("remove", "move"):
        obj = objs[int(rng.integers(len(objs)))]
        cell = int(rng.choice(scene.free_cells)) if et == "move" else None
        target = apply_obj_edit(scene, obj, et, cell)
        slots = {"ref": phrases.refer(obj, scene, rng),
                 "cell": CELLS[cell] if cell is not None else ""}
        return Edit(et, scene, target, phrases.instruction(et, slots, rng), obj, cell)
    if et == "add":
        new_obj = random_obj(rng, int(rng.choice(scene.free_cells)))
        target = scene.with_objects(objs + (new_obj,))
        slots = {"obj": phrases.describe_obj(new_obj, rng)}
        return Edit(et, scene, target, phrases.instruction(et, slots, rng), new_obj, new_obj.cell)
    if et == "background":
        new = _other(BACKGROUNDS, scene.background, rng)
        target = replace(scene, background=new)
        return Edit(et, scene, target, phrases.instruction(et, {"new": new}, rng), None, new)
    # count: change how many objects of one kind there are (never down to zero: that is `remove`).
    can_up = bool(scene.free_cells) and len(objs) < max_objects
    pool = objs if can_up else [o for o in objs if sum(p.kind == o.kind for p in objs) >= 2]
    obj = pool[int(rng.integers(len(pool)))]
    group = [o for o in objs if o.kind == obj.kind]
    k = len(group)
    can_down = k >= 2
    up = can_up and (not can_down or rng.random() < 0.5)
    if up:
        cells = rng.choice(scene.free_cells, size=1, replace=False)
        new_objs = list(objs) + [replace(obj, cell=int(c), pose=int(rng.integers(2**31))) for c in cells]
        new_k = k + 1
    else:
        drop = group[int(rng.integers(k))]
        new_objs = [o for o in objs if o.cell != drop.cell]
        new_k = k - 1
    target = scene.with_objects(new_objs)
    slots = {"n": NUMBERS[new_k], "shapes": f"{obj.size} {obj.color} {plural(obj.shape)}"}
    return Edit("count", scene, target, phrases.instruction("count", slots, rng), obj, new_k)


def inject_failure(edit: Edit, failure: str, rng: np.random.Generator, phrases: PhraseSet,
                   max_objects: int = 4) -> tuple[str, Scene, str]:
    """Apply a generator failure to a faithful edit.

    Returns (failure label actually applied, scene shown by the target image, instruction).
    A failure that cannot apply to this edit (e.g. `wrong_object` in a one-object scene) falls
    back to `extra_change`, which always applies; the returned label says which one happened.
    Raises ValueError for a failure not in `FAILURES`.
    """
    src, tgt = edit.source, edit.target
    if failure == "wrong_object":
        others = [o for o in src.objects if edit.obj is not None and o.cell != edit.obj.cell]
        if edit.type in OBJECT_EDITS and others:
            o2 = others[int(rng.integers(len(others)))]
            if edit.type in _ATTR:
                attr, values = _ATTR[edit.type]
                value = edit.value if getattr(o2, attr) != edit.value else _other(values, edit.value, rng)
            elif edit.type == "move":
                value = edit.value
            else:
                value = None
            return failure, apply_obj_edit(src, o2, edit.type, value), edit.instruction
        failure = "extra_change"
    if failure == "extra_change":
        extra = sample_edit(tgt, rng, phrases, max_objects, exclude=(edit.type,))
        return failure, extra.target, edit.instruction
    if failure == "noop_target":
        return failure, src, edit.instruction
    if failure == "mismatch":
        other = sample_edit(src, rng, phrases, max_objects, exclude=(edit.type,))
        return failure, tgt, other.instruction
    if failure == "resampled":
        n = len(tgt.objects)
        fresh = sample_scene(rng, n, n)
        return failure, replace(fresh, background=tgt.background), edit.instruction
    raise ValueError(f"unknown failure mode {failure!r}; expected one of {FAILURES}")
