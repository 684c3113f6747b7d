"""Shapes benchmarks in the official layouts, CLIP baselines, and the harness end to end."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner

from cir.eval.baselines import ClipBaseline, modification_text, resolve_model, strip_placeholder, targetpad
from cir.eval.benchmarks import load_benchmark
from cir.eval.harness import EvalOptions, evaluate
from cir.eval.submission import validate_file
from datagen.world.benchmark import ASPECTS, write_shapes_benchmark
from datagen.world.scene import Scene, is_heldout


def _digest(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    base = tmp_path_factory.mktemp("shapes")
    write_shapes_benchmark(base / "cirr", "cirr", n_queries=6, seed=3, resolution=32, splits=("val", "test"))
    write_shapes_benchmark(base / "circo", "circo", n_queries=8, seed=3, resolution=32, splits=("val", "test"))
    return base


@pytest.fixture(scope="module")
def clip():
    from datagen.base.clip_loader import load_clip

    return load_clip("shapes-clip", random_init=True)


def _scene(truth, name) -> Scene:
    return Scene.from_json(json.dumps(truth["images"][name]["scene"]))


def test_shapes_cirr_layout_read_back_by_the_cirr_loader(shapes):
    root = shapes / "cirr"
    for f in ("captions/cap.rc2.val.json", "captions/cap.rc2.test1.json", "image_splits/split.rc2.val.json",
              "image_splits/split.rc2.test1.json", "scenes.json"):
        assert (root / f).is_file()
    truth = json.loads((root / "scenes.json").read_text())
    bench = load_benchmark("shapes-cirr", root, "val")
    task = bench.tasks[0]
    assert bench.split == "val" and len(task.queries) == 6 and len(task.gallery) == 18   # 3 sets of 6
    assert all(task.paths[g].parent.name == "dev" and task.paths[g].suffix == ".png" for g in task.gallery)
    raw = json.loads((root / "captions" / "cap.rc2.val.json").read_text())
    for q, r, t in zip(task.queries, raw, truth["queries"]["val"]):
        assert len(q.members) == 6 and q.reference in q.members and q.target in q.members
        scenes = [_scene(truth, m) for m in q.members]
        assert len(set(scenes)) == 6                                # distinct descriptions: one true target
        assert all(is_heldout(s) for s in scenes)
        assert r["img_set"]["members"][r["img_set"]["target_rank"]] == q.target
        assert q.captions[0] == t["instruction"]
        assert _scene(truth, q.target) == Scene.from_json(json.dumps(t["target"]))
    test = load_benchmark("shapes-cirr", root, "test")
    assert test.split == "test1" and not test.labelled and all(q.target is None for q in test.tasks[0].queries)


def test_shapes_circo_layout_and_multi_ground_truth(shapes):
    root = shapes / "circo"
    truth = json.loads((root / "scenes.json").read_text())
    bench = load_benchmark("shapes-circo", root, "val")
    task = bench.tasks[0]
    assert len(task.queries) == 8 and all(p.name == f"{int(i):012d}.jpg" for i, p in task.paths.items())
    scene_of = {i: _scene(truth, i) for i in task.gallery}
    for q, t in zip(task.queries, truth["queries"]["val"]):
        target = scene_of[q.target]
        # gt = the target first, then every other gallery image showing the same scene
        assert q.gt[0] == q.target
        assert set(q.gt) == {i for i in task.gallery if scene_of[i] == target}
        assert is_heldout(target) and is_heldout(scene_of[q.reference]) and target != scene_of[q.reference]
        assert list(q.aspects) == [ASPECTS[t["edit_type"]]] and q.shared_concept
    assert any(len(q.gt) > 1 for q in task.queries)                 # multi-GT really occurs
    test = load_benchmark("shapes-circo", root, "test")
    assert not test.labelled and [q.qid for q in test.tasks[0].queries] == [str(i) for i in range(8)]


def test_shapes_benchmark_is_deterministic(tmp_path, shapes):
    write_shapes_benchmark(tmp_path / "a", "cirr", n_queries=6, seed=3, resolution=32, splits=("val", "test"))
    assert _digest(tmp_path / "a") == _digest(shapes / "cirr")
    write_shapes_benchmark(tmp_path / "b", "cirr", n_queries=6, seed=4, resolution=32)
    assert _digest(tmp_path / "b") != _digest(tmp_path / "a")
    with pytest.raises(FileExistsError):
        write_shapes_benchmark(tmp_path / "a", "cirr", n_queries=2, seed=3, resolution=32)


def test_prompt_processing_for_baselines():
    from cir.prompts import fill_template

    assert strip_placeholder(fill_template("a photo of * that {}", "is red")) == "a photo of that is red"
    assert strip_placeholder(fill_template("a photo of * , {}", "is red")) == "a photo of, is red"
    assert strip_placeholder(fill_template("a photo of * that {}", "costs $5")) == "a photo of that costs $5"
    assert modification_text(fill_template("a photo of * that {}", "is red")) == "is red"
    assert modification_text(fill_template("a photo of * , {}", "is red and has stripes")) == "is red and has stripes"
    assert modification_text("find a dog but is red") == "find a dog but is red"     # template none
    from PIL import Image

    assert targetpad(Image.new("RGB", (100, 50))).size == (100, 100)
    assert targetpad(Image.new("RGB", (60, 50))).size == (60, 50)      # ratio 1.2 < 1.25: unchanged


def test_baselines_end_to_end_on_shapes_with_random_shapes_clip(shapes, clip, tmp_path):
    results = {}
    for mode in ("image-only", "text-only", "sum"):
        model = ClipBaseline(clip, mode)
        r = evaluate(model, "shapes-cirr", shapes / "cirr", options=EvalOptions(keep_rankings=True))
        assert set(r.metrics) == {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "avg"}
        assert all(0 <= v <= 100 for v in r.metrics.values()) and r.model == mode
        results[mode] = r
        c = evaluate(model, "shapes-circo", shapes / "circo", options=EvalOptions(keep_rankings=True))
        assert "mAP@10" in c.metrics and any(k.startswith("mAP@10_") for k in c.metrics)
        if mode == "image-only":
            # the query is the reference's own gallery feature and CIRCO keeps the reference: rank 1
            task = load_benchmark("circo", shapes / "circo").tasks[0]
            assert all(c.rankings[q.qid][0] == q.reference for q in task.queries)
    # image+text sum is exactly normalise(image feature + modification-text feature)
    model = ClipBaseline(clip, "sum")
    ref = load_benchmark("cirr", shapes / "cirr").tasks[0]
    q = ref.queries[0]
    from cir.prompts import fill_template

    prompt = fill_template("a photo of * that {}", q.captions[0])
    got = model.encode_queries([ref.paths[q.reference]], [prompt])
    want = torch.nn.functional.normalize(model.encode_images([ref.paths[q.reference]])
                                         + model.encode_texts([q.captions[0]]), dim=1)
    assert torch.allclose(got, want, atol=1e-6)
    # test splits: server files written and valid
    sub = tmp_path / "sub"
    r = evaluate(ClipBaseline(clip, "sum"), "shapes-cirr", shapes / "cirr", split="test",
                 options=EvalOptions(submission=sub))
    task = load_benchmark("cirr", shapes / "cirr", "test").tasks[0]
    assert sorted(validate_file(p, "cirr", task) for p in r.submission) == ["recall", "recall_subset"]
    r = evaluate(ClipBaseline(clip, "sum"), "shapes-circo", shapes / "circo", split="test",
                 options=EvalOptions(submission=sub))
    assert validate_file(r.submission[0], "circo", load_benchmark("circo", shapes / "circo", "test").tasks[0]) == ""


def test_resolve_model_baselines_and_errors():
    m = resolve_model("image-only", weights="random")
    assert m.name == "image-only" and m.cache_key == "shapes-clip@random/clip"
    from cir.eval import EvalError

    with pytest.raises(EvalError, match="model '/nonexistent/run'"):
        resolve_model("/nonexistent/run")


def test_cli_benchmark_and_eval(tmp_path):
    from cir.cli import main

    runner = CliRunner()
    out = tmp_path / "bench"
    r = runner.invoke(main, ["benchmark", "shapes", "--format", "cirr", "--out", str(out), "--queries", "4",
                             "--seed", "1", "--resolution", "32"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["splits"]["val"]["queries"] == 4
    r = runner.invoke(main, ["eval", "--model", "sum", "--dataset", "shapes-cirr", "--root", str(out),
                             "--weights", "random", "--set", "cirr_summary=r1", "--out-dir", str(tmp_path / "res")])
    assert r.exit_code == 0, r.output
    assert "protocol: split=val" in r.output and "avg=(R@1+Rs@1)/2" in r.output and "Rs@1" in r.output
    assert json.loads((tmp_path / "res" / "results.json").read_text())["n_queries"] == 4
    r = runner.invoke(main, ["eval", "--model", "sum", "--dataset", "cirr", "--root", str(out),
                             "--weights", "random", "--set", "nope=1"])
    assert r.exit_code != 0 and "unknown protocol key 'nope'" in r.output
    (out / "dev" / next(iter(sorted(p.name for p in (out / "dev").iterdir())))).unlink()
    r = runner.invoke(main, ["eval", "--model", "image-only", "--dataset", "shapes-cirr", "--root", str(out),
                             "--weights", "random", "--json"])
    assert r.exit_code != 0 and "1 image(s) missing or unreadable" in r.output
