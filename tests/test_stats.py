"""Typed run statistics keep the on-disk format: stats.json and the shard footers read and write
exactly the keys (and values) they always had."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from datagen.inspect import inspect_dataset, render_text
from datagen.pipeline import generate, summary_lines
from datagen.recipe import load_gen_recipe
from datagen.stats import Budget, DatasetStats, UnitStats

STATS_KEYS = {"kept", "generated", "rejected", "failures_kept", "failures_generated", "edit_types", "passes",
              "criteria", "pass_rates", "yield", "budget", "near_duplicates_cross_unit"}
BUDGET_KEYS = {"seconds_total", "seconds_per_stage", "seconds_per_generated", "seconds_per_kept",
               "seconds_per_1k_kept", "stage_seconds_per_generated", "stage_seconds_per_kept",
               "device_per_stage", "seconds_by_device", "gpu_seconds", "gpu_seconds_per_1k_kept", "device"}
FOOTER_KEYS = {"unit", "seed", "recipe_hash", "kept", "generated", "rejected", "failures_kept",
               "failures_generated", "edit_types", "passes", "seconds"}


def test_stats_json_and_footers_round_trip_through_the_typed_objects(tmp_path):
    out = tmp_path / "ds"
    r = load_gen_recipe("shapes-high", ["images.resolution=32", "pipeline.unit_size=4", "pipeline.batch_size=4",
                                        "filters.text.max_words=6", "filters.dedupe.enabled=true"])
    summary = generate(r, out, 8, workers=1, progress=False, log=lambda s: None)
    disk = json.loads((out / "stats.json").read_text())
    assert set(disk) == STATS_KEYS and set(disk["budget"]) == BUDGET_KEYS
    assert DatasetStats.from_dict(disk).to_dict() == disk
    assert {k: v for k, v in summary.items() if k != "wall_seconds"} == disk
    assert disk["kept"] == 8 and disk["generated"] > 8 and disk["rejected"]     # some were rejected
    units = []
    for path in sorted((out / "shards").glob("*.parquet")):
        footer = json.loads(pq.read_schema(path).metadata[b"cirgen"])
        assert set(footer) == FOOTER_KEYS and UnitStats.from_dict(footer).to_dict() == footer
        units.append(UnitStats.from_dict(footer))
    assert sum(u.kept for u in units) == disk["kept"] and sum(u.generated for u in units) == disk["generated"]
    text = render_text(inspect_dataset(out))
    assert f"generated {disk['generated']}, kept 8" in text and "budget: captions" in text
    assert summary_lines(summary)[0].startswith(f"kept 8 of {disk['generated']} candidates")


def test_an_older_stats_json_without_newer_fields_still_reads():
    old = {"kept": 3, "generated": 4, "rejected": {"text_noop": 1}, "failures_kept": {"none": 3},
           "edit_types": {"color": 3}, "yield": 0.75,
           "budget": {"seconds_per_stage": {"captions": 1.0}, "seconds_per_1k_kept": 333.3}}
    st = DatasetStats.from_dict(old)
    assert (st.kept, st.yield_, st.criteria, st.near_duplicates_cross_unit) == (3, 0.75, {}, None)
    assert st.budget == Budget(seconds_per_stage={"captions": 1.0}, seconds_per_1k_kept=333.3)
    assert "seconds per stage: captions 1.00 | 333.30 s per 1k kept (cpu)" in st.summary_lines()
