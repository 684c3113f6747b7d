"""End to end: `generate` on shapes-low with the CLIP filter (random-init shapes-CLIP) and dedupe on."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SMALL, dataset_content
from datagen.calibrate import load_scores
from datagen.filters import CLIP_CRITERIA
from datagen.pipeline import generate, summary_lines
from datagen.recipe import load_gen_recipe
from datagen.schema import TripletReader

QUIET = {"progress": False, "log": lambda s: None}
# Random-init shapes-CLIP (ResNet tower): img_img 0.997-1.0 (median 1.0), image-caption -0.19 to
# 0.05 (median -0.07), directional -0.26 to 0.21 (median -0.03). These thresholds reject a good
# share without starving the units.
FILTERED = SMALL + ["pipeline.unit_size=30", "filters.clip.random_init=true", "filters.clip.device=cpu",
                    "filters.clip.batch_size=32",
                    "filters.clip.thresholds={img_img: 0.999, img_cap: -0.15, dir: -0.1, instr_tgt: null}",
                    "filters.dedupe.enabled=true", "filters.dedupe.max_distance=2"]
N = 60


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    out = tmp_path_factory.mktemp("filtered") / "ds"
    stats = generate(load_gen_recipe("shapes-low-filtered", FILTERED), out, N, workers=1, **QUIET)
    return out, stats


def test_shards_hold_every_score_and_pass_and_rejects_name_the_first_failed_criterion(filtered):
    out, stats = filtered
    assert stats["kept"] == N and stats["generated"] > N
    reader = TripletReader(out)
    kept, rejected = reader.table(), reader.table(rejects=True)
    scores = ["score_clip_img_img", "score_clip_img_cap_ref", "score_clip_img_cap_tgt", "score_clip_dir",
              "score_clip_instr_tgt"]
    passes = ["pass_text", "pass_clip_img_img", "pass_clip_img_cap", "pass_clip_dir", "pass_dedupe"]
    for t in (kept, rejected):
        for col in scores + passes + ["score_dedupe_phash"]:
            assert col in t.column_names, col
    assert rejected.num_rows == stats["generated"] - N > 0
    reasons = set(rejected.column("reject_reason").to_pylist())
    assert reasons & {"clip_img_img", "clip_img_cap", "clip_dir"}
    assert reasons <= {"clip_img_img", "clip_img_cap", "clip_dir", "near_duplicate", "text_noop",
                       "text_empty", "text_too_long"}
    order = [k for k in CLIP_CRITERIA if f"pass_clip_{k}" in passes]
    for row in rejected.to_pylist() + kept.to_pylist():
        assert all(row[c] is not None and np.isfinite(row[c]) for c in scores)    # scored regardless
        assert all(row[p] is not None for p in passes)
        failed = [k for k in order if not row[f"pass_clip_{k}"]]
        if row["kept"]:
            assert not failed and row["pass_dedupe"] and row["reject_reason"] is None
        elif row["reject_reason"].startswith("clip_"):
            assert row["reject_reason"] == f"clip_{failed[0]}"
        elif row["reject_reason"] == "near_duplicate":
            assert not failed and row["score_dedupe_phash"] <= 2
        gen = json.loads(row["generator"])
        assert gen["filters"]["clip"] == {"model": "shapes-clip@random", "device": "cpu"}


def test_stats_report_pass_rates_per_criterion_and_the_budget(filtered):
    out, stats = filtered
    st = json.loads((out / "stats.json").read_text())
    assert set(st["criteria"]) == {"text", "clip_img_img", "clip_img_cap", "clip_dir", "dedupe"}
    for name, c in st["criteria"].items():
        assert c["evaluated"] == st["generated"] and 0 <= c["passed"] <= c["evaluated"]
        assert c["pass_rate"] == round(c["passed"] / c["evaluated"], 4)
        assert st["pass_rates"][f"pass_{name}"] == c["pass_rate"]
    assert st["criteria"]["clip_img_img"]["pass_rate"] < 1.0
    b = st["budget"]
    assert b["device_per_stage"] == {s: "cpu" for s in ("captions", "edits", "images", "filters")}
    assert b["device"] == "cpu" and b["gpu_seconds"] == 0.0
    assert b["seconds_by_device"]["cpu"] == pytest.approx(b["seconds_total"], abs=0.01)
    assert b["stage_seconds_per_kept"]["filters"] > 0 and b["seconds_per_generated"] < b["seconds_per_kept"]
    dup = st["near_duplicates_cross_unit"]
    assert dup["checked"] == N and dup["count"] == len(dup["ids"])
    text = "\n".join(summary_lines(stats))
    assert "pass rate per criterion: " in text and "clip_dir" in text and "near-duplicates across units" in text
    assert "pass rate per criterion" in (out / "README.md").read_text()


def test_scores_load_for_calibration(filtered):
    out, stats = filtered
    scores, failures = load_scores(out)
    assert set(scores) == {"img_img", "img_cap", "dir", "instr_tgt"}
    assert len(failures) == stats["generated"] and all(len(v) == len(failures) for v in scores.values())
    assert any(f is not None for f in failures)


def test_same_records_on_two_workers(filtered, tmp_path):
    out, _ = filtered
    two = tmp_path / "two"
    generate(load_gen_recipe("shapes-low-filtered", FILTERED), two, N, workers=2, **QUIET)
    assert dataset_content(two) == dataset_content(out)
    assert json.loads((two / "stats.json").read_text())["near_duplicates_cross_unit"] == \
        json.loads((out / "stats.json").read_text())["near_duplicates_cross_unit"]


def test_batch_sizes_do_not_change_the_records(filtered, tmp_path):
    out, _ = filtered
    other = tmp_path / "b7"
    extra = ["pipeline.batch_size=7", "filters.clip.batch_size=5"]
    generate(load_gen_recipe("shapes-low-filtered", FILTERED + extra), other, N, workers=1, **QUIET)
    assert dataset_content(other) == dataset_content(out)


class _GpuScorer:
    """Stands in for a CLIP on a GPU: fixed scores, reports device cuda:0."""
    model_id, device = "fake@gpu", "cuda:0"

    def pair_scores(self, refs, tgts, srcs, dsts, instructions=None):
        n = len(refs)
        out = {"img_img": np.full(n, 0.9, np.float32), "img_cap_ref": np.full(n, 0.3, np.float32),
               "img_cap_tgt": np.full(n, 0.3, np.float32), "dir": np.where(np.arange(n) % 3 == 2, -0.5, 0.5).astype(np.float32)}
        if instructions is not None:
            out["instr_tgt"] = np.full(n, 0.3, np.float32)
        return out


def test_budget_counts_gpu_seconds_of_the_stages_that_ran_on_a_gpu(tmp_path, monkeypatch):
    import datagen.filters

    monkeypatch.setattr(datagen.filters, "load_scorer", lambda cfg: _GpuScorer())
    out = tmp_path / "gpu"
    stats = generate(load_gen_recipe("shapes-low-filtered", SMALL + ["filters.clip.thresholds.dir=0.0",
                                                                     "filters.clip.thresholds.img_img=0.8",
                                                                     "filters.clip.thresholds.img_cap=0.2"]),
                     out, 40, workers=1, **QUIET)
    b = stats["budget"]
    assert b["device_per_stage"] == {"captions": "cpu", "edits": "cpu", "images": "cpu", "filters": "cuda"}
    assert b["device"] == "cpu+cuda"
    assert b["gpu_seconds"] == pytest.approx(b["seconds_per_stage"]["filters"], abs=0.01) and b["gpu_seconds"] > 0
    assert b["seconds_by_device"]["cpu"] + b["seconds_by_device"]["cuda"] == pytest.approx(b["seconds_total"], abs=0.01)
    assert stats["rejected"].get("clip_dir", 0) > 0
    assert "GPU" in "\n".join(summary_lines(stats))
