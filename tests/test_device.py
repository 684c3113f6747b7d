"""One device setting reaches every model and tensor of each command that computes.

The meta device stands in for "not the CPU" on a machine without a GPU: a module built or fed on
the wrong device either fails (a CPU tensor into a meta Linear) or is caught by the forward
pre-hooks that record the device of every tensor handed to every submodule. Features are cached
on the CPU by a first CPU run (the cache key does not depend on the device outside CUDA), so the
meta run reads them and only the model side runs on meta. A GPU the machine lacks is one line,
`error: ...`, for every command.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cir.model
import cir.stage1
import cir.stage2
from cir.cli import main
from cir.model import CIRModel
from conftest import SMALL

META = torch.device("meta")
# Loading trained weights into a meta model copies nothing, and torch says so; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")


# ----------------------------------------------------------------------------- helpers

def _devices(x) -> set[str]:
    if isinstance(x, torch.Tensor):
        return {x.device.type}
    if isinstance(x, (list, tuple)):
        return set().union(*map(_devices, x)) if x else set()
    if isinstance(x, dict):
        return _devices(list(x.values()))
    return set()


class Watch:
    """Records the device of every tensor handed to any submodule of the models it watches, and
    of the tensors handed to the loss functions it wraps."""

    def __init__(self):
        self.module_inputs: set[str] = set()
        self.loss_inputs: set[str] = set()
        self.calls = 0

    def model(self, model: torch.nn.Module) -> None:
        def hook(_m, args, kwargs):
            self.calls += 1
            self.module_inputs |= _devices(args) | _devices(kwargs)
        for m in model.modules():
            m.register_forward_pre_hook(hook, with_kwargs=True)

    def losses(self, monkeypatch, module, names) -> None:
        for name in names:
            fn = getattr(module, name)

            def wrapped(*a, _fn=fn, **k):
                self.loss_inputs |= _devices(a) | _devices(k)
                out = _fn(*a, **k)
                self.loss_inputs |= _devices(out)
                return out
            monkeypatch.setattr(module, name, wrapped)


def _params_and_buffers(model: torch.nn.Module) -> set[str]:
    return {t.device.type for t in itertools.chain(model.parameters(), model.buffers())}


def _probe_fit(monkeypatch, module, watch: Watch, record: dict) -> None:
    """Replace the training loop by one loss evaluation (a meta loss has no value to log)."""
    def fit(holder, params, n_items, loss_fn, cfg, out, **kw):
        if kw.get("on_epoch_start"):
            kw["on_epoch_start"](0)
        watch.model(loss_fn.model)
        loss, metrics = loss_fn(np.arange(min(n_items, 8)))
        loss.backward()
        record.update(model=loss_fn.model, loss=loss, metrics=metrics, params=params)
        return {"stopped": True}
    monkeypatch.setattr(module, "fit", fit)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny stage-I run and stage-II run on the CPU (filling the feature cache), triplets, a
    shapes CIRR benchmark and a gallery folder."""
    from cir.stage1 import load_stage1_recipe, run_stage1
    from cir.stage2 import load_stage2_recipe, run_stage2
    from datagen.pipeline import generate
    from datagen.recipe import load_gen_recipe
    from datagen.world.benchmark import write_shapes_benchmark

    root = tmp_path_factory.mktemp("device")
    cache = root / "cache"
    s1 = ["clip.random_init=true", "data.n=64", "train.batch_size=32", "train.epochs=1", "eval.scenes=10",
          "views.reference=1", "views.target=1", f"cache_dir={cache}", "clip.device=cpu"]
    run_stage1(load_stage1_recipe("stage1-shapes", s1), root / "s1", log=lambda s: None)
    trip = root / "trip"
    generate(load_gen_recipe("shapes-low", SMALL), trip, 40, workers=1, progress=False, log=lambda s: None)
    s2 = [f"triplets.path={trip}", "triplets.max_triplets=32", "train.epochs=1", "train.batch_size=16",
          f"cache_dir={cache}", "device=cpu"]
    run_stage2(load_stage2_recipe("stage2-shapes", s2), root / "s1", root / "s2", log=lambda s: None)
    bench = root / "bench"
    write_shapes_benchmark(bench, "cirr", 12, 0, 64, ("val",))
    gallery = root / "gallery"
    gallery.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 255 - 40 * i, 90)).save(gallery / f"g{i}.png")
    return {"root": root, "cache": cache, "s1": s1, "s2": s2, "trip": trip, "bench": bench, "gallery": gallery}


# ----------------------------------------------------------------------------- stage I and II

def test_stage1_builds_and_feeds_everything_on_the_recipes_device(env, tmp_path, monkeypatch):
    from cir.stage1 import load_stage1_recipe, run_stage1

    watch, rec = Watch(), {}
    _probe_fit(monkeypatch, cir.stage1, watch, rec)
    watch.losses(monkeypatch, cir.stage1, ["contrastive", "soft_text_alignment"])
    recipe = load_stage1_recipe("stage1-shapes", env["s1"] + ["clip.device=meta"])
    res = run_stage1(recipe, tmp_path / "s1", log=lambda s: None)
    assert res["images_encoded"] == 0                     # the CPU run's features, from the cache
    model = rec["model"]
    assert model.device == META and _params_and_buffers(model) == {"meta"}
    assert watch.calls and watch.module_inputs == {"meta"}
    assert watch.loss_inputs == {"meta"} and rec["loss"].device == META
    assert {p.device.type for p in rec["params"]} == {"meta"}


@pytest.mark.parametrize("how", ["recipe", "cli"])
def test_stage2_builds_and_feeds_everything_on_the_chosen_device(env, tmp_path, monkeypatch, how):
    watch, rec = Watch(), {}
    _probe_fit(monkeypatch, cir.stage2, watch, rec)
    watch.losses(monkeypatch, cir.stage2, ["composed_contrastive", "contrastive", "soft_text_alignment"])
    if how == "recipe":
        from cir.stage2 import load_stage2_recipe, run_stage2

        res = run_stage2(load_stage2_recipe("stage2-shapes", env["s2"] + ["device=meta"]), env["root"] / "s1",
                         tmp_path / "s2", log=lambda s: None)
        assert res["images_encoded"] == 0
    else:
        r = CliRunner().invoke(main, ["stage2", "--triplets", str(env["trip"]), "--stage1", str(env["root"] / "s1"),
                                      "--out", str(tmp_path / "s2"), "--device", "meta",
                                      *[x for s in env["s2"] if s != "device=cpu" for x in ("--set", s)]])
        assert r.exit_code == 0, r.output
    model = rec["model"]
    assert model.composer is not None and _params_and_buffers(model) == {"meta"}
    assert watch.calls and watch.module_inputs == {"meta"}
    assert watch.loss_inputs == {"meta"} and rec["loss"].device == META
    assert set(rec["metrics"]) == {"loss_composed", "loss_map", "loss_soft"}
    # The run folder's identity does not depend on where it runs: --resume may move to a GPU.
    cpu_hash = json.loads((env["root"] / "s2" / "recipe.json").read_text())["hash"]
    assert json.loads((tmp_path / "s2" / "recipe.json").read_text())["hash"] == cpu_hash


def test_stage2_mined_negatives_are_ranked_beside_the_model(env, tmp_path, monkeypatch):
    """The mined variant's query encoding and ranking follow the model: on the CPU they give the
    same negatives wherever the features were first put (a regression guard for `.to(dev)`)."""
    from cir.stage2 import _MinedNegatives, _TripletFeatures, load_stage2_recipe
    from cir.triplets import load_triplets

    r = load_stage2_recipe("stage2-shapes", env["s2"] + ["hard_negatives.kind=mined", "hard_negatives.k=3"])
    run = cir.model.load_run(env["root"] / "s1", "cpu")
    run.model.add_composer(r.compose)
    data = _TripletFeatures(r, run.model, load_triplets(r.triplets), 0)
    mined = _MinedNegatives(r, run.model, data, tmp_path, resume=False)
    mined.mine(0)
    assert mined.idx.shape == (32, 4) and mined.idx.device.type == "cpu"
    assert (tmp_path / "checkpoints" / "negatives-e0000.pt").exists()


# ----------------------------------------------------------------------------- eval and search

@pytest.fixture
def cpu_cache(env, monkeypatch):
    monkeypatch.setenv("CIRGEN_CACHE", str(env["root"] / "run-cache"))


def _watch_load_run(monkeypatch, module, watch: Watch, loaded: list):
    real = cir.model.load_run

    def load_run(path, device="auto", **kw):
        run = real(path, device, **kw)
        watch.model(run.model)
        loaded.append(run)
        return run
    monkeypatch.setattr(module, "load_run", load_run)


def _host_queries(monkeypatch):
    """Run the real query encoder, then hand zeros to the CPU side (a meta result has no values)."""
    real = CIRModel.encode_query

    def encode_query(self, *a, **k):
        out = real(self, *a, **k)
        assert out.device == self.device
        return torch.zeros(out.shape)
    monkeypatch.setattr(CIRModel, "encode_query", encode_query)


def test_eval_runs_the_model_and_the_ranking_on_the_device(env, cpu_cache, monkeypatch):
    import cir.eval.metrics as M

    args = ["eval", "--model", str(env["root"] / "s2"), "--dataset", "shapes-cirr", "--root", str(env["bench"])]
    r = CliRunner().invoke(main, args + ["--device", "cpu"])       # fills the cache on the CPU
    assert r.exit_code == 0, r.output
    watch, loaded, ranked = Watch(), [], set()
    _watch_load_run(monkeypatch, cir.model, watch, loaded)
    _host_queries(monkeypatch)

    def topk_chunked(q, g, k, exclude=None, *a):
        ranked.update(_devices([q, g, exclude]))
        return torch.zeros(q.shape[0], min(k, g.shape[0] - 1), dtype=torch.long)
    monkeypatch.setattr(M, "topk_chunked", topk_chunked)
    r = CliRunner().invoke(main, args + ["--device", "meta"])
    assert r.exit_code == 0, r.output
    (run,) = loaded
    assert _params_and_buffers(run.model) == {"meta"}
    assert watch.calls and watch.module_inputs == {"meta"}
    assert ranked == {"meta"}


def test_search_runs_the_model_on_the_device(env, cpu_cache, monkeypatch):
    import cir.search

    args = ["search", "--model", str(env["root"] / "s2"), "--gallery", str(env["gallery"]),
            "--image", str(env["gallery"] / "g0.png"), "--text", "is red", "--json"]
    r = CliRunner().invoke(main, args + ["--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output)) == 6
    watch, loaded = Watch(), []
    _watch_load_run(monkeypatch, cir.search, watch, loaded)
    _host_queries(monkeypatch)
    r = CliRunner().invoke(main, args + ["--device", "meta"])
    assert r.exit_code == 0, r.output
    (run,) = loaded
    assert _params_and_buffers(run.model) == {"meta"}
    assert watch.calls and watch.module_inputs == {"meta"}


@pytest.mark.parametrize("device,want", [("meta", "meta"), (None, "cuda" if torch.cuda.is_available() else "cpu")])
def test_eval_clip_loads_clip_on_the_device(monkeypatch, device, want):
    import datagen.base.clip_loader

    seen = []

    class Stop(Exception):
        pass

    def load_clip(name, pretrained=None, device="cpu", **kw):
        seen.append(device)
        raise Stop
    monkeypatch.setattr(datagen.base.clip_loader, "load_clip", load_clip)
    r = CliRunner().invoke(main, ["eval-clip", "--scenes", "4"] + (["--device", device] if device else []))
    assert isinstance(r.exception, Stop)
    assert seen == [torch.device(want)]


def test_baseline_eval_runs_on_the_device(env, monkeypatch):
    from cir.eval.baselines import resolve_model

    m = resolve_model("sum", weights="random", device="meta")
    assert {p.device.type for p in m.clip.model.parameters()} == {"meta"}


def test_study_passes_its_device_to_every_step_and_keys_none_of_it(env, tmp_path, monkeypatch):
    import cir.eval.baselines
    from cir.study import Cell, Study, load_study_recipe

    def study(device):
        return Study(load_study_recipe("shapes", [f"device={device}", "quantities=[8]"]), tmp_path / device)

    meta, cpu = study("meta"), study("cpu")
    cell = Cell(meta.r.tiers[0], 8, 0)
    assert meta._stage1_recipe().clip.device == "meta" and meta._stage2_recipe(cell).device == "meta"
    assert meta.recipe_hash == cpu.recipe_hash
    assert meta._stage1_key() == cpu._stage1_key() and meta._cell_key(cell) == cpu._cell_key(cell)
    seen = []

    class Stop(Exception):
        pass

    def resolve_model(spec, *a, device="auto", **k):
        seen.append(device)
        raise Stop
    monkeypatch.setattr(cir.eval.baselines, "resolve_model", resolve_model)
    with pytest.raises(Stop):
        meta.run_cell(Cell(None, 0, 0), env["root"] / "s1", env["bench"], {})
    assert seen == ["meta"]


# ----------------------------------------------------------------------------- no such GPU

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("command", ["stage1", "stage2", "eval", "search", "eval-clip", "study"])
def test_explicit_cuda_without_a_gpu_is_one_line_for_every_command(env, tmp_path, command):
    g = env["gallery"]
    args = {
        "stage1": ["stage1", "--out", str(tmp_path / "o"), "--device", "cuda"],
        "stage2": ["stage2", "--triplets", str(env["trip"]), "--stage1", str(env["root"] / "s1"),
                   "--out", str(tmp_path / "o"), "--device", "cuda"],
        "eval": ["eval", "--model", str(env["root"] / "s2"), "--dataset", "shapes-cirr", "--root",
                 str(env["bench"]), "--device", "cuda"],
        "search": ["search", "--model", str(env["root"] / "s2"), "--gallery", str(g), "--image",
                   str(g / "g0.png"), "--text", "x", "--device", "cuda"],
        "eval-clip": ["eval-clip", "--device", "cuda"],
        "study": ["study", "--out", str(tmp_path / "o"), "--device", "cuda"],
    }[command]
    r = subprocess.run([sys.executable, "-m", "cir.cli", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: device 'cuda' requested but torch sees no CUDA"), r.stderr
    # Nothing was started: no run folder written.
    assert not (tmp_path / "o").exists()


def test_features_are_keyed_apart_on_cuda_and_unchanged_on_the_cpu(monkeypatch):
    """bf16 features from a GPU never serve a CPU run; CPU entries keep their old key."""
    from cir.clip import CIRClip
    from cir.features import FeatureCache
    from datagen.base.images import LOADER_VERSION
    from datagen.base.config import stable_hash

    clip = CIRClip.load("shapes-clip", random_init=True)
    cache = FeatureCache(clip, "/nonexistent-cache-root")
    old = stable_hash({"model": clip.name, "weights": clip.weights_id, "preprocess": repr(clip.preprocess),
                       "loader": LOADER_VERSION})
    assert cache.model_key == old and not cache.autocast
    monkeypatch.setattr(FeatureCache, "device", property(lambda self: torch.device("cuda")))
    assert cache.autocast and cache.model_key != old


def test_feature_extraction_feeds_the_image_tower_on_its_device(tmp_path, monkeypatch):
    """The cache's decoded CPU batches go to the tower's device (run for real on meta; zeros
    stand in for the features, which a meta tensor does not have)."""
    from cir.clip import CIRClip
    from cir.features import FeatureCache

    clip = CIRClip.load("shapes-clip", random_init=True)
    clip.clip.to("meta")
    real, seen = clip.image_features, []

    def image_features(x, patches=False):
        seen.append(x.device.type)
        out = real(x, patches)
        return tuple(torch.zeros(t.shape) for t in out) if patches else torch.zeros(out.shape)
    monkeypatch.setattr(clip, "image_features", image_features)
    f = FeatureCache(clip, tmp_path).image_features(
        "x", 6, lambda i: Image.new("RGB", (32, 32), (40 * i, 0, 0)), list("abcdef"), patches=True, batch_size=4)
    assert seen == ["meta", "meta"] and f.global_.shape[0] == 6 and f.patch is not None
