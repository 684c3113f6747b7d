"""Readers of the official layouts: annotation errors name file and entry; integrity checks."""
from __future__ import annotations

import pytest

from cir.eval import EvalError
from cir.eval.benchmarks import find_bad_images, load_benchmark
from cir.eval.harness import EvalOptions, evaluate
from cir.eval.protocol import build_protocol
from test_eval_fixtures import (A, CIRCO_IDS, CIRR_NAMES, FakeModel, circo_name, circo_val_queries,
                                cirr_val_queries, descending, dump, fiq_ids, make_circo, make_cirr,
                                make_fashioniq, png)


def _fiq(tmp_path, ext=".png"):
    q = [{"candidate": "dress000", "target": "dress001", "captions": ["a", "b"]},
         {"candidate": "dress002", "target": "dress003", "captions": ["c", "d"]},
         {"candidate": "dress004", "target": "dress005", "captions": ["e", "f"]}]
    return make_fashioniq(tmp_path, {"dress": q, "shirt": [dict(q[0], candidate="shirt000", target="shirt001")]},
                          ext=ext, n=12)


def _fiq_model():
    names = [a for c in ("dress", "shirt", "toptee") for a in fiq_ids(c, 12)]
    # every query ranks its target first: R@10 = 100 on whatever is evaluated
    tgt = {"dress000": "dress001", "dress002": "dress003", "dress004": "dress005", "shirt000": "shirt001"}
    return FakeModel(names, lambda ref, p: descending([tgt[ref]]))


def test_fashioniq_extension_jpg_or_png(tmp_path):
    jpg = load_benchmark("fashioniq", _fiq(tmp_path / "j", ".jpg"))
    assert jpg.tasks[0].paths["dress000"].name == "dress000.jpg" and "image extension: .jpg" in jpg.notes
    png_b = load_benchmark("fashioniq", _fiq(tmp_path / "p", ".png"))
    assert png_b.tasks[0].paths["dress000"].name == "dress000.png"
    # forcing .jpg on a .png mirror: every image is missing, and the check says so
    forced = load_benchmark("fashioniq", tmp_path / "p", protocol=build_protocol(["fiq_ext=jpg"]))
    assert len(find_bad_images(forced)) == 36


def test_missing_images_stop_the_run_with_names_and_counts(tmp_path):
    root = _fiq(tmp_path)
    (root / "images" / "dress003.png").unlink()                 # target of dress query 1
    (root / "images" / "dress007.png").write_bytes(b"not an image")   # gallery-only image
    with pytest.raises(EvalError) as e:
        evaluate(_fiq_model(), "fashioniq", root)
    msg = str(e.value)
    assert "2 image(s) missing or unreadable" in msg
    assert "images/dress003.png (missing)" in msg and "images/dress007.png (unreadable" in msg
    assert "1 of 4 queries affected" in msg and "--allow-missing" in msg


def test_allow_missing_drops_fashioniq_queries_and_reports_it(tmp_path):
    root = _fiq(tmp_path)
    (root / "images" / "dress003.png").unlink()
    (root / "images" / "dress007.png").write_bytes(b"")
    res = evaluate(_fiq_model(), "fashioniq", root, options=EvalOptions(allow_missing=True))
    rep = res.integrity
    assert rep["bad_images"] == 2 and rep["queries_dropped"] == 1 and rep["queries_total"] == 4
    assert rep["dropped_examples"] == ["cap.dress.val.json entry 1 (id dress:1)"]
    assert res.n_queries == 3 and res.gallery_size["dress"] == 10     # 12 minus the two bad images
    assert res.metrics["dress_R@10"] == 100.0                         # over the 2 remaining queries
    assert "1 of 4 queries dropped" in res.table() and "missing=drop" in res.table()


def test_cirr_annotation_errors_name_file_and_entry(tmp_path):
    q = cirr_val_queries()
    q[1]["reference"] = "x"
    make_cirr(tmp_path, queries=q)
    with pytest.raises(EvalError, match=r"^cap\.rc2\.val\.json entry 1 \(pairid 11\): reference 'x' not in "
                                        r"split\.rc2\.val\.json$"):
        load_benchmark("cirr", tmp_path)
    q = cirr_val_queries()
    q[2]["img_set"]["members"][3] = "dev-9-9-img9"
    dump(tmp_path / "captions" / "cap.rc2.val.json", q)
    with pytest.raises(EvalError, match=r"entry 2 \(pairid 12\): img_set member 'dev-9-9-img9' not in"):
        load_benchmark("cirr", tmp_path)
    q = cirr_val_queries()
    del q[0]["target_hard"]
    dump(tmp_path / "captions" / "cap.rc2.val.json", q)
    with pytest.raises(EvalError, match=r"entry 0 \(pairid 10\): missing field 'target_hard'"):
        load_benchmark("cirr", tmp_path)
    q = cirr_val_queries()
    q[2]["pairid"] = 10
    dump(tmp_path / "captions" / "cap.rc2.val.json", q)
    with pytest.raises(EvalError, match=r"entry 2 \(pairid 10\): pairid 10 also used by entry 0"):
        load_benchmark("cirr", tmp_path)


def test_malformed_annotation_file(tmp_path):
    make_cirr(tmp_path)
    (tmp_path / "captions" / "cap.rc2.val.json").write_text('[{"pairid": 1,\n "reference": }]')
    with pytest.raises(EvalError, match=r"cap\.rc2\.val\.json: malformed JSON at line 2"):
        load_benchmark("cirr", tmp_path)
    (tmp_path / "captions" / "cap.rc2.val.json").write_text('{"pairid": 1}')
    with pytest.raises(EvalError, match="expected a JSON list at the top level, got a JSON object"):
        load_benchmark("cirr", tmp_path)
    (tmp_path / "captions" / "cap.rc2.val.json").unlink()
    with pytest.raises(EvalError, match=r"cap\.rc2\.val\.json: file not found"):
        load_benchmark("cirr", tmp_path)


def test_fashioniq_annotation_errors(tmp_path):
    root = make_fashioniq(tmp_path, {"shirt": [{"candidate": "shirt000", "target": "dress001",
                                                "captions": ["a", "b"]}]}, n=3)
    with pytest.raises(EvalError, match=r"^cap\.shirt\.val\.json entry 0 \(candidate shirt000\): target "
                                        r"'dress001' not in split\.shirt\.val\.json$"):
        load_benchmark("fashioniq", root)
    dump(root / "captions" / "cap.shirt.val.json", [{"candidate": "shirt000", "target": "shirt001", "captions": ["a"]}])
    with pytest.raises(EvalError, match="'captions' should be a list of 2 strings"):
        load_benchmark("fashioniq", root)


def test_circo_annotation_errors(tmp_path):
    q = circo_val_queries()
    q[1]["gt_img_ids"] = [99, 12345]
    make_circo(tmp_path, queries=q)
    with pytest.raises(EvalError, match=r"^val\.json entry 1 \(id 1\): gt_img_ids 12345 not in "
                                        r"image_info_unlabeled2017\.json$"):
        load_benchmark("circo", tmp_path)
    q = circo_val_queries()
    q[0]["gt_img_ids"] = [33, 22]
    dump(tmp_path / "annotations" / "val.json", q)
    with pytest.raises(EvalError, match="gt_img_ids should start with target_img_id 22"):
        load_benchmark("circo", tmp_path)
    q = circo_val_queries()
    q[0]["reference_img_id"] = "11"
    dump(tmp_path / "annotations" / "val.json", q)
    with pytest.raises(EvalError, match="field 'reference_img_id' should be int, got '11'"):
        load_benchmark("circo", tmp_path)


def test_circo_allow_missing_keeps_missing_ground_truths_as_misses(tmp_path):
    root = make_circo(tmp_path)
    img = root / "COCO2017_unlabeled" / "unlabeled2017"
    (img / f"{33:012d}.jpg").unlink()      # a non-target GT of query 0: query kept, GT a miss
    (img / f"{99:012d}.jpg").unlink()      # the target of query 1: dropped
    names = [circo_name(i) for i in CIRCO_IDS]
    model = FakeModel(names, lambda ref, p: descending([circo_name(i) for i in (22, 44, 55, 66, 77, 88)]))
    with pytest.raises(EvalError, match=r"2 image\(s\).*2 of 2 queries affected"):
        evaluate(model, "circo", root)
    res = evaluate(model, "circo", root, options=EvalOptions(allow_missing=True))
    assert res.integrity["queries_dropped"] == 1 and res.integrity["queries_changed"] == 1
    # query 0 keeps its 7 annotated GTs; the 6 present are ranked 1..6 -> AP@5 = 5/min(5, 7) = 1,
    # AP@10 = 6/min(10, 7) = 6/7, as the official scorer computes it on this ranking (not 6/6)
    assert res.metrics["mAP@5"] == pytest.approx(100.0)
    assert res.metrics["mAP@10"] == pytest.approx(600 / 7)


def test_test_split_cannot_drop_queries(tmp_path):
    root = make_cirr(tmp_path, "test1", queries=[{"pairid": 1, "reference": A, "caption": "x",
                                                   "img_set": {"id": 0, "members": CIRR_NAMES[:6]}}])
    (root / "test1" / f"{A}.png").unlink()
    with pytest.raises(EvalError, match=r"cap\.rc2\.test1\.json entry 0 \(id 1\): reference image .* is missing; "
                                        "a test-server submission must cover every query"):
        evaluate(FakeModel(CIRR_NAMES, lambda r, p: [1.0] * 8), "cirr", root, split="test",
                 options=EvalOptions(allow_missing=True, submission=tmp_path / "sub"))


def test_circo_layout_without_coco_folder(tmp_path):
    # image list and images directly under the root are accepted too
    dump(tmp_path / "annotations" / "image_info_unlabeled2017.json", {"images": [{"id": 5}, {"id": 6}]})
    dump(tmp_path / "annotations" / "test.json",
         [{"id": 0, "reference_img_id": 5, "relative_caption": "x", "shared_concept": "y"}])
    for i in (5, 6):
        png(tmp_path / "unlabeled2017" / f"{i:012d}.jpg")
    b = load_benchmark("circo", tmp_path, "test")
    assert not b.labelled and b.tasks[0].paths["6"] == tmp_path / "unlabeled2017" / "000000000006.jpg"
    assert find_bad_images(b, "decode") == {}


def test_a_folder_of_another_benchmark_names_the_right_dataset(tmp_path):
    fiq, cirr, circo = _fiq(tmp_path / "fiq"), make_cirr(tmp_path / "cirr"), make_circo(tmp_path / "circo")
    for dataset, root, right in [("cirr", circo, "circo"), ("circo", cirr, "cirr"), ("fashioniq", cirr, "cirr"),
                                 ("cirr", fiq, "fashioniq"), ("shapes-cirr", circo, "shapes-circo")]:
        with pytest.raises(EvalError, match=rf"not .* layout: pass --dataset {right}$"):
            load_benchmark(dataset, root)
    for dataset, root in [("fashioniq", fiq), ("cirr", cirr), ("circo", circo)]:    # each reads as itself
        assert load_benchmark(dataset, root).n_queries > 0
