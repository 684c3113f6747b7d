"""Metrics and ranking, checked against values worked out by hand in the comments."""
from __future__ import annotations

import pytest
import torch

from cir.eval import metrics as M


def test_recall_at_k_counts_target_in_first_k():
    rankings = [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"]]
    # targets at ranks 1, 3 and absent (target "z" is not in the ranking: a miss)
    r = M.recall_at_k(rankings, ["a", "b", "z"], (1, 2, 3))
    assert r == {1: pytest.approx(100 / 3), 2: pytest.approx(100 / 3), 3: pytest.approx(200 / 3)}


def test_average_precision_doc_example_three_gts_in_top_three():
    # CIRCO's mAP@K (Baldrati et al., ICCV 2023): a query with 3 GTs, all in the top 3, scores 1.0 at every K.
    for k in (5, 10, 25, 50):
        assert M.average_precision_at_k(["g1", "g2", "g3", "x"], ["g3", "g1", "g2"], k) == pytest.approx(1.0)


def test_average_precision_with_more_ground_truths_than_k():
    # 7 GTs; hits at ranks 1, 3, 5, 6, 8, 9, 11.
    ranked = ["g1", "x1", "g2", "x2", "g3", "g4", "x3", "g5", "g6", "x4", "g7", "x5"]
    gt = [f"g{i}" for i in range(1, 8)]
    # AP@5  = (1/1 + 2/3 + 3/5) / min(5, 7)                 = 2.266667 / 5 = 0.453333
    assert M.average_precision_at_k(ranked, gt, 5) == pytest.approx(0.4533333, abs=1e-6)
    # AP@10 = (2.266667 + 4/6 + 5/8 + 6/9) / min(10, 7)     = 4.225 / 7    = 0.603571
    assert M.average_precision_at_k(ranked, gt, 10) == pytest.approx(0.6035714, abs=1e-6)
    # AP@25 = (4.225 + 7/11) / 7                            = 0.694481
    assert M.average_precision_at_k(ranked, gt, 25) == pytest.approx(0.6944805, abs=1e-6)
    # A single GT at rank 2: precision 1/2 there, denominator min(K, 1) = 1.
    assert M.average_precision_at_k(["x", "g"], ["g"], 5) == pytest.approx(0.5)
    assert M.map_at_k([ranked, ["x", "g"]], [gt, ["g"]], (5,)) == {5: pytest.approx((45.33333 + 50) / 2, abs=1e-4)}
    with pytest.raises(ValueError, match="1 rankings for 2 ground-truth sets"):
        M.map_at_k([ranked], [gt, ["g"]], (5,))      # a short list must not lower the mean silently


def test_map_per_aspect_averages_only_tagged_queries():
    # query 0: AP@10 = 1.0 (GT first); query 1: AP@10 = 0.5 (GT second)
    r = M.map_per_aspect([["g"], ["x", "h"]], [["g"], ["h"]], [["addition", "negation"], ["addition"]], 10)
    assert r == {"addition": pytest.approx(75.0), "negation": pytest.approx(100.0)}


def test_summaries():
    r = {1: 20.0, 5: 60.0, 10: 70.0, 50: 90.0}
    rs = {1: 40.0, 2: 60.0, 3: 80.0}
    assert M.cirr_summary(r, rs, "r5") == 50.0          # (60 + 40) / 2
    assert M.cirr_summary(r, rs, "r1") == 30.0          # (20 + 40) / 2 (CompoDiff)
    s = M.fiq_summary({"dress": {10: 10.0, 50: 30.0}, "shirt": {10: 20.0, 50: 40.0}, "toptee": {10: 30.0, 50: 50.0}})
    assert s["avg_R@10"] == 20.0 and s["avg_R@50"] == 40.0 and s["avg"] == 30.0


def test_ties_break_by_gallery_order():
    q = torch.tensor([[1.0, 0.0]])
    # gallery rows 1, 2 and 4 tie at 0.5 with the highest score; rows 0, 3 score 0.
    g = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.5, 0.1], [0.0, 1.0], [0.5, 0.9]])
    assert M.topk_chunked(q, g, 5).tolist() == [[1, 2, 4, 0, 3]]
    # same ranking however the gallery is chunked (ties straddle chunks)
    for chunk in (1, 2, 3):
        assert M.topk_chunked(q, g, 5, gallery_chunk=chunk).tolist() == [[1, 2, 4, 0, 3]]
    # k smaller than the number of tied rows: the lowest gallery indices win
    assert M.topk_chunked(q, g, 2, gallery_chunk=2).tolist() == [[1, 2]]
    # excluding row 1 (a CIRR reference) moves the others up; excluded rows never appear
    assert M.topk_chunked(q, g, 5, exclude=torch.tensor([1])).tolist() == [[2, 4, 0, 3]]


def test_chunked_topk_matches_brute_force_with_many_ties():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-2, 3, (29, 4), generator=gen).float()
    g = torch.randint(-2, 3, (257, 4), generator=gen).float()    # few distinct scores: many ties
    exclude = torch.randint(-1, 257, (29,), generator=gen)
    s = q @ g.T
    expected = []
    for i in range(29):
        order = sorted((j for j in range(257) if j != exclude[i]), key=lambda j: (-s[i, j].item(), j))
        expected.append(order[:50])
    for qc, gc in ((7, 16), (29, 100), (5, 1000)):
        got = M.topk_chunked(q, g, 50, exclude=exclude, query_chunk=qc, gallery_chunk=gc)
        assert got.tolist() == expected


def test_subset_ranking_uses_full_ranking_order():
    q = torch.tensor([1.0, 0.0])
    g = torch.tensor([[0.2, 0.0], [0.9, 0.0], [0.2, 0.0], [0.5, 0.0]])
    # members 3, 2, 0 (given in any order): scores 0.5, 0.2, 0.2 -> 3, then the tie 0, 2 in gallery order
    assert M.subset_ranking(q, g, [3, 2, 0]) == [3, 0, 2]
    assert M.subset_ranking(q, g, []) == []
