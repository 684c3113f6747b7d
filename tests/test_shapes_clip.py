"""shapes-CLIP: the shipped weights, their compact format, and the pretraining command."""
from __future__ import annotations

import torch

import json
from dataclasses import replace

import pytest

from cir.shapes_clip import Phase, PretrainConfig, _lr_at, _StepBatches, build_model, evaluate, pretrain
from datagen.base.clip_loader import (compact_state_dict, expand_state_dict, load_clip, load_weights_file,
                                 shipped_weights)


def test_shipped_weights_load_offline_and_retrieve_held_out_scenes():
    path = shipped_weights()
    assert path.stat().st_size <= 30 * 2**20
    clip = load_clip("shapes-clip")
    assert clip.weights_id != "random"
    res = evaluate(clip, n_scenes=200, seed=99)
    # The model card reports >= 0.93 on 1,000 held-out scenes for each of these; random weights
    # give ~0.005 top-1 here and chance on the probes.
    assert res["t2i_top1"] >= 0.8, res
    assert min(res["probe"].values()) >= 0.8, res


def test_compact_weights_roundtrip_exactly():
    model, _, _ = build_model(seed=3)
    with torch.no_grad():
        model.token_embedding.weight[[320, 1125, 539]] += 1.0   # "trained" rows
    state = model.state_dict()
    tensors, meta = compact_state_dict(state, token_init_seed=3)
    assert tensors["token_embedding.rows"].tolist() == [320, 539, 1125]
    back = expand_state_dict(tensors, meta)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_contrastive_loss_is_open_clips_without_negatives_and_ranks_them_with():
    from open_clip.loss import ClipLoss

    from cir.shapes_clip import contrastive_loss

    g = torch.Generator().manual_seed(0)
    img, txt, neg = (torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1) for _ in range(3))
    assert torch.allclose(contrastive_loss(img, txt, 10.0), ClipLoss()(img, txt, 10.0))
    # A negative identical to the positive caption makes the image->text side strictly harder.
    assert contrastive_loss(img, txt, 10.0, txt.clone()) > contrastive_loss(img, txt, 10.0)


def test_pretraining_is_deterministic_and_resumes_bitwise_across_phases(tmp_path):
    # The shipped recipe's shape: shape-only pairs and negatives, then a phase with all of them.
    phase = Phase(steps=3, lr=5e-4, warmup=1, pair_types=["move", "recolor"], neg_captions=["color", "position"])
    cfg = dict(steps=3, schedule_steps=5, batch_size=8, warmup=2, eval_every=1000, eval_scenes=8, ckpt_every=1000,
               threads=1, loader_workers=0, resolution=64, pair_types=["reshape"], neg_captions=["shape"],
               phases=[phase])
    a = pretrain(PretrainConfig(**cfg), tmp_path / "a", log=lambda s: None)
    assert a.name == "shapes-clip.safetensors"
    # Interrupted inside the second phase, then resumed.
    assert pretrain(PretrainConfig(**cfg, stop_after=4), tmp_path / "b", log=lambda s: None).name == \
        "shapes-clip-step4.safetensors"
    b = pretrain(PretrainConfig(**cfg), tmp_path / "b", log=lambda s: None)
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    m1, _, _ = build_model(0)
    load_weights_file(m1, a)
    assert m1.token_embedding.weight.shape == (49408, 128)


def test_phases_schedule_their_own_data_and_learning_rate():
    phase = Phase(steps=4, lr=3e-4, warmup=2, pair_types=["move"], neg_captions=["position"])
    cfg = PretrainConfig(steps=3, schedule_steps=6, lr=1e-3, warmup=1, batch_size=6, resolution=64, phases=[phase],
                         pair_types=["reshape"], neg_captions=["shape"])
    assert cfg.total_steps == 7 and cfg.phase_at(2) == (0, 2) and cfg.phase_at(3) == (1, 0)
    # Phase 0 follows the 6-step cosine and is cut at step 3; phase 1 restarts: warmup, then down to 0.
    one_phase = PretrainConfig(steps=6, lr=1e-3, warmup=1)
    assert [_lr_at(k, cfg) for k in range(3)] == [_lr_at(k, one_phase) for k in range(3)]
    assert [_lr_at(k, cfg) for k in (3, 4)] == pytest.approx([1.5e-4, 3e-4])
    assert _lr_at(6, cfg) < _lr_at(5, cfg) == pytest.approx(3e-4)
    with pytest.raises(IndexError):
        cfg.phase_at(7)
    model, preprocess, tokenizer = build_model(0)
    data = _StepBatches(cfg, preprocess, tokenizer)
    assert len(data) == 7
    # A step's batch depends only on the options of its phase: the same as a one-phase run with them.
    as_phase0 = _StepBatches(replace(cfg, phases=[]), preprocess, tokenizer)[1]
    as_phase1 = _StepBatches(replace(cfg.data_view(1), steps=7, phases=[]), preprocess, tokenizer)[4]
    for mine, alone in ((data[1], as_phase0), (data[4], as_phase1)):
        assert all(torch.equal(x, y) for x, y in zip(mine, alone))
    assert not torch.equal(data[4][2], _StepBatches(replace(cfg, steps=7, phases=[]), preprocess, tokenizer)[4][2])
    assert cfg.data_view(1).neg_captions == ["position"] and cfg.data_view(1).pair_fraction == cfg.pair_fraction


def test_pretrain_config_errors_name_the_field():
    from datagen.base.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"phases\[0\].*warmup"):
        from_dict(PretrainConfig, {"phases": [{"steps": 10, "lr": 1e-4, "warmup": 10}]})
    with pytest.raises(ConfigError, match="schedule_steps"):
        from_dict(PretrainConfig, {"steps": 10, "schedule_steps": 5})
    with pytest.raises(ConfigError, match=r"unknown key .phases\[0\].lr_max"):
        from_dict(PretrainConfig, {"phases": [{"steps": 10, "lr_max": 1e-4}]})


def test_a_run_written_before_an_option_existed_resumes(tmp_path):
    cfg = PretrainConfig(steps=2, batch_size=4, warmup=1, eval_every=1000, eval_scenes=8, ckpt_every=1000,
                         threads=1, loader_workers=0, resolution=64)
    pretrain(replace(cfg, stop_after=1), tmp_path, log=lambda s: None)
    old = json.loads((tmp_path / "config.json").read_text())
    del old["phases"], old["schedule_steps"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert pretrain(cfg, tmp_path, log=lambda s: None).name == "shapes-clip.safetensors"
    with pytest.raises(ValueError, match="different config"):
        pretrain(replace(cfg, lr=5e-4), tmp_path, log=lambda s: None)


def test_phase_one_of_the_shipped_recipe_is_the_v3_recipe():
    # The shipped weights were made by resuming the v3 run's step-2,000 state with phase 2: valid
    # only if phase 1 sees exactly v3's data and learning rates.
    from cir.shapes_clip import load_pretrain_recipe

    v4, v3 = load_pretrain_recipe("shapes-clip"), load_pretrain_recipe("shapes-clip-v3")
    assert v4.steps == v3.stop_after == 2000 and v4.phases
    schedule = ("steps", "schedule_steps", "phases", "stop_after")
    assert replace(v4, **{k: getattr(v3, k) for k in schedule}) == v3
    assert all(_lr_at(k, v4) == _lr_at(k, v3) for k in (0, 199, 200, 1000, 1999))
    _, preprocess, tokenizer = build_model(0)
    a, b = _StepBatches(v4, preprocess, tokenizer)[1999], _StepBatches(v3, preprocess, tokenizer)[1999]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
