"""Train and measure shapes-CLIP: a small open_clip model learned from scratch on the shapes world.

Training is plain CLIP (open_clip's contrastive loss) on an endless, seeded stream of rendered
scenes and their training-phrase captions. Complete captions are separable by colour and background
alone, so the data options make the other attributes necessary (see MODEL_CARD.md for what each
did):
- `pair_types`: part of each batch are pairs one faithful edit apart (same poses; the named change),
  which only that attribute tells apart;
- `neg_captions`: every image also scores a caption of a scene one attribute away (NegCLIP-style);
- `partial_fraction`: captions that leave size, colour, position or background out;
- `phases`: later phases of the schedule with a warm-restarted learning rate and their own data
  options (the shipped model learns shape first, then binding of colour, size and position).
The data of step k depends only on (seed, k, the options of k's phase): a resumed run sees exactly
the batches an uninterrupted run sees.

Evaluation uses held-out scenes (a hash partition of the scene space never sampled in training)
described with the held-out phrase set.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from datagen.base.errors import InputError
from datagen.base.device import resolve_device
from datagen.base.io import read_json, write_atomic, write_atomic_with
from datagen.base.clip_loader import (SHAPES_CLIP, LoadedClip, compact_state_dict, create_architecture,
                                 init_token_table)
from datagen.world.editor import sample_edit
from datagen.world.phrases import load_phrases
from datagen.world.render import RenderConfig, render
from datagen.world.scene import BACKGROUNDS, COLORS, SHAPES, SIZES, Scene, is_heldout, random_obj, sample_scene


_PHASE_DATA_KEYS = ("pair_types", "pair_fraction", "partial_fraction", "neg_captions")


@dataclass
class Phase:
    """A later phase of the schedule: `steps` more steps, the learning rate warm-restarted (linear
    warmup to `lr`, cosine to 0 at the phase's end); data options given here replace the run's."""
    steps: int
    lr: float
    warmup: int = 0
    pair_types: list[str] | None = None
    pair_fraction: float | None = None
    partial_fraction: float | None = None
    neg_captions: list[str] | None = None

    def validate(self) -> None:
        """Check steps > 0, lr > 0 and 0 <= warmup < steps; ValueError otherwise."""
        if self.steps <= 0 or self.lr <= 0 or not 0 <= self.warmup < self.steps:
            raise ValueError(f"a phase needs steps > 0, lr > 0 and 0 <= warmup < steps (got {self})")


@dataclass
class PretrainConfig:
    """shapes-CLIP pre-training (`pretrain`): schedule, data options and runtime knobs; the
    `pretrain-clip` recipes in recipes/train/ (`load_pretrain_recipe`)."""

    seed: int = 0
    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 200
    pair_fraction: float = 0.5       # share of the batch made of one-edit-apart scene pairs
    pair_types: list[str] = field(default_factory=lambda: ["reshape", "move", "resize", "recolor"])
    partial_fraction: float = 0.5    # share of captions that leave attributes out (see below)
    min_objects: int = 1
    max_objects: int = 4
    resolution: int = 128            # rendered size; the model's preprocess resizes to 64
    ckpt_every: int = 200
    eval_every: int = 1000
    eval_scenes: int = 300
    threads: int = 2
    loader_workers: int = 1
    model: str = SHAPES_CLIP         # architecture: a config JSON in assets/shapes_clip/
    # NegCLIP-style hard negatives: each image also scores one caption of a scene that differs in
    # one of these attributes (image->text side only); empty = off.
    neg_captions: list[str] = field(default_factory=list)
    # The first phase is `steps` steps of a cosine schedule `schedule_steps` long (default: `steps`);
    # a longer schedule ends the phase before the learning rate reaches 0.
    schedule_steps: int | None = None
    phases: list[Phase] = field(default_factory=list)
    # Runtime knobs, not part of the run's identity (they do not change what is learned, or only
    # in floating-point rounding for `device`):
    stop_after: int | None = None    # stop early (as if interrupted)
    device: str = "cpu"

    def validate(self) -> None:
        """Check `schedule_steps >= steps` when set; ValueError otherwise (each `Phase` validates
        itself when the recipe is read)."""
        if self.schedule_steps is not None and self.schedule_steps < self.steps:
            raise ValueError(f"schedule_steps ({self.schedule_steps}) must be >= steps ({self.steps})")

    @property
    def total_steps(self) -> int:
        """Steps of the whole schedule: `steps` plus every phase's."""
        return self.steps + sum(p.steps for p in self.phases)

    def phase_at(self, step: int) -> tuple[int, int]:
        """(phase index, step within it); phase 0 is the first `steps` steps.
        Errors: IndexError for a step at or past `total_steps`."""
        if step < self.steps:
            return 0, step
        i = step - self.steps
        for k, ph in enumerate(self.phases):
            if i < ph.steps:
                return k + 1, i
            i -= ph.steps
        raise IndexError(f"step {step} is past the schedule ({self.total_steps} steps)")

    def data_view(self, phase: int) -> "PretrainConfig":
        """The config whose data options hold in `phase`."""
        if phase == 0:
            return self
        ph = self.phases[phase - 1]
        return replace(self, **{k: getattr(ph, k) for k in _PHASE_DATA_KEYS if getattr(ph, k) is not None})


RUNTIME_KNOBS = ("stop_after", "device", "threads", "loader_workers")


# ----------------------------------------------------------------------------- data

_OMITTABLE = ("size", "color", "position", "background")


class _StepBatches(torch.utils.data.Dataset):
    """Item k is the whole batch of step k: images [B,3,64,64] and tokens [B,ctx]."""

    def __init__(self, cfg: PretrainConfig, preprocess, tokenizer):
        self.run_cfg, self.preprocess, self.tokenizer = cfg, preprocess, tokenizer
        self.views = [cfg.data_view(k) for k in range(len(cfg.phases) + 1)]
        self.phrases = load_phrases("train")
        self.render_cfg = RenderConfig(resolution=cfg.resolution)

    def __len__(self) -> int:
        return self.run_cfg.total_steps

    def __getitem__(self, step: int):
        cfg = self.views[self.run_cfg.phase_at(step)[0]]
        rng = np.random.default_rng([cfg.seed, step])
        n_pairs = int(cfg.batch_size * cfg.pair_fraction) // 2
        scenes: list[Scene] = []
        for _ in range(n_pairs):
            s = sample_scene(rng, cfg.min_objects, cfg.max_objects, split="train")
            for _try in range(8):
                t = sample_edit(s, rng, self.phrases, cfg.max_objects, tuple(cfg.pair_types)).target
                if t != s and not is_heldout(t):
                    break
            scenes += [s, t]
        while len(scenes) < cfg.batch_size:
            scenes.append(sample_scene(rng, cfg.min_objects, cfg.max_objects, split="train"))
        captions = [self.phrases.caption(s, rng, _omit(cfg, rng)) for s in scenes]
        images = torch.stack([self.preprocess(render(s, int(rng.integers(2**31)), self.render_cfg))
                              for s in scenes])
        if not cfg.neg_captions:        # no draw: the stream of a recipe without negatives
            return images, self.tokenizer(captions), None
        negs = [self.phrases.caption(_negative(cfg, s, rng), rng) for s in scenes]
        return images, self.tokenizer(captions), self.tokenizer(negs)


def _omit(cfg: PretrainConfig, rng: np.random.Generator) -> frozenset:
    """The attributes a caption leaves out (none unless the caption is drawn to be partial)."""
    if cfg.partial_fraction <= 0:      # no draw: the stream of a complete-caption recipe
        return frozenset()
    if rng.random() >= cfg.partial_fraction:
        return frozenset()
    while True:
        omit = frozenset(a for a in _OMITTABLE if rng.random() < 0.5)
        if omit:
            return omit


def _negative(cfg: PretrainConfig, scene: Scene, rng: np.random.Generator) -> Scene:
    """A training-split scene one attribute (of `cfg.neg_captions`) away from `scene`."""
    attrs = list(cfg.neg_captions)
    for _ in range(16):
        attr = attrs[int(rng.integers(len(attrs)))]
        cands = one_attribute_variants(scene, attr, rng, cfg.max_objects)[1:]
        if cands:
            neg = cands[int(rng.integers(len(cands)))]
            if not is_heldout(neg):
                return neg
    return sample_scene(rng, cfg.min_objects, cfg.max_objects, split="train")


def one_attribute_variants(scene: Scene, attr: str, rng: np.random.Generator, max_objects: int):
    """`scene` followed by the scenes that differ from it in `attr` only (one object changed)."""
    objs = list(scene.objects)
    i = int(rng.integers(len(objs)))
    o = objs[i]

    def swap(**kw):
        from dataclasses import replace
        return scene.with_objects(objs[:i] + [replace(o, **kw)] + objs[i + 1:])

    if attr == "color":
        return [scene] + [swap(color=c) for c in COLORS if c != o.color]
    if attr == "shape":
        return [scene] + [swap(shape=s) for s in SHAPES if s != o.shape]
    if attr == "size":
        return [scene] + [swap(size=s) for s in SIZES if s != o.size]
    if attr == "position":
        return [scene] + [swap(cell=c) for c in scene.free_cells]
    if attr == "background":
        from dataclasses import replace
        return [scene] + [replace(scene, background=b) for b in BACKGROUNDS if b != scene.background]
    if attr == "count":
        cands = [scene]
        if len(objs) > 1:
            cands.append(scene.with_objects(objs[:i] + objs[i + 1:]))
        if scene.free_cells and len(objs) < max_objects:
            cands.append(scene.with_objects(objs + [random_obj(rng, int(rng.choice(scene.free_cells)))]))
        return cands
    raise ValueError(attr)



# ----------------------------------------------------------------------------- model

def build_model(seed: int, arch: str = SHAPES_CLIP):
    """shapes-CLIP with random weights; the token table from the recorded seed (see clip_loader)."""
    import open_clip

    torch.manual_seed(seed)
    model, preprocess = create_architecture(arch)
    with torch.no_grad():
        w = model.token_embedding.weight
        w.copy_(init_token_table(w.shape[0], w.shape[1], seed))
    return model, preprocess, open_clip.get_tokenizer(arch)


def contrastive_loss(img, txt, scale, neg=None):
    """open_clip's symmetric InfoNCE (CLIP, Radford et al., 2021); with `neg`, image->text also
    ranks each image's hard negative caption (all negatives of the batch are candidates for every
    image; NegCLIP-style, text->image is unchanged).

    img, txt: [B, D] normalised, row i a pair; neg: [B, D] normalised or None; scale: the logit
    scale (1/T). Returns a scalar (nats)."""
    labels = torch.arange(len(img), device=img.device)
    texts = txt if neg is None else torch.cat([txt, neg])
    i2t = scale * img @ texts.T
    t2i = scale * txt @ img.T
    return (torch.nn.functional.cross_entropy(i2t, labels) + torch.nn.functional.cross_entropy(t2i, labels)) / 2


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # The token table stays out of weight decay so untrained rows remain exactly at init
        # (that is what lets the shipped file store only the trained rows).
        if p.ndim < 2 or "token_embedding" in name or "embedding" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup, then cosine to 0, per phase (later phases restart it)."""
    phase, i = cfg.phase_at(step)
    if phase == 0:
        lr, warmup, length = cfg.lr, cfg.warmup, cfg.schedule_steps or cfg.steps
    else:
        ph = cfg.phases[phase - 1]
        lr, warmup, length = ph.lr, ph.warmup, ph.steps
    if i < warmup:
        return lr * (i + 1) / warmup
    t = (i - warmup) / max(1, length - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


def pretrain(cfg: PretrainConfig, out: str | Path, log=print) -> Path:
    """Train shapes-CLIP into `out/` (resumable: rerun with the same config to continue); returns
    the exported safetensors file (`shapes-clip-step<N>.safetensors` after an early stop).
    Errors: InputError when `out` holds a run with another config (runtime knobs aside);
    DeviceError for a device this machine lacks."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    cfg_path, state_path = out / "config.json", out / "state.pt"
    ident = {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_KNOBS}
    if cfg_path.exists():
        from datagen.base.config import from_dict

        # Filled with today's defaults, so a run written before an option existed still resumes.
        saved = read_json(cfg_path, dict, InputError, "a pretrain-clip run's config")
        prev = {k: v for k, v in asdict(from_dict(PretrainConfig, saved)).items()
                if k not in RUNTIME_KNOBS}
        if prev != ident:
            raise InputError(f"{out} holds a run with a different config; use a new --out")
    else:
        write_atomic(cfg_path, json.dumps(ident, indent=2))

    device = resolve_device(cfg.device)
    model, preprocess, tokenizer = build_model(cfg.seed, cfg.model)
    model = model.to(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    start, elapsed = 0, 0.0
    if state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, elapsed = int(st["step"]), float(st["elapsed"])
        log(f"resuming at step {start}")
    data = _StepBatches(cfg, preprocess, tokenizer)
    total = cfg.total_steps
    end = total if cfg.stop_after is None else min(total, cfg.stop_after)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, sampler=range(start, end), num_workers=cfg.loader_workers,
        prefetch_factor=4 if cfg.loader_workers else None, persistent_workers=False)
    metrics_f = open(out / "metrics.jsonl", "a")
    model.train()
    t0 = time.time() - elapsed
    bar = tqdm(total=total, initial=start, desc="pretrain shapes-clip", unit="step")
    step = start
    for images, tokens, negs in loader:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        img_f, txt_f, scale = model(images.to(device, non_blocking=True), tokens.to(device, non_blocking=True))
        neg_f = None if negs is None else model.encode_text(negs.to(device, non_blocking=True), normalize=True)
        loss = contrastive_loss(img_f, txt_f, scale, neg_f)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        rec = {"step": step, "loss": round(loss.item(), 5), "lr": _lr_at(step - 1, cfg),
               "seconds": round(time.time() - t0, 1)}
        if step % cfg.eval_every == 0 or step == total:
            model.eval()
            ev = evaluate(LoadedClip(model, preprocess, tokenizer, cfg.model, "training"),
                          n_scenes=cfg.eval_scenes, seed=12345)
            model.train()
            rec["eval"] = ev
            log(json.dumps({"step": step, **ev}))
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
        if step % cfg.ckpt_every == 0 or step == total or step == cfg.stop_after:
            ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "elapsed": time.time() - t0}
            write_atomic_with(state_path, lambda p: torch.save(ckpt, p))
        if cfg.stop_after is not None and step >= cfg.stop_after:
            break
    bar.close()
    metrics_f.close()
    # An early stop exports too (named by its step), so a checkpoint of a longer schedule can be
    # shipped and reproduced exactly with `--set stop_after=N`.
    name = "shapes-clip.safetensors" if step >= total else f"shapes-clip-step{step}.safetensors"
    return export(model, cfg.seed, out / name,
                  {"steps_done": str(step), "steps_scheduled": str(total), "architecture": cfg.model,
                   "device": str(device), "train_seconds": f"{time.time() - t0:.0f}"})


def export(model, seed: int, path: Path, extra_meta: dict | None = None) -> Path:
    """Write the compact fp16 safetensors file that `load_clip("shapes-clip")` reads."""
    from safetensors.torch import save_file

    tensors, meta = compact_state_dict(model.state_dict(), seed, dtype=torch.float16)
    meta.update(extra_meta or {})
    write_atomic_with(path, lambda p: save_file(tensors, str(p), metadata=meta))
    return path


# ----------------------------------------------------------------------------- evaluation

def _device(clip: LoadedClip) -> torch.device:
    return next(clip.model.parameters()).device


@torch.no_grad()
def _encode_images(clip: LoadedClip, images, batch: int = 256) -> torch.Tensor:
    feats = []
    for i in range(0, len(images), batch):
        x = torch.stack([clip.preprocess(im) for im in images[i:i + batch]])
        feats.append(clip.model.encode_image(x.to(_device(clip)), normalize=True).float().cpu())
    return torch.cat(feats)


@torch.no_grad()
def _encode_texts(clip: LoadedClip, texts, batch: int = 512) -> torch.Tensor:
    feats = [clip.model.encode_text(clip.tokenizer(texts[i:i + batch]).to(_device(clip)), normalize=True).float().cpu()
             for i in range(0, len(texts), batch)]
    return torch.cat(feats)


PROBE_ATTRS = ("color", "shape", "size", "position", "count", "background")


def evaluate(clip: LoadedClip, n_scenes: int = 1000, seed: int = 12345, split: str = "heldout",
             max_objects: int = 4) -> dict:
    """Text->image retrieval (description-level top-1 / R@5) and per-attribute zero-shot probes,
    on `n_scenes` held-out scenes; every score is a fraction in [0, 1] (not percent), rounded to 4
    places."""
    rng = np.random.default_rng(seed)
    phrases = load_phrases(split)
    scenes = [sample_scene(rng, 1, max_objects, split="heldout") for _ in range(n_scenes)]
    images = [render(s, int(rng.integers(2**31))) for s in scenes]
    captions = [phrases.caption(s, rng) for s in scenes]
    img = _encode_images(clip, images)
    txt = _encode_texts(clip, captions)
    sims = txt @ img.T
    top = sims.topk(5, dim=1).indices
    keys = [s.key() for s in scenes]
    hit1 = np.mean([keys[int(top[q, 0])] == keys[q] for q in range(n_scenes)])
    hit5 = np.mean([any(keys[int(j)] == keys[q] for j in top[q]) for q in range(n_scenes)])
    by_n = {}
    for n in range(1, max_objects + 1):
        qs = [q for q in range(n_scenes) if len(scenes[q].objects) == n]
        if qs:
            by_n[str(n)] = round(float(np.mean([keys[int(top[q, 0])] == keys[q] for q in qs])), 4)
    probes = {}
    for attr in PROBE_ATTRS:
        correct, total = 0, 0
        for q, s in enumerate(scenes):
            cands = one_attribute_variants(s, attr, rng, max_objects)
            if len(cands) < 2:
                continue
            cseed = int(rng.integers(2**31))
            texts = [phrases.caption(c, np.random.default_rng(cseed)) for c in cands]
            scores = _encode_texts(clip, texts) @ img[q]
            correct += int(scores.argmax()) == 0
            total += 1
        probes[attr] = round(correct / max(total, 1), 4)
    return {"t2i_top1": round(float(hit1), 4), "t2i_r5": round(float(hit5), 4),
            "t2i_top1_by_objects": by_n, "probe": probes, "n_scenes": n_scenes, "phrases": split}


def pair_similarities(clip: LoadedClip, n_pairs: int = 500, seed: int = 777) -> dict:
    """Image-image similarity of faithful edit pairs vs re-sampled pairs; directional similarity.
    Cosine similarities in [-1, 1] (mean, std, 5th and 95th percentiles); `separation_auc` is the
    fraction of (faithful, re-sampled) pairs in which the faithful pair scores higher."""
    rng = np.random.default_rng(seed)
    phrases = load_phrases("heldout")
    src, tgt, rnd, cs, ct = [], [], [], [], []
    for _ in range(n_pairs):
        s = sample_scene(rng, 1, 4, split="heldout")
        e = sample_edit(s, rng, phrases)
        src.append(render(s, int(rng.integers(2**31))))
        tgt.append(render(e.target, int(rng.integers(2**31))))
        n = len(e.target.objects)
        rnd.append(render(sample_scene(rng, n, n), int(rng.integers(2**31))))
        cs.append(phrases.caption(s, rng))
        ct.append(phrases.caption(e.target, rng))
    a, b, r = _encode_images(clip, src), _encode_images(clip, tgt), _encode_images(clip, rnd)
    ta, tb = _encode_texts(clip, cs), _encode_texts(clip, ct)
    faithful = (a * b).sum(1)
    resampled = (a * r).sum(1)
    direction = torch.nn.functional.cosine_similarity(b - a, tb - ta, dim=1)

    def stats(x):
        x = x.numpy()
        return {"mean": round(float(x.mean()), 4), "std": round(float(x.std()), 4),
                "p05": round(float(np.quantile(x, 0.05)), 4), "p95": round(float(np.quantile(x, 0.95)), 4)}

    return {"image_image_faithful": stats(faithful), "image_image_resampled": stats(resampled),
            "directional_faithful": stats(direction),
            "separation_auc": round(float((faithful[:, None] > resampled[None, :]).float().mean()), 4)}


def load_pretrain_recipe(name_or_path: str = "shapes-clip", overrides: list[str] | None = None) -> PretrainConfig:
    """A `PretrainConfig` from a recipe name in recipes/train/ or a path, with `key=value`
    overrides. Errors: ConfigError naming the file for a missing recipe, a `kind` other than
    `pretrain-clip`, or an invalid value."""
    from datagen.base.config import ConfigError, apply_overrides, from_dict, read_yaml
    from datagen.base.recipes import resolve_recipe_path

    path = resolve_recipe_path(name_or_path, "train")
    data = apply_overrides(read_yaml(path), list(overrides or []))
    if data.pop("kind", None) != "pretrain-clip":
        raise ConfigError(f"{path}: kind must be 'pretrain-clip'")
    for k in ("name", "expected_cost"):
        data.pop(k, None)
    try:
        return from_dict(PretrainConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
