"""Shapes benchmarks written in the exact CIRR and CIRCO layouts, from held-out scenes.

Every reference scene and every target comes from the held-out part of the scene space (never
sampled for training) and every modification text from the held-out phrase set, so the same
readers that read the real benchmarks read these, and a score measures composition on unseen
scenes and wording.

CIRR format (`captions/cap.rc2.<split>.json`, `image_splits/split.rc2.<split>.json`,
`dev/<name>.png`): an image set is a reference scene and five distinct held-out edits of it;
each set gives up to two queries (reference -> one edit), so the other members are hard
distractors (other edits of the same scene). The gallery is every image of the split.

CIRCO format (`annotations/<split>.json`, `COCO2017_unlabeled/annotations/
image_info_unlabeled2017.json`, `COCO2017_unlabeled/unlabeled2017/%012d.jpg`): each query adds
its reference, its target (half of the targets rendered 2-4 times with different seeds), two other
edits of the reference and a random held-out scene to one shared gallery; `gt_img_ids` is every
gallery image whose scene equals the target scene (description level: pose is ignored).

`scenes.json` beside the files holds the ground truth (scene and render seed of every image, the
edit of every query). Output is deterministic given the seed.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..base.errors import CirgenError, InputError
from ..base.io import temp_path
from .editor import Edit, sample_edit
from .phrases import PhraseSet, load_phrases
from .render import RenderConfig, encode, render
from .scene import Scene, is_heldout, sample_scene

FORMATS = ("cirr", "circo")


class BenchmarkExists(CirgenError, FileExistsError):
    """The benchmark folder exists and is not empty (and overwrite was not asked for)."""

# Our edit types -> CIRCO semantic aspects.
ASPECTS = {
    "add": "addition", "remove": "negation", "count": "cardinality",
    "move": "spatial_relations_background", "background": "spatial_relations_background",
    "recolor": "direct_addressing", "reshape": "direct_addressing", "resize": "direct_addressing",
}
SET_SIZE = 6              # CIRR img_set.members
QUERIES_PER_SET = 2


@dataclass
class _Image:
    name: str
    scene: Scene
    seed: int


@dataclass
class _Gallery:
    images: list[_Image] = field(default_factory=list)

    def add(self, name: str, scene: Scene, rng: np.random.Generator) -> _Image:
        im = _Image(name, scene, int(rng.integers(2**31)))
        self.images.append(im)
        return im


def held_out_edits(scene: Scene, rng: np.random.Generator, phrases: PhraseSet, n: int,
                   tries: int = 300) -> list[Edit]:
    """Up to `n` faithful edits of `scene` whose targets are held-out, distinct and != scene
    (at most `tries` draws)."""
    edits: list[Edit] = []
    seen = {scene}
    for _ in range(tries):
        e = sample_edit(scene, rng, phrases)
        if e.target not in seen and is_heldout(e.target):
            seen.add(e.target)
            edits.append(e)
            if len(edits) == n:
                break
    return edits


def _reference(rng: np.random.Generator, phrases: PhraseSet, n_edits: int) -> tuple[Scene, list[Edit]]:
    while True:
        scene = sample_scene(rng, split="heldout")
        edits = held_out_edits(scene, rng, phrases, n_edits)
        if len(edits) == n_edits:
            return scene, edits


def write_shapes_benchmark(out: str | Path, fmt: str = "cirr", n_queries: int = 1000, seed: int = 0,
                           resolution: int = 128, splits: tuple[str, ...] = ("val",),
                           overwrite: bool = False) -> dict:
    """Write a shapes benchmark in `fmt` ("cirr" or "circo") layout to `out`; returns a summary.

    `splits`: "val" (labelled) and/or "test" (CIRR test1 / CIRCO test: no targets in the
    annotation files, ground truth still in scenes.json). The folder appears atomically.
    `resolution`: image side in pixels. Raises InputError for an unknown `fmt`, `n_queries` < 1 or
    splits other than val/test, and BenchmarkExists when `out` is not empty and not `overwrite`.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown benchmark format {fmt!r}; expected one of {FORMATS}")
    if n_queries < 1:
        raise InputError(f"n_queries must be positive, got {n_queries}")
    bad = [s for s in splits if s not in ("val", "test")]
    if bad or not splits:
        raise InputError(f"splits must be val and/or test, got {list(splits)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BenchmarkExists(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    tmp = temp_path(out)
    tmp.mkdir(parents=True)
    cfg = RenderConfig(resolution=resolution)
    phrases = load_phrases("heldout")
    try:
        if fmt == "cirr":
            summary = _write_cirr(tmp, n_queries, seed, cfg, phrases, splits)
        else:
            summary = _write_circo(tmp, n_queries, seed, cfg, phrases, splits)
        # The old benchmark moves aside before the new one takes its name and is deleted only
        # after; a failed move puts it back (a kill in between leaves it under its temp name).
        old = temp_path(out) if out.exists() else None
        if old is not None:
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"format": fmt, "out": str(out), "seed": seed, "resolution": resolution, **summary}


def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _scene_record(im: _Image) -> dict:
    return {"scene": json.loads(im.scene.to_json()), "seed": im.seed}


def _edit_record(e: Edit) -> dict:
    return {"edit_type": e.type, "instruction": e.instruction,
            "source": json.loads(e.source.to_json()), "target": json.loads(e.target.to_json())}


# ----------------------------------------------------------------------------- CIRR

def _write_cirr(root: Path, n_queries: int, seed: int, cfg: RenderConfig, phrases: PhraseSet,
                splits: tuple[str, ...]) -> dict:
    truth = {"format": "cirr", "seed": seed, "images": {}, "queries": {}}
    counts, pairid = {}, 0
    for si, split in enumerate(("val", "test")):
        if split not in splits:
            continue
        name = "dev" if split == "val" else "test1"       # folder and name prefix, as in CIRR
        official = "val" if split == "val" else "test1"
        rng = np.random.default_rng([seed, si])
        gallery, records = _Gallery(), []
        n_sets = -(-n_queries // QUERIES_PER_SET)
        for s in range(n_sets):
            scene, edits = _reference(rng, phrases, SET_SIZE - 1)
            ref = gallery.add(f"{name}-{s}-img0", scene, rng)
            tgts = [gallery.add(f"{name}-{s}-img{j + 1}", e.target, rng) for j, e in enumerate(edits)]
            members = [ref.name] + [t.name for t in tgts]
            members = [members[i] for i in rng.permutation(len(members))]
            for j in range(min(QUERIES_PER_SET, n_queries - len(records))):
                records.append((pairid, s, ref, tgts[j], edits[j], members))
                pairid += 1
        order = rng.permutation(len(gallery.images))     # gallery order carries no structure
        split_map = {gallery.images[i].name: f"./{name}/{gallery.images[i].name}.png" for i in order}
        by_key: dict[tuple, list[str]] = {}
        for im in gallery.images:
            by_key.setdefault(im.scene.key(), []).append(im.name)
        caps, qtruth = [], []
        for pid, s, ref, tgt, edit, members in records:
            entry = {"pairid": pid, "reference": ref.name, "caption": edit.instruction,
                     "img_set": {"id": s, "members": members, "reference_rank": members.index(ref.name)}}
            if split == "val":
                entry["target_hard"] = tgt.name
                entry["target_soft"] = {n: 1.0 for n in [tgt.name] + [m for m in by_key[tgt.scene.key()]
                                                                       if m != tgt.name]}
                entry["img_set"]["target_rank"] = members.index(tgt.name)
            caps.append(entry)
            qtruth.append({"pairid": pid, "reference": ref.name, "target": tgt.name, **_edit_record(edit)})
        _dump(root / "captions" / f"cap.rc2.{official}.json", caps)
        _dump(root / "image_splits" / f"split.rc2.{official}.json", split_map)
        (root / name).mkdir()
        for im in gallery.images:
            (root / name / f"{im.name}.png").write_bytes(encode(render(im.scene, im.seed, cfg), "png"))
            truth["images"][im.name] = _scene_record(im)
        truth["queries"][official] = qtruth
        counts[official] = {"queries": len(caps), "images": len(gallery.images)}
    _dump(root / "scenes.json", truth)
    return {"splits": counts}


# ----------------------------------------------------------------------------- CIRCO

def shared_concept(edit: Edit) -> str:
    """What the edit leaves unchanged: the untouched objects, and the background if kept."""
    kept = [o for o in edit.source.objects if o in edit.target.objects]
    objs = [f"a {o.size} {o.color} {o.shape}" for o in kept]
    text = ", ".join(objs[:-1]) + " and " + objs[-1] if len(objs) > 1 else "".join(objs)
    if edit.source.background == edit.target.background:
        bg = f"a {edit.source.background} background"
        return f"{text} on {bg}" if text else bg
    return text


def _write_circo(root: Path, n_queries: int, seed: int, cfg: RenderConfig, phrases: PhraseSet,
                 splits: tuple[str, ...]) -> dict:
    gallery = _Gallery()
    per_split: dict[str, list[tuple]] = {}
    for si, split in enumerate(("val", "test")):
        if split not in splits:
            continue
        rng = np.random.default_rng([seed, si])
        recs = []
        for q in range(n_queries):
            scene, edits = _reference(rng, phrases, 3)
            ref = gallery.add(f"{split}-{q}-ref", scene, rng)
            tgt = gallery.add(f"{split}-{q}-tgt", edits[0].target, rng)
            if rng.random() < 0.5:                     # multi-GT: more renders of the target scene
                for j in range(int(rng.integers(1, 4))):
                    gallery.add(f"{split}-{q}-tgt{j + 1}", edits[0].target, rng)
            for j, e in enumerate(edits[1:]):          # hard distractors: other edits of the reference
                gallery.add(f"{split}-{q}-alt{j}", e.target, rng)
            gallery.add(f"{split}-{q}-rnd", sample_scene(rng, split="heldout"), rng)
            recs.append((q, ref, tgt, edits[0]))
        per_split[split] = recs
    # COCO-like ids: unique, random, and listed in id order (so file order carries no structure).
    id_rng = np.random.default_rng([seed, 7])
    ids = id_rng.choice(np.arange(1, 10 * len(gallery.images) + 1000), size=len(gallery.images), replace=False)
    coco = {im.name: int(i) for im, i in zip(gallery.images, ids)}
    ordered = sorted(gallery.images, key=lambda im: coco[im.name])
    by_key: dict[tuple, list[int]] = {}
    for im in ordered:
        by_key.setdefault(im.scene.key(), []).append(coco[im.name])
    truth = {"format": "circo", "seed": seed, "images": {}, "queries": {}}
    counts = {}
    for split, recs in per_split.items():
        ann, qtruth = [], []
        for q, ref, tgt, edit in recs:
            entry = {"id": q, "reference_img_id": coco[ref.name], "relative_caption": edit.instruction,
                     "shared_concept": shared_concept(edit)}
            gt = [coco[tgt.name]] + [i for i in by_key[tgt.scene.key()] if i != coco[tgt.name]]
            if split == "val":
                entry.update({"target_img_id": gt[0], "gt_img_ids": gt,
                              "semantic_aspects": [ASPECTS[edit.type]]})
            ann.append(entry)
            qtruth.append({"id": q, "reference_img_id": coco[ref.name], "gt_img_ids": gt, **_edit_record(edit)})
        _dump(root / "annotations" / f"{split}.json", ann)
        truth["queries"][split] = qtruth
        counts[split] = {"queries": len(ann),
                         "mean_gt": round(float(np.mean([len(t["gt_img_ids"]) for t in qtruth])), 3),
                         "max_gt": max(len(t["gt_img_ids"]) for t in qtruth)}
    coco_dir = root / "COCO2017_unlabeled"
    img_dir = coco_dir / "unlabeled2017"
    img_dir.mkdir(parents=True)
    infos = []
    for im in ordered:
        iid = coco[im.name]
        fname = f"{iid:012d}.jpg"
        (img_dir / fname).write_bytes(encode(render(im.scene, im.seed, cfg), "jpeg"))
        infos.append({"id": iid, "file_name": fname, "width": cfg.resolution, "height": cfg.resolution})
        truth["images"][str(iid)] = {"name": im.name, **_scene_record(im)}
    _dump(coco_dir / "annotations" / "image_info_unlabeled2017.json",
          {"info": {"description": "cirgen shapes world, held-out scenes (COCO unlabeled2017 layout)"},
           "licenses": [], "images": infos})
    _dump(root / "scenes.json", truth)
    return {"splits": counts, "gallery": len(ordered)}
