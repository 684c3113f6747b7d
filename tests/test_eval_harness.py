"""The harness end to end on tiny official-layout folders with a fake model (hand-worked numbers)."""
from __future__ import annotations

import json

import pytest
import torch

from cir.eval import EvalError
from cir.eval.harness import RetrievalModel, EvalOptions, evaluate, write_results
from cir.eval.protocol import Protocol, build_protocol
from test_eval_fixtures import (A, B, C, CIRCO_IDS, CIRR_NAMES, D, E, F, G, H, FakeModel, circo_name,
                                descending, fiq_ids, make_circo, make_cirr, make_fashioniq)

# ----------------------------------------------------------------------------- FashionIQ


def _fiq_rank_model(target_rank: dict[str, int]):
    """Query with reference <ref> puts its target at `target_rank[ref]` (1-based)."""
    targets = {}

    def scores(ref, prompt):
        cat = ref.rstrip("0123456789")
        tgt = targets[ref]
        others = [a for a in fiq_ids(cat) if a != tgt]
        r = target_rank[ref]
        return descending(others[: r - 1] + [tgt] + others[r - 1:])
    return scores, targets


def test_fashioniq_recall_per_category_and_average(tmp_path):
    q = lambda c, t: {"candidate": c, "target": t, "captions": ["is longer", "has dots"]}   # noqa: E731
    queries = {"dress": [q("dress000", "dress001"), q("dress002", "dress003")],
               "shirt": [q("shirt000", "shirt001"), q("shirt002", "shirt003")],
               "toptee": [q("toptee000", "toptee001")]}
    root = make_fashioniq(tmp_path, queries)
    scores, targets = _fiq_rank_model({"dress000": 1, "dress002": 20, "shirt000": 10, "shirt002": 51,
                                       "toptee000": 50})
    targets.update({c["candidate"]: c["target"] for qs in queries.values() for c in qs})
    names = [a for cat in ("dress", "shirt", "toptee") for a in fiq_ids(cat)]
    res = evaluate(FakeModel(names, scores), "fashioniq", root)
    m = res.metrics
    # dress: ranks 1, 20  -> R@10 1/2, R@50 2/2
    assert (m["dress_R@10"], m["dress_R@50"]) == (50.0, 100.0)
    # shirt: ranks 10, 51 -> R@10 1/2 (rank 10 is inside), R@50 1/2 (rank 51 is outside)
    assert (m["shirt_R@10"], m["shirt_R@50"]) == (50.0, 50.0)
    # toptee: rank 50 -> R@10 0, R@50 1
    assert (m["toptee_R@10"], m["toptee_R@50"]) == (0.0, 100.0)
    assert m["avg_R@10"] == pytest.approx(100 / 3)        # (50 + 50 + 0) / 3
    assert m["avg_R@50"] == pytest.approx(250 / 3)        # (100 + 50 + 100) / 3
    assert m["avg"] == pytest.approx(175 / 3)             # (33.33 + 83.33) / 2
    assert res.n_queries == 5 and res.gallery_size == {"dress": 60, "shirt": 60, "toptee": 60}
    assert "fiq_order=c2 and c1" in res.table() and "R@10" in res.table()


def _fiq_order_setup(tmp_path):
    root = make_fashioniq(tmp_path, {"dress": [{"candidate": "dress000", "target": "dress003",
                                                "captions": [" is shiny.", "fit and flare?"]}]}, n=4)
    # gallery: dress000 -> e0, dress001 -> e1, dress002 -> (e0 + e1)/sqrt2, dress003 -> e3
    names = fiq_ids("dress", 4)
    gal = {"dress000": [1, 0, 0, 0], "dress001": [0, 1, 0, 0], "dress002": [0.5 ** 0.5, 0.5 ** 0.5, 0, 0],
           "dress003": [0, 0, 0, 1]}

    class Model(FakeModel):
        def encode_images(self, paths):
            return torch.tensor([gal[p.stem] for p in paths])

    def scores(ref, prompt):
        # c1-first text -> 3*e0 (not unit length on purpose); c2-first text -> e1
        return [3.0, 0, 0, 0] if "that is shiny and" in prompt or prompt.startswith("is shiny") else [0, 1.0, 0, 0]
    return root, Model(names, scores)


@pytest.mark.parametrize("order,template,prompts,ranking", [
    # c1c2 alone -> query e0: scores dress000 1, dress002 .707, dress001 0, dress003 0 (tie: gallery order)
    ("c1c2", "that", ["a photo of * that is shiny and fit and flare"],
     ["dress000", "dress002", "dress001", "dress003"]),
    ("c2c1", "pic2word", ["a photo of * , fit and flare and is shiny"],
     ["dress001", "dress002", "dress000", "dress003"]),
    ("c1c2", "none", ["is shiny and fit and flare"], ["dress000", "dress002", "dress001", "dress003"]),
    # both: normalise 3*e0 -> e0 and e1, average (.5, .5), renormalise (.707, .707):
    # dress002 scores 1.0, dress000 and dress001 tie at .707 (gallery order), dress003 0.
    # (Averaging before normalising would give (3, 1)/sqrt10 and rank dress000 first.)
    ("both", "that", ["a photo of * that is shiny and fit and flare", "a photo of * that fit and flare and is shiny"],
     ["dress002", "dress000", "dress001", "dress003"]),
])
def test_fashioniq_caption_order_template_and_two_pass_average(tmp_path, order, template, prompts, ranking):
    root, model = _fiq_order_setup(tmp_path)
    proto = build_protocol([f"fiq_order={order}", f"template={template}"])
    res = evaluate(model, "fashioniq", root, protocol=proto, options=EvalOptions(keep_rankings=True))
    assert model.prompts == prompts                         # captions stripped of " ", ".", "?"
    assert res.rankings["dress:0"] == ranking


def test_fashioniq_without_stripping_keeps_punctuation(tmp_path):
    root, model = _fiq_order_setup(tmp_path)
    evaluate(model, "fashioniq", root, protocol=build_protocol(["fiq_order=c1c2", "fiq_strip=false"]))
    assert model.prompts == ["a photo of * , that  is shiny. and fit and flare?"]      # TSCIR's FashionIQ prompt


# ----------------------------------------------------------------------------- CIRR

def _cirr_scores(ref, prompt):
    if ref == A:   # reference A scores highest (removed), then G (not a member), C (target), B
        return descending([A, G, C, B])
    if ref == B:   # D, E (target), H tie at the top: gallery order puts D first
        return {D: 1.0, E: 1.0, H: 1.0, C: 0.2}
    return descending([G, A])    # ref C: target G (outside img_set.members) ranked first


def test_cirr_recall_subset_ties_and_reference_removal(tmp_path):
    root = make_cirr(tmp_path)
    res = evaluate(FakeModel(CIRR_NAMES, _cirr_scores), "cirr", root, options=EvalOptions(keep_rankings=True))
    # pairid 10: ranking without A: G, C, B, ... -> R@1 miss, R@5 hit; subset (B..F): C, B, ... -> Rs@1 hit
    # pairid 11: ranking without B: D, E, H (tie, gallery order), C -> R@1 miss, R@5 hit;
    #            subset (C, D, E, F, A): D, E, C, ... -> Rs@1 miss, Rs@2 hit
    # pairid 12: target G ranked first -> R@1 hit; G is not in img_set.members, so by our convention
    #            it is a Recall_subset miss at every K (the query stays in the denominator)
    assert res.rankings["10"][:3] == [G, C, B] and A not in res.rankings["10"]
    assert res.rankings["11"][:4] == [D, E, H, C]
    m = res.metrics
    assert m["R@1"] == pytest.approx(100 / 3)
    assert m["R@5"] == m["R@10"] == m["R@50"] == 100.0
    assert m["Rs@1"] == pytest.approx(100 / 3)
    assert m["Rs@2"] == m["Rs@3"] == pytest.approx(200 / 3)
    assert m["avg"] == pytest.approx((100 + 100 / 3) / 2)          # (R@5 + Rs@1) / 2 = 66.67
    assert len(res.rankings["10"]) == 7                             # 8 images minus the reference
    compodiff = evaluate(FakeModel(CIRR_NAMES, _cirr_scores), "cirr", root,
                         protocol=build_protocol(["cirr_summary=r1"]))
    assert compodiff.metrics["avg"] == pytest.approx(100 / 3)      # (R@1 + Rs@1) / 2
    assert "avg=(R@1+Rs@1)/2" in compodiff.table()


def test_cirr_reference_kept_and_all_split_gallery(tmp_path):
    root = make_cirr(tmp_path)
    kept = evaluate(FakeModel(CIRR_NAMES, _cirr_scores), "cirr", root,
                    protocol=build_protocol(["cirr_remove_reference=false"]), options=EvalOptions(keep_rankings=True))
    assert kept.rankings["10"][0] == A and len(kept.rankings["10"]) == 8
    # Subset is always members minus the reference: still C first for pairid 10.
    assert kept.metrics["Rs@1"] == pytest.approx(100 / 3)
    # all-splits gallery: a train image outscores everything for pairid 12 -> its R@1 is lost
    make_cirr(root, "train", queries=[], names=["train-0-0-img0"])
    names = CIRR_NAMES + ["train-0-0-img0"]
    scores = lambda ref, p: {"train-0-0-img0": 2.0, **_cirr_scores(ref, p)}   # noqa: E731
    res = evaluate(FakeModel(names, scores), "cirr", root, protocol=build_protocol(["cirr_gallery=all"]))
    assert res.gallery_size == {"cirr": 9} and res.metrics["R@1"] == 0.0
    assert "cirr_gallery=all" in res.table()


def test_cirr_test_split_needs_a_submission_folder(tmp_path):
    root = make_cirr(tmp_path, "test1", queries=[{"pairid": 1, "reference": A, "caption": "x",
                                                   "img_set": {"id": 0, "members": CIRR_NAMES[:6]}}],
                     names=CIRR_NAMES)
    with pytest.raises(EvalError, match="no targets: pass a submission folder"):
        evaluate(FakeModel(CIRR_NAMES, _cirr_scores), "cirr", root, split="test")
    res = evaluate(FakeModel(CIRR_NAMES, _cirr_scores), "cirr", root, split="test",
                   options=EvalOptions(submission=tmp_path / "sub"))
    assert res.metrics == {} and len(res.submission) == 2
    recall = json.loads((tmp_path / "sub" / "cirr_test1_recall.json").read_text())
    subset = json.loads((tmp_path / "sub" / "cirr_test1_recall_subset.json").read_text())
    assert recall["metric"] == "recall" and recall["1"] == [G, C, B, D, E, F, H]   # A removed
    assert subset["metric"] == "recall_subset" and subset["1"] == [C, B, D]


# ----------------------------------------------------------------------------- CIRCO

def _circo_scores(ref, prompt):
    n = {i: circo_name(i) for i in CIRCO_IDS}
    if ref == n[11]:   # GT hits at ranks 1, 3, 5, 6 (target 22), 8, 9, 11; reference 11 last
        return descending([n[i] for i in (33, 99, 44, 111, 55, 22, 122, 66, 77, 133, 88, 11)])
    return descending([n[22], n[99]])   # ref 22 ranks itself first, then its only GT (99)


def test_circo_map_recall_aspects_and_reference_masking(tmp_path):
    root = make_circo(tmp_path)
    names = [circo_name(i) for i in CIRCO_IDS]
    res = evaluate(FakeModel(names, _circo_scores), "circo", root)
    m = res.metrics
    # query 0 (7 GTs): AP@5 = (1 + 2/3 + 3/5)/5 = .453333; AP@10 = (2.266667 + 4/6 + 5/8 + 6/9)/7 = .603571;
    #                  AP@25 = AP@50 = (4.225 + 7/11)/7 = .694481; target 22 at rank 6: R@5 miss, R@10 hit
    # query 1 (1 GT, reference kept and ranked first): AP@K = (1/2)/1 = .5; target at rank 2
    assert m["mAP@5"] == pytest.approx((45.3333 + 50) / 2, abs=1e-3)
    assert m["mAP@10"] == pytest.approx((60.3571 + 50) / 2, abs=1e-3)
    assert m["mAP@25"] == m["mAP@50"] == pytest.approx((69.4481 + 50) / 2, abs=1e-3)
    assert m["R@5"] == 50.0 and m["R@10"] == m["R@25"] == m["R@50"] == 100.0
    # per-aspect mAP@10: cardinality = query 0 only; addition = both queries
    assert m["mAP@10_cardinality"] == pytest.approx(60.3571, abs=1e-3)
    assert m["mAP@10_addition"] == pytest.approx((60.3571 + 50) / 2, abs=1e-3)
    masked = evaluate(FakeModel(names, _circo_scores), "circo", root, protocol=build_protocol(["circo_reference=mask"]))
    # masking the reference puts query 1's GT first: AP = 1
    assert masked.metrics["mAP@5"] == pytest.approx((45.3333 + 100) / 2, abs=1e-3)
    assert "circo_reference=mask" in masked.table()


def test_circo_query_text_options(tmp_path):
    root = make_circo(tmp_path)
    names = [circo_name(i) for i in CIRCO_IDS]
    model = FakeModel(names, _circo_scores)
    evaluate(model, "circo", root)
    assert model.prompts == ["a photo of * that has two of them", "a photo of * that is red"]
    model = FakeModel(names, _circo_scores)
    evaluate(model, "circo", root, protocol=build_protocol(["circo_text=magiclens", "template=none"]))
    assert model.prompts == ["find a dog but has two of them", "find a car but is red"]


# ----------------------------------------------------------------------------- protocol, results

def test_protocol_overrides_and_description():
    p = build_protocol(["protocol.fiq_order=c2c1", "template=a photo of $ modified by {}", "depth=100"])
    assert p.fiq_order == "c2c1" and p.prompt("x *").text() == "a photo of * modified by x *" and p.depth == 100
    auto = build_protocol([])
    assert auto.prompt("x", "cirr").text() == "a photo of * , that x"            # TSCIR's per-benchmark prompts
    assert auto.prompt("x", "circo").text() == "a photo of * that x"
    assert build_protocol(["template=none"]).prompt("x", "cirr") == "x"
    line = p.describe("fashioniq")
    assert line.startswith("protocol: ") and "\n" not in line and "fiq_order=c2 and c1" in line
    assert "cirr_gallery" not in line and "cirr_gallery=split" in p.describe("shapes-cirr")
    from datagen.base.config import ConfigError
    with pytest.raises(ConfigError, match="unknown protocol key 'fiq_orde'"):
        build_protocol(["fiq_orde=c1c2"])
    with pytest.raises(ConfigError, match="not one of"):
        build_protocol(["fiq_order=c3"])
    with pytest.raises(ConfigError, match="exactly one"):
        build_protocol(["template=no slot"])
    assert Protocol().describe().count("=") >= 14


def test_results_files_and_model_interface(tmp_path):
    root = make_cirr(tmp_path / "b")
    model = FakeModel(CIRR_NAMES, _cirr_scores)
    assert isinstance(model, RetrievalModel)
    res = evaluate(model, "cirr", root)
    files = write_results(res, tmp_path / "out")
    data = json.loads(files[0].read_text())
    assert data["metrics"]["R@5"] == 100.0 and data["protocol"]["cirr_gallery"] == "split"
    assert data["protocol"]["backbone"] == "fake@test"
    rows = files[1].read_text().splitlines()
    assert rows[0].startswith("dataset,split,model,metric,value") and len(rows) == 1 + len(res.metrics)


def test_non_finite_or_misshapen_features_are_errors(tmp_path):
    root = make_cirr(tmp_path)
    model = FakeModel(CIRR_NAMES, lambda r, p: [float("nan")] * 8)
    with pytest.raises(EvalError, match="non-finite"):
        evaluate(model, "cirr", root)
    model = FakeModel(CIRR_NAMES, lambda r, p: [1.0] * 5)
    with pytest.raises(EvalError, match="5-d, gallery 8-d"):
        evaluate(model, "cirr", root)
