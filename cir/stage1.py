"""Stage I (mapping): train the token learner and VSI on image-caption pairs; CLIP stays frozen.

The released TSCIR objective (`src/trainer.py`, `get_loss_img2text`), features normalised,
logit scale 1/T with T = 0.07 fixed:

    t = T(`a photo of *`) with the pseudo-word of the image's reference view (and VSI on its tokens)
    L = contrastive(t, target view) + 1.0 x contrastive(t, reference view)
        + 0.2 x soft_text_alignment(LLM caption, t, target view)

(see `cir/losses.py`). Two augmented views per image come from the feature cache (`cir/views.py`),
so an epoch costs only the text encoder's forward/backward on the prompts. cirgen's first design
stays as options: `loss.soft_alignment: caption`, `loss.temperature: null` (CLIP's learnt scale),
`loss.reference_weight: 0`.

Entry point `run_stage1` reads as numbered steps.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from datagen.base.device import resolve_device
from datagen.base.io import write_atomic
from datagen.base.config import ConfigError, stable_hash, to_dict
from datagen.base.recipes import RecipeProse, load_recipe

from .clip import CIRClip
from .data import DataConfig, open_source
from .features import FeatureCache, Features
from .losses import caption_soft_alignment, contrastive, logit_scale, soft_text_alignment
from .mapping import MappingConfig
from .model import DEFAULT_PROMPT, CIRModel
from .train import TrainConfig, claim_run_folder, fit, init_distributed, rank_device
from .views import ViewsConfig, make_view, view_seed


@dataclass
class ClipConfig:
    """The `clip` section of a stage-I recipe: the frozen CLIP backbone (`CIRClip.load`) and its device;
    stage II reuses the one recorded in the stage-I run's model.json."""
    name: str = "shapes-clip"
    pretrained: str | None = None
    # auto = the GPU when there is one (an explicit cuda this machine lacks is an error); a
    # runtime knob, not part of the run's identity (it changes results only in rounding: bf16 on CUDA).
    device: str = "auto"
    random_init: bool = False         # tests/benchmarks only: the architecture with random weights


@dataclass
class Stage1Loss:
    """The `loss` section of a stage-I recipe: the prompt, temperature and term weights of the objective in
    the module docstring (TSCIR released code, `get_loss_img2text`)."""
    prompt: str = DEFAULT_PROMPT
    temperature: float | None = 0.07  # fixed T (TSCIR); null = CLIP's learnt logit scale
    reference_weight: float = 1.0     # InfoNCE to the reference view (TSCIR: 1.0; 0 = off)
    soft_alignment: str = "tscir"     # tscir (KL, images vs pseudo-sentences) | caption (first design) | off
    soft_weight: float = 0.2          # TSCIR: 0.2
    target_temperature: float = 0.05  # caption variant only: softness of the caption-caption target

    def validate(self) -> None:
        """Raise ValueError unless `soft_alignment` is tscir, caption or off and `temperature` is null or
        > 0 (`logit_scale`); `from_dict` turns it into a ConfigError. The weights are not checked."""
        if self.soft_alignment not in ("tscir", "caption", "off"):
            raise ValueError(f"soft_alignment: {self.soft_alignment!r} is not one of tscir, caption, off")
        logit_scale(self.temperature, torch.ones(()))


@dataclass
class Stage1Eval:
    """The `eval` section of a stage-I recipe: the held-out shapes check `evaluate_mapping` runs after
    training (shapes data only)."""
    scenes: int = 1000                # shapes: held-out scenes for `a photo of *` retrieval; 0 = off
    seed: int = 4242

    def validate(self) -> None:
        """Raise ValueError for 1..4 scenes (R@5 needs five gallery images) or a negative count."""
        if self.scenes < 0 or 0 < self.scenes < 5:
            raise ValueError(f"scenes must be 0 (off) or >= 5 (R@5 needs five gallery images), got {self.scenes}")


@dataclass
class Stage1Recipe(RecipeProse):
    """A stage-I training recipe (`recipes/train/`, kind stage1): everything `run_stage1` needs."""
    kind: Literal["stage1"] = "stage1"
    name: str = "stage1-shapes"
    clip: ClipConfig = field(default_factory=ClipConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mapping: MappingConfig = field(default_factory=MappingConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    loss: Stage1Loss = field(default_factory=Stage1Loss)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: Stage1Eval = field(default_factory=Stage1Eval)
    cache_dir: str | None = None
    decode_workers: int | None = None  # image decoding processes for the features (null = auto; no effect on results)


def load_stage1_recipe(name_or_path: str = "stage1-shapes", overrides: list[str] | None = None) -> Stage1Recipe:
    """A `Stage1Recipe` from a shipped name (`recipes/train/`) or a YAML path, with `key.path=value`
    overrides. Raises ConfigError as `load_recipe` does (including a `kind` other than stage1)."""
    return load_recipe(Stage1Recipe, name_or_path, "train", overrides)


def run_stage1(recipe: Stage1Recipe, out: str | Path, resume: bool = False, log=print,
               evaluate_after: bool = True) -> dict:
    """Train stage I into run folder `out` (model.json, model.safetensors, metrics.jsonl,
    checkpoints/, result.json). Returns the result dict (`train`: the last epoch's metrics,
    `feature_seconds`, `images_encoded`, `skipped`, and `eval` from `evaluate_mapping` on shapes data).
    Errors: DeviceError for a `clip.device` this machine lacks (before anything is written),
    InputError for an `out` holding a run without `--resume` (or another recipe with it), DataError for unusable data (or counted skips
    with bad_rows=skip)."""
    out = Path(out)
    dev = resolve_device(recipe.clip.device)         # a GPU this machine lacks: an error before any write
    rank, _ = init_distributed()
    dev = rank_device(dev)
    # 1. Model: frozen CLIP + the stage-I mapping, on the recipe's device (built before anything
    #    is written: a bad block choice or weights file leaves no folder behind).
    torch.manual_seed(recipe.train.seed)
    clip = CIRClip.load(recipe.clip.name, recipe.clip.pretrained, dev, random_init=recipe.clip.random_init)
    # model.json records what was trained, not where: a stage-II identity does not depend on it.
    model = CIRModel(clip, recipe.mapping, None, {k: v for k, v in asdict(recipe.clip).items() if k != "device"})
    model.to(dev)
    src = open_source(recipe.data)
    # 2. Identity of the run: a resumed run must be the same recipe.
    rhash = _claim_run_folder(recipe, out, resume, rank)
    # 3. Data: cached features of the augmented views (and of the captions); batches go to `dev`.
    t0 = time.time()
    data = _ViewFeatures(recipe, src, FeatureCache(clip, recipe.cache_dir, recipe.decode_workers),
                         model.uses_patches, rank, log)
    feat_seconds = time.time() - t0
    if data.skipped:
        log(f"skipped {data.skipped} unusable image-caption pairs ({recipe.data.bad_rows=})")
    clip.grad_checkpointing = recipe.train.grad_checkpointing
    # 4. Train: the loss of the module docstring over batches of images.
    loss_fn = _Stage1Loss(recipe, model, data, dev)
    params = [p for p in model.mapping.parameters() if p.requires_grad]
    last = fit(model.mapping, params, len(data.valid), loss_fn, recipe.train, out, resume=resume,
               on_epoch_start=data.draw_views, log=log)
    result = {"train": last, "feature_seconds": round(feat_seconds, 2), "images_encoded": data.cache.computed,
              "skipped": data.skipped}
    if last.get("stopped"):
        return result
    # 5. Save, and on the shapes world check `a photo of *` retrieval on held-out scenes.
    if rank == 0:
        model.save(out, {"stage": 1, "recipe_hash": rhash})
        if evaluate_after and recipe.data.source == "shapes" and recipe.eval.scenes:
            result["eval"] = evaluate_mapping(model, recipe.eval.scenes, recipe.eval.seed, recipe.loss.prompt)
        write_atomic(out / "result.json", json.dumps(result, indent=2))
        log(f"{out}: stage I model written (trained on {dev}); result.json holds the metrics")
    return result


def _claim_run_folder(recipe: Stage1Recipe, out: Path, resume: bool, rank: int) -> str:
    ident = to_dict(recipe)
    ident["train"].pop("stop_after")  # an interruption knob, not part of what is trained
    ident["clip"].pop("device")       # where it runs (a resume may move to a GPU)
    ident.pop("decode_workers")
    rhash = stable_hash(ident)
    if rank == 0:
        claim_run_folder(out, rhash, resume, {"recipe": to_dict(recipe)})
    return rhash


class _ViewFeatures:
    """Cached features of every image's reference and target views, and of its caption; which
    view each image uses in an epoch is drawn by `draw_views(epoch)` (seeded by epoch)."""

    def __init__(self, recipe: Stage1Recipe, src, cache: FeatureCache, patches: bool, rank: int, log):
        v = recipe.views
        self.cache, self.seed = cache, recipe.train.seed
        if not v.augment:
            log("stage I augmentation is OFF (views.augment: false): reference and target views are the image itself")

        def views(kind: str, count: int, scale, flip: bool, with_patches: bool) -> list[Features]:
            out = []
            for k in range(count if v.augment else 1):
                spec = stable_hash({"kind": kind, "k": k, "scale": scale, "flip": flip, "augment": v.augment,
                                    "seed": recipe.data.seed})
                image = ((lambda i, k=k: make_view(src.image(i), view_seed(recipe.data.seed, src.ids[i], kind, k),
                                                    scale, flip)) if v.augment else src.image)
                out.append(cache.image_features(f"{src.dataset_id}-{kind}{k}-{spec}", len(src), image, src.ids,
                                                patches=with_patches, bad_rows=recipe.data.bad_rows,
                                                progress=rank == 0))
            return out

        self.reference = views("reference", v.reference, v.reference_scale, v.reference_flip, patches)
        self.target = views("target", v.target, v.target_scale, False, False)
        ok = np.logical_and.reduce([f.valid for f in self.reference + self.target])
        self.valid = np.nonzero(ok)[0]
        self.skipped = int(len(src) - len(self.valid)) + getattr(src, "skipped", 0)
        self.captions = None
        if recipe.loss.soft_alignment != "off":
            self.captions = torch.from_numpy(cache.text_features(src.dataset_id,
                                                                 [src.caption(i) for i in range(len(src))]))
        self.ref_view = self.tgt_view = np.zeros(len(src), dtype=np.int64)

    def draw_views(self, epoch: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, 101])
        n = len(self.ref_view)
        self.ref_view = rng.integers(0, len(self.reference), n)
        self.tgt_view = rng.integers(0, len(self.target), n)
        return {}

    @staticmethod
    def _rows(views: list[Features], pick: np.ndarray, idx: np.ndarray):
        g, p = None, None
        for k in np.unique(pick):
            sel = np.nonzero(pick == k)[0]
            gk, pk = views[int(k)].tensors(idx[sel])
            if g is None:
                g = torch.empty((len(idx),) + tuple(gk.shape[1:]), dtype=gk.dtype)
                p = None if pk is None else torch.empty((len(idx),) + tuple(pk.shape[1:]), dtype=pk.dtype)
            g[sel] = gk
            if pk is not None:
                p[sel] = pk
        return g, p

    def batch(self, idx: np.ndarray):
        """(reference global [B, D], reference visual tokens [B, P, Wv] or None, target global [B, D],
        caption features [B, D] or None) for dataset items `idx`."""
        g_ref, p_ref = self._rows(self.reference, self.ref_view[idx], idx)
        g_tgt, _ = self._rows(self.target, self.tgt_view[idx], idx)
        caps = None if self.captions is None else self.captions[idx]
        return g_ref, p_ref, g_tgt, caps


class _Stage1Loss:
    """loss(batch of item positions) -> (scalar, metrics); see the module docstring."""

    def __init__(self, recipe: Stage1Recipe, model: CIRModel, data: _ViewFeatures, dev: torch.device):
        self.loss, self.model, self.data, self.dev = recipe.loss, model, data, dev
        self.scale = logit_scale(recipe.loss.temperature, model.clip.logit_scale.to(dev))

    def __call__(self, batch: np.ndarray):
        cfg, dev = self.loss, self.dev
        g_ref, p_ref, g_tgt, caps = (None if x is None else x.to(dev) for x in self.data.batch(self.data.valid[batch]))
        t = self.model.encode_query(g_ref, p_ref, [cfg.prompt] * len(batch))
        terms = {"loss_target": contrastive(t, g_tgt, self.scale)}
        if cfg.reference_weight:
            terms["loss_reference"] = cfg.reference_weight * contrastive(t, g_ref, self.scale)
        if cfg.soft_alignment == "tscir":
            terms["loss_soft"] = cfg.soft_weight * soft_text_alignment(caps, t, g_tgt, self.scale)
        elif cfg.soft_alignment == "caption":
            terms["loss_soft"] = cfg.soft_weight * caption_soft_alignment(t, caps, self.scale, cfg.target_temperature)
        return sum(terms.values()), {k: v.detach() for k, v in terms.items()}


@torch.no_grad()
def evaluate_mapping(model: CIRModel, n_scenes: int = 1000, seed: int = 4242, prompt: str = DEFAULT_PROMPT) -> dict:
    """`a photo of *` retrieval on held-out scenes: the query is one render of a scene, the
    gallery holds another render of every scene; a hit is a gallery image of the same scene
    (description-level). Reported next to the image->image upper reference.

    Returns `pseudo_r1`, `pseudo_r5`, `image_to_image_r1` and `pseudo_r1_by_objects` (R@1 per object
    count 1..4) as fractions in [0, 1], 4 decimals; cirgen's own check. ValueError when
    `n_scenes` < 5 (R@5 needs five gallery images)."""
    from datagen.world.render import render
    from datagen.world.scene import sample_scene

    model.eval()
    clip, dev = model.clip, model.device
    if n_scenes < 5:
        raise ValueError(f"n_scenes must be >= 5 for R@5, got {n_scenes}")
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, 1, 4, split="heldout") for _ in range(n_scenes)]
    q_imgs = [render(s, int(rng.integers(2**31))) for s in scenes]
    g_imgs = [render(s, int(rng.integers(2**31))) for s in scenes]

    def enc(imgs):
        gs, ps = [], []
        for i in range(0, len(imgs), 256):
            x = torch.stack([clip.preprocess(im) for im in imgs[i:i + 256]]).to(dev)
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

    sims = (q @ gg.T).float().cpu()       # the per-query reads below stay off the device
    img = (qg @ gg.T).float().cpu()
    by_n = {}
    top1 = sims.argmax(1)
    for n in range(1, 5):
        qs = [i for i in range(n_scenes) if len(scenes[i].objects) == n]
        if qs:
            by_n[str(n)] = round(float(np.mean([keys[int(top1[i])] == keys[i] for i in qs])), 4)
    return {"pseudo_r1": round(r_at(sims, 1), 4), "pseudo_r5": round(r_at(sims, 5), 4),
            "pseudo_r1_by_objects": by_n, "image_to_image_r1": round(r_at(img, 1), 4), "n_scenes": n_scenes,
            "prompt": prompt}
