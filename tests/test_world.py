"""The shapes world: scenes, renderer, phrase sets, editor and injected failures."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import yaml

from datagen.base.assets import asset_path
from datagen.world.editor import FAILURES, inject_failure, sample_edit
from datagen.world.phrases import EDIT_TYPES, load_phrases
from datagen.world.render import RenderConfig, encode, render
from datagen.world.scene import CELLS, Obj, Scene, is_heldout, sample_scene


def test_scene_equality_ignores_pose_and_order():
    a = Scene((Obj("circle", "red", "small", 0, pose=1), Obj("star", "blue", "large", 4, pose=2)), "white")
    b = Scene((Obj("star", "blue", "large", 4, pose=9), Obj("circle", "red", "small", 0, pose=7)), "white")
    assert a == b and hash(a) == hash(b)
    assert a != Scene(a.objects, "black")
    assert Scene.from_json(a.to_json()) == a
    assert Scene.from_json(a.to_json()).objects[0].pose == 1
    with pytest.raises(ValueError, match="share a cell"):
        Scene((Obj("circle", "red", "small", 0), Obj("star", "red", "small", 0)), "white")


def test_heldout_partition_is_stable_and_respected():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(3000)]
    share = np.mean([is_heldout(s) for s in scenes])
    assert 0.07 < share < 0.13
    assert all(is_heldout(sample_scene(rng, split="heldout")) for _ in range(50))
    assert not any(is_heldout(sample_scene(rng, split="train")) for _ in range(200))
    assert all(1 <= len(s.objects) <= 4 for s in scenes)


def test_render_is_deterministic_and_varies_with_seed():
    scene = sample_scene(np.random.default_rng(1))
    a, b, c = render(scene, 5), render(scene, 5), render(scene, 6)
    assert encode(a) == encode(b)
    assert encode(a) != encode(c)
    assert render(scene, 5, RenderConfig(resolution=64)).size == (64, 64)
    assert a.size == (128, 128) and a.mode == "RGB"


def test_render_draws_objects_in_their_cells():
    cfg = RenderConfig(noise=0, color_jitter=0)
    scene = Scene((Obj("square", "red", "large", 0),), "white")
    arr = np.asarray(render(scene, 0, cfg)).astype(int)
    red = (arr[..., 0] > 180) & (arr[..., 1] < 90)
    ys, xs = np.nonzero(red)
    assert red.sum() > 200
    assert xs.mean() < 128 / 3 and ys.mean() < 128 / 3  # top-left cell


def test_phrase_sets_share_words_but_not_templates():
    data = yaml.safe_load(asset_path("phrases", "shapes.yaml").read_text())
    tr, ho = data["train"], data["heldout"]
    for key in ("object", "scene", "position"):
        assert not set(tr[key]) & set(ho[key])
    for et in EDIT_TYPES:
        assert not set(tr["edits"][et]) & set(ho["edits"][et]), et


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_name_every_object_and_the_background(split):
    ph = load_phrases(split)
    rng = np.random.default_rng(3)
    for _ in range(50):
        s = sample_scene(rng)
        cap = ph.caption(s, rng)
        assert s.background in cap
        for o in s.objects:
            assert o.color in cap and o.shape in cap and CELLS[o.cell] in cap


def test_every_edit_type_changes_the_scene_as_named():
    ph = load_phrases("train")
    rng = np.random.default_rng(4)
    seen = Counter()
    for _ in range(600):
        s = sample_scene(rng)
        e = sample_edit(s, rng, ph)
        seen[e.type] += 1
        assert e.target != s and e.instruction
        src, tgt = s.objects, e.target.objects
        if e.type in ("recolor", "reshape", "resize"):
            attr = {"recolor": "color", "reshape": "shape", "resize": "size"}[e.type]
            changed = [(a, b) for a, b in zip(src, tgt) if a != b]
            assert len(changed) == 1 and getattr(changed[0][1], attr) == e.value
            assert e.value in e.instruction
        elif e.type == "add":
            assert len(tgt) == len(src) + 1
        elif e.type == "remove":
            assert len(tgt) == len(src) - 1
        elif e.type == "move":
            assert len(tgt) == len(src) and {o.cell for o in tgt} != {o.cell for o in src}
            assert CELLS[e.value] in e.instruction
        elif e.type == "background":
            assert e.target.background != s.background and tgt == src
        elif e.type == "count":
            kind = e.obj.kind
            assert sum(o.kind == kind for o in tgt) == e.value >= 1
            assert abs(len(tgt) - len(src)) == 1
    assert set(seen) == set(EDIT_TYPES)


def test_referring_expressions_are_unambiguous():
    ph = load_phrases("train")
    rng = np.random.default_rng(5)
    s = Scene((Obj("circle", "red", "small", 0), Obj("circle", "red", "large", 1),
               Obj("circle", "red", "large", 2)), "white")
    assert ph.refer(s.objects[0], s, rng) == "small red circle"
    assert "top right" in ph.refer(s.objects[2], s, rng)


def test_injected_failures_are_what_their_labels_say():
    ph = load_phrases("train")
    rng = np.random.default_rng(6)
    labels = Counter()
    for i in range(400):
        s = sample_scene(rng, 2, 4)
        e = sample_edit(s, rng, ph, types=("recolor", "reshape", "resize", "move", "remove"))
        f = FAILURES[i % len(FAILURES)]
        label, shown, instr = inject_failure(e, f, rng, ph)
        labels[label] += 1
        assert label == f  # with >= 2 objects and an object edit every failure applies
        if label == "noop_target":
            assert shown == s
        elif label == "mismatch":
            assert shown == e.target and instr != e.instruction
        elif label in ("wrong_object", "extra_change", "resampled"):
            assert shown != e.target and instr == e.instruction
    assert set(labels) == set(FAILURES)


def test_wrong_object_falls_back_when_it_cannot_apply():
    ph = load_phrases("train")
    rng = np.random.default_rng(7)
    s = sample_scene(rng, 1, 1)
    e = sample_edit(s, rng, ph, types=("recolor",))
    label, shown, _ = inject_failure(e, "wrong_object", rng, ph)
    assert label == "extra_change" and shown != e.target


def test_an_overwritten_benchmark_is_never_lost_and_no_temp_folder_stays(tmp_path, monkeypatch):
    import pytest

    import datagen.world.benchmark as B
    from pathlib import Path

    out = tmp_path / "bench"
    B.write_shapes_benchmark(out, "cirr", 6, 0, 32)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    old_caps = (out / "captions" / "cap.rc2.val.json").read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(B, "_write_cirr", crash)
    with pytest.raises(RuntimeError):
        B.write_shapes_benchmark(out, "cirr", 6, 1, 32, overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    monkeypatch.undo()
    real_replace = B.os.replace

    failed = []

    def full_disk(src, dst):                 # the new folder cannot take the name (once)
        if Path(src).name.startswith(".bench~") and Path(dst) == out and not failed:
            failed.append(src)
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(B.os, "replace", full_disk)
    with pytest.raises(OSError):
        B.write_shapes_benchmark(out, "cirr", 6, 1, 32, overwrite=True)
    assert (out / "captions" / "cap.rc2.val.json").read_bytes() == old_caps      # the old one is back
    monkeypatch.undo()
    B.write_shapes_benchmark(out, "cirr", 6, 1, 32, overwrite=True)
    assert (out / "captions" / "cap.rc2.val.json").read_bytes() != old_caps      # the new seed's queries
    assert [p.name for p in tmp_path.iterdir()] == ["bench"]                     # no temp or old folder
