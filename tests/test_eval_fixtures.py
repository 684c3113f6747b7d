"""Tiny FashionIQ / CIRR / CIRCO folders in the exact official layouts, and a fake model.

Imported by the other tests/test_eval_*.py files. The fake model's gallery features are one-hot
vectors (one dimension per image) and a query's feature is a score vector over those images, so
every similarity in a test is a number written in the test itself and ties are exact.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

FIQ_CATS = ("dress", "shirt", "toptee")


def png(path: Path, color=(255, 0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)


def dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _texts(prompts) -> list[str]:
    from cir.prompts import QueryPrompt

    return [p.text() if isinstance(p, QueryPrompt) else p for p in prompts]


class FakeModel:
    """Gallery image i of `names` -> e_i; query -> `scores(ref_stem, prompt)` (a dict name -> score,
    or a full vector). Records every prompt it is asked to encode."""
    name = "fake"
    cache_key = "fake@test"

    def __init__(self, names: list[str], scores):
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.scores = scores
        self.prompts: list[str] = []

    def encode_images(self, paths):
        out = torch.zeros(len(paths), len(self.names))
        for r, p in enumerate(paths):
            out[r, self.index[Path(p).stem]] = 1.0
        return out

    max_prompt_words: int | None = None   # prompt_problems: longer prompts "lose" the placeholder

    def prompt_problems(self, prompts):
        n = self.max_prompt_words
        return {i: "placeholder cut" for i, p in enumerate(_texts(prompts)) if n is not None and len(p.split()) > n}

    def encode_queries(self, ref_paths, prompts):
        prompts = _texts(prompts)               # QueryPrompts read as `a photo of * that ...`
        self.prompts += list(prompts)
        rows = []
        for r, p in zip(ref_paths, prompts):
            s = self.scores(Path(r).stem, p)
            if isinstance(s, dict):
                v = torch.zeros(len(self.names))
                for n, x in s.items():
                    v[self.index[n]] = x
                s = v
            rows.append(torch.as_tensor(s, dtype=torch.float32))
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def descending(order: list[str]) -> dict[str, float]:
    """Scores that rank `order` first to last (1.0, 0.99, ...); unlisted images score 0."""
    return {n: 1.0 - 0.01 * i for i, n in enumerate(order)}


# ----------------------------------------------------------------------------- FashionIQ

def fiq_ids(cat: str, n: int = 60) -> list[str]:
    return [f"{cat}{i:03d}" for i in range(n)]


def make_fashioniq(root: Path, queries: dict[str, list[dict]], ext: str = ".png", n: int = 60,
                   split: str = "val") -> Path:
    """Each category has `n` gallery images <cat>000..; `queries[cat]` are cap.*.json records."""
    for cat in FIQ_CATS:
        ids = fiq_ids(cat, n)
        dump(root / "image_splits" / f"split.{cat}.{split}.json", ids)
        dump(root / "captions" / f"cap.{cat}.{split}.json", queries.get(cat, []))
        for a in ids:
            png(root / "images" / f"{a}{ext}")
    return root


# ----------------------------------------------------------------------------- CIRR

CIRR_NAMES = [f"dev-{g}-{i}-img{i % 2}" for g in range(2) for i in range(4)]   # 8 images
A, B, C, D, E, F, G, H = CIRR_NAMES


def cirr_val_queries() -> list[dict]:
    return [
        {"pairid": 10, "reference": A, "caption": "has two dogs.", "target_hard": C,
         "target_soft": {C: 1.0}, "img_set": {"id": 1, "members": [A, B, C, D, E, F],
                                               "reference_rank": 0, "target_rank": 2}},
        {"pairid": 11, "reference": B, "caption": "is at night", "target_hard": E,
         "target_soft": {E: 1.0}, "img_set": {"id": 2, "members": [B, C, D, E, F, A],
                                               "reference_rank": 0, "target_rank": 3}},
        {"pairid": 12, "reference": C, "caption": "shows a cat", "target_hard": G,
         "target_soft": {G: 1.0}, "img_set": {"id": 3, "members": [C, A, B, D, E, F],
                                               "reference_rank": 0, "target_rank": -1}},
    ]


def make_cirr(root: Path, split: str = "val", queries: list[dict] | None = None,
              names: list[str] | None = None) -> Path:
    folder = {"val": "dev", "test1": "test1", "train": "train/0"}[split]
    names = names or CIRR_NAMES
    dump(root / "image_splits" / f"split.rc2.{split}.json", {n: f"./{folder}/{n}.png" for n in names})
    dump(root / "captions" / f"cap.rc2.{split}.json", cirr_val_queries() if queries is None else queries)
    for n in names:
        png(root / folder / f"{n}.png")
    return root


def cirr_test_queries(names: list[str]) -> list[dict]:
    """Two test1 queries over `names` (no targets, as on the server)."""
    return [{"pairid": 100 + i, "reference": names[i], "caption": f"caption {i}",
             "img_set": {"id": i, "members": names[i:i + 6], "reference_rank": 0}} for i in range(2)]


# ----------------------------------------------------------------------------- CIRCO

CIRCO_IDS = [11, 22, 33, 44, 55, 66, 77, 88, 99, 111, 122, 133]


def circo_val_queries() -> list[dict]:
    return [
        {"id": 0, "reference_img_id": 11, "target_img_id": 22, "relative_caption": "has two of them",
         "shared_concept": "a dog", "gt_img_ids": [22, 33, 44, 55, 66, 77, 88],
         "semantic_aspects": ["cardinality", "addition"]},
        {"id": 1, "reference_img_id": 22, "target_img_id": 99, "relative_caption": "is red",
         "shared_concept": "a car", "gt_img_ids": [99], "semantic_aspects": ["addition"]},
    ]


def make_circo(root: Path, split: str = "val", queries: list[dict] | None = None,
               ids: list[int] | None = None) -> Path:
    ids = ids or CIRCO_IDS
    coco = root / "COCO2017_unlabeled"
    dump(coco / "annotations" / "image_info_unlabeled2017.json",
         {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]})
    for i in ids:
        png(coco / "unlabeled2017" / f"{i:012d}.jpg")    # PIL reads by content, not extension
    dump(root / "annotations" / f"{split}.json", circo_val_queries() if queries is None else queries)
    return root


def circo_name(i: int) -> str:
    return f"{i:012d}"


def test_fixtures_are_read_by_the_loaders(tmp_path):
    from cir.eval.benchmarks import load_benchmark

    make_fashioniq(tmp_path / "fiq", {"dress": [{"candidate": "dress000", "target": "dress001",
                                                  "captions": ["a", "b"]}]})
    fiq = load_benchmark("fashioniq", tmp_path / "fiq")
    assert [t.name for t in fiq.tasks] == list(FIQ_CATS) and fiq.n_queries == 1
    assert fiq.tasks[0].paths["dress000"] == tmp_path / "fiq" / "images" / "dress000.png"
    cirr = load_benchmark("cirr", make_cirr(tmp_path / "cirr"))
    assert cirr.split == "val" and cirr.tasks[0].gallery == CIRR_NAMES and cirr.n_queries == 3
    circo = load_benchmark("circo", make_circo(tmp_path / "circo"))
    assert circo.tasks[0].queries[0].gt == ("22", "33", "44", "55", "66", "77", "88")
