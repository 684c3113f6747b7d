"""Test-server writers and validators (CIRR two files, CIRCO one dict)."""
from __future__ import annotations

import json

import pytest

from cir.eval import submission as S
from cir.eval.benchmarks import load_benchmark
from cir.eval.submission import SubmissionError, validate_circo, validate_cirr, validate_file
from test_eval_fixtures import cirr_test_queries, dump, make_circo, make_cirr

NAMES = [f"test1-{i}-0-img{i % 2}" for i in range(60)]


@pytest.fixture
def cirr_task(tmp_path):
    make_cirr(tmp_path / "cirr", "test1", queries=cirr_test_queries(NAMES), names=NAMES)
    return load_benchmark("cirr", tmp_path / "cirr", "test").tasks[0]


def _cirr_rankings(task):
    # query i (reference NAMES[i]): every other image in gallery order; subset = members[1:4]
    rank = {q.qid: [n for n in NAMES if n != q.reference][:50] for q in task.queries}
    sub = {q.qid: [m for m in q.members if m != q.reference][:3] for q in task.queries}
    return rank, sub


def test_cirr_writer_output_passes_validators(cirr_task, tmp_path):
    rank, sub = _cirr_rankings(cirr_task)
    paths = S.write_cirr_submission(tmp_path / "out", cirr_task, rank, sub)
    assert [p.name for p in paths] == ["cirr_test1_recall.json", "cirr_test1_recall_subset.json"]
    assert [validate_file(p, "cirr", cirr_task) for p in paths] == ["recall", "recall_subset"]
    recall = json.loads(paths[0].read_text())
    assert recall["version"] == "rc2" and set(recall) == {"version", "metric", "100", "101"}
    assert len(recall["100"]) == 50 and NAMES[0] not in recall["100"]
    subset = json.loads(paths[1].read_text())
    assert subset["101"] == NAMES[2:5]                       # members NAMES[1:7] minus the reference
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in paths]   # no temp files


def _payload(task, metric):
    rank, sub = _cirr_rankings(task)
    p = {"version": "rc2", "metric": metric}
    p.update(rank if metric == "recall" else sub)
    return p


@pytest.mark.parametrize("metric,mutate,message", [
    ("recall", lambda p: p.pop("101"), r"1 of 2 queries of cap\.rc2\.test1\.json missing \(first: 101\)"),
    ("recall", lambda p: p.update({"10": p.pop("100")}),
     r"key '10' is not a query of cap\.rc2\.test1\.json .*another split"),
    ("recall", lambda p: p["100"].__setitem__(3, "dev-1-1-img1"),
     r"pairid 100: 'dev-1-1-img1' not in split\.rc2\.test1\.json \(a submission for another split\?\)"),
    ("recall", lambda p: p["100"].__setitem__(3, p["100"][2]), r"pairid 100: image '.*' listed twice"),
    ("recall", lambda p: p["100"].pop(), r"pairid 100: 49 names, expected 50"),
    ("recall", lambda p: p["100"].__setitem__(0, NAMES[0]), r"pairid 100: the reference 'test1-0-0-img0' must be excluded"),
    ("recall", lambda p: p.update(version="rc1"), r"'version' must be 'rc2'"),
    ("recall", lambda p: p.update(metric="recall_subset"), r"'metric' must be 'recall'"),
    ("recall_subset", lambda p: p["101"].pop(), r"pairid 101: 2 names, expected 3"),
    ("recall_subset", lambda p: p["101"].__setitem__(0, NAMES[30]),
     r"pairid 101: 'test1-30-0-img0' not in img_set members minus the reference"),
    ("recall_subset", lambda p: p["100"].__setitem__(0, 5), r"pairid 100: expected a list of image names"),
])
def test_cirr_validator_rejects(cirr_task, metric, mutate, message):
    p = _payload(cirr_task, metric)
    validate_cirr(p, metric, cirr_task)        # the unmutated payload is valid
    mutate(p)
    with pytest.raises(SubmissionError, match=message):
        validate_cirr(p, metric, cirr_task)


def test_cirr_size_limit_and_nothing_written_on_failure(cirr_task, tmp_path, monkeypatch):
    rank, sub = _cirr_rankings(cirr_task)
    monkeypatch.setattr(S, "CIRR_MAX_BYTES", 1000)
    with pytest.raises(SubmissionError, match=r"MB, the server accepts at most 5 MB"):
        S.write_cirr_submission(tmp_path / "out", cirr_task, rank, sub)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------- CIRCO

IDS = list(range(1000, 1060))


@pytest.fixture
def circo_task(tmp_path):
    qs = [{"id": i, "reference_img_id": IDS[i], "relative_caption": "x", "shared_concept": "y"} for i in range(3)]
    make_circo(tmp_path / "circo", "test", queries=qs, ids=IDS)
    return load_benchmark("circo", tmp_path / "circo", "test").tasks[0]


def _circo_payload():
    return {str(q): [IDS[(q + j) % 60] for j in range(50)] for q in range(3)}


def test_circo_writer_output_passes_validator(circo_task, tmp_path):
    rank = {k: [str(i) for i in v] for k, v in _circo_payload().items()}
    path = S.write_circo_submission(tmp_path / "sub" / "circo_test.json", circo_task, rank)
    data = json.loads(path.read_text())
    assert set(data) == {"0", "1", "2"} and all(isinstance(i, int) for i in data["0"]) and len(data["2"]) == 50
    assert validate_file(path, "circo", circo_task) == ""


@pytest.mark.parametrize("mutate,message", [
    (lambda p: p.pop("2"), r"1 of 3 queries of test\.json missing \(first: 2\)"),
    (lambda p: p.update({"3": p["0"]}), r"key '3' is not a query of test\.json .*another split"),
    (lambda p: p["0"].__setitem__(1, p["0"][0]), r"query 0: image 1000 listed twice"),
    (lambda p: p["1"].pop(), r"query 1: 49 ids, expected 50"),
    (lambda p: p["1"].__setitem__(0, str(p["1"][0])), r"query 1: expected a list of integer image ids"),
    (lambda p: p["1"].__setitem__(0, True), r"query 1: expected a list of integer image ids"),
    (lambda p: p["2"].__setitem__(0, 7), r"query 2: image id 7 not in image_info_unlabeled2017\.json"),
])
def test_circo_validator_rejects(circo_task, mutate, message):
    p = _circo_payload()
    validate_circo(p, circo_task)
    mutate(p)
    with pytest.raises(SubmissionError, match=message):
        validate_circo(p, circo_task)


def test_val_submission_is_rejected_for_test_split(circo_task, tmp_path):
    # a val-sized file (ids 0..4) offered for a 3-query test split: extra ids name the problem
    p = {str(q): [IDS[j] for j in range(50)] for q in range(5)}
    dump(tmp_path / "val_sub.json", p)
    with pytest.raises(SubmissionError, match=r"val_sub\.json: key '3' is not a query of test\.json"):
        validate_file(tmp_path / "val_sub.json", "circo", circo_task)
