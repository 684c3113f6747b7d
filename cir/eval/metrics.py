"""Ranking and the benchmark metrics: Recall@K, CIRR Recall_subset@K, CIRCO mAP@K.

Ranking order is (score descending, gallery index ascending): equal scores are broken by the
order of the gallery file, deterministically, however the gallery is chunked. Metric functions
take ranked id lists so they can be checked by hand and reused on submission files. All metric
values are percentages (the per-query `average_precision_at_k` is a fraction in [0, 1]).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

FIQ_KS = (10, 50)
CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
CIRCO_KS = (5, 10, 25, 50)


# ----------------------------------------------------------------------------- ranking

def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row by (score desc, column asc). `torch.topk` alone picks ties arbitrarily.

    scores: [Q, N] -> (values [Q, k'], column indices [Q, k'] long), k' = min(k, N) (0 when k <= 0)."""
    n = scores.shape[1]
    k = min(k, n)
    if k <= 0:
        return scores.new_empty((scores.shape[0], 0)), torch.empty((scores.shape[0], 0), dtype=torch.long, device=scores.device)
    # One extra element tells whether an unselected column ties with the k-th: then the
    # selection among those ties may not be the lowest columns. Rare with real features;
    # fixed row by row. (Cheaper than a full pass comparing every score with the k-th.)
    vals, idx = scores.topk(min(k + 1, n), dim=1)
    short = (vals[:, k] == vals[:, k - 1]).nonzero().flatten() if k < n else idx.new_empty(0)
    vals, idx = vals[:, :k].clone(), idx[:, :k].clone()
    for r in short.tolist():
        row, t = scores[r], vals[r, k - 1]
        above = (row > t).nonzero().flatten()
        equal = (row == t).nonzero().flatten()[: k - len(above)]
        idx[r] = torch.cat([above, equal])
        vals[r] = row[idx[r]]
    return _order(vals, idx)


def _order(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (value desc, index asc): index sort first, then a stable value sort."""
    o = idx.argsort(dim=1)
    vals, idx = vals.gather(1, o), idx.gather(1, o)
    o = vals.argsort(dim=1, descending=True, stable=True)
    return vals.gather(1, o), idx.gather(1, o)


@torch.no_grad()
def topk_chunked(queries: torch.Tensor, gallery: torch.Tensor, k: int,
                 exclude: torch.Tensor | None = None, query_chunk: int = 1024,
                 gallery_chunk: int = 32768) -> torch.Tensor:
    """Indices [Q, k] of the best gallery rows for each query by dot product, in ranking order.

    queries: [Q, D]; gallery: [N, D] (normalised features: the scores are cosine similarities);
    exclude: [Q] long or None.

    Never holds more than a query_chunk x gallery_chunk score block: a running top-k is merged
    with each gallery chunk's top-k. `exclude[q]` (or -1) is a gallery index removed from query
    q's ranking (CIRR reference removal, CIRCO reference masking); k shrinks to the gallery size
    (minus one when excluding) on tiny galleries.
    """
    n = gallery.shape[0]
    if exclude is not None:
        exclude = exclude.to(torch.long)
    k = min(k, n - (1 if exclude is not None and bool((exclude >= 0).any()) else 0))
    out = []
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs:qs + query_chunk]
        best_v = q.new_empty((q.shape[0], 0))
        best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
        for gs in range(0, n, gallery_chunk):
            g = gallery[gs:gs + gallery_chunk]
            s = q @ g.T
            if exclude is not None:
                ex = exclude[qs:qs + query_chunk]
                rows = ((ex >= gs) & (ex < gs + g.shape[0])).nonzero().flatten()
                s[rows, ex[rows] - gs] = float("-inf")
            v, i = stable_topk(s, k)
            # Running entries have lower gallery indices than this chunk's and both halves are
            # already in ranking order, so a stable sort on value keeps the index tie-break.
            v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i + gs], 1)
            o = v.argsort(dim=1, descending=True, stable=True)[:, :k]
            best_v, best_i = v.gather(1, o), i.gather(1, o)
        out.append(best_i)
    return torch.cat(out) if out else torch.empty((0, k), dtype=torch.long)


def subset_ranking(query: torch.Tensor, gallery: torch.Tensor, members: Sequence[int]) -> list[int]:
    """Gallery indices `members` ordered as the full ranking would order them (score desc, index
    asc). query: [D]; gallery: [N, D]."""
    if not members:
        return []
    idx = torch.tensor(sorted(members), dtype=torch.long)
    s = gallery[idx] @ query
    o = s.argsort(descending=True, stable=True)
    return idx[o].tolist()


# ----------------------------------------------------------------------------- metrics

def recall_at_k(rankings: Sequence[Sequence[str]], targets: Sequence[str],
                ks: Sequence[int]) -> dict[int, float]:
    """% of queries whose target is among the first K of its ranking (absent target: a miss).
    Returns {K: percent}. Errors: ValueError when `rankings` and `targets` differ in length."""
    if len(rankings) != len(targets):
        raise ValueError(f"{len(rankings)} rankings for {len(targets)} targets")
    n = max(len(targets), 1)
    out = {}
    for k in ks:
        hits = sum(t in list(r[:k]) for r, t in zip(rankings, targets))
        out[k] = 100.0 * hits / n
    return out


def average_precision_at_k(ranked: Sequence[str], gt: Sequence[str], k: int) -> float:
    """CIRCO AP@K = sum_{i<=K} prec_i * hit_i / min(K, #GT) (the server's formula), a fraction in
    [0, 1]; 0 when `gt` is empty."""
    gts = set(gt)
    if not gts:
        return 0.0
    hits, total = 0, 0.0
    for i, r in enumerate(ranked[:k], start=1):
        if r in gts:
            hits += 1
            total += hits / i
    return total / min(k, len(gts))


def map_at_k(rankings: Sequence[Sequence[str]], gts: Sequence[Sequence[str]],
             ks: Sequence[int] = CIRCO_KS) -> dict[int, float]:
    """CIRCO mAP@K in percent, {K: mean over queries of `average_precision_at_k` x 100}; rankings
    and gts are per query, in the same order. Errors: ValueError when their lengths differ (a
    shorter list would otherwise lower the mean silently)."""
    if len(rankings) != len(gts):
        raise ValueError(f"{len(rankings)} rankings for {len(gts)} ground-truth sets")
    n = max(len(gts), 1)
    return {k: 100.0 * sum(average_precision_at_k(r, g, k) for r, g in zip(rankings, gts)) / n
            for k in ks}


def map_per_aspect(rankings: Sequence[Sequence[str]], gts: Sequence[Sequence[str]],
                   aspects: Sequence[Sequence[str]], k: int = 10) -> dict[str, float]:
    """mAP@K in percent over the queries tagged with each semantic aspect (CIRCO reports K=10)."""
    by: dict[str, list[float]] = {}
    for r, g, tags in zip(rankings, gts, aspects):
        ap = average_precision_at_k(r, g, k)
        for t in tags:
            by.setdefault(t, []).append(ap)
    return {t: 100.0 * sum(v) / len(v) for t, v in sorted(by.items())}


def fiq_summary(per_category: dict[str, dict[int, float]]) -> dict[str, float]:
    """Per-category R@10/R@50, their means over categories, and the mean of those two (percent in,
    percent out; every category needs keys 10 and 50)."""
    out = {}
    for cat, r in per_category.items():
        out[f"{cat}_R@10"], out[f"{cat}_R@50"] = r[10], r[50]
    cats = list(per_category)
    out["avg_R@10"] = sum(per_category[c][10] for c in cats) / len(cats)
    out["avg_R@50"] = sum(per_category[c][50] for c in cats) / len(cats)
    out["avg"] = (out["avg_R@10"] + out["avg_R@50"]) / 2
    return out


def cirr_summary(recall: dict[int, float], subset: dict[int, float], which: str = "r5") -> float:
    """(R@5 + Rs@1)/2 (common; `which="r5"`) or (R@1 + Rs@1)/2 (CompoDiff's table; any other
    `which`), in percent."""
    return (recall[5 if which == "r5" else 1] + subset[1]) / 2
