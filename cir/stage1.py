"""Stage I (mapping): train the token learner and VSI on image-caption pairs; CLIP stays frozen.

Loss = image <-> `a photo of $` symmetric contrastive + w * soft text alignment (see losses.py).
The frozen image tower runs once per image through the feature cache; caption features are
cached too, so an epoch costs only the text encoder's forward/backward on the prompts.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from datagen.config import ConfigError, stable_hash, to_dict
from datagen.recipe import load_recipe

from .clip import CIRClip
from .data import DataConfig, open_source
from .features import FeatureCache
from .losses import contrastive, soft_text_alignment
from .mapping import MappingConfig
from .model import DEFAULT_PROMPT, CIRModel
from .train import TrainConfig, fit, init_distributed


@dataclass
class ClipConfig:
    name: str = "shapes-clip"
    pretrained: str | None = None
    device: str = "cpu"
    random_init: bool = False         # tests/benchmarks only: the architecture with random weights


@dataclass
class Stage1Loss:
    prompt: str = DEFAULT_PROMPT
    soft_alignment: bool = True
    soft_weight: float = 1.0
    target_temperature: float = 0.05


@dataclass
class Stage1Eval:
    scenes: int = 1000                # shapes: held-out scenes for `a photo of $` retrieval
    seed: int = 4242


@dataclass
class Stage1Recipe:
    kind: Literal["stage1"] = "stage1"
    name: str = "stage1-shapes"
    description: str = ""
    expected_cost: str = ""
    clip: ClipConfig = field(default_factory=ClipConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mapping: MappingConfig = field(default_factory=MappingConfig)
    loss: Stage1Loss = field(default_factory=Stage1Loss)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: Stage1Eval = field(default_factory=Stage1Eval)
    cache_dir: str | None = None


def load_stage1_recipe(name_or_path: str = "stage1-shapes", overrides: list[str] | None = None) -> Stage1Recipe:
    return load_recipe(Stage1Recipe, name_or_path, "train", overrides)


def run_stage1(recipe: Stage1Recipe, out: str | Path, resume: bool = False, log=print,
               evaluate_after: bool = True) -> dict:
    out = Path(out)
    rank, _ = init_distributed()
    ident = to_dict(recipe)
    ident["train"].pop("stop_after")  # an interruption knob, not part of what is trained
    rhash = stable_hash(ident)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        prev = out / "recipe.json"
        if prev.exists() and json.loads(prev.read_text())["hash"] != rhash and resume:
            raise ConfigError(f"{out}: --resume with a different recipe (hash mismatch); use a new --out")
        prev.write_text(json.dumps({"hash": rhash, "recipe": to_dict(recipe)}, indent=2))
    torch.manual_seed(recipe.train.seed)
    clip = CIRClip.load(recipe.clip.name, recipe.clip.pretrained, recipe.clip.device,
                        random_init=recipe.clip.random_init)
    model = CIRModel(clip, recipe.mapping, None, asdict(recipe.clip))
    src = open_source(recipe.data)
    cache = FeatureCache(clip, recipe.cache_dir)
    t0 = time.time()
    feats = cache.image_features(src.dataset_id, len(src), src.image, src.ids, patches=model.uses_patches,
                                 on_error=recipe.data.on_error, progress=rank == 0)
    caps = None
    if recipe.loss.soft_alignment:
        caps = torch.from_numpy(cache.text_features(src.dataset_id, [src.caption(i) for i in range(len(src))]))
    feat_seconds = time.time() - t0
    valid = np.nonzero(feats.valid)[0]
    skipped = int(len(src) - len(valid)) + getattr(src, "skipped", 0)
    if skipped:
        log(f"skipped {skipped} unusable image-caption pairs ({recipe.data.on_error=})")
    dev = torch.device(recipe.clip.device)
    model.to(dev)
    clip.grad_checkpointing = recipe.train.grad_checkpointing
    scale = clip.logit_scale.to(dev)
    prompt = recipe.loss.prompt

    def loss_fn(batch_idx: np.ndarray):
        idx = valid[batch_idx]
        g, p = feats.tensors(idx)
        g = g.to(dev)
        q = model.encode_query(g, None if p is None else p.to(dev), [prompt] * len(idx))
        loss_c = contrastive(g, q, scale)
        metrics = {"loss_contrastive": loss_c.detach()}
        loss = loss_c
        if caps is not None:
            loss_s = soft_text_alignment(q, caps[idx].to(dev), scale, recipe.loss.target_temperature)
            loss = loss + recipe.loss.soft_weight * loss_s
            metrics["loss_soft"] = loss_s.detach()
        return loss, metrics

    params = [p for p in model.mapping.parameters() if p.requires_grad]
    last = fit(model.mapping, params, len(valid), loss_fn, recipe.train, out, resume=resume, log=log)
    result = {"train": last, "feature_seconds": round(feat_seconds, 2), "images_encoded": cache.computed,
              "skipped": skipped}
    if last.get("stopped"):
        return result
    if rank == 0:
        model.save(out, {"stage": 1, "recipe_hash": rhash})
        if evaluate_after and recipe.data.source == "shapes":
            result["eval"] = evaluate_mapping(model, recipe.eval.scenes, recipe.eval.seed, prompt)
            log(json.dumps(result["eval"]))
        (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


@torch.no_grad()
def evaluate_mapping(model: CIRModel, n_scenes: int = 1000, seed: int = 4242, prompt: str = DEFAULT_PROMPT) -> dict:
    """`a photo of $` retrieval on held-out scenes: the query is one render of a scene, the
    gallery holds another render of every scene; a hit is a gallery image of the same scene
    (description-level). Reported next to the image->image upper reference."""
    from datagen.world.render import render
    from datagen.world.scene import sample_scene

    model.eval()
    clip = model.clip
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, 1, 4, split="heldout") for _ in range(n_scenes)]
    q_imgs = [render(s, int(rng.integers(2**31))) for s in scenes]
    g_imgs = [render(s, int(rng.integers(2**31))) for s in scenes]

    def enc(imgs):
        gs, ps = [], []
        for i in range(0, len(imgs), 256):
            x = torch.stack([clip.preprocess(im) for im in imgs[i:i + 256]])
            if model.uses_patches:
                g, p = clip.image_features(x, patches=True)
                ps.append(p)
            else:
                g = clip.image_features(x)
            gs.append(torch.nn.functional.normalize(g, dim=-1))
        return torch.cat(gs), (torch.cat(ps) if ps else None)

    qg, qp = enc(q_imgs)
    gg, _ = enc(g_imgs)
    q = torch.cat([model.encode_query(qg[i:i + 256], None if qp is None else qp[i:i + 256],
                                      [prompt] * len(qg[i:i + 256])) for i in range(0, n_scenes, 256)])
    keys = [s.key() for s in scenes]

    def r_at(sims, k):
        top = sims.topk(k, dim=1).indices
        return float(np.mean([any(keys[int(j)] == keys[i] for j in top[i]) for i in range(n_scenes)]))

    sims = q @ gg.T
    img = qg @ gg.T
    by_n = {}
    top1 = sims.argmax(1)
    for n in range(1, 5):
        qs = [i for i in range(n_scenes) if len(scenes[i].objects) == n]
        if qs:
            by_n[str(n)] = round(float(np.mean([keys[int(top1[i])] == keys[i] for i in qs])), 4)
    return {"pseudo_r1": round(r_at(sims, 1), 4), "pseudo_r5": round(r_at(sims, 5), 4),
            "pseudo_r1_by_objects": by_n, "image_to_image_r1": round(r_at(img, 1), 4), "n_scenes": n_scenes,
            "prompt": prompt}
