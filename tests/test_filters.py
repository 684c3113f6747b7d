"""CLIP scorer (random-init shapes-CLIP), CLIP filter logic (fake scorer) and threshold calibration."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from datagen.calibrate import calibrate, criterion_scores, filter_report
from datagen.candidate import Candidate
from datagen.clip_scores import ClipScorer, shared_scorer
from datagen.base.config import ConfigError
from datagen.filters import ClipFilter, build_filters, load_scorer
from datagen.unit import Stages
from datagen.recipe import load_gen_recipe
from datagen.world.render import RenderConfig, encode, render
from datagen.world.scene import sample_scene

CAPS = ["a red circle", "two blue squares on a black background", "a small green star", "a large cross"]


@pytest.fixture(scope="module")
def scorer():
    # batch_size 3 < inputs: exercises the chunking.
    return ClipScorer.load("shapes-clip", device="cpu", batch_size=3, random_init=True)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    cfg = RenderConfig(resolution=48)
    return [encode(render(sample_scene(rng, 1, 4), i, cfg), "jpeg") for i in range(8)]


def _manual_features(scorer, imgs, texts):
    m, clip = scorer.model, scorer.clip
    with torch.no_grad():
        x = torch.stack([clip.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in imgs])
        fi = m.encode_image(x).float()
        ft = m.encode_text(clip.tokenizer(texts)).float()
    return fi / fi.norm(dim=-1, keepdim=True), ft / ft.norm(dim=-1, keepdim=True)


def test_scores_are_float32_raw_cosines_of_the_right_shape(scorer, images):
    a, b = images[:4], images[4:]
    for s in (scorer.image_image(a, b), scorer.image_text(a, CAPS), scorer.text_text(CAPS, CAPS[::-1]),
              scorer.directional(a, b, CAPS, CAPS[::-1])):
        assert s.dtype == np.float32 and s.shape == (4,)
        assert np.all(np.isfinite(s)) and np.all(np.abs(s) <= 1.0 + 1e-5)
    np.testing.assert_allclose(scorer.image_image(a, a), 1.0, atol=1e-5)
    np.testing.assert_allclose(scorer.text_text(CAPS, CAPS), 1.0, atol=1e-5)
    # bytes, PIL and arrays are the same image
    pil = [Image.open(io.BytesIO(x)) for x in a]
    arr = [np.asarray(p.convert("RGB")) for p in pil]
    np.testing.assert_allclose(scorer.image_image(a, pil), 1.0, atol=1e-5)
    np.testing.assert_allclose(scorer.image_image(arr, a), 1.0, atol=1e-5)
    assert scorer.model_id == "shapes-clip@random" and scorer.device == "cpu"


def test_image_text_matches_a_manual_computation(scorer, images):
    fi, ft = _manual_features(scorer, images[:4], CAPS)
    np.testing.assert_allclose(scorer.image_text(images[:4], CAPS), (fi * ft).sum(-1).numpy(), atol=1e-5)


def test_directional_is_ip2p_formula_normalised_before_differences(scorer, images):
    ref, tgt = images[:4], images[4:]
    src, dst = CAPS, ["a blue circle", "two red squares", "a large green star", "a small cross"]
    fi0, ft0 = _manual_features(scorer, ref, src)
    fi1, ft1 = _manual_features(scorer, tgt, dst)
    di, dt = fi1 - fi0, ft1 - ft0
    want = ((di * dt).sum(-1) / (di.norm(dim=-1) * dt.norm(dim=-1))).numpy()
    got = scorer.directional(ref, tgt, src, dst)
    # The scorer runs fixed-size calls (padded to 32 rows), the manual path a batch of 4: the last
    # bits differ, and differences of near-collinear random-init features amplify them.
    np.testing.assert_allclose(got, want, atol=1e-4)
    # Not the same thing as differences of unnormalised features (the normalisation matters).
    with torch.no_grad():
        raw = [scorer.model.encode_image(torch.stack([scorer.clip.preprocess(Image.open(io.BytesIO(b)))
                                                      for b in xs])) for xs in (ref, tgt)]
    assert raw[0].norm(dim=-1).sub(1).abs().max() > 1e-3
    # Best-of-k form: one caption pair for k samples (strings broadcast).
    k = scorer.directional(ref, tgt, src[0], dst[0])
    np.testing.assert_allclose(k, scorer.directional(ref, tgt, [src[0]] * 4, [dst[0]] * 4), atol=1e-6)
    # No change in the image or the text -> 0, never NaN.
    z = scorer.directional(ref, ref, src, dst)
    np.testing.assert_allclose(z, 0.0, atol=1e-6)
    assert np.all(np.isfinite(scorer.directional(ref, tgt, src, src)))


def test_pair_scores_agree_with_the_single_methods(scorer, images):
    ref, tgt = images[:4], images[4:]
    dst = CAPS[::-1]
    s = scorer.pair_scores(ref, tgt, CAPS, dst, instructions=["make it blue"] * 4)
    np.testing.assert_allclose(s["img_img"], scorer.image_image(ref, tgt), atol=1e-5)
    np.testing.assert_allclose(s["img_cap_ref"], scorer.image_text(ref, CAPS), atol=1e-5)
    np.testing.assert_allclose(s["img_cap_tgt"], scorer.image_text(tgt, dst), atol=1e-5)
    np.testing.assert_allclose(s["dir"], scorer.directional(ref, tgt, CAPS, dst), atol=1e-5)
    np.testing.assert_allclose(s["instr_tgt"], scorer.image_text(tgt, "make it blue"), atol=1e-5)
    with pytest.raises(ValueError, match="differ in length"):
        scorer.image_image(ref, tgt[:2])


def test_random_init_is_seeded_and_shared_scorer_is_built_once_per_process():
    a = shared_scorer("shapes-clip", device="cpu", random_init=True)
    assert shared_scorer("shapes-clip", device="cpu", random_init=True) is a
    b = ClipScorer.load("shapes-clip", device="cpu", random_init=True)
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(v, w), k


def test_missing_clip_weights_give_one_clear_config_error(tmp_path):
    r = load_gen_recipe("shapes-low-filtered", [f"filters.clip.pretrained={tmp_path / 'none.safetensors'}"])
    with pytest.raises(ConfigError, match="filters.clip: cannot load CLIP 'shapes-clip'"):
        load_scorer(r.filters.clip)


def test_missing_shipped_weights_say_how_to_train_them(tmp_path, monkeypatch):
    import datagen.base.assets as assets

    monkeypatch.setattr(assets, "assets_root", lambda: tmp_path)      # a checkout without the weights
    r = load_gen_recipe("shapes-low-filtered")
    with pytest.raises(ConfigError, match="shapes-CLIP weights not found at .*cirgen pretrain-clip"):
        load_scorer(r.filters.clip)


# ----------------------------------------------------------------------------- filter logic

class FakeScorer:
    """Returns preset scores per candidate (keyed by its source caption)."""
    model_id, device = "fake@0", "cpu"

    def __init__(self, table: dict[str, dict[str, float]]):
        self.table, self.calls = table, 0

    def pair_scores(self, refs, tgts, srcs, dsts, instructions=None):
        self.calls += 1
        keys = ["img_img", "img_cap_ref", "img_cap_tgt", "dir"] + (["instr_tgt"] if instructions else [])
        return {k: np.array([self.table[s].get(k, 0.9) for s in srcs], np.float32) for k in keys}


def _cands(names):
    out = []
    for j, n in enumerate(names):
        c = Candidate(0, j, j, source_caption=n, target_caption=n + " edited", modification_text="edit it")
        c.reference_image = c.target_image = b"x"
        out.append(c)
    return out


def _recipe(*extra):
    return load_gen_recipe("shapes-low-filtered", ["filters.clip.thresholds.img_img=0.7",
                                                   "filters.clip.thresholds.img_cap=0.2",
                                                   "filters.clip.thresholds.dir=0.2", *extra])


def test_clip_filter_passes_and_rejects_by_the_first_failed_criterion_and_stores_everything():
    table = {
        "good": {"img_img": 0.9, "img_cap_ref": 0.3, "img_cap_tgt": 0.3, "dir": 0.5},
        "edge": {"img_img": 0.7, "img_cap_ref": 0.2, "img_cap_tgt": 0.2, "dir": 0.2},   # >= passes
        "far": {"img_img": 0.5, "img_cap_ref": 0.3, "img_cap_tgt": 0.3, "dir": 0.5},
        "badtgt": {"img_img": 0.9, "img_cap_ref": 0.3, "img_cap_tgt": 0.1, "dir": 0.5},
        "baddir": {"img_img": 0.9, "img_cap_ref": 0.3, "img_cap_tgt": 0.3, "dir": 0.1},
        "allbad": {"img_img": 0.1, "img_cap_ref": 0.0, "img_cap_tgt": 0.0, "dir": -0.3},
        "nan": {"img_img": float("nan"), "img_cap_ref": 0.3, "img_cap_tgt": 0.3, "dir": 0.5},
    }
    f = ClipFilter(_recipe(), FakeScorer(table))
    assert f.score_columns == ["score_clip_img_img", "score_clip_img_cap_ref", "score_clip_img_cap_tgt",
                               "score_clip_dir", "score_clip_instr_tgt"]
    assert f.pass_columns == ["pass_clip_img_img", "pass_clip_img_cap", "pass_clip_dir"]
    batch = _cands(list(table))
    batch[-1].reject("text_noop")          # an earlier filter's reject: still scored, reason kept
    f(batch)
    got = {c.source_caption: c for c in batch}
    assert [got[n].reject_reason for n in table] == [None, None, "clip_img_img", "clip_img_cap", "clip_dir",
                                                     "clip_img_img", "text_noop"]
    allbad = got["allbad"]
    assert allbad.passes == {"pass_clip_img_img": False, "pass_clip_img_cap": False, "pass_clip_dir": False}
    assert allbad.scores["score_clip_dir"] == pytest.approx(-0.3)
    assert got["badtgt"].passes == {"pass_clip_img_img": True, "pass_clip_img_cap": False, "pass_clip_dir": True}
    assert got["nan"].passes["pass_clip_img_img"] is False
    for c in batch:
        assert set(c.scores) == set(f.score_columns) and set(c.passes) == set(f.pass_columns)
        assert c.generator["filters"]["clip"] == {"model": "fake@0", "device": "cpu"}


def test_null_thresholds_score_only_and_tiers_pick_thresholds():
    r = _recipe("filters.clip.thresholds.dir=null", "filters.clip.score_instruction=false")
    f = ClipFilter(r, FakeScorer({"a": {"dir": -1.0}}))
    assert "score_clip_dir" in f.score_columns and "pass_clip_dir" not in f.pass_columns
    assert "score_clip_instr_tgt" not in f.score_columns
    batch = _cands(["a"])
    f(batch)
    assert batch[0].kept and batch[0].scores["score_clip_dir"] == -1.0
    # quality.tier = low picks the `low` entry; an instruction threshold adds its criterion.
    r = _recipe("filters.clip.tiers={low: {img_img: 0.95, img_cap: null, dir: null, instr_tgt: 0.5}}")
    f = ClipFilter(r, FakeScorer({"a": {"img_img": 0.96, "instr_tgt": 0.4}, "b": {"img_img": 0.9}}))
    assert f.pass_columns == ["pass_clip_img_img", "pass_clip_instr_tgt"]
    batch = _cands(["a", "b"])
    f(batch)
    assert [c.reject_reason for c in batch] == ["clip_instr_tgt", "clip_img_img"]
    r = _recipe("quality.tier=other", "filters.clip.tiers={low: {img_img: 0.95}}")
    assert ClipFilter(r, FakeScorer({})).thresholds.img_img == 0.7


def test_build_filters_order_and_schema_columns(tmp_path):
    r = _recipe("filters.dedupe.enabled=true", "filters.contamination.enabled=true",
                f"filters.contamination.galleries=[{tmp_path}]")
    fs = build_filters(r, scorer=FakeScorer({}))
    assert [f.name for f in fs] == ["text", "clip", "contamination", "dedupe"]
    st = Stages.__new__(Stages)
    st.filters = fs
    names = st.schema.names
    for col in ("score_clip_img_img", "score_clip_dir", "pass_clip_img_cap", "score_contamination_phash",
                "pass_contamination", "score_dedupe_phash", "pass_dedupe", "pass_text"):
        assert col in names
    assert [f.name for f in build_filters(load_gen_recipe("shapes-high"))] == ["text"]
    with pytest.raises(ConfigError, match="galleries"):
        load_gen_recipe("shapes-high", ["filters.contamination.enabled=true"])
    with pytest.raises(ConfigError, match="not a cosine"):
        load_gen_recipe("shapes-high", ["filters.clip.thresholds.dir=2"])


# ----------------------------------------------------------------------------- calibration

def test_filter_report_precision_recall_on_a_hand_made_example():
    # 6 clean, 4 failures. Threshold img_img >= 0.5, dir >= 0.1.
    scores = {"img_img": np.array([.9, .8, .7, .6, .4, .9, .3, .9, .2, .8]),
              "dir": np.array([.5, .5, .5, .5, .5, .05, .5, .0, .5, .5])}
    failures = [None] * 6 + ["noop_target", "noop_target", "resampled", "mismatch"]
    rep = filter_report(scores, failures, {"img_img": 0.5, "dir": 0.1})
    # rejected: idx 4 (clean, img), 5 (clean, dir), 6 (fail, img), 7 (fail, dir), 8 (fail, img)
    assert rep["kept"] == 5 and rep["clean"] == 6 and rep["failures"] == 4
    assert rep["precision"] == pytest.approx(3 / 5, abs=1e-4)
    assert rep["recall"] == pytest.approx(3 / 4, abs=1e-4)
    assert rep["clean_kept"] == pytest.approx(4 / 6, abs=1e-4)
    assert rep["kept_failure_rate"] == pytest.approx(1 / 5, abs=1e-4)
    assert rep["removed_by_failure"] == {"mismatch": 0.0, "noop_target": 1.0, "resampled": 1.0}
    assert rep["per_criterion"]["img_img"] == {"threshold": 0.5, "rejected": 3, "precision": 0.6667,
                                               "recall": 0.5, "clean_rejected": 0.1667}
    assert rep["per_criterion"]["dir"]["rejected"] == 2 and rep["per_criterion"]["dir"]["precision"] == 0.5


def test_calibrate_keeps_the_target_share_of_clean_and_removes_the_most_failures():
    rng = np.random.default_rng(0)
    n_clean, n_fail = 400, 200
    # Failures score low on img_img (half) or on dir (other half); clean ones score high on both.
    img = np.concatenate([rng.normal(0.9, 0.03, n_clean), rng.normal(0.6, 0.05, 100), rng.normal(0.9, 0.03, 100)])
    dirs = np.concatenate([rng.normal(0.3, 0.05, n_clean), rng.normal(0.3, 0.05, 100), rng.normal(0.0, 0.05, 100)])
    failures = [None] * n_clean + ["resampled"] * 100 + ["noop_target"] * 100
    res = calibrate({"img_img": img, "dir": dirs}, failures, target_clean_keep=0.9)
    rep = res["report"]
    assert rep["clean_kept"] >= 0.9 and rep["recall"] > 0.95
    assert set(res["thresholds"]) == {"img_img", "dir"} and None not in res["thresholds"].values()
    # Nothing to separate on -> the only way to keep 100% clean is to reject no clean triplet.
    strict = calibrate({"img_img": img}, failures, target_clean_keep=1.0)
    assert strict["report"]["clean_kept"] == 1.0
    assert strict["report"]["removed_by_failure"]["noop_target"] == 0.0


def test_criterion_scores_take_the_min_of_both_image_caption_scores():
    cols = {"score_clip_img_cap_ref": [0.3, 0.1, None], "score_clip_img_cap_tgt": [0.2, 0.4, 0.5],
            "score_clip_dir": [0.1, 0.2, 0.3]}
    s = criterion_scores(cols)
    np.testing.assert_allclose(s["img_cap"][:2], [0.2, 0.1])
    assert np.isnan(s["img_cap"][2]) and "img_img" not in s


def test_scores_do_not_depend_on_the_torch_thread_count(scorer, images, monkeypatch):
    """A single-process run keeps torch's default thread count, pool workers run on one thread:
    the stored scores must be the same bits in both (case 21). The count is restored after."""
    def scores(threads):
        torch.set_num_threads(threads)
        s = scorer.pair_scores(images[:4], images[4:], CAPS, CAPS[::-1], CAPS[1:] + CAPS[:1])
        assert torch.get_num_threads() == threads
        return s

    # Whether 1 and 4 threads give other bits depends on the CPU's kernels, so also check the
    # mechanism: the model always runs on RECORD_THREADS threads, whatever the process has.
    from datagen.base.threads import RECORD_THREADS

    seen = []
    for name in ("encode_image", "encode_text"):
        real = getattr(scorer.model, name)
        monkeypatch.setattr(scorer.model, name,
                            lambda x, _real=real: (seen.append(torch.get_num_threads()), _real(x))[1])
    before = torch.get_num_threads()
    try:
        one, four = scores(1), scores(4)
    finally:
        torch.set_num_threads(before)
    for k in one:
        assert one[k].tobytes() == four[k].tobytes(), k
    assert seen and set(seen) == {RECORD_THREADS}
