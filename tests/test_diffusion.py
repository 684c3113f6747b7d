"""diffusers image backends with tiny random models built from configs (CPU, offline, no hub)."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from datagen.candidate import Candidate, candidate_seed  # noqa: E402
from datagen.base.config import ConfigError  # noqa: E402
from datagen.diffusion import tiny  # noqa: E402
from datagen.diffusion.attention import ShareState, SharedSelfAttnProcessor, shared_self_attention  # noqa: E402
from datagen.diffusion.generate import (check_image, edit_images, generate_pairs, generators,  # noqa: E402
                                        text_to_image)
from datagen.images import build_images  # noqa: E402
from datagen.recipe import load_gen_recipe  # noqa: E402

R = 32          # pixels
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: one intra-op thread is ~30x faster than two on a shared, busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny.write_clip_tokenizer_files(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="module")
def sd(tok_dir):
    return tiny.build_sd_pipeline(tok_dir)


@pytest.fixture(scope="module")
def sdxl(tok_dir):
    return tiny.build_sdxl_pipeline(tok_dir)


@pytest.fixture(scope="module")
def ip2p(tok_dir):
    return tiny.build_ip2p_pipeline(tok_dir)


def recipe(backend="diffusers-paired", fmt="png", **diffusion):
    sets = [f"images.backend={backend}", f"images.resolution={R}", f"images.format={fmt}",
            f"images.diffusion.steps={STEPS}", f"images.diffusion.edit_steps={STEPS}"]
    sets += [f"images.diffusion.{k}={v}" for k, v in diffusion.items()]
    return load_gen_recipe("shapes-high", sets)


CAPTIONS = [("a red cube on the left", "a blue cube on the left", "make the cube blue"),
            ("two green circles", "two green circles and a star", "add a star"),
            ("a yellow triangle", "a small yellow triangle", "make the triangle smaller")]


def candidates(n=2, seed=0):
    return [Candidate(0, j, candidate_seed(seed, 0, j), source_caption=CAPTIONS[j % 3][0],
                      target_caption=CAPTIONS[j % 3][1], modification_text=CAPTIONS[j % 3][2]) for j in range(n)]


def plain(pipe, prompts, seeds, guidance):
    return pipe(prompt=list(prompts), num_inference_steps=STEPS, guidance_scale=guidance, height=R, width=R,
                generator=generators(seeds), output_type="np").images


class FakeScorer:
    """Stand-in for the CLIP scorer: 'directional' = mean absolute ref/target pixel difference."""

    def __init__(self):
        self.calls = []

    def directional(self, ref_images, tgt_images, src_captions, tgt_captions):
        assert len(ref_images) == len(tgt_images) == len(src_captions) == len(tgt_captions)
        assert all(isinstance(im, Image.Image) for im in ref_images + tgt_images)
        self.calls.append(len(ref_images))
        return np.array([np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
                         for a, b in zip(ref_images, tgt_images)])


# -- the shared self-attention processor ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["attention", "kv"])
def test_processor_shares_exactly_what_it_documents(mode):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8)
    x = torch.randn(4, 16, 32)                    # two pairs: (0, 1) shares, (2, 3) does not
    state = ShareState([1.0, 0.0], mode)
    with torch.no_grad():
        got = SharedSelfAttnProcessor(state, AttnProcessor2_0())(attn, x)
        plain_out = AttnProcessor2_0()(attn, x)
        q, k, v = (f(x).view(4, 16, 4, 8).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        if mode == "attention":     # image 1: image 0's probabilities, its own values
            probs = torch.softmax(q[0] @ k[0].transpose(-1, -2) / 8 ** 0.5, -1)
            o1 = probs @ v[1]
        else:                       # image 1: its own queries, image 0's keys and values
            o1 = torch.softmax(q[1] @ k[0].transpose(-1, -2) / 8 ** 0.5, -1) @ v[0]
        want1 = attn.to_out[0](o1.transpose(0, 1).reshape(16, 32))
    assert torch.allclose(got[1], want1, atol=1e-5)
    assert torch.allclose(got[0], plain_out[0], atol=1e-6)         # image 0 untouched
    assert torch.allclose(got[2:], plain_out[2:], atol=1e-6)       # inactive pair untouched
    assert not torch.allclose(got[1], plain_out[1], atol=1e-3)


def test_share_schedule_and_cfg_layout():
    s = ShareState([0.0, 0.5, 1.0])
    assert s.shared_steps(10) == [0, 5, 10]
    s.set_step(4, 10)
    assert s.active.tolist() == [False, True, True]
    s.set_step(5, 10)
    assert s.active.tolist() == [False, False, True]
    # CFG batch [uncond pairs, cond pairs]: the same pairs share in both branches
    assert s.gather_index(12, "cpu").tolist() == [0, 1, 2, 3, 4, 4, 6, 7, 8, 9, 10, 10]
    with pytest.raises(RuntimeError):
        s.gather_index(10, "cpu")
    s.set_step(10, 10)
    assert s.gather_index(12, "cpu") is None      # nothing active: layers run their own processor


def test_processor_is_installed_on_self_attention_only_and_restored(sd):
    before = dict(sd.unet.attn_processors)
    with shared_self_attention(sd.unet, ShareState([1.0])) as n:
        procs = sd.unet.attn_processors
        mine = [k for k, p in procs.items() if isinstance(p, SharedSelfAttnProcessor)]
        assert n == len(mine) > 0 and all(k.endswith("attn1.processor") for k in mine)
        assert all(procs[k] is before[k] for k in procs if k not in mine)
    assert all(sd.unet.attn_processors[k] is before[k] for k in before)


# -- paired generation on SD-class and SDXL-class pipelines ---------------------------------------

@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_p1_identical_prompts_give_identical_images(which, request):
    pipe = request.getfixturevalue(which)
    src, tgt, _, shared = generate_pairs(pipe, ["a red cube"] * 2, ["a red cube"] * 2, [3, 4], [1.0, 1.0],
                                         [7.5, 7.5], STEPS, R, R)
    assert src.shape == (2, R, R, 3) and src.dtype == np.float32 and shared == [STEPS, STEPS]
    # Identical 8-bit images. In float, SD is bitwise equal; the tiny SDXL UNet on CPU is not
    # batch-row invariant even without sharing (~2e-6 between identical rows at p = 0).
    assert np.array_equal((src * 255).round(), (tgt * 255).round())
    assert np.array_equal(src, tgt) if which == "sd" else np.allclose(src, tgt, atol=1e-5)
    assert not np.array_equal(src[0], src[1])           # different seeds, different images


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_p0_is_the_plain_pipeline_and_p1_shares(which, request):
    pipe = request.getfixturevalue(which)
    srcs, tgts, seeds = ["a red cube", "two green circles"], ["a blue cube", "two green stars"], [11, 12]
    s0, t0, _, shared0 = generate_pairs(pipe, srcs, tgts, seeds, [0.0, 0.0], [9.0, 9.0], STEPS, R, R)
    assert shared0 == [0, 0]
    # p = 0: exactly the plain pipeline on the same batch (same prompts, same per-image generators)
    ref = plain(pipe, [srcs[0], tgts[0], srcs[1], tgts[1]], [11, 11, 12, 12], 9.0)
    assert np.array_equal(s0, ref[0::2]) and np.array_equal(t0, ref[1::2])
    # ... and, up to batch-size numerics, a plain call per prompt from the same latents
    for i in range(2):
        assert np.allclose(plain(pipe, [srcs[i]], [seeds[i]], 9.0)[0], s0[i], atol=1e-4)
        assert np.allclose(plain(pipe, [tgts[i]], [seeds[i]], 9.0)[0], t0[i], atol=1e-4)
    # p = 1: the source images do not change, the targets do
    s1, t1, _, _ = generate_pairs(pipe, srcs, tgts, seeds, [1.0, 1.0], [9.0, 9.0], STEPS, R, R)
    assert np.allclose(s1, s0, atol=1e-5)
    assert not np.allclose(t1, t0, atol=1e-4)
    # p = 1 in kv mode shares too, differently
    _, tkv, _, _ = generate_pairs(pipe, srcs, tgts, seeds, [1.0, 1.0], [9.0, 9.0], STEPS, R, R, mode="kv")
    assert not np.allclose(tkv, t0, atol=1e-4) and not np.allclose(tkv, t1, atol=1e-4)


def test_per_pair_share_fraction_in_one_batch(sd):
    srcs, tgts, seeds = ["a red cube", "a red cube"], ["a blue cube", "a blue cube"], [5, 5]
    s, t, _, shared = generate_pairs(sd, srcs, tgts, seeds, [0.0, 1.0], [8.0, 8.0], STEPS, R, R)
    assert shared == [0, STEPS]
    _, t0, _, _ = generate_pairs(sd, srcs[:1], tgts[:1], seeds[:1], [0.0], [8.0], STEPS, R, R)
    _, t1, _, _ = generate_pairs(sd, srcs[:1], tgts[:1], seeds[:1], [1.0], [8.0], STEPS, R, R)
    assert np.allclose(t[0], t0[0], atol=1e-4) and np.allclose(t[1], t1[0], atol=1e-4)
    assert not np.allclose(t[0], t[1], atol=1e-4)


def test_per_sample_guidance_matches_separate_calls(sd):
    imgs, _ = text_to_image(sd, ["a red cube", "a red cube"], [7, 7], [7.5, 14.0], STEPS, R, R)
    assert np.allclose(imgs[0], plain(sd, ["a red cube"], [7], 7.5)[0], atol=1e-4)
    assert np.allclose(imgs[1], plain(sd, ["a red cube"], [7], 14.0)[0], atol=1e-4)
    assert not np.allclose(imgs[0], imgs[1], atol=1e-4)


def test_ip2p_per_sample_text_and_image_guidance(ip2p):
    ref = Image.fromarray((np.random.default_rng(0).random((R, R, 3)) * 255).astype("uint8"))

    def one(g, h):
        return ip2p(prompt=["make it blue"], image=[ref], num_inference_steps=STEPS, guidance_scale=g,
                    image_guidance_scale=h, generator=generators([3]), output_type="np").images[0]

    got, _ = edit_images(ip2p, ["make it blue"] * 3, [ref] * 3, [3, 3, 3], [7.5, 12.0, 12.0], [1.5, 1.5, 1.2], STEPS)
    assert got.shape == (3, R, R, 3)
    for i, (g, h) in enumerate([(7.5, 1.5), (12.0, 1.5), (12.0, 1.2)]):
        assert np.allclose(got[i], one(g, h), atol=1e-4)


# -- the backends ---------------------------------------------------------------------------------

def decode(b: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(b))
    im.load()
    return im


def test_paired_backend_outputs_records_and_determinism(sd):
    r = recipe()
    backend = build_images(r, pipe=sd)
    assert backend.name == "diffusers-paired"
    a, b = candidates(3), candidates(3)
    backend(a)
    backend(b)
    for c in a:
        assert c.kept
        for raw in (c.reference_image, c.target_image):
            im = decode(raw)
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (R, R)
        g = c.generator["images"]
        assert g["backend"] == "diffusers-paired" and g["steps"] == STEPS and g["model"]
        assert g["dtype"] == "float32" and g["scheduler"] == "EulerAncestralDiscreteScheduler"
        assert 0.1 <= g["p"] <= 0.9 and 7.5 <= g["guidance"] <= 15.0 and isinstance(g["seed"], int)
        assert g["shared_steps"] == min(STEPS, int(np.ceil(g["p"] * STEPS)))
        assert len(g["samples"]) == 1 and g["samples"][0]["seed"] == g["seed"]
    # same seeds -> same bytes; other seeds -> other bytes and settings
    assert [(c.reference_image, c.target_image, c.generator) for c in a] == \
           [(c.reference_image, c.target_image, c.generator) for c in b]
    other = candidates(3, seed=1)
    backend(other)
    assert all(x.reference_image != y.reference_image and x.target_image != y.target_image
               for x, y in zip(a, other))
    assert a[0].generator["images"]["seed"] != other[0].generator["images"]["seed"]
    # a pair's images differ (different captions), and candidates differ from each other
    assert a[0].reference_image != a[0].target_image and a[0].reference_image != a[1].reference_image


def test_jpeg_output(sd):
    batch = candidates(1)
    build_images(recipe(fmt="jpeg"), pipe=sd)(batch)
    im = decode(batch[0].reference_image)
    assert im.format == "JPEG" and im.size == (R, R) and im.mode == "RGB"


def test_batching_across_candidates(sd):
    calls = []
    h = sd.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        batch = candidates(3)
        build_images(recipe(samples_per_prompt=2, pairs_per_call=4), pipe=sd, scorer=FakeScorer())(batch)
    finally:
        h.remove()
    # 3 candidates x 2 samples = 6 pairs -> calls of 4 and 2 pairs, the short one padded to 4 (its
    # shape must not depend on the batch); UNet batch = 2 CFG x 2 images x pairs
    assert calls == [16] * STEPS + [16] * STEPS
    assert all(c.kept for c in batch)


@pytest.mark.parametrize("backend", ["diffusers-paired", "diffusers-edit"])
def test_images_do_not_depend_on_the_stage_batch(sd, ip2p, backend):
    """Case 13: pipeline.batch_size decides how many candidates reach the image stage at once;
    a candidate's images must be the same bytes whether it came with 3 others or alone."""
    r = recipe(backend, pairs_per_call=4, guidance="[2.0,9.0]", edit_guidance="[3.0,9.0]",
               image_guidance="[1.2,2.0]")
    stage = build_images(r, pipe=sd, edit_pipe=ip2p) if backend == "diffusers-edit" else build_images(r, pipe=sd)
    together = candidates(4)
    stage(together)
    alone = []
    for c in candidates(4):
        stage([c])
        alone.append(c)
    for a, b in zip(together, alone):
        assert a.kept and b.kept
        assert (a.reference_image, a.target_image) == (b.reference_image, b.target_image), a.j


def test_samples_per_prompt_needs_a_scorer():
    with pytest.raises(ValueError, match="scorer"):
        build_images(recipe(samples_per_prompt=2))          # fails before any model is loaded
    with pytest.raises(ValueError, match="scorer"):
        build_images(recipe("diffusers-edit", samples_per_prompt=3))


def test_best_of_k_by_directional_score(sd):
    scorer = FakeScorer()
    batch = candidates(2)
    build_images(recipe(samples_per_prompt=3), pipe=sd, scorer=scorer)(batch)
    assert scorer.calls == [6]                               # one scorer call for the whole batch
    for c in batch:
        g = c.generator["images"]
        scores = [s["directional"] for s in g["samples"]]
        assert len(scores) == 3 and len({s["seed"] for s in g["samples"]}) == 3
        assert g["sample"] == int(np.argmax(scores)) and g["directional"] == max(scores)
        chosen = g["samples"][g["sample"]]
        assert (g["seed"], g["p"], g["guidance"]) == (chosen["seed"], chosen["p"], chosen["guidance"])
    # sample s of a candidate does not depend on k: the first draws of k=3 are those of k=1
    single = candidates(2)
    build_images(recipe(), pipe=sd)(single)
    assert single[0].generator["images"]["seed"] == batch[0].generator["images"]["samples"][0]["seed"]


def test_sdxl_backend_runs(sdxl):
    batch = candidates(2)
    build_images(recipe(guidance="[0.0, 0.0]"), pipe=sdxl)(batch)    # turbo-style: no CFG
    assert all(c.kept and decode(c.target_image).size == (R, R) for c in batch)
    assert batch[0].generator["images"]["guidance"] == 0.0


def test_edit_backend_runs(sd, ip2p):
    batch = candidates(2)
    backend = build_images(recipe("diffusers-edit"), pipe=sd, edit_pipe=ip2p)
    assert backend.name == "diffusers-edit"
    backend(batch)
    again = candidates(2)
    backend(again)
    for c, d in zip(batch, again):
        assert c.kept and decode(c.reference_image).size == (R, R) and decode(c.target_image).size == (R, R)
        assert (c.reference_image, c.target_image) == (d.reference_image, d.target_image)
        g = c.generator["images"]
        assert g["backend"] == "diffusers-edit" and g["edit_steps"] == STEPS
        assert 1.2 <= g["image_guidance"] <= 2.0 and g["edit_guidance"] == 7.5 and g["edit_seed"] != g["seed"]
    # the reference is the text-to-image output of the source caption with the recorded settings
    g = batch[0].generator["images"]
    ref = plain(sd, [batch[0].source_caption], [g["seed"]], g["guidance"])[0]
    assert np.abs(np.asarray(decode(batch[0].reference_image), float) - ref * 255).max() <= 1.0
    no_instruction = candidates(1)
    no_instruction[0].modification_text = ""
    backend(no_instruction)
    assert no_instruction[0].reject_reason == "image_error"


# -- failures are rejects, not crashes ------------------------------------------------------------

def nan_hook(pipe, poison_calls, elements):
    """Turn UNet outputs of `elements` to NaN during the first `poison_calls` pipeline calls."""
    state = {"forward": 0}

    def hook(module, args, out):
        call = state["forward"] // STEPS
        state["forward"] += 1
        if call < poison_calls:
            out[0][list(elements)] = float("nan")
        return out
    return pipe.unet.register_forward_hook(hook)


def test_check_image():
    ok = np.full((4, 4, 3), 0.5, np.float32)
    assert check_image(ok) is None
    assert check_image(np.zeros_like(ok)) == "image_nan"
    bad = ok.copy()
    bad[0, 0, 0] = np.nan
    assert check_image(bad) == "image_nan"


def test_nan_images_are_rejects(sd):
    # UNet batch [uncond c0 src, c0 tgt, c1 src, c1 tgt, cond ...]: poison candidate 0's reference
    h = nan_hook(sd, 99, [0, 4])
    try:
        batch = candidates(2)
        build_images(recipe(retries=0), pipe=sd)(batch)
    finally:
        h.remove()
    assert batch[0].reject_reason == "image_nan" and batch[1].kept
    assert batch[0].generator["images"]["samples"][0]["error"] == "image_nan"
    assert batch[0].reference_image == b""


def test_nan_images_are_retried(sd):
    h = nan_hook(sd, 1, [0, 4])          # only the first call is poisoned
    try:
        batch = candidates(2)
        build_images(recipe(retries=1), pipe=sd)(batch)
    finally:
        h.remove()
    assert all(c.kept for c in batch)
    samples = batch[0].generator["images"]["samples"]
    assert [(s["attempt"], s.get("error")) for s in samples] == [(0, "image_nan"), (1, None)]
    assert samples[0]["seed"] != samples[1]["seed"] and batch[0].generator["images"]["attempt"] == 1


def test_pipeline_errors_are_isolated(sd):
    def too_big(module, args, kwargs):          # fails whenever more than one pair is in the call
        if args[0].shape[0] > 4:
            raise RuntimeError("CUDA out of memory (simulated)")
    h = sd.unet.register_forward_pre_hook(too_big, with_kwargs=True)
    try:
        batch = candidates(3)
        build_images(recipe(retries=0), pipe=sd)(batch)
    finally:
        h.remove()
    assert all(c.kept for c in batch)                     # bisected down to one pair per call

    def always(module, args, kwargs):
        raise RuntimeError("kernel failure (simulated)")
    h = sd.unet.register_forward_pre_hook(always, with_kwargs=True)
    try:
        batch = candidates(2)
        build_images(recipe(retries=1), pipe=sd)(batch)
    finally:
        h.remove()
    assert [c.reject_reason for c in batch] == ["image_error", "image_error"]
    assert "kernel failure" in batch[0].generator["images"]["samples"][-1]["detail"]


def test_encode_failures_are_rejects(sd, monkeypatch):
    import datagen.diffusion.backend as backend_mod

    real, n = backend_mod.encode, []

    def flaky(img, fmt):
        n.append(1)
        if len(n) == 1:
            raise OSError("encoder broke")
        return real(img, fmt)
    monkeypatch.setattr(backend_mod, "encode", flaky)
    batch = candidates(2)
    build_images(recipe(), pipe=sd)(batch)
    assert batch[0].reject_reason == "image_error" and "encoder broke" in batch[0].generator["images"]["error"]
    assert batch[1].kept


# -- loading, config, imports ---------------------------------------------------------------------

def test_load_by_local_path(sd, tmp_path):
    from datagen.base.device import resolve_dtype
    from datagen.diffusion.loading import load_pipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    sd.save_pretrained(tmp_path / "tiny-sd")
    pipe = load_pipeline(str(tmp_path / "tiny-sd"), "t2i", dtype="auto", device="cpu", scheduler="ddim")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.unet.dtype == torch.float32
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    backend = build_images(recipe(model=str(tmp_path / "tiny-sd"), device="cpu"))
    assert backend.model == str(tmp_path / "tiny-sd")
    batch = candidates(1)
    backend(batch)
    assert batch[0].kept and batch[0].generator["images"]["scheduler"] == "EulerAncestralDiscreteScheduler"


def test_config_validation():
    with pytest.raises(ConfigError, match="share_fraction"):
        recipe(share_fraction="[0.5, 1.5]")
    with pytest.raises(ConfigError, match="guidance"):
        recipe(guidance="[9, 8]")
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_gen_recipe("shapes-high", ["images.backend=diffusers-paired", "images.resolution=36"])
    with pytest.raises(ConfigError, match="share"):
        recipe(share="logits")
    assert load_gen_recipe("shapes-high").images.backend == "shapes"


def test_importing_the_image_stage_stays_light():
    code = "import sys, datagen.images; print('diffusers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.slow
def test_generate_end_to_end_with_paired_backend(sd, tmp_path):
    """The pipeline runs the paired backend on shapes captions and writes the usual dataset."""
    import pyarrow.parquet as pq

    from datagen.pipeline import generate

    sd.save_pretrained(tmp_path / "tiny-sd")
    r = load_gen_recipe("shapes-high", [
        "images.backend=diffusers-paired", f"images.resolution={R}", "images.diffusion.steps=2",
        f"images.diffusion.model={tmp_path / 'tiny-sd'}", "images.diffusion.device=cpu",
        "pipeline.unit_size=3", "pipeline.batch_size=3"])
    stats = generate(r, tmp_path / "ds", 3, workers=1, progress=False, log=lambda s: None)
    assert stats["kept"] == 3
    rows = pq.read_table(next((tmp_path / "ds" / "shards").glob("*.parquet"))).to_pylist()
    g = json.loads(rows[0]["generator"])["images"]
    assert g["backend"] == "diffusers-paired" and g["steps"] == 2 and "p" in g
