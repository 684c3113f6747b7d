"""Training triplets for stage II, read from a datagen dataset folder or a public triplet release.

`triplets.format` names the layout of `triplets.path`:

* `cirgen`: a datagen dataset folder (`run.json`, `shards/*.parquet`, `rejects/*.parquet`). Read in
  two passes so memory grows with the subsample, not the dataset: first only the columns the
  `conditions` use (no column at all without filters: the row counts come from the footers),
  then `id`, `modification_text` and the image bytes of the chosen rows only, one parquet row
  group at a time.
* `transagg`: TransAgg's Laion-CIR files as released (Code-kunkun/ZS-CIR, `data/files/`):
  `laion_template_info.json`, a list of `{ref_image_id, relative_cap, tgt_image_id}`, and
  `laion_llm_info.json` (the ChatGPT set), an object keyed by the reference id holding
  `{tgt_image_id, relative_cap, tgt_cap}`. Images are `<image_root>/<id zero-padded to 7
  digits>.png`, TransAgg's own `str(id).zfill(7)` (`0001000.png`); an unpadded `<id>`,
  `<id>.png` or `<id>.jpg` is also accepted. `image_root` defaults to the JSON file's folder.
* `cirr`: CIRR captions `captions/cap.rc2.<split>.json` (train or val). Names resolve through
  `image_splits/split.rc2.<split>.json` (official layout: train images in `train/<k>/`); its
  relative paths are taken inside `image_root`, the CIRR root folder, which defaults to the folder
  holding `image_splits/` (the parent of `captions/`). Without a split file, `<image_root>/<name>`
  `[.png|.jpg]`.
* `synthtriplets18m`: CompoDiff's SynthTriplets18M in its WebDataset form: samples
  `<key>.source_image.jpg`, `<key>.target_image.jpg` and `<key>.json` (`source_caption`,
  `target_caption`), either in uncompressed `.tar` shards (`path` = one shard, a folder of shards
  or a glob) or extracted into a folder. The release carries no edit instruction (CompoDiff issue
  #10), so the modification text is the target caption, as the TSCIR authors' reader
  (`LiJiaBei-7/TSCIR`, `src/data.py`) uses it. Image bytes are read only for the chosen samples.

Quantity and quality are varied without regenerating: `max_triplets` takes a deterministic
subsample (a seeded permutation of the usable rows, so N=500 is a prefix of N=1000 with the same
seed), and `conditions` select cirgen rows by the stored scores/labels (`score_clip_dir>=0.2`,
`failure==none`, `pass_clip_dir==true`). A bad row (missing or corrupt image, empty text) is an
error naming the file and row, or a counted skip (`bad_rows="skip"`). A path taken from a manifest
(an id, a split-file entry) that leaves its root is always refused, naming the file and entry.
"""
from __future__ import annotations

import glob
import json
import operator
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from datagen.base.errors import MachineError, os_error_line
from datagen.schema import DatasetError, TripletReader

from .data import DataError, open_image

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
        "!=": operator.ne}
_COND = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")
# Columns every cirgen shard must have for stage II (datagen.schema.CORE_COLUMNS).
_CIRGEN_COLUMNS = ("id", "modification_text", "source_caption", "reference_image", "target_image")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TRANSAGG_ID_WIDTH = 7          # TransAgg names images f"{str(id).zfill(7)}.png"


@dataclass
class TripletsConfig:
    """The `triplets` section of a stage-II recipe: which triplet set `load_triplets` reads and how it is
    subsampled and filtered (see the module docstring)."""

    format: Literal["cirgen", "transagg", "cirr", "synthtriplets18m"] = "cirgen"
    path: str | None = None            # dataset folder (cirgen), JSON file, or shards (synthtriplets18m)
    image_root: str | None = None      # transagg: image folder; cirr: CIRR root (see module docstring)
    max_triplets: int | None = None
    subsample_seed: int = 0
    conditions: list[str] = field(default_factory=list)   # e.g. ["failure==none", "score_clip_dir>=0.2"]
    include_rejects: bool = False      # also train on candidates the generation filters rejected
    allow_incomplete: bool = False     # cirgen: train on an unfinished dataset (refused by default)
    bad_rows: Literal["error", "skip"] = "error"


@dataclass
class Triplets:
    """Training triplets as `load_triplets` returns them: parallel per-triplet lists (images as bytes or
    paths, decoded only by `image`), the feature-cache `dataset_id`, and the skipped / filtered-out counts."""

    ids: list[str]
    reference: list            # bytes or Path per triplet
    target: list
    modification: list[str]
    where: list[str]           # "file row" for error messages
    dataset_id: str
    skipped: int = 0
    filtered_out: int = 0
    reference_caption: list[str | None] | None = None   # stage II's soft text alignment (None: none given)

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int, which: str) -> Image.Image:
        """The RGB image of triplet `i`: its reference when `which == "ref"`, else its target.
        Raises DataError naming the triplet's file and row when the image cannot be read."""
        data = self.reference[i] if which == "ref" else self.target[i]
        return open_image(data if isinstance(data, (bytes, Path)) else Path(data), f"{self.where[i]} ({which})")


def parse_condition(text: str):
    """`column<op>value` -> (column, operator, value); value is a float, a bool (`true`/`false`),
    None (`none`/`null`) or text. Raises DataError for anything else."""
    m = _COND.match(text)
    if not m:
        raise DataError(f"filter {text!r} is not of the form column<op>value (ops: {', '.join(_OPS)})")
    col, op, raw = m.groups()
    value: object = raw
    if raw.lower() in ("none", "null"):
        value = None
    elif raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        try:
            value = float(raw)
        except ValueError:
            value = raw.strip("'\"")
    if (value is None or isinstance(value, (str, bool))) and _OPS[op] not in (operator.eq, operator.ne):
        raise DataError(f"filter {text!r}: only == and != compare with text, true/false or none")
    return col, _OPS[op], value


def _keep(row: dict, conds) -> bool:
    for col, op, value in conds:
        v = row.get(col)
        if value is None or isinstance(value, (str, bool)):
            if not op(v, value):
                return False
            continue
        if v is None:
            return False
        if isinstance(v, str):
            raise DataError(f"filter on {col!r} compares a number with the text {v!r}")
        if not op(float(v), value):
            return False
    return True


def _subsample(n: int, k: int | None, seed: int) -> np.ndarray:
    order = np.random.default_rng([seed, 7]).permutation(n)
    return np.sort(order[:k]) if k is not None and k < n else np.arange(n)


def load_triplets(cfg: TripletsConfig) -> Triplets:
    """Read the triplets `cfg` names (see the module docstring for the formats).

    Returns a `Triplets` whose images are bytes (cirgen, synthtriplets18m shards) or file paths.
    Raises DataError/DatasetError naming the file and row/entry for unusable input
    (`bad_rows="skip"` counts bad rows in `.skipped` instead; escaping paths are always refused),
    MachineError when the machine refuses a read (permission)."""
    if not cfg.path:
        raise DataError("triplets.path (--triplets) is required")
    if cfg.format == "cirgen":
        return _load_cirgen(cfg)
    if cfg.format == "synthtriplets18m":
        return _load_synthtriplets(cfg)
    return _load_json(cfg)


# ----------------------------------------------------------------------------- shared helpers

def _os_fail(e: OSError, path: Path) -> Exception:
    """A missing file is the user's input; a refused read is the machine's."""
    cls = MachineError if isinstance(e, PermissionError) else DataError
    return cls(os_error_line(e, path))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise _os_fail(e, path) from None


def _inside(root: Path, rel: str, where: str) -> Path:
    """`root/rel` resolved; DataError naming `where` when it leaves `root` (`..`, absolute paths,
    symlinks pointing out)."""
    base = root.resolve()
    p = (base / rel).resolve()
    if p != base and base not in p.parents:
        raise DataError(f"{where}: path {rel!r} leaves {root}")
    return p


def _dataset_id(ids: list, refs: list, tgts: list) -> str:
    """The feature-cache id of a triplet set: the content of its images in order (bytes or files),
    so images replaced in place, or another copy with the same names, never get stale features,
    and its ids (the cache entry is labelled with them: two files over the same images differ)."""
    from datagen.base.config import stable_hash

    from .features import content_id

    return f"triplets-{stable_hash([content_id(list(refs) + list(tgts)), list(ids)], 24)}"


def _problem(cfg: TripletsConfig, where: str, problem: str) -> None:
    if cfg.bad_rows == "error":
        raise DataError(f"{where}: {problem}")


def _verify(data: bytes) -> bool:
    """Does `data` decode with the one image loader (truncated data included)?"""
    from datagen.base.images import ImageError
    from datagen.base.images import open_image as decode

    try:
        decode(data, "triplet image")
        return True
    except ImageError:
        return False


# ----------------------------------------------------------------------------- cirgen folders

def _parquet_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, PermissionError):
            raise MachineError(os_error_line(e, path)) from None
        raise DatasetError(f"{path}: unreadable shard ({e})") from None


def _load_cirgen(cfg: TripletsConfig) -> Triplets:
    import pyarrow as pa

    # TripletReader opens and checks the folder (run.json, format) and lists its shards; any folder
    # validation it does (missing/extra/corrupt shards) applies here too.
    reader = TripletReader(cfg.path, allow_incomplete=cfg.allow_incomplete)
    conds = [parse_condition(c) for c in cfg.conditions]
    cond_cols = list(dict.fromkeys(c for c, _, _ in conds))
    files = [p for rejects in ([False, True] if cfg.include_rejects else [False])
             for p in reader.shard_paths(rejects)]

    # Pass 1: which rows pass the filters, from the filter columns only.
    kept_parts, total = [], 0
    for fi, path in enumerate(files):
        pf = _parquet_file(path)
        names = set(pf.schema_arrow.names)
        for c in _CIRGEN_COLUMNS:
            if c not in names:
                raise DatasetError(f"{path}: no column {c!r}; not a cirgen triplet shard")
        for c in cond_cols:
            if c not in names:
                raise DataError(f"{path}: no column {c!r} to filter on (columns: {sorted(names)})")
        n = pf.metadata.num_rows
        if not conds:
            rows = np.arange(n)
        else:
            rows, r0 = [], 0
            try:
                for batch in pf.iter_batches(batch_size=8192, columns=cond_cols, use_threads=False):
                    cols = batch.to_pydict()
                    for k in range(batch.num_rows):
                        try:
                            if _keep({c: cols[c][k] for c in cond_cols}, conds):
                                rows.append(r0 + k)
                        except DataError as e:
                            raise DataError(f"{path} row {r0 + k}: {e}") from None
                    r0 += batch.num_rows
            except (pa.ArrowInvalid, OSError) as e:
                raise DatasetError(f"{path}: unreadable shard ({e})") from None
            rows = np.asarray(rows, dtype=np.int64)
        kept_parts.append(np.stack([np.full(len(rows), fi, dtype=np.int64), rows.astype(np.int64)], 1))
        total += n
    kept = np.concatenate(kept_parts) if kept_parts else np.zeros((0, 2), dtype=np.int64)
    sel = kept[_subsample(len(kept), cfg.max_triplets, cfg.subsample_seed)]   # file order, row order

    # Pass 2: id, text and image bytes of the chosen rows only, one row group at a time.
    skipped = 0
    ids, refs, tgts, mods, wh, caps = [], [], [], [], [], []
    for fi in np.unique(sel[:, 0]):
        path = files[fi]
        pf = _parquet_file(path)
        want = sel[sel[:, 0] == fi, 1]
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        for g in range(pf.num_row_groups):
            local = want[(want >= starts[g]) & (want < starts[g + 1])] - starts[g]
            if not len(local):
                continue
            try:
                part = pf.read_row_group(g, columns=list(_CIRGEN_COLUMNS), use_threads=False)
                if 4 * len(local) >= part.num_rows:      # most of the group: convert it once
                    every = part.to_pylist()
                    recs = [every[i] for i in local]
                else:   # zero-copy slices, not Table.take: take loads the compute kernels (~40 MB resident)
                    recs = [part.slice(int(i), 1).to_pylist()[0] for i in local]
            except (pa.ArrowInvalid, OSError) as e:
                raise DatasetError(f"{path}: unreadable shard ({e})") from None
            for r, rec in zip(local + starts[g], recs):
                where = f"{path} row {r}"
                ref = (rec.get("reference_image") or {}).get("bytes")
                tgt = (rec.get("target_image") or {}).get("bytes")
                problem = None if ref and tgt else "missing image bytes"
                if problem is None:
                    for b, which in ((ref, "reference"), (tgt, "target")):
                        if not _verify(b):
                            problem = f"corrupt {which} image"
                mod = rec.get("modification_text")
                if problem is None and not (isinstance(mod, str) and mod.strip()):
                    problem = "empty modification_text"
                if problem:
                    _problem(cfg, f"{where} (id {rec.get('id')})", problem)
                    skipped += 1
                    continue
                ids.append(rec["id"])
                refs.append(ref)
                tgts.append(tgt)
                mods.append(mod.strip())
                caps.append(rec.get("source_caption"))
                wh.append(where)
    return Triplets(ids, refs, tgts, mods, wh, _dataset_id(ids, refs, tgts), skipped, total - len(kept), caps)


# ----------------------------------------------------------------------------- TransAgg / CIRR JSON

def _transagg_entries(path: Path, data):
    """(entry label, reference id, target id, text) per entry of either released file."""
    if isinstance(data, list):
        items = [(str(i), e, None) for i, e in enumerate(data)]
    elif isinstance(data, dict):
        items = [(str(k), e, k) for k, e in data.items()]
    else:
        raise DataError(f"{path}: expected a list (laion_template_info.json) or an object keyed by "
                        f"reference id (laion_llm_info.json), got {type(data).__name__}")
    for label, e, key in items:
        if not isinstance(e, dict):
            raise DataError(f"{path} entry {label}: expected an object, got {type(e).__name__}")
        ref = e.get("ref_image_id", key)
        yield label, ref, e.get("tgt_image_id"), e.get("relative_cap")


def _cirr_entries(path: Path, data):
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of CIRR entries, got {type(data).__name__}")
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise DataError(f"{path} entry {i}: expected an object, got {type(e).__name__}")
        yield str(i), e.get("reference"), e.get("target_hard"), e.get("caption")


def _cirr_split_file(path: Path, image_root: Path | None) -> Path | None:
    """`image_splits/split.rc2.<split>.json` for captions file `path`, or None."""
    m = re.fullmatch(r"cap\.(?:ext\.)?rc2\.([^.]+)\.json", path.name)
    if not m:
        return None
    name = f"split.rc2.{m.group(1)}.json"
    places = ([image_root] if image_root else []) + [path.parent.parent, path.parent]
    return next((p / "image_splits" / name for p in places if (p / "image_splits" / name).is_file()), None)


def _load_json(cfg: TripletsConfig) -> Triplets:
    path = Path(cfg.path)
    data = _read_json(path)
    given_root = Path(cfg.image_root) if cfg.image_root else None
    split_map: dict | None = None
    spl = _cirr_split_file(path, given_root) if cfg.format == "cirr" else None
    if spl is not None:
        root = given_root or spl.parent.parent
        split_map = _read_json(spl)
        if not isinstance(split_map, dict):
            raise DataError(f"{spl}: expected an object from image name to relative path, "
                            f"got {type(split_map).__name__}")
    else:
        root = given_root or path.parent
    if not root.is_dir():
        raise DataError(f"{path}: image folder {root} not found (set triplets.image_root)")

    def candidates(name: str) -> list[str]:
        if cfg.format == "transagg":
            return [f"{name.zfill(TRANSAGG_ID_WIDTH)}.png", name, f"{name}.png", f"{name}.jpg"]
        return [name, f"{name}.png", f"{name}.jpg"]

    def resolve(name, where: str) -> tuple[Path | None, str]:
        """(file, problem); escaping paths raise."""
        if isinstance(name, bool) or not isinstance(name, (str, int)) or str(name) == "":
            return None, f"image id {name!r} is not a name"
        name = str(name)
        if split_map is not None:
            rel = split_map.get(name)
            if rel is None:
                return None, f"image {name!r} is not in {spl.name}"
            if not isinstance(rel, str):
                raise DataError(f"{spl} entry {name!r}: expected a relative path, got {rel!r}")
            p = _inside(root, rel, f"{spl} entry {name!r}")
            if p.is_file():
                return p, ""
            hint = f" (image_root is the CIRR root: the folder {spl.name}'s paths start in)" if given_root else ""
            return None, f"image {name!r} not found at {root / rel}{hint}"
        for cand in candidates(name):
            p = _inside(root, cand, where)
            if p.is_file():
                return p, ""
        hint = "" if cfg.format != "cirr" else f" (no image_splits/ file found next to {path.parent})"
        return None, f"image {name!r} not found in {root} (tried {', '.join(candidates(name))}){hint}"

    entries = _transagg_entries(path, data) if cfg.format == "transagg" else _cirr_entries(path, data)
    ids, refs, tgts, mods, wh = [], [], [], [], []
    skipped = 0
    for label, ref, tgt, mod in entries:
        where = f"{path} entry {label}"
        rp, why = resolve(ref, where)
        problem = None if rp else f"reference: {why}"
        if problem is None:
            if tgt is None:
                problem = "no target image (a test split has none)"
            else:
                tp, why = resolve(tgt, where)
                problem = None if tp else f"target: {why}"
        if problem is None and not (isinstance(mod, str) and mod.strip()):
            problem = f"empty modification text ({mod!r})"
        if problem:
            _problem(cfg, where, problem)
            skipped += 1
            continue
        ids.append(label)
        refs.append(rp)
        tgts.append(tp)
        mods.append(mod.strip())
        wh.append(where)
    pick = _subsample(len(ids), cfg.max_triplets, cfg.subsample_seed)
    sel = lambda xs: [xs[i] for i in pick]  # noqa: E731
    return Triplets(sel(ids), sel(refs), sel(tgts), sel(mods), sel(wh), _dataset_id(sel(ids), sel(refs), sel(tgts)),
                    skipped)


# ----------------------------------------------------------------------------- SynthTriplets18M

def _split_key(name: str) -> tuple[str, str]:
    """WebDataset naming: the key is the path up to the first dot of the file name."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), (ext.lower() if dot else "")


def _synth_image_field(ext: str) -> str | None:
    for which in ("source_image", "target_image"):
        if ext.startswith(which + ".") and ext.split(".", 1)[1] in _IMAGE_EXTS:
            return which
    return None


def _synth_sources(path_text: str) -> tuple[list[Path], Path | None]:
    """(tar shards, extracted folder): exactly one of them is used."""
    if any(c in path_text for c in "*?["):
        tars = sorted(Path(p) for p in glob.glob(path_text))     # absolute or relative patterns
        if not tars:
            raise DataError(f"{path_text}: no file matches")
        return tars, None
    path = Path(path_text)
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise DataError(f"{path}: not found")
    tars = sorted(path.glob("*.tar"))
    return (tars, None) if tars else ([], path)


def _synth_sample(meta, has: dict) -> tuple[str | None, str]:
    """(modification text, problem) from a sample's parsed JSON and which images it has."""
    if meta is None:
        return None, "no .json member"
    if isinstance(meta, Exception):
        return None, f"malformed .json ({meta})"
    if not isinstance(meta, dict):
        return None, f".json is not an object ({type(meta).__name__})"
    for which in ("source_image", "target_image"):
        if not has.get(which):
            return None, f"no {which} member"
    text = meta.get("target_caption")
    if not (isinstance(text, str) and text.strip()):
        return None, f"empty target_caption ({text!r})"
    return text.strip(), ""


def _load_synthtriplets(cfg: TripletsConfig) -> Triplets:
    tars, folder = _synth_sources(cfg.path)
    rows: list[tuple] = []      # (id, where, modification, ref locator, tgt locator)
    skipped = 0

    def add(sid: str, where: str, meta, locs: dict) -> None:
        nonlocal skipped
        text, problem = _synth_sample(meta, locs)
        if problem:
            _problem(cfg, where, problem)
            skipped += 1
            return
        cap = meta.get("source_caption") if isinstance(meta, dict) else None
        rows.append((sid, where, text, locs["source_image"], locs["target_image"],
                     cap.strip() if isinstance(cap, str) and cap.strip() else None))

    for tar in tars:
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(tar, "r:") as tf:         # uncompressed: members can be read by offset
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    s = samples.setdefault(key, {"meta": None, "locs": {}})
                    if ext == "json":
                        try:
                            s["meta"] = json.loads(tf.extractfile(m).read().decode("utf-8"))
                        except (ValueError, UnicodeDecodeError) as e:
                            s["meta"] = e
                    elif (which := _synth_image_field(ext)) is not None:
                        s["locs"][which] = (tar, m.offset_data, m.size)
        except tarfile.TarError as e:
            raise DataError(f"{tar}: not an uncompressed tar shard ({e})") from None
        except OSError as e:
            raise _os_fail(e, tar) from None
        for key, s in samples.items():
            add(f"{tar.name}:{key}", f"{tar} sample {key}", s["meta"], s["locs"])
    if folder is not None:
        metas = sorted(folder.rglob("*.json"))
        if not metas:
            raise DataError(f"{folder}: no .tar shards and no <key>.json samples")
        for mp in metas:
            rel = mp.relative_to(folder).as_posix()
            key, ext = _split_key(rel)
            if ext != "json":
                continue
            where = str(mp)
            try:
                meta = json.loads(mp.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                meta = e
            except OSError as e:
                raise _os_fail(e, mp) from None
            locs = {}
            for which in ("source_image", "target_image"):
                for ext in _IMAGE_EXTS:
                    p = _inside(folder, f"{key}.{which}.{ext}", where)
                    if p.is_file():
                        locs[which] = p
                        break
            add(key, where, meta, locs)

    pick = _subsample(len(rows), cfg.max_triplets, cfg.subsample_seed)
    ids, refs, tgts, mods, wh, caps = [], [], [], [], [], []
    handles: dict[Path, object] = {}
    try:
        for i in pick:
            sid, where, text, rloc, tloc, cap = rows[i]
            imgs = []
            for loc in (rloc, tloc):
                if isinstance(loc, Path):
                    imgs.append(loc)
                    continue
                tar, off, size = loc
                if tar not in handles:
                    handles[tar] = open(tar, "rb")
                f = handles[tar]
                f.seek(off)
                imgs.append(f.read(size))
            bad = next((w for b, w in zip(imgs, ("source", "target")) if isinstance(b, bytes) and not _verify(b)),
                       None)
            if bad:
                _problem(cfg, where, f"corrupt {bad} image")
                skipped += 1
                continue
            ids.append(sid)
            refs.append(imgs[0])
            tgts.append(imgs[1])
            mods.append(text)
            caps.append(cap)
            wh.append(where)
    except OSError as e:
        raise _os_fail(e, Path(cfg.path)) from None
    finally:
        for f in handles.values():
            f.close()
    return Triplets(ids, refs, tgts, mods, wh, _dataset_id(ids, refs, tgts), skipped, reference_caption=caps)
