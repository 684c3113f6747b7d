"""Stage II (composing): teach the text encoder to compose `$` with the modification text.

Trainable: the composer (adapters by default; LoRA or full text fine-tuning as options), and the
stage-I mapping only if `freeze_mapping: false`. Loss: InfoNCE from the composed query
`a photo of $ that {modification}` to the target image over in-batch targets plus, per query,
the reference image and the top-K non-target training images under the current model, re-mined
at the start of every epoch; gallery images nearly identical to the target (frozen CLIP cosine
>= exclude_threshold) are never negatives.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from datagen.config import ConfigError, stable_hash, to_dict
from datagen.recipe import load_recipe

from .adapters import ComposeConfig
from .features import FeatureCache
from .losses import hard_negative_infonce
from .model import CIRModel, load_run
from .train import TrainConfig, fit, init_distributed
from .triplets import TripletsConfig, load_triplets


@dataclass
class HardNegativeConfig:
    enabled: bool = True
    k: int = 3                        # mined negatives per query (plus the reference)
    include_reference: bool = True
    exclude_threshold: float = 0.95   # gallery images this close to the target are not negatives


@dataclass
class Stage2Recipe:
    kind: Literal["stage2"] = "stage2"
    name: str = "stage2-shapes"
    description: str = ""
    expected_cost: str = ""
    prompt: str = "a photo of $ that {}"
    triplets: TripletsConfig = field(default_factory=TripletsConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    freeze_mapping: bool = True
    hard_negatives: HardNegativeConfig = field(default_factory=HardNegativeConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, batch_size=128, lr=1e-3))
    cache_dir: str | None = None


def load_stage2_recipe(name_or_path: str = "stage2-shapes", overrides: list[str] | None = None) -> Stage2Recipe:
    return load_recipe(Stage2Recipe, name_or_path, "train", overrides)


def _prompt(template: str, modification: str) -> str:
    return template.format(modification)


def run_stage2(recipe: Stage2Recipe, stage1: str | Path, out: str | Path, resume: bool = False,
               log=print) -> dict:
    out = Path(out)
    rank, _ = init_distributed()
    ident = to_dict(recipe)
    ident["train"].pop("stop_after")
    ident["stage1"] = json.loads((Path(stage1) / "model.json").read_text()) if (Path(stage1) / "model.json").exists() else None
    if ident["stage1"] is None:
        raise ConfigError(f"{stage1}: not a stage-I run (no model.json)")
    rhash = stable_hash(ident)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        prev = out / "recipe.json"
        if resume and prev.exists() and json.loads(prev.read_text())["hash"] != rhash:
            raise ConfigError(f"{out}: --resume with a different recipe or stage-I run; use a new --out")
        prev.write_text(json.dumps({"hash": rhash, "recipe": to_dict(recipe), "stage1": str(stage1)}, indent=2))
    torch.manual_seed(recipe.train.seed)
    base = load_run(stage1).model
    model: CIRModel = base
    model.add_composer(recipe.compose)
    clip = model.clip
    if recipe.compose.mode == "full":
        for p in model.composer.text_params:
            p.requires_grad_(True)
    model.mapping.requires_grad_(not recipe.freeze_mapping)
    trip = load_triplets(recipe.triplets)
    if trip.skipped:
        log(f"skipped {trip.skipped} unusable triplets ({recipe.triplets.on_error=})")
    if trip.filtered_out:
        log(f"{trip.filtered_out} triplets left out by the filters {recipe.triplets.where}")
    n = len(trip)
    if n == 0:
        raise ConfigError("no triplets left to train on")
    cache = FeatureCache(clip, recipe.cache_dir)
    gallery_ids = [f"{t}:ref" for t in trip.ids] + [f"{t}:tgt" for t in trip.ids]
    t0 = time.time()
    feats = cache.image_features(trip.dataset_id, 2 * n,
                                 lambda i: trip.image(i % n, "ref" if i < n else "tgt"), gallery_ids,
                                 patches=model.uses_patches, progress=rank == 0)
    feat_seconds = time.time() - t0
    G = torch.from_numpy(feats.global_.copy())                  # [2N, D] normalised, frozen
    prompts = [_prompt(recipe.prompt, m) for m in trip.modification]
    hn = recipe.hard_negatives
    negatives = {"idx": None}
    scale = clip.logit_scale

    @torch.no_grad()
    def mine(epoch: int) -> dict:
        if not hn.enabled:
            return {}
        model.eval()
        t = time.time()
        qs = []
        for s in range(0, n, 256):
            g, p = feats.tensors(slice(s, min(n, s + 256)))
            qs.append(model.encode_query(g, p, prompts[s:s + 256]))
        Q = torch.cat(qs)
        idx = torch.zeros(n, hn.k + int(hn.include_reference), dtype=torch.long)
        excluded = 0
        for s in range(0, n, 1024):
            e = min(n, s + 1024)
            sims = Q[s:e] @ G.T
            rows = torch.arange(s, e)
            sims[torch.arange(e - s), n + rows] = -2                 # the target itself
            near = (G[n + rows] @ G.T) >= hn.exclude_threshold       # near-duplicates of the target
            excluded += int(near.sum()) - (e - s)
            sims[near] = -2
            if hn.include_reference:
                ref_ok = ~near[torch.arange(e - s), rows]
                sims[torch.arange(e - s), rows] = torch.where(ref_ok, torch.tensor(3.0), torch.tensor(-2.0))
            idx[s:e] = sims.topk(idx.shape[1], dim=1).indices
        negatives["idx"] = idx
        return {"mined_seconds": round(time.time() - t, 2), "false_negatives_excluded": excluded}

    def loss_fn(batch: np.ndarray):
        b = torch.as_tensor(batch)
        g, p = feats.tensors(batch)
        q = model.encode_query(g, p, [prompts[i] for i in batch])
        tgt = G[n + b]
        neg = G[negatives["idx"][b]] if negatives["idx"] is not None else None
        return hard_negative_infonce(q, tgt, neg, scale), {}

    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.compose.mode == "full":
        params = list({id(p): p for p in params + model.composer.text_params}.values())
    holder = torch.nn.ModuleDict({"mapping": model.mapping, "composer": model.composer})
    if recipe.compose.mode == "full":
        holder["text"] = clip.clip
    last = fit(holder, params, n, loss_fn, recipe.train, out, resume=resume, on_epoch_start=mine, log=log)
    result = {"train": last, "triplets": n, "skipped": trip.skipped, "filtered_out": trip.filtered_out,
              "feature_seconds": round(feat_seconds, 2), "images_encoded": cache.computed}
    if not last.get("stopped") and rank == 0:
        model.save(out, {"stage": 2, "recipe_hash": rhash, "stage1": str(stage1), "triplets": n})
        (out / "result.json").write_text(json.dumps(result, indent=2))
    return result
