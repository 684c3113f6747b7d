"""Stage II: composers start as an identity; triplet reading (subsample, filters, bad rows); a run."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from cir.adapters import ComposeConfig
from cir.clip import CIRClip
from cir.data import DataError
from cir.mapping import MappingConfig
from cir.model import CIRModel
from cir.triplets import TripletsConfig, load_triplets
from conftest import SMALL
from datagen.pipeline import generate
from datagen.recipe import load_gen_recipe


@pytest.mark.parametrize("mode", ["low-rank", "bottleneck", "lora", "full"])
def test_composer_start(mode):
    """bottleneck, LoRA and full start exactly at stage I; TSCIR's low-rank adapters start near it
    (A, B ~ N(0, 1) x 0.01, as released) but not on it."""
    clip = CIRClip.load("shapes-clip", random_init=True)
    m = CIRModel(clip, MappingConfig(dropout=0.0)).eval()
    g = torch.nn.functional.normalize(torch.randn(4, clip.embed_dim), dim=-1)
    p = torch.randn(4, 4, clip.vision_width)
    prompts = ["a photo of * that is red"] * 4
    with torch.no_grad():
        before = m.encode_query(g, p, prompts)
        m.add_composer(ComposeConfig(mode=mode))
        after = m.encode_query(g, p, prompts)
    diff = (before - after).abs().max().item()
    assert diff < 1e-6 if mode != "low-rank" else 1e-7 < diff < 0.05


@pytest.mark.parametrize("mode", ["low-rank", "bottleneck", "lora"])
def test_composer_is_built_on_the_text_towers_device(mode):
    # A tower already on a GPU must get its adapters/LoRA there too (a GPU check once failed on
    # this); the meta device stands in for "not the CPU" on a machine without one.
    clip = CIRClip.load("shapes-clip", random_init=True)
    clip.clip.to("meta")
    m = CIRModel(clip, MappingConfig(vsi=False))
    m.add_composer(ComposeConfig(mode=mode))
    assert {p.device.type for p in m.composer.parameters()} == {"meta"}


@pytest.fixture(scope="module")
def triplet_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("trip") / "low"
    generate(load_gen_recipe("shapes-low", SMALL), out, 150, workers=1, progress=False, log=lambda s: None)
    return out


def test_subsample_is_deterministic_and_nested_and_filters_apply(triplet_dir):
    a = load_triplets(TripletsConfig(path=str(triplet_dir), max_triplets=40))
    b = load_triplets(TripletsConfig(path=str(triplet_dir), max_triplets=80))
    assert len(a) == 40 and set(a.ids) <= set(b.ids)
    assert a.ids == load_triplets(TripletsConfig(path=str(triplet_dir), max_triplets=40)).ids
    clean = load_triplets(TripletsConfig(path=str(triplet_dir), conditions=["failure==none"]))
    assert 0 < len(clean) < 150 and clean.filtered_out == 150 - len(clean)
    with pytest.raises(DataError, match="no column 'score_nope'"):
        load_triplets(TripletsConfig(path=str(triplet_dir), conditions=["score_nope>=0.2"]))


def test_corrupt_image_is_an_error_or_a_counted_skip(triplet_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(triplet_dir, bad)
    shard = sorted((bad / "shards").glob("*.parquet"))[0]
    t = pq.read_table(shard)
    rows = t.to_pylist()
    rows[3]["target_image"] = {"bytes": b"\x89PNG broken", "path": None}
    pq.write_table(type(t).from_pylist(rows, schema=t.schema), shard)
    with pytest.raises(DataError, match=r"000000.parquet row 3 .*corrupt target image"):
        load_triplets(TripletsConfig(path=str(bad)))
    got = load_triplets(TripletsConfig(path=str(bad), bad_rows="skip"))
    assert got.skipped == 1 and len(got) == 149


def test_stage2_cli_runs_from_a_stage1_run(triplet_dir, tmp_path):
    env_sets = ["--set", "clip.random_init=true", "--set", "data.n=128", "--set", "train.batch_size=64",
                "--set", "train.epochs=1", "--set", "eval.scenes=20", "--set", f"cache_dir={tmp_path / 'c'}"]
    r = subprocess.run([sys.executable, "-m", "cir.cli", "stage1", "--out", str(tmp_path / "s1"), *env_sets],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-1500:]
    r = subprocess.run([sys.executable, "-m", "cir.cli", "stage2", "--triplets", str(triplet_dir), "--stage1",
                        str(tmp_path / "s1"), "--out", str(tmp_path / "s2"), "--max-triplets", "128",
                        "--set", "train.epochs=2", "--set", f"cache_dir={tmp_path / 'c'}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-1500:]
    res = json.loads((tmp_path / "s2" / "result.json").read_text())
    assert res["triplets"] == 128 and res["train"]["step"] == 2        # batch 128, 2 epochs
    meta = json.loads((tmp_path / "s2" / "model.json").read_text())
    assert meta["stage"] == 2 and meta["composer"]["mode"] == "low-rank"
    logged = [json.loads(l) for l in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_composed", "loss_map", "loss_soft"} <= set(logged[-1])


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("s1")
    sets = ["clip.random_init=true", "data.n=128", "train.batch_size=64", "train.epochs=1", "eval.scenes=20",
            "mapping.dropout=0.0", f"cache_dir={root / 'cache'}"]
    r = subprocess.run([sys.executable, "-m", "cir.cli", "stage1", "--out", str(root / "run"),
                        *[x for s in sets for x in ("--set", s)]], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-1500:]
    return root


def _stage2(triplet_dir, stage1_run, out, *sets, resume=False, ddp=False):
    import os

    sets = ["train.epochs=2", "train.batch_size=32", "train.threads=1", f"cache_dir={stage1_run / 'cache'}", *sets]
    cli = ["-m", "cir.cli", "stage2", "--triplets", str(triplet_dir), "--stage1", str(stage1_run / "run"),
           "--out", str(out), "--max-triplets", "96", *[x for s in sets for x in ("--set", s)]]
    cli += ["--resume"] if resume else []
    pre = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29544"]
                              if ddp else [])
    return subprocess.run(pre + cli, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def _weights(run) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


@pytest.mark.parametrize("negatives", ["mixed", "mined"])
def test_stage2_resume_is_bitwise_identical(triplet_dir, stage1_run, tmp_path, negatives):
    """A stop mid-epoch and --resume end with the uninterrupted run's weights and metrics, with
    TSCIR's in-batch mixed negatives and with per-epoch mined ones (shared case 22: the resumed
    run reads the epoch's saved negatives instead of mining with mid-epoch weights)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    kind = f"hard_negatives.kind={negatives}"
    assert (r := _stage2(triplet_dir, stage1_run, full, kind)).returncode == 0, r.stderr[-1500:]
    assert (r := _stage2(triplet_dir, stage1_run, cut, kind, "train.stop_after=4")).returncode == 0, r.stderr[-1500:]
    assert not (cut / "model.safetensors").exists()
    assert (r := _stage2(triplet_dir, stage1_run, cut, kind, resume=True)).returncode == 0, r.stderr[-1500:]
    assert "resumed from" in r.stderr
    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = lambda run: [json.loads(l).get("step") for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps(full) == steps(cut)                          # no replayed step logged twice (case 23)
    if negatives == "mined":
        assert len(list((cut / "checkpoints").glob("negatives-e*.pt"))) == 2


def test_stage2_ddp_two_processes_match_one_process(triplet_dir, stage1_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert (r := _stage2(triplet_dir, stage1_run, one)).returncode == 0, r.stderr[-1500:]
    assert (r := _stage2(triplet_dir, stage1_run, two, ddp=True)).returncode == 0, r.stderr[-3000:]
    a, b = _weights(one), _weights(two)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst     # fp32 reductions happen in another order across ranks


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    """Shared case 23: lines logged after the last checkpoint (and a torn last line from a kill)
    are dropped before a resumed run logs those steps again."""
    from cir.train import _cut_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"epoch": 0, "step": 0, "mined_seconds": 0.1})] + \
            [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')
    _cut_metrics(path, 3)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [0, 1, 2, 3]


@pytest.mark.parametrize("mode,expected", [("low-rank", {"composer.adapters"}), ("bottleneck", {"composer.adapters"}),
                                           ("lora", {"clip.clip.transformer"}), ("full", {"clip.clip."})])
def test_stage2_trains_the_composer_of_each_mode_and_nothing_frozen(mode, expected):
    from cir.stage2 import Stage2Recipe, build_stage2_model

    clip = CIRClip.load("shapes-clip", random_init=True)
    model = CIRModel(clip, MappingConfig())
    model, params, holder = build_stage2_model(model, Stage2Recipe(compose=ComposeConfig(mode=mode)))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert params and len(params) == len(names)
    assert all(any(n.startswith(e) for e in expected) for n in names), sorted(names)[:5]
    assert not any(n.startswith(("mapping.", "clip.clip.visual", "clip.clip.logit")) for n in names)
    if mode == "lora":
        assert all("parametrizations" in n for n in names)


def test_triplets_without_reference_captions_train_without_the_soft_term(tmp_path, stage1_run):
    """TransAgg's files (shared case 02) carry no reference caption: stage II says so and trains;
    two files over the same images with other ids share no cache entry by mistake."""
    import io

    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in (1000, 1001, 2000, 2001):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (i % 256, 40, 90)).save(buf, format="PNG")
        (tmp_path / "images" / f"{i:07d}.png").write_bytes(buf.getvalue())
    (tmp_path / "t.json").write_text(json.dumps([
        {"ref_image_id": "1000", "relative_cap": "add a red circle", "tgt_image_id": "2000"},
        {"ref_image_id": "1001", "relative_cap": "make it blue", "tgt_image_id": "2001"}]))
    (tmp_path / "l.json").write_text(json.dumps({
        "1000": {"relative_cap": "add a red circle", "tgt_image_id": "2000"},
        "1001": {"relative_cap": "make it blue", "tgt_image_id": "2001"}}))
    for name in ("t.json", "l.json"):
        r = subprocess.run([sys.executable, "-m", "cir.cli", "stage2", "--triplets", str(tmp_path / name),
                            "--stage1", str(stage1_run / "run"), "--out", str(tmp_path / f"s2-{name}"),
                            "--set", "triplets.format=transagg", "--set", f"triplets.image_root={tmp_path / 'images'}",
                            "--set", "train.epochs=1", "--set", f"cache_dir={stage1_run / 'cache'}"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-1500:]
        assert "soft text alignment term off: 2 of 2 triplets have no reference caption" in r.stderr
        res = json.loads((tmp_path / f"s2-{name}" / "result.json").read_text())
        assert res["triplets"] == 2 and res["soft_alignment"].startswith("off")


def test_a_run_folder_is_never_overwritten_without_resume(triplet_dir, stage1_run, tmp_path):
    out = tmp_path / "s2"
    r = _stage2(triplet_dir, stage1_run, out)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "all 6 steps are inside the warm-up (train.warmup_steps=100)" in r.stderr   # 96 triplets, batch 32
    kept = {p: (p / "model.safetensors").read_bytes() for p in (out, stage1_run / "run")}

    again = _stage2(triplet_dir, stage1_run, out, "compose.rank=16")          # no --resume, another recipe
    assert again.returncode != 0 and "already holds a run: pass --resume" in again.stderr
    onto_stage1 = _stage2(triplet_dir, stage1_run, stage1_run / "run")       # --out = the stage-I run
    assert onto_stage1.returncode != 0 and "already holds a run" in onto_stage1.stderr
    stage1 = subprocess.run([sys.executable, "-m", "cir.cli", "stage1", "--out", str(out), "--set",
                             "clip.random_init=true", "--set", "data.n=64"], capture_output=True, text=True,
                            timeout=600)
    assert stage1.returncode != 0 and "already holds a run" in stage1.stderr
    for err in (again, onto_stage1, stage1):
        assert err.stderr.count("\n") == 1 and "Traceback" not in err.stderr
    assert {p: (p / "model.safetensors").read_bytes() for p in kept} == kept   # nothing was overwritten

    cli = [sys.executable, "-m", "cir.cli", "stage2", "--triplets", str(triplet_dir), "--stage1", str(out),
           "--out", str(tmp_path / "stacked")]
    stacked = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert stacked.returncode != 0 and "a stage-2 run, not a stage-I run" in stacked.stderr
