"""Caption sources for real captions: a file, a HF dataset saved to disk, or an LLM with topics.

Files and datasets are read once into a cleaned *pool*: whitespace collapsed, other control
characters replaced by a space (rows counted), bad rows (empty caption, broken CSV/JSONL row,
undecodable line, a NUL character: a binary or UTF-16 file) either stop the run with
`file:line: why` or are skipped and counted (`captions.bad_rows`), over-long captions (more than
`captions.max_words` words or `MAX_CAPTION_CHARS` characters) skipped and counted, exact and near
duplicates removed and counted (`datagen.text.dedup`). The counts are in `Pool.report`; the
pipeline checks every input text file with `check_text_inputs` before it writes anything and
reports the counts in the log, the summary and stats.json (`caption_pool`). Candidates take
captions from the pool by `datagen.text.assign` (deterministic in (seed, unit, j)); each triplet
records the pool row and the pool fingerprint it came from.

The LLM source writes one caption per candidate about a topic (same backends and parser style
as the edits stage); near-duplicates of earlier captions *of the same unit* are rejected as
`caption_duplicate` (per unit, so the result does not depend on batch size or other units).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from ..base.errors import CirgenError, os_error_line
from ..candidate import Candidate
from .assign import SlotAssigner
from .dedup import NearDupIndex
from .llm import load_generator, make_request, request_seed
from .prompt import (CAPTION_SCHEMA, caption_messages, caption_prompt, load_caption_examples,
                     parse_caption, pick_examples)

log = logging.getLogger("datagen.captions")
TEXT_SUFFIXES = (".txt",)
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
# A caption is a sentence or two (CLIP reads 77 tokens): a longer "line" is a file problem (a
# paragraph, a minified JSON blob, a binary file with few newlines), skipped and counted as too long.
MAX_CAPTION_CHARS = 2000
# C0/C1 control characters that str.split() does not treat as whitespace (NUL is a bad row instead).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class CaptionSourceError(CirgenError, ValueError):
    """A caption file or dataset that cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class Row:
    """One row of a caption source as read, before cleaning; a bad row has `text` None and a `problem`."""

    where: str                  # "captions.csv:17" (1-based line) or "data.parquet row 16" (0-based)
    row: int                    # line number (text formats) or row index (columnar formats)
    text: str | None            # None: a bad row
    problem: str = ""


@dataclass
class Pool:
    """The cleaned caption pool (`build_pool`): captions, their source rows, a 16-hex-digit SHA-256
    fingerprint of the captions, and the counts."""

    captions: list[str]
    rows: list[int]
    fingerprint: str
    report: dict = field(default_factory=dict)


# ---- readers ------------------------------------------------------------------------------------

def _lines(path: Path) -> Iterator[tuple[int, str | None, str]]:
    """(line number, text or None, problem) for every line; a bad encoding is a bad row."""
    data = path.read_bytes()
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()                             # the newline that ends the file
    for i, raw in enumerate(parts, 1):
        try:
            yield i, raw.decode("utf-8").rstrip("\r"), ""
        except UnicodeDecodeError:
            yield i, None, "not valid UTF-8"


def _read_text(path: Path, column: str) -> Iterator[Row]:
    for i, text, problem in _lines(path):
        yield Row(f"{path}:{i}", i, text, problem)


def _read_jsonl(path: Path, column: str) -> Iterator[Row]:
    for i, text, problem in _lines(path):
        where = f"{path}:{i}"
        if text is None:
            yield Row(where, i, None, problem)
            continue
        if not text.strip():
            yield Row(where, i, None, "empty line")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield Row(where, i, None, f"malformed JSON ({e.msg})")
            continue
        value = obj.get(column) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            yield Row(where, i, None, f"no text field {column!r}")
            continue
        yield Row(where, i, value)


def _read_csv(path: Path, column: str) -> Iterator[Row]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise CaptionSourceError(f"{path}:{line}: not valid UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=CSV_SUFFIXES[path.suffix.lower()])
    try:
        header = next(reader)
    except StopIteration:
        raise CaptionSourceError(f"{path}: empty file (expected a header row)") from None
    except csv.Error as e:
        raise CaptionSourceError(f"{path}:1: malformed header ({e})") from None
    if column not in header:
        raise CaptionSourceError(f"{path}:1: no column {column!r} (columns: {', '.join(header)}); "
                                 f"set captions.column")
    idx, width = header.index(column), len(header)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise CaptionSourceError(f"{path}:{start}: malformed CSV ({e})") from None
        where = f"{path}:{start}"
        if not row:
            yield Row(where, start, None, "empty line")
        elif len(row) != width:
            yield Row(where, start, None, f"expected {width} fields, got {len(row)}")
        else:
            yield Row(where, start, row[idx])


def _read_parquet(path: Path, column: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except Exception as e:                      # noqa: BLE001 - pyarrow raises several types
        raise CaptionSourceError(f"{path}: not a readable Parquet file ({e})") from None
    names = f.schema_arrow.names
    if column not in names:
        raise CaptionSourceError(f"{path}: no column {column!r} (columns: {', '.join(names)}); "
                                 f"set captions.column")
    k = 0
    for batch in f.iter_batches(columns=[column], batch_size=65536):
        for v in batch.column(0).to_pylist():
            yield _cell(f"{path} row {k}", k, v)
            k += 1


def _cell(where: str, k: int, v) -> Row:
    if v is None:
        return Row(where, k, None, "missing value")
    if not isinstance(v, str):
        return Row(where, k, None, f"not text ({type(v).__name__})")
    return Row(where, k, v)


def _read_hf_disk(path: Path, column: str, split: str | None) -> Iterator[Row]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise CaptionSourceError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise CaptionSourceError(f"{path}: set captions.split to one of {', '.join(ds)}")
        ds = ds[split]
    if column not in ds.column_names:
        raise CaptionSourceError(f"{path}: no column {column!r} (columns: {', '.join(ds.column_names)}); "
                                 f"set captions.column")
    k = 0
    for batch in ds.select_columns([column]).iter(batch_size=65536):
        for v in batch[column]:
            yield _cell(f"{path} row {k}", k, v)
            k += 1


def read_rows(path: str | Path, column: str = "caption", split: str | None = None,
              kind: str = "file") -> Iterator[Row]:
    """The rows of a caption file (.txt, .csv/.tsv, .jsonl, .parquet by suffix; `column` unused for .txt)
    or, with `kind` "hf_disk", of a `save_to_disk` dataset (`split`). Raises CaptionSourceError for a
    missing path or an unknown suffix; while iterating, for an unreadable Parquet/dataset, a missing
    column or split, a non-UTF-8 or malformed CSV, and OSError for an unreadable file."""
    p = Path(path)
    if not p.exists():
        raise CaptionSourceError(f"{p}: caption source not found")
    if kind == "hf_disk":
        return _read_hf_disk(p, column, split)
    suffix = p.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _read_text(p, column)
    if suffix in CSV_SUFFIXES:
        return _read_csv(p, column)
    if suffix == ".jsonl":
        return _read_jsonl(p, column)
    if suffix == ".parquet":
        return _read_parquet(p, column)
    raise CaptionSourceError(f"{p}: unknown caption file type {suffix!r} "
                             f"(.txt, .csv, .tsv, .jsonl, .parquet; or captions.source: hf_disk)")


# ---- the pool -----------------------------------------------------------------------------------

def _clean(text: str) -> tuple[str | None, str, bool]:
    """(cleaned caption or None, problem, whether control characters were replaced)."""
    text = " ".join(text.split())
    if "\x00" in text:
        return None, "contains NUL characters (a binary or UTF-16 file?)", False
    if _CONTROL.search(text):
        return " ".join(_CONTROL.sub(" ", text).split()), "", True
    return text, "", False


def build_pool(rows: Iterator[Row], bad_rows: str = "error", max_words: int = 0, dedup: str = "near",
               near_threshold: float = 0.8, name: str = "") -> Pool:
    """The cleaned, deduplicated pool of `rows` (see the module docstring).

    `report` counts: rows read, bad_rows (skipped), control_chars (rows whose control characters
    were replaced by spaces), too_long, exact_duplicates, near_duplicates, captions (kept), and
    first_bad_rows (up to 3 `where: why`). Raises CaptionSourceError naming `name` (and the line)
    for a bad row when `bad_rows` is "error", and when no caption is left."""
    index = NearDupIndex(near_threshold, near=dedup == "near") if dedup != "none" else None
    caps, ids = [], []
    report = {"rows": 0, "bad_rows": 0, "control_chars": 0, "too_long": 0, "exact_duplicates": 0,
              "near_duplicates": 0}
    first_bad: list[str] = []
    for r in rows:
        report["rows"] += 1
        text, problem, cleaned = _clean(r.text) if r.text is not None else (None, r.problem, False)
        if not text:
            problem = problem or r.problem or "empty caption"
            if bad_rows == "error":
                raise CaptionSourceError(f"{r.where}: {problem} (set captions.bad_rows: skip to skip "
                                         f"and count such rows)")
            report["bad_rows"] += 1
            if len(first_bad) < 3:
                first_bad.append(f"{r.where}: {problem}")
            continue
        report["control_chars"] += int(cleaned)
        if (max_words and len(text.split()) > max_words) or len(text) > MAX_CAPTION_CHARS:
            report["too_long"] += 1
            continue
        if index is not None and not index.add(text):
            continue
        caps.append(text)
        ids.append(r.row)
    if index is not None:
        report["exact_duplicates"], report["near_duplicates"] = index.removed["exact"], index.removed["near"]
    report["captions"] = len(caps)
    if first_bad:
        report["first_bad_rows"] = first_bad
    if not report["rows"]:
        raise CaptionSourceError(f"{name}: no caption rows (an empty file or dataset)")
    if not caps:
        raise CaptionSourceError(f"{name}: no captions left after cleaning ({pool_counts(report)})"
                                 + (f"; first: {first_bad[0]}" if first_bad else ""))
    fp = hashlib.sha256("\n".join(caps).encode()).hexdigest()[:16]
    return Pool(caps, ids, fp, report)


def pool_counts(report: dict) -> str:
    """The counts of a pool report in words: `14 rows, 6 captions kept; dropped: 2 bad rows, ...`."""
    dropped = [f"{report[k]} {label}" for k, label in (
        ("bad_rows", "bad rows"), ("too_long", "too long"), ("exact_duplicates", "exact duplicates"),
        ("near_duplicates", "near duplicates")) if report.get(k)]
    line = f"{report['rows']} rows, {report.get('captions', 0)} captions kept"
    line += "; dropped: " + (", ".join(dropped) if dropped else "none")
    if report.get("control_chars"):
        line += f"; control characters replaced in {report['control_chars']} rows"
    return line


@lru_cache(maxsize=4)
def _cached_pool(kind: str, path: str, stamp: tuple, column: str, split, bad_rows: str, max_words: int,
                 dedup: str, near_threshold: float) -> Pool:
    try:
        pool = build_pool(read_rows(path, column, split, kind), bad_rows, max_words, dedup, near_threshold,
                          path)
    except OSError as e:                        # unreadable: permission, a folder named x.txt, I/O error
        raise CaptionSourceError(f"cannot read the caption source: {os_error_line(e)}") from None
    log.info("%s: %s", path, pool_counts(pool.report))
    return pool


def load_pool(cfg) -> Pool:
    """The cleaned pool of `captions` config `cfg` (cached per process while the file is unchanged)."""
    p = Path(cfg.path)
    if not p.exists():
        raise CaptionSourceError(f"{p}: caption source not found")
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    stamp = tuple((str(q), q.stat().st_mtime_ns, q.stat().st_size) for q in files)
    return _cached_pool(cfg.source, str(p), stamp, cfg.column, cfg.split, cfg.bad_rows, cfg.max_words,
                        cfg.dedup, cfg.near_threshold)


def check_text_inputs(recipe) -> dict | None:
    """Read and check every input text file of a gen recipe (caption file or dataset, topics file,
    keyword vocabulary, few-shot examples) so that a bad one fails before anything is written.

    Returns the caption pool's report plus `source` (the path) for file / hf_disk captions (the
    pool stays cached for the run), else None. Raises a CirgenError naming the file."""
    from .keywords import load_vocabulary
    from .prompt import load_edit_examples

    cfg, edits = recipe.captions, recipe.edits
    report = None
    if cfg.source in ("file", "hf_disk"):
        report = {"source": os.path.basename(os.path.normpath(cfg.path)), **load_pool(cfg).report}
    elif cfg.source == "llm":
        load_topics(cfg)
    if edits.backend == "keywords":
        load_vocabulary(edits.vocabulary)
    elif edits.backend in ("transformers", "vllm", "openai"):
        load_edit_examples(edits.examples_file)
    return report


# ---- pipeline components ------------------------------------------------------------------------

def _stride(recipe) -> int:
    return recipe.pipeline.unit_size * recipe.captions.reserve


class PoolCaptions:
    """captions.source file / hf_disk: each candidate takes its caption from the pool.
    `seed`: the assignment seed (default the recipe's); CaptionSourceError as `load_pool` raises it."""

    def __init__(self, recipe, seed: int | None = None):
        cfg = recipe.captions
        self.name = cfg.source
        self.pool = load_pool(cfg)
        self.report = self.pool.report
        self.assign = SlotAssigner(len(self.pool.captions), recipe.seed if seed is None else seed,
                                   _stride(recipe), cfg.order)
        self.label = os.path.basename(os.path.normpath(cfg.path))

    def __call__(self, batch: list[Candidate]) -> None:
        for c in batch:
            k = self.assign.index(c.unit, c.j)
            c.source_caption = self.pool.captions[k]
            c.generator["captions"] = {"file": self.label, "row": self.pool.rows[k],
                                       "pool": self.pool.fingerprint}


def load_topics(cfg) -> list[str]:
    """`captions.topics` plus the lines of `captions.topics_file` (blank and `#` lines left out),
    exact duplicates once; CaptionSourceError naming the file and line for an unreadable one."""
    topics = [t.strip() for t in cfg.topics if t and t.strip()]
    if cfg.topics_file:
        p = Path(cfg.topics_file)
        try:
            lines = list(_lines(p))
        except OSError as e:
            raise CaptionSourceError(f"{p}: cannot read topics ({e.strerror})") from None
        for i, t, problem in lines:         # a hand-written list: a bad line is an error, not a skip
            if t is None or "\x00" in t:
                raise CaptionSourceError(f"{p}:{i}: {problem or 'contains NUL characters'}")
            t = " ".join(_CONTROL.sub(" ", t).split())
            if t and not t.startswith("#"):
                topics.append(t)
    topics = list(dict.fromkeys(topics))        # exact duplicates once, order kept
    if not topics:
        raise CaptionSourceError("captions.source llm: the topic list is empty")
    return topics


class LLMCaptions:
    """captions.source llm: an LLM writes one caption per candidate about an assigned topic.
    `generator`: a prebuilt backend, else `captions.llm_backend`; CaptionSourceError as `load_topics` raises it."""

    name = "llm"

    def __init__(self, recipe, seed: int | None = None, generator=None):
        cfg = recipe.captions
        self.cfg = cfg
        self.topics = load_topics(cfg)
        self.gen = generator if generator is not None else load_generator(cfg.llm_backend, cfg.llm)
        self.examples = load_caption_examples()
        self.assign = SlotAssigner(len(self.topics), recipe.seed if seed is None else seed,
                                   _stride(recipe), cfg.order)
        self.max_words = cfg.max_words or 77
        self._unit: int | None = None
        self._index: NearDupIndex | None = None

    def _dedup(self, unit: int) -> NearDupIndex | None:
        if self.cfg.dedup == "none":
            return None
        if unit != self._unit:                  # units run one at a time in a process
            self._unit, self._index = unit, NearDupIndex(self.cfg.near_threshold, self.cfg.dedup == "near")
        return self._index

    def __call__(self, batch: list[Candidate]) -> None:
        fmt = self.gen.format
        reqs, meta = [], []
        for c in batch:
            rng = c.rng("captions")
            seed = request_seed(rng)
            topic = self.topics[self.assign.index(c.unit, c.j)]
            shots = pick_examples(self.examples, self.cfg.llm.examples, rng)
            reqs.append(make_request(fmt, seed, caption_messages(topic, shots), caption_prompt(topic, shots),
                                     CAPTION_SCHEMA, ["\n"], self.cfg.llm.structured))
            meta.append({"topic": topic, "seed": seed})
        replies = self.gen.generate(reqs)
        if len(replies) != len(batch):
            raise RuntimeError(f"llm captions: {len(replies)} replies for {len(batch)} requests")
        info = {**self.gen.describe(), "format": fmt}
        for c, r, m in zip(batch, replies, meta):
            c.generator["captions"] = {**info, **m}
            if r.error:
                if r.detail:
                    c.generator["captions"]["error"] = r.detail
                c.reject(f"caption_{r.error}")
                continue
            p = parse_caption(r.text, fmt, self.max_words, r.finish_reason)
            if not p.ok:
                c.reject(p.reason)
                continue
            index = self._dedup(c.unit)
            if index is not None and not index.add(p.caption):
                c.source_caption = p.caption
                c.reject("caption_duplicate")
                continue
            c.source_caption = p.caption
