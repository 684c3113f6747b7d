"""Evaluation inputs: published CIRR layouts, manifest paths kept inside their root, truncated images
and unusable query texts found per file/entry (and dropped, counted, with --allow-missing)."""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from cir.eval import EvalError
from cir.eval.benchmarks import find_bad_images, load_benchmark
from cir.eval.harness import EvalOptions, evaluate
from test_eval_fixtures import (A, C, CIRR_NAMES, FakeModel, circo_val_queries, descending, dump, fiq_ids,
                                make_circo, make_cirr, make_fashioniq)


def _cirr_scores(ref, prompt):
    return descending([C, A] + [n for n in CIRR_NAMES if n not in (A, C)])


def test_cirr_searle_and_readme_layouts_give_the_flat_numbers(tmp_path):
    flat = make_cirr(tmp_path / "flat")
    searle = tmp_path / "searle"                         # ROOT/cirr/{captions,image_splits}, ROOT/dev
    shutil.copytree(flat / "dev", searle / "dev")
    for sub in ("captions", "image_splits"):
        shutil.copytree(flat / sub, searle / "cirr" / sub)
    readme = tmp_path / "readme"                         # ROOT/{captions,image_splits}, ROOT/img_raw/dev
    shutil.copytree(flat / "dev", readme / "img_raw" / "dev")
    for sub in ("captions", "image_splits"):
        shutil.copytree(flat / sub, readme / sub)
    want = evaluate(FakeModel(CIRR_NAMES, _cirr_scores), "cirr", flat).metrics
    for root in (searle, readme):
        res = evaluate(FakeModel(CIRR_NAMES, _cirr_scores), "cirr", root)
        assert res.metrics == want and res.integrity["bad_images"] == 0, root
    with pytest.raises(EvalError, match=rf"images .* are in {searle}.*pass --root {searle}$"):
        load_benchmark("cirr", searle / "cirr")


@pytest.mark.parametrize("bad", ["../outside.png", "ABS", "../../../../../../../../etc/passwd", "dev/../../x.png"])
def test_cirr_split_paths_cannot_leave_the_root(tmp_path, bad):
    root = make_cirr(tmp_path / "x")
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    bad = str(tmp_path / "outside.png") if bad == "ABS" else bad
    spl = root / "image_splits" / "split.rc2.val.json"
    d = json.loads(spl.read_text())
    d[A] = bad
    dump(spl, d)
    with pytest.raises(EvalError, match=rf"^split\.rc2\.val\.json entry {A}: path '.*' leaves the benchmark root"):
        evaluate(FakeModel(CIRR_NAMES, _cirr_scores), "cirr", root, options=EvalOptions(allow_missing=True))
    d[A] = f"./dev/sub/../{A}.png"                       # stays inside: accepted
    dump(spl, d)
    assert load_benchmark("cirr", root).tasks[0].paths[A] == root / "dev" / f"{A}.png"


def test_circo_and_fashioniq_file_names_cannot_leave_the_root(tmp_path):
    root = make_circo(tmp_path / "circo")
    info = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    d = json.loads(info.read_text())
    d["images"][2]["file_name"] = "../../../outside.jpg"
    dump(info, d)
    with pytest.raises(EvalError, match=r"image_info_unlabeled2017\.json images\[2\] \(id 33\): path "
                                        r"'\.\./\.\./\.\./outside\.jpg' leaves"):
        load_benchmark("circo", root)
    fiq = make_fashioniq(tmp_path / "fiq", {"dress": [{"candidate": "../../secret", "target": "dress001",
                                                        "captions": ["a", "b"]}]})
    with pytest.raises(EvalError, match=r"cap\.dress\.val\.json entry 0: image id '\.\./\.\./secret' is not a file name"):
        load_benchmark("fashioniq", fiq)


def _fiq(tmp_path, captions=("is longer", "has dots")):
    q = [{"candidate": f"dress{2 * i:03d}", "target": f"dress{2 * i + 1:03d}", "captions": list(captions)}
         for i in range(4)]
    root = make_fashioniq(tmp_path, {"dress": q, "shirt": [], "toptee": []}, ext=".jpg")
    return root, q


def _fiq_model():
    names = [a for cat in ("dress", "shirt", "toptee") for a in fiq_ids(cat)]
    return FakeModel(names, lambda ref, p: descending([f"dress{int(ref[5:]) + 1:03d}"]))


def test_truncated_image_is_found_by_the_default_check_and_dropped(tmp_path):
    root, _ = _fiq(tmp_path)
    img = root / "images" / "dress002.jpg"               # the reference of query 1 (a PNG inside)
    img.write_bytes(img.read_bytes()[:-30])              # a download cut short
    bench = load_benchmark("fashioniq", root)
    assert "dress002.jpg" in next(iter(find_bad_images(bench, "header")))
    assert find_bad_images(bench, "exists") == {}
    with pytest.raises(EvalError, match=r"1 image\(s\).*dress002\.jpg \(unreadable: image cannot be decoded"):
        evaluate(_fiq_model(), "fashioniq", root)
    res = evaluate(_fiq_model(), "fashioniq", root, options=EvalOptions(allow_missing=True))
    assert res.integrity["bad_images"] == 1 and res.integrity["queries_dropped"] == 1 and res.n_queries == 3
    assert "1 of 4 queries dropped" in res.table()


def test_image_failing_only_at_encoding_time_names_it_and_suggests_decode(tmp_path):
    root, _ = _fiq(tmp_path)

    class Refuses(FakeModel):
        def encode_images(self, paths):
            from datagen.base.images import ImageError
            raise ImageError(f"{paths[0]}: image cannot be decoded (broken data stream)")

    with pytest.raises(EvalError, match=r"image cannot be decoded .*rerun with --check decode"):
        evaluate(Refuses(_fiq_model().names, None), "fashioniq", root)


def test_placeholder_cut_by_the_context_is_refused_per_entry_or_dropped(tmp_path):
    root, q = _fiq(tmp_path)
    q[0]["captions"][0] = " ".join(["very"] * 40) + " long"
    dump(root / "captions" / "cap.dress.val.json", q)
    model = _fiq_model()
    model.max_prompt_words = 30
    with pytest.raises(EvalError, match=r"^1 of 4 queries cannot be encoded \(first: cap\.dress\.val\.json "
                                        r"entry 0 \(id dress:0\): placeholder cut\)"):
        evaluate(model, "fashioniq", root)
    res = evaluate(model, "fashioniq", root, options=EvalOptions(allow_missing=True))
    assert res.n_queries == 3 and res.integrity["queries_unusable"] == 1
    assert "1 queries dropped whose text cannot be encoded (first: cap.dress.val.json entry 0" in res.table()


def test_empty_caption_is_refused_naming_the_entry(tmp_path):
    q = [dict(x) for x in json.loads(json.dumps(
        __import__("test_eval_fixtures").cirr_val_queries()))]
    q[1]["caption"] = "  "
    root = make_cirr(tmp_path, queries=q)
    with pytest.raises(EvalError, match=r"1 of 3 queries cannot be encoded \(first: cap\.rc2\.val\.json entry 1 "
                                        r"\(id 11\): empty caption\)"):
        evaluate(FakeModel(CIRR_NAMES, _cirr_scores), "cirr", root)
    res = evaluate(FakeModel(CIRR_NAMES, _cirr_scores), "cirr", root, options=EvalOptions(allow_missing=True))
    assert res.n_queries == 2


def test_circo_missing_ground_truth_stays_in_the_denominator(tmp_path):
    """Case 16: reference 11, GTs 22 and 33 (33 missing), official AP@K = 1/min(K, 2)."""
    q = circo_val_queries()[:1]
    q[0]["gt_img_ids"] = [22, 33]
    root = make_circo(tmp_path, queries=q)
    (root / "COCO2017_unlabeled" / "unlabeled2017" / f"{33:012d}.jpg").unlink()
    names = [f"{i:012d}" for i in (11, 22, 33, 44, 55, 66, 77, 88, 99, 111, 122, 133)]
    model = FakeModel(names, lambda ref, p: descending([f"{22:012d}"]))
    res = evaluate(model, "circo", root, options=EvalOptions(allow_missing=True))
    assert res.metrics["mAP@5"] == pytest.approx(50.0) and res.metrics["mAP@50"] == pytest.approx(50.0)
    assert res.integrity["queries_changed"] == 1 and res.integrity["queries_dropped"] == 0
