"""Training triplets for stage II: datagen dataset folders and TransAgg-/CIRR-style JSON.

Quantity and quality are varied without regenerating: `max_triplets` takes a deterministic
subsample (a seeded permutation of the kept rows, so N=500 is a prefix of N=1000 with the same
seed), and `where` filters by the stored scores/labels (`score_clip_dir>=0.2`, `failure==none`).
Missing or corrupt images are an error naming the file and row, or a counted skip.
"""
from __future__ import annotations

import json
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from datagen.config import stable_hash
from datagen.schema import TripletReader

from .data import DataError, open_image

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
        "!=": operator.ne}
_COND = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")


@dataclass
class TripletsConfig:
    format: Literal["cirgen", "transagg", "cirr"] = "cirgen"
    path: str | None = None            # dataset folder (cirgen) or JSON file
    image_root: str | None = None      # transagg/cirr: folder the image ids/paths resolve in
    max_triplets: int | None = None
    subsample_seed: int = 0
    where: list[str] = field(default_factory=list)   # e.g. ["failure==none", "score_clip_dir>=0.2"]
    include_rejects: bool = False      # also train on candidates the generation filters rejected
    on_error: Literal["raise", "skip"] = "raise"


@dataclass
class Triplets:
    ids: list[str]
    reference: list            # bytes or Path per triplet
    target: list
    modification: list[str]
    where: list[str]           # "file row" for error messages
    dataset_id: str
    skipped: int = 0
    filtered_out: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int, which: str) -> Image.Image:
        data = self.reference[i] if which == "ref" else self.target[i]
        return open_image(data if isinstance(data, (bytes, Path)) else Path(data), f"{self.where[i]} ({which})")


def parse_condition(text: str):
    m = _COND.match(text)
    if not m:
        raise DataError(f"filter {text!r} is not of the form column<op>value (ops: {', '.join(_OPS)})")
    col, op, raw = m.groups()
    value: object = raw
    if raw.lower() in ("none", "null"):
        value = None
    else:
        try:
            value = float(raw)
        except ValueError:
            value = raw.strip("'\"")
    return col, _OPS[op], value


def _keep(row: dict, conds) -> bool:
    for col, op, value in conds:
        v = row.get(col)
        if value is None or isinstance(value, str):
            if op not in (operator.eq, operator.ne):
                raise DataError(f"filter on {col!r}: only == and != compare with text or none")
            if not op(v, value):
                return False
        elif v is None or not op(float(v), value):
            return False
    return True


def _subsample(n: int, k: int | None, seed: int) -> np.ndarray:
    order = np.random.default_rng([seed, 7]).permutation(n)
    return np.sort(order[:k]) if k is not None and k < n else np.arange(n)


def load_triplets(cfg: TripletsConfig) -> Triplets:
    if not cfg.path:
        raise DataError("triplets.path (--triplets) is required")
    if cfg.format == "cirgen":
        return _load_cirgen(cfg)
    return _load_json(cfg)


def _load_cirgen(cfg: TripletsConfig) -> Triplets:
    reader = TripletReader(cfg.path)
    conds = [parse_condition(c) for c in cfg.where]
    rows, where = [], []
    for rejects in ([False, True] if cfg.include_rejects else [False]):
        for path in reader.shard_paths(rejects):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            names = set(pf.schema_arrow.names)
            for c, _, _ in conds:
                if c not in names:
                    raise DataError(f"{path}: no column {c!r} to filter on (columns: {sorted(names)})")
            r0 = 0
            for batch in pf.iter_batches(batch_size=512):
                for k, rec in enumerate(batch.to_pylist()):
                    rows.append(rec)
                    where.append(f"{path} row {r0 + k}")
                r0 += batch.num_rows
    kept = [i for i, r in enumerate(rows) if _keep(r, conds)]
    filtered_out = len(rows) - len(kept)
    pick = _subsample(len(kept), cfg.max_triplets, cfg.subsample_seed)
    sel = [kept[i] for i in pick]
    skipped = 0
    ids, refs, tgts, mods, wh = [], [], [], [], []
    for i in sel:
        r = rows[i]
        ref, tgt = (r.get("reference_image") or {}).get("bytes"), (r.get("target_image") or {}).get("bytes")
        problem = None if ref and tgt else "missing image bytes"
        if problem is None:
            for b, which in ((ref, "reference"), (tgt, "target")):
                try:
                    open_image(b, where[i])      # the one loader: also catches truncated data
                except DataError:
                    problem = f"corrupt {which} image"
        if problem is None and not (r.get("modification_text") or "").strip():
            problem = "empty modification_text"
        if problem:
            if cfg.on_error == "raise":
                raise DataError(f"{where[i]} (id {r.get('id')}): {problem}")
            skipped += 1
            continue
        ids.append(r["id"])
        refs.append(ref)
        tgts.append(tgt)
        mods.append(r["modification_text"].strip())
        wh.append(where[i])
    run = reader.run
    did = stable_hash({"recipe": run.get("recipe_hash"), "seed": run.get("seed"), "ids": ids})
    return Triplets(ids, refs, tgts, mods, wh, f"triplets-{did}", skipped, filtered_out)


def _load_json(cfg: TripletsConfig) -> Triplets:
    path = Path(cfg.path)
    root = Path(cfg.image_root) if cfg.image_root else path.parent
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    entries = list(data.values()) if isinstance(data, dict) else data
    keys = list(data.keys()) if isinstance(data, dict) else [str(i) for i in range(len(data))]
    ids, refs, tgts, mods, wh = [], [], [], [], []
    skipped = 0

    def resolve(name: str) -> Path | None:
        for cand in (root / name, root / f"{name}.png", root / f"{name}.jpg"):
            p = cand.resolve()
            if root.resolve() not in p.parents:
                raise DataError(f"{path}: image {name!r} escapes {root}")
            if p.exists():
                return p
        return None

    for k, e in zip(keys, entries):
        if cfg.format == "transagg":
            ref = e.get("ref_image_id", k)
            tgt, mod = e.get("tgt_image_id"), e.get("relative_cap")
        else:  # cirr
            ref, tgt, mod = e.get("reference"), e.get("target_hard"), e.get("caption")
        where = f"{path} entry {k}"
        rp, tp = resolve(str(ref)) if ref is not None else None, resolve(str(tgt)) if tgt is not None else None
        problem = None if (rp and tp) else f"image not found for {'reference ' + str(ref) if not rp else 'target ' + str(tgt)}"
        if problem is None and not (mod or "").strip():
            problem = "empty modification text"
        if problem:
            if cfg.on_error == "raise":
                raise DataError(f"{where}: {problem}")
            skipped += 1
            continue
        ids.append(str(k))
        refs.append(rp)
        tgts.append(tp)
        mods.append(mod.strip())
        wh.append(where)
    pick = _subsample(len(ids), cfg.max_triplets, cfg.subsample_seed)
    sel = lambda xs: [xs[i] for i in pick]  # noqa: E731
    did = stable_hash({"file": str(path.resolve()), "ids": sel(ids)})
    return Triplets(sel(ids), sel(refs), sel(tgts), sel(mods), sel(wh), f"triplets-{did}", skipped)
