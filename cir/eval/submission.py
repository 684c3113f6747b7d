"""Test-server files for CIRR and CIRCO: writers, and validators that mirror the servers' checks.

Writers validate before writing and write atomically (temp file + rename), so a file on disk has
always passed the checks. Validators can also be run on any existing file (`validate_file`).

CIRR: two files (`"metric": "recall"` with 50 names per pairid, reference excluded, and
`"metric": "recall_subset"` with 3 names from img_set members minus the reference), both
`"version": "rc2"`, every test1 pairid, each at most 5 MB, distinct names (LDRE wrote both to one
name). CIRCO: one dict `{"<id>": [50 unique int image ids]}` over exactly the split's query ids.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from datagen.base.io import write_atomic

from . import EvalError
from .benchmarks import Task

CIRR_MAX_BYTES = 5_000_000     # "at most 5 MB"; decimal megabytes, the stricter reading
RANK_DEPTH = 50
SUBSET_DEPTH = 3


class SubmissionError(EvalError):
    """A submission that a test server would reject; names the file/metric and the entry."""


def _dumps(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)


def _missing_extra(got: set[str], want: Sequence[str], what: str, where: str) -> None:
    extra = sorted(got - set(want))
    if extra:
        raise SubmissionError(f"{where}: key {extra[0]!r} is not a query of {what} "
                              f"({len(extra)} unknown keys; a submission for another split?)")
    missing = [k for k in want if k not in got]
    if missing:
        raise SubmissionError(f"{where}: {len(missing)} of {len(want)} queries of {what} missing "
                              f"(first: {', '.join(missing[:5])}); the server needs every query")


# ----------------------------------------------------------------------------- CIRR

def validate_cirr(payload: Mapping, metric: str, task: Task, where: str = "") -> None:
    """Raise SubmissionError unless `payload` is a valid CIRR `metric` file for `task`'s split."""
    where = where or f"CIRR {metric} submission"
    if metric not in ("recall", "recall_subset"):
        raise SubmissionError(f"{where}: metric must be 'recall' or 'recall_subset', not {metric!r}")
    if not isinstance(payload, Mapping):
        raise SubmissionError(f"{where}: expected a JSON object")
    if payload.get("version") != "rc2":
        raise SubmissionError(f"{where}: 'version' must be 'rc2', got {payload.get('version')!r}")
    if payload.get("metric") != metric:
        raise SubmissionError(f"{where}: 'metric' must be {metric!r}, got {payload.get('metric')!r}")
    queries = {q.qid: q for q in task.queries}
    keys = {k for k in payload if k not in ("version", "metric")}
    _missing_extra(keys, list(queries), task.annotation.name, where)
    gallery = set(task.gallery)
    for qid, q in queries.items():
        names = payload[qid]
        at = f"{where}: pairid {qid}"
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise SubmissionError(f"{at}: expected a list of image names")
        if len(set(names)) != len(names):
            raise SubmissionError(f"{at}: image {_first_dup(names)!r} listed twice")
        if metric == "recall":
            want = min(RANK_DEPTH, len(gallery) - 1)
            allowed, what = gallery, task.gallery_file.name
        else:
            allowed = set(q.members) - {q.reference}
            want, what = min(SUBSET_DEPTH, len(allowed)), "img_set members minus the reference"
        if len(names) != want:
            raise SubmissionError(f"{at}: {len(names)} names, expected {want}")
        if q.reference in names:
            raise SubmissionError(f"{at}: the reference {q.reference!r} must be excluded")
        bad = [n for n in names if n not in allowed]
        if bad:
            hint = " (a submission for another split?)" if metric == "recall" else ""
            raise SubmissionError(f"{at}: {bad[0]!r} not in {what}{hint}")
    size = len(_dumps(dict(payload)).encode())
    if size > CIRR_MAX_BYTES:
        raise SubmissionError(f"{where}: {size / 1e6:.2f} MB, the server accepts at most 5 MB")


def write_cirr_submission(out_dir: str | Path, task: Task, rankings: Mapping[str, Sequence[str]],
                          subsets: Mapping[str, Sequence[str]], name: str = "cirr_test1") -> list[Path]:
    """Write `<name>_recall.json` and `<name>_recall_subset.json` into `out_dir`; both validated
    first (nothing is written unless both pass). `rankings`, `subsets`: ranked image names per
    pairid, cut to 50 and 3. Returns the two paths. Errors: SubmissionError (`validate_cirr`),
    MachineError when a write fails."""
    out_dir = Path(out_dir)
    files = {"recall": out_dir / f"{name}_recall.json",
             "recall_subset": out_dir / f"{name}_recall_subset.json"}
    assert len(set(files.values())) == 2    # the LDRE bug: never one name for both files
    payloads = {}
    for metric, source, depth in (("recall", rankings, RANK_DEPTH), ("recall_subset", subsets, SUBSET_DEPTH)):
        p = {"version": "rc2", "metric": metric}
        p.update({q.qid: list(source[q.qid])[:depth] for q in task.queries if q.qid in source})
        validate_cirr(p, metric, task, str(files[metric]))
        payloads[metric] = p
    for metric, path in files.items():
        _atomic_write(path, _dumps(payloads[metric]))
    return list(files.values())


# ----------------------------------------------------------------------------- CIRCO

def validate_circo(payload: Mapping, task: Task, where: str = "CIRCO submission") -> None:
    """Raise SubmissionError unless `payload` is a valid CIRCO file for `task`'s split."""
    if not isinstance(payload, Mapping):
        raise SubmissionError(f"{where}: expected a JSON object")
    _missing_extra(set(payload), [q.qid for q in task.queries], task.annotation.name, where)
    gallery = set(task.gallery)
    want = min(RANK_DEPTH, len(gallery))
    for q in task.queries:
        ids = payload[q.qid]
        at = f"{where}: query {q.qid}"
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise SubmissionError(f"{at}: expected a list of integer image ids")
        if len(set(ids)) != len(ids):
            raise SubmissionError(f"{at}: image {_first_dup(ids)} listed twice (the server rejects duplicates)")
        if len(ids) != want:
            raise SubmissionError(f"{at}: {len(ids)} ids, expected {want}")
        bad = [i for i in ids if str(i) not in gallery]
        if bad:
            raise SubmissionError(f"{at}: image id {bad[0]} not in {task.gallery_file.name}")


def write_circo_submission(path: str | Path, task: Task, rankings: Mapping[str, Sequence[str]]) -> Path:
    """Write the CIRCO file at `path`: {query id: first 50 ranked image ids as ints}, validated
    (`validate_circo`) before the atomic write; returns `path`. Errors: SubmissionError for a
    missing query or a ranking the server would reject; ValueError for an id that is not an
    integer; MachineError when the write fails."""
    path = Path(path)
    payload = {q.qid: [int(i) for i in list(rankings[q.qid])[:RANK_DEPTH]]
               for q in task.queries if q.qid in rankings}
    validate_circo(payload, task, str(path))
    _atomic_write(path, _dumps(payload))
    return path


# ----------------------------------------------------------------------------- files

def validate_file(path: str | Path, dataset: str, task: Task) -> str:
    """Validate a submission file on disk; returns the CIRR metric it holds ('' for CIRCO).
    Errors: SubmissionError for an unreadable or malformed file or one the server would reject."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SubmissionError(f"{path}: not a readable JSON file ({e})") from None
    if dataset.removeprefix("shapes-") == "cirr":
        metric = payload.get("metric") if isinstance(payload, dict) else None
        validate_cirr(payload, str(metric), task, str(path))
        return str(metric)
    validate_circo(payload, task, str(path))
    return ""


def _first_dup(items: Sequence) -> object:
    seen = set()
    for x in items:
        if x in seen:
            return x
        seen.add(x)
    return None
