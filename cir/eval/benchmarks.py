"""Readers for the official FashionIQ, CIRR and CIRCO layouts, with integrity checks.

Every reader returns a `Benchmark`: one `Task` per gallery (FashionIQ has three, one per
category) holding the queries, the gallery in file order (the documented tie-break order) and the
image file of every id. Annotation problems are errors that name the file and the entry; images
that are missing or unreadable are found by `find_bad_images` and either stop the run or are
handled by `drop_bad_images`, which says exactly what it did. The shapes benchmarks are written in
these same layouts, so the same readers read them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from datagen.base.io import read_json

from . import EvalError
from .protocol import Protocol

FIQ_CATEGORIES = ("dress", "shirt", "toptee")
CIRR_SPLITS = {"val": "val", "test": "test1", "test1": "test1", "train": "train"}
CIRCO_SPLITS = ("val", "test")
DATASETS = ("fashioniq", "cirr", "circo")


@dataclass
class Query:
    """One composed query: reference image id, its caption(s) and, on labelled splits, the
    target(s); ids are keys of the task's `paths`."""

    qid: str                          # pairid (CIRR), id (CIRCO), "<category>:<index>" (FashionIQ)
    reference: str
    captions: tuple[str, ...]         # FashionIQ: two; CIRR / CIRCO: one
    target: str | None = None         # None on unlabelled (test) splits
    gt: tuple[str, ...] = ()          # CIRCO ground truths (target first); else (target,)
    members: tuple[str, ...] = ()     # CIRR img_set.members
    shared_concept: str = ""
    aspects: tuple[str, ...] = ()
    entry: int = 0                    # index in the annotation file, for messages


@dataclass
class Task:
    """One gallery and the queries ranked against it (FashionIQ: one per category)."""

    name: str                         # category (FashionIQ) or the dataset name
    annotation: Path
    gallery_file: Path
    queries: list[Query]
    gallery: list[str]                # ids in file order
    paths: dict[str, Path]            # every id used by this task -> image file


@dataclass
class Benchmark:
    """One split of one dataset as the readers return it; `labelled` is False on test splits (no
    targets), `notes` are layout and protocol facts reported with the results."""

    dataset: str                      # fashioniq | cirr | circo
    split: str                        # official split name (val, test1, test)
    root: Path
    tasks: list[Task]
    labelled: bool
    notes: list[str] = field(default_factory=list)

    @property
    def n_queries(self) -> int:
        """Queries over all tasks."""
        return sum(len(t.queries) for t in self.tasks)


def load_benchmark(dataset: str, root: str | Path, split: str = "val",
                   protocol: Protocol | None = None) -> Benchmark:
    """Read `dataset` (fashioniq, cirr, circo; a `shapes-` prefix is accepted) from `root`.
    Errors: EvalError for a missing folder or an unknown dataset, and the readers' EvalErrors
    (bad split, missing or malformed annotation)."""
    protocol = protocol or Protocol()
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"{root}: benchmark folder not found")
    kind = dataset.removeprefix("shapes-")
    other = _looks_like(root)
    if other is not None and other != kind and kind in DATASETS:
        raise EvalError(f"{root}: a {other.upper() if other != 'fashioniq' else 'FashionIQ'} folder, not "
                        f"{kind.upper() if kind != 'fashioniq' else 'FashionIQ'}'s layout: pass --dataset "
                        f"{dataset.replace(kind, other)}")
    if kind == "fashioniq":
        return load_fashioniq(root, split, protocol)
    if kind == "cirr":
        return load_cirr(root, split, protocol)
    if kind == "circo":
        return load_circo(root, split)
    raise EvalError(f"unknown dataset {dataset!r}; expected one of {DATASETS} (or shapes-cirr, shapes-circo)")


def _looks_like(root: Path) -> str | None:
    """The benchmark whose layout `root` unmistakably has (one kind's marker files only), else None:
    CIRR's `image_splits/split.rc2.*.json` (at root or root/cirr), CIRCO's `annotations/<split>.json`,
    FashionIQ's `captions/cap.<dress|shirt|toptee>.*.json`."""
    def has(*patterns: str) -> bool:
        return any(any(root.glob(p)) for p in patterns)

    marks = {"cirr": has("image_splits/split.rc2.*.json", "cirr/image_splits/split.rc2.*.json"),
             "circo": has(*(f"annotations/{s}.json" for s in CIRCO_SPLITS)),
             "fashioniq": has("captions/cap.dress.*.json", "captions/cap.shirt.*.json", "captions/cap.toptee.*.json")}
    found = [k for k, v in marks.items() if v]
    return found[0] if len(found) == 1 else None


# ----------------------------------------------------------------------------- file helpers

def _read_json(path: Path, expect: type):
    return read_json(path, expect, EvalError)


def _entry(path: Path, i: int, data, label: str = "") -> "_Entry":
    if not isinstance(data, dict):
        raise EvalError(f"{path.name} entry {i}: expected an object, got {type(data).__name__}")
    return _Entry(path, i, data, label)


@dataclass
class _Entry:
    """One annotation record; `get` checks type and presence and names the entry on failure."""
    path: Path
    index: int
    data: dict
    label: str

    def where(self) -> str:
        return f"{self.path.name} entry {self.index}" + (f" ({self.label})" if self.label else "")

    def fail(self, msg: str) -> EvalError:
        return EvalError(f"{self.where()}: {msg}")

    def get(self, key: str, tp, optional: bool = False):
        if key not in self.data:
            if optional:
                return None
            raise self.fail(f"missing field {key!r}")
        v = self.data[key]
        ok = isinstance(v, tp) and not (tp is int and isinstance(v, bool))
        if not ok:
            raise self.fail(f"field {key!r} should be {getattr(tp, '__name__', tp)}, got {v!r}")
        return v


def _keyed_entries(path: Path, key: str):
    """(index, entry, id) of each record of a JSON list whose integer `key` must be unique;
    EvalError naming the entry for a missing, mistyped or repeated id."""
    seen: dict[int, int] = {}
    for i, raw in enumerate(_read_json(path, list)):
        e = _entry(path, i, raw)
        v = e.get(key, int)
        e.label = f"{key} {v}"
        if v in seen:
            raise e.fail(f"{key} {v} also used by entry {seen[v]}")
        seen[v] = i
        yield i, e, v


def _join(base: Path, rel: str, where: str) -> Path:
    """`base / rel` for a path read from a manifest; refused (EvalError naming `where`) when it is
    absolute or its `..` parts lead out of `base`.

    The check is lexical (no symlinks resolved): a symlink the user put inside the tree (images
    on another disk) is theirs to make; a manifest cannot add one."""
    if not rel or "\0" in rel or os.path.isabs(rel):
        raise EvalError(f"{where}: path {rel!r} leaves the benchmark root {base}")
    top = os.path.abspath(base)
    full = os.path.abspath(os.path.join(top, rel))
    if full == top or os.path.commonpath([top, full]) != top:
        raise EvalError(f"{where}: path {rel!r} leaves the benchmark root {base}")
    return base / os.path.relpath(full, top)


def _listdir(folder: Path) -> set[str]:
    try:
        with os.scandir(folder) as it:
            return {e.name for e in it}
    except OSError:
        return set()


# ----------------------------------------------------------------------------- FashionIQ

def load_fashioniq(root: Path, split: str = "val", protocol: Protocol | None = None,
                   categories: tuple[str, ...] = FIQ_CATEGORIES) -> Benchmark:
    """FashionIQ at `root` (`captions/cap.<cat>.<split>.json`, `image_splits/split.<cat>.<split>.json`,
    `images/`): one task per category, gallery = the split file in order, query ids
    `<category>:<index>`, two captions each; unlabelled on `test`. `protocol.fiq_ext` picks the
    image extension (auto: .jpg or .png, whichever `images/` holds more of).

    Errors: EvalError naming the file and entry for an unknown split, a missing or malformed JSON
    file, a gallery id that is not a string, is listed twice or is not a plain file name,
    captions that are not 2 strings, or (train, val) a target outside the split file. Missing
    images are not errors here (`find_bad_images`)."""
    protocol = protocol or Protocol()
    if split not in ("train", "val", "test"):
        raise EvalError(f"FashionIQ split {split!r}: expected train, val or test")
    images = root / "images"
    present = _listdir(images)
    exts = {"jpg": (".jpg",), "png": (".png",), "auto": (".jpg", ".png")}[protocol.fiq_ext]
    if protocol.fiq_ext == "auto" and sum(n.endswith(".png") for n in present) > \
            sum(n.endswith(".jpg") for n in present):
        exts = (".png", ".jpg")     # a .png mirror: report a missing image under its .png name
    used_ext: set[str] = set()

    def image_path(asin: str, where: str) -> Path:
        if "/" in asin or "\\" in asin or asin in ("", ".", ".."):
            raise EvalError(f"{where}: image id {asin!r} is not a file name in {images}")
        for ext in exts:
            if asin + ext in present:
                used_ext.add(ext)
                return images / (asin + ext)
        return images / (asin + exts[0])    # expected name; reported as missing by the check

    tasks = []
    for cat in categories:
        cap = root / "captions" / f"cap.{cat}.{split}.json"
        spl = root / "image_splits" / f"split.{cat}.{split}.json"
        gallery = _read_json(spl, list)
        for i, g in enumerate(gallery):
            if not isinstance(g, str):
                raise EvalError(f"{spl.name} entry {i}: expected an image id string, got {g!r}")
        if len(set(gallery)) != len(gallery):
            dup = next(g for i, g in enumerate(gallery) if g in gallery[:i])
            raise EvalError(f"{spl.name}: image id {dup!r} listed twice")
        in_split = set(gallery)
        labelled = split != "test"
        queries = []
        for i, raw in enumerate(_read_json(cap, list)):
            e = _entry(cap, i, raw)
            ref = e.get("candidate", str)
            e.label = f"candidate {ref}"
            caps = e.get("captions", list)
            if len(caps) != 2 or not all(isinstance(c, str) for c in caps):
                raise e.fail(f"'captions' should be a list of 2 strings, got {caps!r}")
            tgt = e.get("target", str, optional=not labelled)
            if labelled and tgt not in in_split:
                raise e.fail(f"target {tgt!r} not in {spl.name}")
            queries.append(Query(f"{cat}:{i}", ref, tuple(caps), tgt, (tgt,) if tgt else (), entry=i))
        ids = set(gallery) | {q.reference for q in queries}
        where = {q.reference: f"{cap.name} entry {q.entry}" for q in queries} | \
            {g: f"{spl.name} entry {i}" for i, g in enumerate(gallery)}
        tasks.append(Task(cat, cap, spl, queries, list(gallery),
                          {a: image_path(a, where[a]) for a in sorted(ids)}))
    notes = [f"image extension: {'/'.join(sorted(used_ext)) or exts[0]}"]
    return Benchmark("fashioniq", split, root, tasks, split != "test", notes)


# ----------------------------------------------------------------------------- CIRR

def _cirr_split_file(ann: Path, images: Path, split: str) -> tuple[Path, dict[str, Path]]:
    spl = ann / "image_splits" / f"split.rc2.{split}.json"
    mapping = _read_json(spl, dict)
    paths = {}
    for i, (name, rel) in enumerate(mapping.items()):
        if not isinstance(rel, str):
            raise EvalError(f"{spl.name} entry {i} ({name}): expected a relative path, got {rel!r}")
        paths[name] = _join(images, rel, f"{spl.name} entry {name}")
    return spl, paths


def cirr_layout(root: Path, split: str) -> tuple[Path, Path]:
    """(annotation folder, image folder) of a CIRR tree at `root`, in any published layout.

    Annotations (`captions/`, `image_splits/`) are at `root` or, as SEARLE's loaders expect, at
    `root/cirr/`. Images (`dev/`, `test1/`, `train/`, the folders the split files name) are at
    `root` or, as in the CIRR README, at `root/img_raw/`. A `--root` that points at SEARLE's
    `cirr/` folder, with the images beside it, is refused with the right `--root`."""
    ann = root
    if not (root / "image_splits").is_dir() and (root / "cirr" / "image_splits").is_dir():
        ann = root / "cirr"
    spl = ann / "image_splits" / f"split.rc2.{split}.json"
    tops = {"dev", "test1", "train"}
    try:
        data = json.loads(spl.read_text())
        if isinstance(data, dict):
            first = {Path(v.removeprefix("./")).parts[0] for v in data.values()
                     if isinstance(v, str) and Path(v.removeprefix("./")).parts}
            tops = {t for t in first if t not in (".", "..") and not os.path.isabs(t)} or tops
    except (OSError, ValueError):
        pass                                    # the reader reports it
    for images in (root, root / "img_raw"):
        if any((images / t).is_dir() for t in tops):
            return ann, images
    for images in (root.parent, root.parent / "img_raw"):
        if ann == root and any((images / t).is_dir() for t in tops):
            raise EvalError(f"{root}: CIRR annotations found but the images ({'/'.join(sorted(tops))}/) "
                            f"are in {images}, outside this folder (SEARLE's layout keeps the "
                            f"annotations in cirr/ beside the images): pass --root {root.parent}")
    return ann, root


def load_cirr(root: Path, split: str = "val", protocol: Protocol | None = None) -> Benchmark:
    """CIRR at `root` (any layout `cirr_layout` knows): split val, test1 (alias test) or train;
    one task, gallery = the split file's images (`protocol.cirr_gallery == "all"`: every split
    file present, not comparable to the standard), query ids = pairids; test1 is unlabelled.

    Errors: EvalError naming the file and entry for an unknown split, a missing or malformed JSON
    file, a repeated pairid, a reference, img_set member or target_hard not in the split file,
    or a split-file path that leaves the image folder."""
    protocol = protocol or Protocol()
    if split not in CIRR_SPLITS:
        raise EvalError(f"CIRR split {split!r}: expected one of {', '.join(CIRR_SPLITS)}")
    split = CIRR_SPLITS[split]
    ann, images = cirr_layout(root, split)
    cap = ann / "captions" / f"cap.rc2.{split}.json"
    spl, own = _cirr_split_file(ann, images, split)
    labelled = split != "test1"
    queries = []
    for i, e, pid in _keyed_entries(cap, "pairid"):
        ref = e.get("reference", str)
        if ref not in own:
            raise e.fail(f"reference {ref!r} not in {spl.name}")
        caption = e.get("caption", str)
        img_set = e.get("img_set", dict)
        members = img_set.get("members")
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise e.fail(f"img_set.members should be a non-empty list of image names, got {members!r}")
        for m in members:
            if m not in own:
                raise e.fail(f"img_set member {m!r} not in {spl.name}")
        tgt = e.get("target_hard", str, optional=not labelled)
        if labelled and tgt not in own:
            raise e.fail(f"target_hard {tgt!r} not in {spl.name}")
        queries.append(Query(str(pid), ref, (caption,), tgt, (tgt,) if tgt else (), tuple(members), entry=i))
    gallery_paths = dict(own)
    notes = []
    if protocol.cirr_gallery == "all":
        # VISTA/MegaPairs-style: rank against every CIRR split present (not comparable to the standard).
        for other in ("train", "val", "test1"):
            f = ann / "image_splits" / f"split.rc2.{other}.json"
            if other != split and f.exists():
                gallery_paths.update(_cirr_split_file(ann, images, other)[1])
                notes.append(f"gallery includes {f.name}")
    if ann != root or images != root:
        notes.append(f"layout: annotations in {ann}, images in {images}")
    task = Task("cirr", cap, spl, queries, list(gallery_paths), gallery_paths)
    return Benchmark("cirr", split, root, [task], labelled, notes)


# ----------------------------------------------------------------------------- CIRCO

def _coco_dirs(root: Path) -> tuple[Path, Path]:
    tried = []
    for base in (root / "COCO2017_unlabeled", root):
        info = base / "annotations" / "image_info_unlabeled2017.json"
        if info.exists():
            return info, base / "unlabeled2017"
        tried.append(str(info))
    raise EvalError(f"{root}: COCO unlabeled2017 image list not found (looked for {' and '.join(tried)})")


def load_circo(root: Path, split: str = "val") -> Benchmark:
    """CIRCO at `root` (`annotations/<split>.json`; COCO's `annotations/image_info_unlabeled2017.json`
    and `unlabeled2017/` under `root/COCO2017_unlabeled/` or `root`): split val (labelled) or test;
    one task whose gallery is every COCO unlabeled2017 image, ids as decimal strings.

    Errors: EvalError naming the file and entry for an unknown split, a missing COCO image list,
    a missing or malformed annotation, a repeated query id, an image id not in the COCO list, a
    COCO `file_name` that leaves the image folder, or (val) `gt_img_ids` that do not start with
    the target or list an image twice."""
    if split not in CIRCO_SPLITS:
        raise EvalError(f"CIRCO split {split!r}: expected val or test")
    ann = root / "annotations" / f"{split}.json"
    info, img_dir = _coco_dirs(root)
    images = _read_json(info, dict).get("images")
    if not isinstance(images, list):
        raise EvalError(f"{info}: expected an 'images' list")
    paths: dict[str, Path] = {}
    for i, im in enumerate(images):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int):
            raise EvalError(f"{info.name} images[{i}]: expected an object with an integer 'id'")
        name = im.get("file_name", f"{im['id']:012d}.jpg")
        if not isinstance(name, str):
            raise EvalError(f"{info.name} images[{i}] (id {im['id']}): file_name should be a string, got {name!r}")
        paths[str(im["id"])] = _join(img_dir, name, f"{info.name} images[{i}] (id {im['id']})")
    labelled = split == "val"
    queries = []
    for i, e, qid in _keyed_entries(ann, "id"):

        def image(key: str, v=None) -> str:
            v = e.get(key, int) if v is None else v
            if not isinstance(v, int) or isinstance(v, bool):
                raise e.fail(f"{key} should hold integer image ids, got {v!r}")
            if str(v) not in paths:
                raise e.fail(f"{key} {v} not in {info.name}")
            return str(v)

        ref = image("reference_img_id")
        rel = e.get("relative_caption", str)
        shared = e.get("shared_concept", str)
        tgt, gt, aspects = None, (), ()
        if labelled:
            tgt = image("target_img_id")
            gts = e.get("gt_img_ids", list)
            gt = tuple(image("gt_img_ids", v) for v in gts)
            if not gt or gt[0] != tgt:
                raise e.fail(f"gt_img_ids should start with target_img_id {tgt}, got {gts[:3]}")
            if len(set(gt)) != len(gt):
                raise e.fail("gt_img_ids lists an image twice")
            aspects = tuple(e.get("semantic_aspects", list, optional=True) or ())
        queries.append(Query(str(qid), ref, (rel,), tgt, gt, shared_concept=shared, aspects=aspects, entry=i))
    task = Task("circo", ann, info, queries, list(paths), paths)
    return Benchmark("circo", split, root, [task], labelled)


# ----------------------------------------------------------------------------- integrity

CheckLevel = Literal["exists", "header", "decode"]


def find_bad_images(bench: Benchmark, level: CheckLevel = "header") -> dict[str, str]:
    """Image files that are missing or unreadable: {path: reason}.

    `exists` only looks the name up in its folder; `header` also opens it with PIL (catches empty
    and non-image files at a few microseconds each) and checks that a JPEG/PNG/GIF/WebP ends as a
    complete file does (a cut download), decoding in full the files that do not; `decode`
    decodes every file with the loader the models use (`datagen.base.images.open_image`; slow).
    """
    from PIL import Image

    from datagen.base.images import ImageError, looks_truncated, open_image

    listing: dict[Path, set[str]] = {}
    bad: dict[str, str] = {}
    checked: set[Path] = set()
    for task in bench.tasks:
        for p in task.paths.values():
            if p in checked:
                continue
            checked.add(p)
            names = listing.get(p.parent)
            if names is None:
                names = listing[p.parent] = _listdir(p.parent)
            if p.name not in names:
                bad[str(p)] = "missing"
                continue
            if level == "exists":
                continue
            try:
                try:
                    if level == "header":
                        with Image.open(p):
                            pass
                    full = level == "decode" or looks_truncated(p)
                except Exception:  # noqa: BLE001 - the loader says why, in the models' words
                    full = True
                if full:
                    open_image(p, str(p))
            except ImageError as e:
                bad[str(p)] = "unreadable: " + str(e).removeprefix(f"{p}: ")
    return bad


def _bad_ids(task: Task, bad: dict[str, str]) -> set[str]:
    return {i for i, p in task.paths.items() if str(p) in bad}


def _affected(q: Query, ids: set[str]) -> bool:
    return q.reference in ids or any(g in ids for g in q.gt) or any(m in ids for m in q.members)


def integrity_error(bench: Benchmark, bad: dict[str, str]) -> EvalError:
    """The EvalError (returned, not raised) that stops a run on `bad` images ({path: reason}, from
    `find_bad_images`): how many, the first five, the queries affected, and how to go on."""
    n_q = sum(_affected(q, _bad_ids(t, bad)) for t in bench.tasks for q in t.queries)
    first = ", ".join(f"{_rel(p, bench.root)} ({why})" for p, why in list(bad.items())[:5])
    return EvalError(
        f"{len(bad)} image(s) missing or unreadable under {bench.root} (first: {first}); "
        f"{n_q} of {bench.n_queries} queries affected. No number is reported on an incomplete "
        "benchmark: restore the images, or pass --allow-missing (protocol missing=drop) to drop the "
        "affected queries, which is reported with the results.")


def _rel(p: str, root: Path) -> str:
    try:
        return str(Path(p).relative_to(root))
    except ValueError:
        return p


def drop_bad_images(bench: Benchmark, bad: dict[str, str]) -> tuple[Benchmark, dict]:
    """Remove bad images and the queries that cannot be scored without them; report both.

    A query is dropped when its reference or its target is bad (Pic2Word drops unreadable
    FashionIQ queries the same way, silently; we report it). Bad images leave the gallery, so they
    cannot be retrieved: a CIRCO query that loses a non-target ground truth, or a CIRR query that
    loses a non-target set member, is kept with its annotation unchanged (the lost ground truth
    is a miss, still counted in mAP@K's min(K, #ground truths), as the official scorer counts it
    on the same ranking) and counted as changed. On unlabelled (test) splits nothing can be
    dropped, because a server submission must cover every query.
    Errors: EvalError on an unlabelled split when a query's reference (or target) is bad.
    """
    tasks, dropped, changed, examples = [], 0, 0, []
    for task in bench.tasks:
        ids = _bad_ids(task, bad)
        keep = []
        for q in task.queries:
            if q.reference in ids or (q.target is not None and q.target in ids):
                if not bench.labelled:
                    raise EvalError(
                        f"{task.annotation.name} entry {q.entry} (id {q.qid}): reference image "
                        f"{_rel(str(task.paths[q.reference]), bench.root)} is {bad[str(task.paths[q.reference])]}; "
                        "a test-server submission must cover every query, so it cannot be dropped")
                dropped += 1
                if len(examples) < 5:
                    examples.append(f"{task.annotation.name} entry {q.entry} (id {q.qid})")
                continue
            if _affected(q, ids):
                changed += 1
            keep.append(q)
        tasks.append(replace(task, queries=keep, gallery=[g for g in task.gallery if g not in ids]))
    report = {
        "bad_images": len(bad),
        "bad_examples": [f"{_rel(p, bench.root)} ({why})" for p, why in list(bad.items())[:5]],
        "queries_total": bench.n_queries,
        "queries_dropped": dropped,
        "dropped_examples": examples,
        "queries_changed": changed,
        "handling": "dropped queries whose reference or target image is missing or unreadable "
                    "(as Pic2Word); removed those images from the gallery; queries that lost other "
                    "ground truths / set members keep them as misses (metric denominators unchanged)",
    }
    return replace(bench, tasks=tasks), report


def query_text_problems(bench: Benchmark) -> dict[tuple[str, str], str]:
    """{(task name, query id): why} for queries whose annotation gives no text to compose with
    (every caption empty or blank)."""
    return {(t.name, q.qid): "empty caption" for t in bench.tasks for q in t.queries
            if not any(c.strip() for c in q.captions)}


def drop_queries(bench: Benchmark, problems: dict[tuple[str, str], str], allow: bool) -> tuple[Benchmark, dict]:
    """Refuse (EvalError naming the file and entry of the first few) or, with `allow`, drop the
    queries in `problems` and report how many. Test splits are never dropped (see drop_bad_images)."""
    where = [f"{t.annotation.name} entry {q.entry} (id {q.qid}): {problems[(t.name, q.qid)]}"
             for t in bench.tasks for q in t.queries if (t.name, q.qid) in problems]
    if not allow or not bench.labelled:
        more = ("a test-server submission must cover every query: fix the annotation or the template"
                if allow else "fix the caption or the template, or pass --allow-missing (protocol "
                "missing=drop) to drop these queries, which is reported with the results")
        raise EvalError(f"{len(where)} of {bench.n_queries} queries cannot be encoded (first: "
                        f"{'; '.join(where[:3])}); {more}")
    tasks = [replace(t, queries=[q for q in t.queries if (t.name, q.qid) not in problems]) for t in bench.tasks]
    report = {"queries_unusable": len(where), "unusable_examples": where[:5]}
    return replace(bench, tasks=tasks), report
