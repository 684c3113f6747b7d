"""Stage II (composing): teach the text encoder to compose the pseudo-word with the modification text.

The released TSCIR objective (`src/trainer.py`, `get_loss_img2text_stage2`, its multi-GPU branch,
which the reported runs used), features normalised, logit scale 1/T with T = 0.01 fixed:

    q = T(`a photo of * that {relative caption}`)   the composed query (adapters on)
    m = T(`a photo of *`)                            the map query (adapters on)
    L = (L_i2t + L_t2i with 10 mixed hard negatives) / 2        `composed_contrastive`
        + contrastive(m, reference image)                         L_map
        + 0.2 x soft_text_alignment(reference caption, m, target)  KL

Trainable: the composing adapters only (low-rank h + hAB after every other block, rank 128); the
stage-I mapping (token learner, VSI) and both CLIP towers stay frozen, in eval mode. cirgen's first
design stays as options: `compose.mode: bottleneck | lora | full`, `hard_negatives.kind: mined`
(the reference and the top-K training images under the current model, re-mined every epoch and
saved, so a resumed run uses the same negatives), `loss.map_weight: 0`, `loss.soft_weight: 0`.

Entry point `run_stage2` reads as numbered steps.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from datagen.base.device import resolve_device
from datagen.base.io import read_json, write_atomic
from datagen.base.config import ConfigError, stable_hash, to_dict
from datagen.base.recipes import RecipeProse, load_recipe

from .adapters import ComposeConfig
from .features import FeatureCache
from .losses import (composed_contrastive, contrastive, hard_negative_infonce, logit_scale,
                     soft_text_alignment)
from .model import DEFAULT_PROMPT, CIRModel, load_run
from .prompts import fill_template
from .train import TrainConfig, claim_run_folder, fit, init_distributed, rank_device
from .triplets import TripletsConfig, load_triplets


@dataclass
class HardNegativeConfig:
    """The `hard_negatives` section of a stage-II recipe: TSCIR's in-batch mixed negatives, cirgen's mined
    ones, or none (see the module docstring)."""
    kind: str = "mixed"               # mixed (TSCIR, in-batch) | mined (first design, per epoch) | off
    k: int = 10                       # negatives per query (TSCIR: 10 mixed)
    scaled: bool = False              # mixed: multiply the appended logits by 1/T (released: no)
    include_reference: bool = True    # mined: the reference image is one of the negatives
    exclude_threshold: float = 0.95   # mined: gallery images this close to the target are not negatives

    def validate(self) -> None:
        """Raise ValueError unless `kind` is mixed, mined or off and k >= 0 (`from_dict` turns it into a
        ConfigError). `exclude_threshold` is not checked."""
        if self.kind not in ("mixed", "mined", "off"):
            raise ValueError(f"kind: {self.kind!r} is not one of mixed, mined, off")
        if self.k < 0:
            raise ValueError("k must be >= 0")


@dataclass
class Stage2Loss:
    """The `loss` section of a stage-II recipe: temperature and the weights of L_map and the KL term
    (TSCIR released code, `get_loss_img2text_stage2`)."""
    temperature: float | None = 0.01  # fixed T (TSCIR); null = CLIP's learnt logit scale
    map_weight: float = 1.0           # L_map: contrastive(map query, reference image); 0 = off
    soft_weight: float = 0.2          # KL soft text alignment on the map query; 0 = off
    map_prompt: str = DEFAULT_PROMPT

    def validate(self) -> None:
        """Raise ValueError unless `temperature` is null or > 0 (`logit_scale`); the weights are not checked."""
        logit_scale(self.temperature, torch.ones(()))


@dataclass
class Stage2Recipe(RecipeProse):
    """A stage-II training recipe (`recipes/train/`, kind stage2): everything `run_stage2` needs besides the
    stage-I run."""
    kind: Literal["stage2"] = "stage2"
    name: str = "stage2-shapes"
    prompt: str = "a photo of * that {}"
    triplets: TripletsConfig = field(default_factory=TripletsConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    freeze_mapping: bool = True
    hard_negatives: HardNegativeConfig = field(default_factory=HardNegativeConfig)
    loss: Stage2Loss = field(default_factory=Stage2Loss)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, batch_size=128, warmup_steps=100))
    cache_dir: str | None = None
    # Runtime knobs, not part of the run's identity. device: auto = the GPU when there is one (an
    # explicit cuda this machine lacks is an error); results differ only in rounding (bf16 on CUDA).
    device: str = "auto"
    decode_workers: int | None = None  # image decoding processes for the features (null = auto)


def load_stage2_recipe(name_or_path: str = "stage2-shapes", overrides: list[str] | None = None) -> Stage2Recipe:
    """A `Stage2Recipe` from a shipped name (`recipes/train/`) or a YAML path, with `key.path=value`
    overrides. Raises ConfigError as `load_recipe` does (including a `kind` other than stage2)."""
    return load_recipe(Stage2Recipe, name_or_path, "train", overrides)


def run_stage2(recipe: Stage2Recipe, stage1: str | Path, out: str | Path, resume: bool = False,
               log=print) -> dict:
    """Train stage II from the stage-I run `stage1` into run folder `out`. Returns the result
    dict. Errors: DeviceError for a `device` this machine lacks (before anything is written),
    ConfigError (not a stage-I run, no triplets), InputError (an `out` holding a run without --resume, or
    another recipe with it), DataError for unusable
    triplets. Triplets without reference captions (TransAgg, CIRR) train
    without the soft alignment term, which the log and result.json say."""
    out = Path(out)
    dev = resolve_device(recipe.device)               # a GPU this machine lacks: an error before any write
    rank, _ = init_distributed()
    dev = rank_device(dev)
    # 1. Model: the stage-I run, frozen, plus a composer, on the recipe's device; and the triplets
    #    (both checked before anything is written).
    _stage1_meta(Path(stage1))
    torch.manual_seed(recipe.train.seed)
    model, params, holder = build_stage2_model(load_run(stage1, dev).model, recipe)
    trip = load_triplets(recipe.triplets)
    if trip.skipped:
        log(f"skipped {trip.skipped} unusable triplets ({recipe.triplets.bad_rows=})")
    if trip.filtered_out:
        log(f"{trip.filtered_out} triplets left out by the conditions {recipe.triplets.conditions}")
    if len(trip) == 0:
        raise ConfigError("no triplets left to train on")
    # 2. Identity of the run: a resumed run must be the same recipe and stage-I run.
    rhash = _claim_run_folder(recipe, Path(stage1), out, resume, rank)
    # 3. Data: the cached features of the triplets' images (and reference captions).
    t0 = time.time()
    data = _TripletFeatures(recipe, model, trip, rank)
    feat_seconds = time.time() - t0
    soft = "on" if data.captions is not None else "off (loss.soft_weight=0)"
    if recipe.loss.soft_weight and data.captions is None:
        # TransAgg's and CIRR's files carry no caption of the reference image: say so, train without it.
        soft = f"off: {data.missing_captions} of {len(trip)} triplets have no reference caption"
        log(f"soft text alignment term {soft} ({recipe.triplets.path}); training without it")
    # 4. Train the composer.
    negatives = _MinedNegatives(recipe, model, data, out, resume) if recipe.hard_negatives.kind == "mined" else None
    loss_fn = _Stage2Loss(recipe, model, data, negatives)
    last = fit(holder, params, len(trip), loss_fn, recipe.train, out, resume=resume,
               on_epoch_start=negatives.mine if negatives else None, log=log,
               train_mode=_TrainMode(model, recipe.freeze_mapping))
    result = {"train": last, "triplets": len(trip), "skipped": trip.skipped, "filtered_out": trip.filtered_out,
              "feature_seconds": round(feat_seconds, 2), "images_encoded": data.cache.computed,
              "soft_alignment": soft}
    # 5. Save.
    if not last.get("stopped") and rank == 0:
        model.save(out, {"stage": 2, "recipe_hash": rhash, "stage1": str(stage1), "triplets": len(trip)})
        write_atomic(out / "result.json", json.dumps(result, indent=2))
        log(f"{out}: stage II model written (trained on {dev}); result.json holds the metrics")
    return result


def build_stage2_model(model: CIRModel, recipe: Stage2Recipe):
    """Add the recipe's composer to a stage-I model (CLIP already frozen) and choose what trains.

    Returns (model, trainable parameters, the module whose state a checkpoint holds). The composer
    is added after CLIP is frozen: LoRA's matrices live inside CLIP's attention modules."""
    model.add_composer(recipe.compose)
    model.mapping.requires_grad_(not recipe.freeze_mapping)
    if recipe.compose.mode == "full":
        for p in model.composer.text_params:
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.compose.mode == "full":
        params = list({id(p): p for p in params + model.composer.text_params}.values())
    holder = torch.nn.ModuleDict({"mapping": model.mapping, "composer": model.composer})
    if recipe.compose.mode == "full":
        holder["text"] = model.clip.clip
    return model, params, holder


def _stage1_meta(stage1: Path) -> dict:
    """The stage-I run's model.json (ConfigError when `stage1` is not a stage-I run: no or an
    unreadable model.json, or a run of another stage)."""
    meta = stage1 / "model.json"
    if not meta.exists():
        raise ConfigError(f"{stage1}: not a stage-I run (no model.json)")
    d = read_json(meta, dict, ConfigError, "a stage-I run's model description")
    if d.get("stage", 1) != 1:
        raise ConfigError(f"{stage1}: a stage-{d['stage']} run, not a stage-I run (--stage1 takes the "
                          "folder `cirgen stage1 --out` wrote)")
    return d


def _claim_run_folder(recipe: Stage2Recipe, stage1: Path, out: Path, resume: bool, rank: int) -> str:
    ident = to_dict(recipe)
    ident["train"].pop("stop_after")
    for knob in ("device", "decode_workers"):     # where and how fast, not what is trained
        ident.pop(knob)
    ident["stage1"] = _stage1_meta(stage1)
    rhash = stable_hash(ident)
    if rank == 0:
        claim_run_folder(out, rhash, resume, {"recipe": to_dict(recipe), "stage1": str(stage1)})
    return rhash


class _TrainMode:
    """Put only the trained modules in train mode: frozen ones (CLIP, and the stage-I mapping
    with its dropout and BatchNorm) stay in eval mode, so they compute what stage I saved."""

    def __init__(self, model: CIRModel, freeze_mapping: bool):
        self.model, self.freeze_mapping = model, freeze_mapping

    def __call__(self, module: torch.nn.Module) -> None:
        module.train()
        if self.freeze_mapping:
            self.model.mapping.eval()
        if self.model.composer is None or self.model.composer.cfg.mode != "full":
            self.model.clip.clip.eval()


class _TripletFeatures:
    """Frozen features: rows 0..N-1 the references, N..2N-1 the targets (global normalised,
    references with visual tokens when the model has VSI), plus reference caption features.
    They stay on the CPU (the cache's memory maps); `references`/`targets` give a batch's rows
    on the model's device."""

    def __init__(self, recipe: Stage2Recipe, model: CIRModel, trip, rank: int):
        n = len(trip)
        self.n, self.trip, self.dev = n, trip, model.device
        self.cache = FeatureCache(model.clip, recipe.cache_dir, recipe.decode_workers)
        ids = [f"{t}:ref" for t in trip.ids] + [f"{t}:tgt" for t in trip.ids]
        self.feats = self.cache.image_features(trip.dataset_id, 2 * n,
                                               lambda i: trip.image(i % n, "ref" if i < n else "tgt"), ids,
                                               patches=model.uses_patches, progress=rank == 0)
        self.G = torch.from_numpy(self.feats.global_.copy())                    # [2N, D]
        self.prompts = [fill_template(recipe.prompt, m) for m in trip.modification]
        self.where = list(trip.where)
        self.captions = None
        caps = trip.reference_caption
        self.missing_captions = 0 if caps else n
        if recipe.loss.soft_weight and caps:
            self.missing_captions = sum(c is None for c in caps)
            if not self.missing_captions:
                self.captions = torch.from_numpy(self.cache.text_features(trip.dataset_id, list(caps)))

    def references(self, idx) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference global [B, D] and visual tokens [B, P, W] (or None) of triplets `idx`, on the device."""
        g, p = self.feats.tensors(idx)
        return g.to(self.dev), None if p is None else p.to(self.dev)

    def targets(self, idx) -> torch.Tensor:
        """Target global features [B, D] of triplets `idx`, on the device."""
        return self.G[self.n + torch.as_tensor(idx)].to(self.dev)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Global features of rows `idx` (any shape) of [references; targets], on the device."""
        return self.G[idx.cpu()].to(self.dev)

    def caption_rows(self, idx) -> torch.Tensor:
        """Reference caption features [B, D] of triplets `idx`, on the device."""
        return self.captions[torch.as_tensor(idx)].to(self.dev)


class _MinedNegatives:
    """cirgen's first design: at the start of each epoch, per query the reference image and the
    top-K training images under the current model (near-duplicates of the target excluded).
    Each epoch's choice is saved in `OUT/checkpoints/negatives-eNNNN.pt` before training on it,
    and a resumed run reads it back instead of mining with mid-epoch weights (bitwise resume)."""

    def __init__(self, recipe: Stage2Recipe, model: CIRModel, data: _TripletFeatures, out: Path, resume: bool):
        self.cfg, self.model, self.data = recipe.hard_negatives, model, data
        self.folder = out / "checkpoints"
        self.idx: torch.Tensor | None = None
        if not resume:
            for old in self.folder.glob("negatives-e*.pt"):
                old.unlink()

    def _path(self, epoch: int) -> Path:
        return self.folder / f"negatives-e{epoch:04d}.pt"

    @torch.no_grad()
    def mine(self, epoch: int) -> dict:
        from datagen.base.io import write_atomic

        path = self._path(epoch)
        if path.exists():
            self.idx = torch.load(path, weights_only=True)
            return {}
        cfg, data, n = self.cfg, self.data, self.data.n
        self.model.eval()
        t = time.time()
        qs = []
        for s in range(0, n, 256):
            g, p = data.references(slice(s, min(n, s + 256)))
            qs.append(self.model.encode_query(g, p, data.prompts[s:s + 256], where=data.where[s:s + 256]))
        Q, G = torch.cat(qs), data.G.to(data.dev)      # ranking on the model's device
        idx = torch.zeros(n, cfg.k + int(cfg.include_reference), dtype=torch.long)
        excluded = 0
        for s in range(0, n, 1024):
            e = min(n, s + 1024)
            rows = torch.arange(s, e, device=G.device)
            at = torch.arange(e - s, device=G.device)
            sims = Q[s:e].float() @ G.T
            sims[at, n + rows] = -2                                   # the target itself
            near = (G[n + rows] @ G.T) >= cfg.exclude_threshold       # near-duplicates of the target
            excluded += int(near.sum()) - (e - s)
            sims[near] = -2
            if cfg.include_reference:
                ref_ok = ~near[at, rows]
                sims[at, rows] = torch.where(ref_ok, 3.0, -2.0)
            idx[s:e] = sims.topk(idx.shape[1], dim=1).indices.cpu()
        self.folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(idx, buf)
        write_atomic(path, buf.getvalue())
        self.idx = idx
        return {"mined_seconds": round(time.time() - t, 2), "false_negatives_excluded": excluded}


class _Stage2Loss:
    """loss(batch of triplet indices) -> (scalar, metrics); see the module docstring."""

    def __init__(self, recipe: Stage2Recipe, model: CIRModel, data: _TripletFeatures,
                 negatives: _MinedNegatives | None):
        self.recipe, self.model, self.data, self.negatives = recipe, model, data, negatives
        self.scale = logit_scale(recipe.loss.temperature, model.clip.logit_scale)

    def __call__(self, batch: np.ndarray):
        r, data = self.recipe, self.data
        hn, lw = r.hard_negatives, r.loss
        g, p = data.references(batch)
        tgt = data.targets(batch)
        with_map = bool(lw.map_weight or lw.soft_weight)
        prompts = [data.prompts[i] for i in batch] + ([lw.map_prompt] * len(batch) if with_map else [])
        where = [data.where[i] for i in batch] + ([lw.map_prompt] * len(batch) if with_map else [])
        two = (lambda x: None if x is None else torch.cat([x, x])) if with_map else (lambda x: x)
        out = self.model.encode_query(two(g), two(p), prompts, where=where)      # one text pass
        q, m = out[:len(batch)], out[len(batch):]
        if hn.kind == "mined":
            neg = data.rows(self.negatives.idx[torch.as_tensor(batch)])
            terms = {"loss_composed": hard_negative_infonce(q, tgt, neg, self.scale)}
        else:
            k = hn.k if hn.kind == "mixed" else 0
            terms = {"loss_composed": composed_contrastive(q, tgt, self.scale, k, hn.scaled)}
        if lw.map_weight:
            terms["loss_map"] = lw.map_weight * contrastive(m, g, self.scale)
        if lw.soft_weight and data.captions is not None:
            caps = data.caption_rows(batch)
            terms["loss_soft"] = lw.soft_weight * soft_text_alignment(caps, m, tgt, self.scale)
        return sum(terms.values()), {k: v.detach() for k, v in terms.items()}
