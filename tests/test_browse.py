"""HTML reports (`cirgen browse`, `write_retrieval_report`): files, thumbnails, escaping, and the
viewer driven in a real headless Chromium (filters, sorting, paging, lazy chunks, hits)."""
from __future__ import annotations

import io
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import SMALL, file_states
from datagen.candidate import Candidate, candidate_seed
from datagen.base.config import from_dict
from datagen.recipe import GenRecipe
from datagen.report import (ReportError, RetrievalQuery, RetrievalResult, write_dataset_report,
                            write_retrieval_report)
from datagen.schema import FORMAT, build_schema
from datagen.store import shard_path, to_table, write_table

EVIL = '<script>window.__pwned=1</script><img src="x" onerror="window.__pwned=2"> & </script>'
SCORES = ["score_clip_img", "score_clip_dir"]
PASSES = ["pass_text", "pass_clip_img", "pass_clip_dir"]
FAILURES = [None, None, "wrong_object", "noop_target", None, "extra_change"]


def _img(seed: int, size: int = 48, fmt: str = "JPEG") -> bytes:
    rng = random.Random(seed)
    im = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    im.paste(tuple(rng.randrange(256) for _ in range(3)), (size // 4, size // 4, size // 2, size // 2))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def make_dataset(root: Path, n_kept: int = 60, n_rejected: int = 15, tier: str = "low",
                 size: int = 48, fmt: str = "JPEG", broken: int | None = None) -> dict:
    """A dataset folder in the real on-disk format with CLIP-like scores, rejects and an
    injected `<script>` caption on row 0. Returns the expected facts for the assertions."""
    rng = random.Random(tier)
    kept, rejected = [], []
    for j in range(n_kept + n_rejected):
        c = Candidate(unit=0, j=j, seed=candidate_seed(0, 0, j))
        c.source_caption = EVIL if j == 0 else f"a small red circle number {j}"
        c.modification_text = "make it <b>blue</b>" if j == 0 else f"make circle {j} blue"
        c.target_caption = f"a small blue circle number {j}"
        c.edit_type = ["recolor", "move", "add"][j % 3]
        c.failure = FAILURES[j % len(FAILURES)]
        c.reference_image = _img(j, size, fmt)
        # noop targets are the reference itself: the thumbnail must be stored once
        c.target_image = c.reference_image if c.failure == "noop_target" else _img(10_000 + j, size, fmt)
        if j == broken:
            c.target_image = b"\x89PNG but truncated"
        s_img, s_dir = rng.uniform(0.5, 1.0), rng.uniform(-0.1, 0.6)
        c.passes["pass_text"] = True
        if j < n_kept:
            s_img, s_dir = max(s_img, 0.71), max(s_dir, 0.21)
        elif j % 3 == 0:
            s_img = min(s_img, 0.69)
            c.reject("clip_img_low")
        elif j % 3 == 1:
            s_dir = min(s_dir, 0.19)
            c.reject("clip_dir_low")
        else:  # rejected by the text filter before any image was made: no images, no scores
            c.passes["pass_text"] = False
            c.reject("text_noop")
            c.reference_image = c.target_image = b""
        if c.passes["pass_text"]:
            c.scores = {"score_clip_img": s_img, "score_clip_dir": s_dir if j != 5 else math.nan}
            c.passes.update(pass_clip_img=s_img >= 0.7, pass_clip_dir=s_dir >= 0.2)
        c.seconds = {"captions": 0.001, "edits": 0.002, "images": 0.01, "filters": 0.003}
        (kept if c.kept else rejected).append(c)
    (root / "shards").mkdir(parents=True)
    (root / "rejects").mkdir()
    schema = build_schema(SCORES, PASSES)
    write_table(to_table(kept, schema, 500, tier, True), shard_path(root, 0), {})
    write_table(to_table(rejected, schema, 500, tier, False), shard_path(root, 0, rejects=True), {})
    # run.json as `cirgen triplets` writes it: readers check the shards against its plan
    # (unit_size, n, seed) and its recipe against recipe_hash.
    recipe = {"quality": {"tier": tier}, "pipeline": {"unit_size": 500}}
    run = {"format": FORMAT, "schema_version": 1, "recipe_name": f"fixture-{tier}",
           "recipe_hash": from_dict(GenRecipe, recipe).hash(), "seed": 0, "n": n_kept, "recipe": recipe}
    (root / "run.json").write_text(json.dumps(run))
    stats = {"kept": n_kept, "generated": n_kept + n_rejected, "yield": n_kept / (n_kept + n_rejected),
             "budget": {"seconds_per_stage": {"captions": 1.0, "edits": 2.0, "images": 30.0, "filters": 4.0},
                        "seconds_per_1k_kept": 123.0}}
    (root / "stats.json").write_text(json.dumps(stats))
    by_failure: dict = {}
    for c in kept + rejected:
        by_failure[c.failure] = by_failure.get(c.failure, 0) + 1
    return {"kept": len(kept), "rejected": len(rejected), "by_failure": by_failure,
            "max_clip_img": max(c.scores["score_clip_img"] for c in kept + rejected if c.scores)}


def load_js(path: Path, prefix: str):
    text = path.read_text()
    assert text.startswith(prefix)
    return json.loads(text[len(prefix):].rstrip().rstrip(";").rstrip(")"))


# ---------------------------------------------------------------- files (no browser)

def test_report_holds_every_row_score_and_label_and_escapes_text(tmp_path):
    ds = tmp_path / "ds"
    facts = make_dataset(ds)
    res = write_dataset_report(ds, tmp_path / "rep", chunk_size=10)
    assert (res.rows, res.kept, res.rejected) == (75, 60, 15) and res.chunks == 8
    rep = tmp_path / "rep"
    assert {p.name for p in rep.iterdir()} >= {"index.html", "report.js", "report.css", "report.json", "data", "thumbs"}
    idx = load_js(rep / "data" / "index.js", "CIRGEN_INDEX = ")
    facets = {f["key"]: f for f in idx["facets"]}
    assert set(facets) == {"status", "quality", "failure", "reject_reason", "edit_type", *PASSES}
    assert facets["status"]["values"] == ["kept", "rejected"]
    assert set(facets["reject_reason"]["values"]) == {"none", "clip_img_low", "clip_dir_low", "text_noop"}
    fail = facets["failure"]
    assert {v: fail["codes"].count(k) for k, v in enumerate(fail["values"])} == \
        {("none" if k is None else k): v for k, v in facts["by_failure"].items()}
    nums = {n["key"]: n["values"] for n in idx["numbers"]}
    assert max(v for v in nums["score_clip_img"] if v is not None) == round(facts["max_clip_img"], 4)
    assert nums["score_clip_dir"][5] is None  # NaN stored as missing, the JSON stays valid
    assert idx["charts"][0]["bars"] == [["captions", 1.0], ["edits", 2.0], ["images", 30.0], ["filters", 4.0]]
    rows = [r for k in range(res.chunks) for r in load_js(rep / "data" / f"chunk-{k:05d}.js", f"CIRGEN_CHUNK({k},")]
    assert len(rows) == 75 and rows[0]["src"] == EVIL
    assert rows[-1]["ref"] is None or rows[-1]["ref"]  # text-stage rejects have no image
    assert sum(r["ref"] is None for r in rows) == sum(1 for j in range(60, 75) if j % 3 == 2)
    for p in (rep / "data").iterdir():  # no raw markup from the dataset in any file the page loads
        assert "<" not in p.read_text(), p.name


def test_thumbnails_are_written_once_and_a_rerun_changes_no_file(tmp_path):
    ds = tmp_path / "ds"
    make_dataset(ds)
    rep = tmp_path / "rep"
    first = write_dataset_report(ds, rep)
    images = 2 * 75 - 2 * 5  # 5 text-stage rejects without images
    noop = sum(1 for j in range(75) if FAILURES[j % len(FAILURES)] == "noop_target" and not (j >= 60 and j % 3 == 2))
    assert first.thumbs_written + first.thumbs_reused == images
    assert first.thumbs_written == images - noop  # identical bytes -> one file
    assert len(list((rep / "thumbs").glob("*.jpg"))) == first.thumbs_written
    # small JPEGs are copied as they are, never re-encoded
    src = {_img(j) for j in range(75)}
    assert all(p.read_bytes() in src or Image.open(p).size == (48, 48) for p in (rep / "thumbs").iterdir())
    before = file_states(rep)
    time.sleep(0.01)
    again = write_dataset_report(ds, rep)
    assert again.thumbs_written == 0 and again.thumbs_reused == images and again.files_written == 0
    assert file_states(rep) == before


def test_large_or_png_images_are_scaled_down_to_jpeg_in_any_number_of_workers(tmp_path):
    ds = tmp_path / "ds"
    make_dataset(ds, n_kept=40, n_rejected=0, size=300, fmt="PNG", broken=1)
    one = write_dataset_report(ds, tmp_path / "one", thumb_size=96, workers=1)
    two = write_dataset_report(ds, tmp_path / "two", thumb_size=96, workers=2)  # > 1 batch: a pool
    thumbs = sorted((tmp_path / "two" / "thumbs").glob("*.jpg"))
    assert two.thumbs_written == len(thumbs) == 80 - 7 and two.thumb_cpu_seconds > 0  # 7 noop targets
    assert two.images_unreadable == one.images_unreadable == 1  # shown as a placeholder thumbnail
    assert {p.name: p.read_bytes() for p in thumbs} == \
        {p.name: p.read_bytes() for p in (tmp_path / "one" / "thumbs").glob("*.jpg")}
    for p in thumbs:
        with Image.open(p) as im:
            assert im.format == "JPEG" and max(im.size) == 96


def test_stale_chunks_go_and_foreign_folders_are_refused(tmp_path):
    ds = tmp_path / "ds"
    make_dataset(ds)
    rep = tmp_path / "rep"
    write_dataset_report(ds, rep, chunk_size=10)
    assert len(list((rep / "data").glob("chunk-*.js"))) == 8
    write_dataset_report(ds, rep, chunk_size=50)
    assert len(list((rep / "data").glob("chunk-*.js"))) == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ReportError, match="not empty"):
        write_dataset_report(ds, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cir.cli", *args], capture_output=True, text=True)


def test_cli_browse_on_a_pipeline_dataset_and_bad_input(tmp_path):
    from datagen.pipeline import generate
    from datagen.recipe import load_gen_recipe

    ds = tmp_path / "low"
    generate(load_gen_recipe("shapes-low", SMALL), ds, 60, workers=1, progress=False, log=lambda s: None)
    r = _cli("browse", str(ds), "--out", str(tmp_path / "rep"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["rows"] >= 60 and res["kept"] == 60 and res["thumbs_written"] > 0
    r = _cli("browse", str(ds), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0 and "0 written" in r.stdout and "file://" in r.stdout
    not_ds = tmp_path / "empty"
    not_ds.mkdir()
    r = _cli("browse", str(not_ds), "--out", str(tmp_path / "rep2"))
    assert r.returncode != 0 and "no run.json" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "rep2").exists()


# ---------------------------------------------------------------- retrieval report

TARGET_RANK = [1, 3, None, 1, 5, None]  # where each query's target lands in its top 5


def _queries(tmp_path: Path) -> list[RetrievalQuery]:
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for g in range(12):
        (gallery / f"g{g}.png").write_bytes(_img(500 + g, 64, "PNG"))
    qs = []
    for q, rank in enumerate(TARGET_RANK):
        target = f"g{q}"
        ranking = [f"g{g}" for g in range(6, 11)]
        if rank is not None:
            ranking[rank - 1] = target
        qs.append(RetrievalQuery(
            query_id=f"q{q}", reference_image=_img(900 + q) if q % 2 else gallery / f"g{q + 6}.png",
            text=EVIL if q == 0 else f"make the circle {q} blue", target_ids=[target],
            results=[RetrievalResult(g, gallery / f"{g}.png", 1.0 - 0.1 * k) for k, g in enumerate(ranking)],
            group="dress" if q < 3 else "shirt"))
    return qs


def test_retrieval_report_marks_hits_and_computes_recall(tmp_path):
    qs = _queries(tmp_path)
    # an explicit is_hit wins over target_ids; a missing image file becomes a placeholder
    qs[2].results.append(RetrievalResult("g2-dup", tmp_path / "nope.png", 0.1, is_hit=True))
    res = write_retrieval_report(tmp_path / "rep", qs, title="shapes CIRR", metrics={"R@1": 0.5})
    assert res.rows == 6 and res.images_unreadable == 1 and (res.kept, res.rejected) == (5, 1)
    idx = load_js(tmp_path / "rep" / "data" / "index.js", "CIRGEN_INDEX = ")
    firsts = [1, 3, 6, 1, 5, None]
    assert {n["key"]: n["values"] for n in idx["numbers"]}["first_hit"] == firsts
    assert idx["charts"][0]["bars"] == [["R@1", round(2 / 6, 4)], ["R@5", round(4 / 6, 4)], ["R@6", round(5 / 6, 4)]]
    assert idx["charts"][1]["bars"] == [["R@1", 0.5]]
    assert {f["key"] for f in idx["facets"]} == {"group", "hit@1", "hit@5", "hit@6"}
    # the same gallery image in many rankings is one thumbnail
    # gallery g6-g10 + the 4 placed targets + 3 references given as bytes (the others are g6/g8/g10)
    assert (res.thumbs_written, res.thumbs_reused) == (5 + 4 + 3, 6 + 6 * 5 - 12)
    with pytest.raises(ReportError, match="no queries"):
        write_retrieval_report(tmp_path / "rep3", [])


# ---------------------------------------------------------------- in a real browser

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium. Missing browser = FAIL (CI installs it), never a skip."""
    from headless import BrowserMissing, start_chromium

    try:
        drv = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    except BrowserMissing as e:
        missing = str(e)
    else:
        missing = ""
    if missing:
        pytest.fail(f"cannot run the browser tests: {missing}", pytrace=False)
    yield drv
    drv.quit()


def _open(drv, report: Path) -> int:
    from headless import wait_rendered

    drv.get(report.resolve().as_uri() + "/index.html")
    return wait_rendered(drv)


def _cards(drv) -> list[dict]:
    return drv.execute_script("""return [...document.querySelectorAll('#cards .card')].map(c => ({
        row: +c.dataset.row, status: c.dataset.status, failure: c.dataset.failure,
        hits: c.querySelectorAll('.thumb.hit').length, text: c.innerText}))""")


def _click(drv, facet: str, value: str, token: int) -> int:
    from headless import wait_rendered

    drv.find_element("css selector", f'.facet[data-facet="{facet}"] .chip[data-value="{value}"]').click()
    return wait_rendered(drv, token)


def test_browser_filters_sort_page_and_escape(tmp_path, browser):
    from selenium.webdriver.support.ui import Select

    from headless import wait_rendered

    ds = tmp_path / "ds"
    facts = make_dataset(ds)
    write_dataset_report(ds, tmp_path / "rep", chunk_size=10)
    drv = browser
    t = _open(drv, tmp_path / "rep")
    cards = _cards(drv)
    assert len(cards) == 48 and [c["row"] for c in cards] == list(range(48))
    # lazy loading: only the chunks of the first page (rows 0-47 -> chunks 0-4) were loaded
    assert drv.execute_script("return document.querySelectorAll('script[src^=\"data/chunk-\"]').length") == 5
    # the injected markup is visible as text and nothing from it ran or became an element
    assert drv.execute_script("return window.__pwned === undefined")
    injected = "#cards img[src='x'], #cards script, #cards b"
    assert drv.execute_script(f'return document.querySelectorAll("{injected}").length') == 0
    first = drv.find_element("css selector", '#cards .card[data-row="0"]')
    assert first.find_element("css selector", ".src").text == EVIL.strip()
    assert "make it <b>blue</b>" in first.text
    assert drv.execute_script("return document.querySelectorAll('#charts svg').length") >= 5

    t = _click(drv, "status", "rejected", t)
    cards = _cards(drv)
    assert len(cards) == facts["rejected"] and all(c["status"] == "rejected" for c in cards)
    assert all("rejected: " in c["text"] for c in cards)
    chips = drv.execute_script("""const o = {}; document.querySelectorAll('.chip').forEach(c =>
        o[c.dataset.facet + '=' + c.dataset.value] = +c.querySelector('.n').textContent); return o""")
    # a chip counts the rows the other facets let through: status chips keep their totals
    assert (chips["status=kept"], chips["status=rejected"]) == (facts["kept"], facts["rejected"])
    assert sum(v for k, v in chips.items() if k.startswith("failure=")) == facts["rejected"]
    t = _click(drv, "status", "rejected", t)  # toggle off
    t = _click(drv, "failure", "wrong_object", t)
    cards = _cards(drv)
    assert len(cards) == facts["by_failure"]["wrong_object"] and {c["failure"] for c in cards} == {"wrong_object"}
    assert "failure: wrong_object" in cards[0]["text"]
    t = _click(drv, "failure", "wrong_object", t)

    Select(drv.find_element("id", "sort")).select_by_value("score_clip_img")
    t = wait_rendered(drv, t)
    vals = drv.execute_script("""return [...document.querySelectorAll('#cards .card')].map(
        c => parseFloat(c.querySelector('.scores td.num').textContent))""")
    assert vals[0] == pytest.approx(facts["max_clip_img"], abs=1e-3) and vals == sorted(vals, reverse=True)

    Select(drv.find_element("id", "sort")).select_by_value("")
    t = wait_rendered(drv, t)
    drv.find_element("css selector", "#pager-top .next").click()
    t = wait_rendered(drv, t)
    assert [c["row"] for c in _cards(drv)] == list(range(48, 75))
    assert drv.execute_script("return document.querySelectorAll('script[src^=\"data/chunk-\"]').length") == 8
    errors = [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_browser_retrieval_report_marks_hits(tmp_path, browser):
    qs = _queries(tmp_path)
    write_retrieval_report(tmp_path / "rep", qs, title="shapes CIRR")
    drv = browser
    t = _open(drv, tmp_path / "rep")
    assert drv.title == "shapes CIRR"
    cards = _cards(drv)
    assert [c["hits"] for c in cards] == [sum(q.hits()) for q in qs]
    assert drv.execute_script("return window.__pwned === undefined")
    assert drv.find_element("css selector", '#cards .card[data-row="0"] .mod').text == EVIL.strip()
    t = _click(drv, "hit@1", "no", t)
    cards = _cards(drv)
    assert [c["row"] for c in cards] == [i for i, q in enumerate(qs) if not q.hits()[0]]
    assert all(c["hits"] == 0 or "first hit at rank" in c["text"] for c in cards)
    errors = [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
