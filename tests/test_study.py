"""The study: a tiny grid end to end; rerun does no work; a deleted cell alone is recomputed, identically."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from cir.study import Study, load_study_recipe
from conftest import SMALL
from datagen.base.config import ConfigError


def _tiny(tmp_path, extra=()):
    cache = tmp_path / "cache"
    gen = "[" + ",".join(SMALL) + "]"
    return load_study_recipe("shapes", [
        "quantities=[20,40]", "seeds=[0]", "workers=1",
        f"tiers=[{{name: high, gen: shapes-high, overrides: {gen}}}, "
        f"{{name: low-unfiltered, gen: shapes-low, overrides: {gen}}}]",
        f"stage1.overrides=[clip.random_init=true, data.n=64, train.batch_size=32, train.epochs=1, "
        f"eval.scenes=10, cache_dir={cache}]",
        f"stage2.overrides=[train.epochs=1, train.batch_size=16, cache_dir={cache}]",
        "benchmark.queries=12", "benchmark.resolution=32", *extra])


def test_tiny_study_end_to_end_resumes_and_recomputes_one_cell(tmp_path):
    out = tmp_path / "study"
    r = _tiny(tmp_path)
    res = Study(r, out, log=lambda s: None).run()
    assert res["cells"] == 5
    assert set(res["work_done"]) == {"data/high", "data/low-unfiltered", "stage1", "bench",
                                     "cells/stage1", "cells/high-n20-s0", "cells/high-n40-s0",
                                     "cells/low-unfiltered-n20-s0", "cells/low-unfiltered-n40-s0"}
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(x["tier"], x["quantity"]) for x in rows] == [
        ("stage1", "0"), ("high", "20"), ("high", "40"), ("low-unfiltered", "20"), ("low-unfiltered", "40")]
    assert all(x["recipe_hash"] == res_hash for x in rows for res_hash in [rows[0]["recipe_hash"]])
    # Cost: generation seconds grow with the count; stage I costs no generation.
    g = {(x["tier"], x["quantity"]): float(x["gen_seconds"]) for x in rows}
    assert g[("stage1", "0")] == 0 and 0 < g[("high", "20")] < g[("high", "40")]
    assert (out / "plots" / "metric_vs_triplets.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "| high | 40 | 1 |" in md and "±" not in md.split("|---|")[-1]    # one seed: no spread shown

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = Study(_tiny(tmp_path), out, log=lambda s: None).run()
    assert again["work_done"] == []
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    changed = [p for p in after if before.get(p) != after[p] and p.name != "study.json"]
    assert changed == []

    cell = out / "cells" / "high-n40-s0"
    old = json.loads((cell / "metrics.json").read_text())
    shutil.rmtree(cell)
    third = Study(_tiny(tmp_path), out, log=lambda s: None).run()
    assert third["work_done"] == ["cells/high-n40-s0"]
    assert json.loads((cell / "metrics.json").read_text())["metrics"] == old["metrics"]   # deterministic

    # Adding a seed adds cells and recomputes nothing else.
    fourth = Study(_tiny(tmp_path, ["seeds=[0,1]"]), out, log=lambda s: None).run()
    assert sorted(fourth["work_done"]) == ["cells/high-n20-s1", "cells/high-n40-s1",
                                           "cells/low-unfiltered-n20-s1", "cells/low-unfiltered-n40-s1"]
    assert "| high | 40 | 2 |" in (md := (out / "results.md").read_text()) and "±" in md.split("|---|")[-1]


def test_study_recipe_errors_name_the_field():
    with pytest.raises(ConfigError, match="tiers"):
        load_study_recipe("shapes", ["tiers=[]"])
    with pytest.raises(ConfigError, match="unknown key 'quantity'"):
        load_study_recipe("shapes", ["quantity=[1]"])
    with pytest.raises(ConfigError, match="primary_metric"):
        load_study_recipe("shapes", ["primary_metric=R@3"])


def test_outputs_are_keyed_by_the_clip_weights_not_only_by_the_model_name(tmp_path):
    # New weights under the same name (a retrained shapes-CLIP) must redo stage I, the filtered
    # data and every cell, not report the old results.
    import torch
    from safetensors.torch import save_file

    keys, w = [], tmp_path / "weights.safetensors"      # one path, two contents
    for i in range(2):
        save_file({"x": torch.full((2,), float(i))}, str(w))
        tier = f"{{name: low, gen: shapes-low-filtered, overrides: [filters.clip.pretrained={w}]}}"
        r = _tiny(tmp_path, [f"stage1.overrides=[clip.pretrained={w}]", f"tiers=[{tier}]"])
        study = Study(r, tmp_path / "study", log=lambda s: None)
        cell = study.cells()[1]
        keys.append((study._stage1_key(), study._gen_key(cell.tier), study._cell_key(cell)))
    assert all(a != b for a, b in zip(*keys))


def test_cell_keys_ignore_recipe_prose_and_cache_folders(tmp_path):
    def key(*stage2):
        study = Study(_tiny(tmp_path, [f"stage2.overrides=[{', '.join(stage2)}]"]), tmp_path / "s", log=lambda s: None)
        return study._cell_key(study.cells()[1])

    base = key("train.epochs=1")
    assert key("train.epochs=1", "description=reworded", f"cache_dir={tmp_path / 'elsewhere'}") == base
    assert key("train.epochs=2") != base
