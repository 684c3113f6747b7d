"""End to end through `datagen.pipeline.generate`: captions from a file, a real-caption text
backend (keywords; a tiny memorised causal LM through transformers), tiny random SD paired
images (datagen.diffusion.tiny). Text rejects appear in stats.json and the rejects shards."""
from __future__ import annotations

import json
from collections import Counter

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import pyarrow.parquet as pq  # noqa: E402

from datagen.diffusion import tiny  # noqa: E402
from datagen.pipeline import generate  # noqa: E402
from datagen.recipe import load_gen_recipe  # noqa: E402
from datagen.text.prompt import SEP_PROMPT  # noqa: E402
from tinylm import SCRIPT, save_memorised_lm  # noqa: E402

QUIET = {"progress": False, "log": lambda s: None, "workers": 1}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd")
    tiny.build_sd_pipeline(tiny.write_clip_tokenizer_files(d / "tok")).save_pretrained(d / "tiny-sd")
    return d / "tiny-sd"


def recipe(captions, sd, *extra):
    return load_gen_recipe("shapes-high", [
        "captions.source=file", f"captions.path={captions}", "images.backend=diffusers-paired",
        "images.resolution=32", "images.format=png", "images.diffusion.steps=2", f"images.diffusion.model={sd}",
        "images.diffusion.device=cpu", "pipeline.unit_size=3", "pipeline.batch_size=3", *extra])


def rows(out, sub):
    return [r for p in sorted((out / sub).glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


@pytest.mark.slow
def test_file_captions_keywords_and_paired_images(tmp_path, tiny_sd):
    caps = ["a dog running on the beach", "zzz qqq 1", "a red car parked on a street", "zzz qqq 2",
            "two cats sleeping on a sofa", "a boat on a lake at sunset", "zzz qqq 3"]
    f = tmp_path / "caps.txt"
    f.write_text("\n".join(caps + ["a boat on a lake at sunset", "\x00\x00"]) + "\n")   # 1 duplicate, 1 NUL row
    out = tmp_path / "ds"
    stats = generate(recipe(f, tiny_sd, "edits.backend=keywords", "captions.bad_rows=skip"), out, 5, **QUIET)
    assert stats["kept"] == 5
    pool = json.loads((out / "stats.json").read_text())["caption_pool"]     # the pool's counts are reported
    assert pool["source"] == "caps.txt" and pool["rows"] == 9 and pool["captions"] == 7
    assert pool["bad_rows"] == 1 and pool["exact_duplicates"] == 1
    kept, rejected = rows(out, "shards"), rows(out, "rejects")
    assert Counter(r["reject_reason"] for r in rejected) == Counter(stats["rejected"])
    assert set(stats["rejected"]) <= {"text_no_keyword", "text_noop"} and stats["rejected"]["text_no_keyword"] >= 1
    for r in kept:
        g = json.loads(r["generator"])
        assert r["source_caption"] in caps and not r["source_caption"].startswith("zzz")
        assert g["captions"]["file"] == "caps.txt" and g["edits"]["backend"] == "keywords"
        assert g["images"]["backend"] == "diffusers-paired" and r["reference_image"]["bytes"]
    assert generate(recipe(f, tiny_sd, "edits.backend=keywords", "captions.bad_rows=skip"), out, 5,
                    **QUIET)["kept"] == 5   # resume: no-op


@pytest.mark.slow
def test_transformers_backend_rejects_are_counted_in_stats(tmp_path, tiny_sd):
    lm = save_memorised_lm(tmp_path / "lm", [(cap + SEP_PROMPT, o) for cap, o, _ in SCRIPT])
    f = tmp_path / "caps.txt"
    f.write_text("\n".join(cap for cap, _, _ in SCRIPT) + "\n")
    r = recipe(f, tiny_sd, "edits.backend=transformers", f"edits.llm.model={lm}", "edits.llm.examples=0",
               "edits.llm.temperature=0", "edits.llm.max_new_tokens=48", "edits.llm.runtime.device=cpu")
    out = tmp_path / "ds"
    stats = generate(r, out, 3, **QUIET)
    want = {cap: res for cap, _, res in SCRIPT}
    kept = rows(out, "shards")
    assert stats["kept"] == 3 and sorted(x["target_caption"] for x in kept) == \
        sorted(res for res in want.values() if not res.startswith("text_"))
    rejected = rows(out, "rejects")
    assert Counter(x["reject_reason"] for x in rejected) == Counter(stats["rejected"])
    for x in rejected:                                # each reject has the reason its caption earns
        assert want[x["source_caption"]] == x["reject_reason"]
        assert json.loads(x["generator"])["edits"]["raw"] is not None
    assert json.loads((out / "stats.json").read_text())["rejected"] == stats["rejected"]
