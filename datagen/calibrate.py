"""Calibrate CLIP-filter thresholds against labelled failures (the shapes-low world).

IP2P's 0.7 / 0.2 / 0.2 are for OpenAI ViT-L/14; another CLIP has another score scale. shapes-low
labels every injected generator failure, so a threshold set can be measured: treat the filter as
a failure detector (rejected = predicted failure) and report precision / recall, the share of
clean triplets kept and the share of each failure type removed. `calibrate` searches thresholds
at quantiles of the clean scores for the set that keeps >= `target_clean_keep` of the clean
triplets while removing as many failures as possible.

Typical use (once shapes-CLIP is trained): generate shapes-low with the CLIP filter on and every
threshold null (scores stored, nothing rejected), then

    scores, failures = load_scores("runs/low-scored")
    best = calibrate(scores, failures, target_clean_keep=0.9)
    best["thresholds"], best["report"]
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

# criterion -> score columns; a criterion passes when every one of its columns >= the threshold.
CRITERIA = {
    "img_img": ("score_clip_img_img",),
    "img_cap": ("score_clip_img_cap_ref", "score_clip_img_cap_tgt"),
    "dir": ("score_clip_dir",),
    "instr_tgt": ("score_clip_instr_tgt",),
}


def criterion_scores(columns: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
    """Per-criterion scores from `score_clip_*` columns (img_cap = min of both images); missing -> NaN."""
    out = {}
    for crit, cols in CRITERIA.items():
        if all(c in columns for c in cols):
            arrs = [np.array([np.nan if v is None else v for v in columns[c]], dtype=np.float64) for c in cols]
            out[crit] = np.minimum.reduce(arrs) if len(arrs) > 1 else arrs[0]
    return out


def load_scores(root: str | Path, rejects: bool = True) -> tuple[dict[str, np.ndarray], list[str | None]]:
    """(criterion scores, failure labels) of every scored row of a dataset (kept and rejected).

    Scores are float64 [n] per criterion (raw CLIP cosines, NaN where a row lacks that score), for the n rows
    with at least one CLIP score; labels are the rows' `failure` (None = clean). A dataset with no rows gives
    `({}, [])`. Raises DatasetError (via `TripletReader`) for a damaged or incomplete dataset.
    """
    import pyarrow as pa

    from .schema import TripletReader

    reader = TripletReader(root)
    tables = [reader.table()] + ([reader.table(rejects=True)] if rejects else [])
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return {}, []
    t = pa.concat_tables(tables, promote_options="default")
    cols = {c: t.column(c).to_pylist() for c in t.column_names if c.startswith("score_clip_")}
    scores = criterion_scores(cols)
    failures = t.column("failure").to_pylist()
    scored = np.zeros(t.num_rows, bool)
    for v in scores.values():
        scored |= ~np.isnan(v)
    return {k: v[scored] for k, v in scores.items()}, [f for f, s in zip(failures, scored) if s]


def _keep_mask(scores: Mapping[str, np.ndarray], thresholds: Mapping[str, float | None], n: int) -> np.ndarray:
    keep = np.ones(n, bool)
    for crit, t in thresholds.items():
        if t is not None and crit in scores:
            keep &= _passes(scores[crit], t)
    return keep


def _passes(scores: np.ndarray, t: float) -> np.ndarray:
    # As the filter compares: in float32 (the scores' precision); NaN never passes.
    return np.asarray(scores, np.float32) >= np.float32(t)


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def filter_report(scores: Mapping[str, np.ndarray], failures: Sequence[str | None],
                  thresholds: Mapping[str, float | None]) -> dict:
    """How a threshold set separates clean triplets from labelled failures.

    precision = rejected failures / rejected; recall = rejected failures / failures;
    clean_kept = kept clean / clean; kept_failure_rate = failures among kept / kept.
    Also per failure type (share removed) and per criterion alone. Rates are fractions in [0, 1] rounded
    to 4 places, None when the denominator is 0. `scores[crit]` are [n] arrays aligned with `failures`;
    a criterion with a null threshold or no scores is not applied.
    """
    n = len(failures)
    failed = np.array([f is not None for f in failures], bool)
    keep = _keep_mask(scores, thresholds, n)
    rej = ~keep
    out = {
        "n": n, "clean": int((~failed).sum()), "failures": int(failed.sum()),
        "thresholds": dict(thresholds),
        "kept": int(keep.sum()),
        "precision": _rate(int((rej & failed).sum()), int(rej.sum())),
        "recall": _rate(int((rej & failed).sum()), int(failed.sum())),
        "clean_kept": _rate(int((keep & ~failed).sum()), int((~failed).sum())),
        "kept_failure_rate": _rate(int((keep & failed).sum()), int(keep.sum())),
        "removed_by_failure": {}, "per_criterion": {},
    }
    labels = np.array([f or "" for f in failures], dtype=object)
    for f in sorted({f for f in failures if f is not None}):
        m = labels == f
        out["removed_by_failure"][f] = _rate(int((rej & m).sum()), int(m.sum()))
    for crit, t in thresholds.items():
        if t is None or crit not in scores:
            continue
        r = ~_passes(scores[crit], t)
        out["per_criterion"][crit] = {
            "threshold": t, "rejected": int(r.sum()),
            "precision": _rate(int((r & failed).sum()), int(r.sum())),
            "recall": _rate(int((r & failed).sum()), int(failed.sum())),
            "clean_rejected": _rate(int((r & ~failed).sum()), int((~failed).sum())),
        }
    return out


def calibrate(scores: Mapping[str, np.ndarray], failures: Sequence[str | None],
              target_clean_keep: float = 0.9, criteria: Sequence[str] | None = None,
              steps: int = 10) -> dict:
    """Thresholds keeping >= `target_clean_keep` of clean triplets that remove the most failures.

    Each criterion's candidates: off, or the clean scores' quantile q for q in
    linspace(0, 1 - target, steps + 1) (q = 0 is the lowest clean score: it removes only failures
    scoring below every clean triplet). Exhaustive over the grid; ties go to more clean kept, then
    to fewer active criteria. Returns {"thresholds", "report", "searched"}. Raises ValueError when
    `target_clean_keep` is not in (0, 1] or there is no clean (unlabelled) triplet.
    """
    if not 0.0 < target_clean_keep <= 1.0:
        raise ValueError(f"target_clean_keep must be in (0, 1], got {target_clean_keep}")
    failed = np.array([f is not None for f in failures], bool)
    if not (~failed).any():
        raise ValueError("no clean (unlabelled) triplets to calibrate against")
    crits = [c for c in (criteria or CRITERIA) if c in scores]
    qs = np.linspace(0.0, 1.0 - target_clean_keep, steps + 1)
    options: list[list[tuple[float | None, np.ndarray]]] = []
    for c in crits:
        clean = scores[c][~failed]
        clean = clean[~np.isnan(clean)]
        ts = sorted({float(np.quantile(clean, q, method="lower")) for q in qs}) if len(clean) else []
        options.append([(None, np.zeros(len(failures), bool))] + [(t, ~_passes(scores[c], t)) for t in ts])
    n_clean, best, best_key = int((~failed).sum()), None, None
    for combo in itertools.product(*options):
        rej = np.zeros(len(failures), bool)
        for _, r in combo:
            rej |= r
        kept_clean = n_clean - int((rej & ~failed).sum())
        if kept_clean < target_clean_keep * n_clean - 1e-9:
            continue
        key = (int((rej & failed).sum()), kept_clean, -sum(t is not None for t, _ in combo))
        if best_key is None or key > best_key:
            best, best_key = combo, key
    thresholds = {c: t for c, (t, _) in zip(crits, best)} if best else {c: None for c in crits}
    return {"thresholds": thresholds, "report": filter_report(scores, failures, thresholds),
            "searched": int(np.prod([len(o) for o in options])) if options else 0}
