"""The CIR model: CLIP + stage-I mapping (+ stage-II composer), saved as a run folder.

Inference: query text `a photo of * that {modification}`; the template's `*` position takes the
pseudo-word token made from the reference image (a `*` inside the modification text stays text);
the text encoder (with VSI and the composer) encodes it; the gallery is frozen CLIP image
embeddings; cosine similarity.

A run folder holds `model.json` (what to build: CLIP name/weights, mapping and composer configs)
and `model.safetensors` (the trained weights: mapping, composer, and text tower for full
fine-tuning). `load_run(path)` rebuilds it and implements the evaluation harness's interface.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from datagen.base.errors import InputError, InputNotFound
from datagen.base.io import read_json, write_atomic, write_atomic_with

from .adapters import ComposeConfig, Composer
from .clip import CIRClip
from .mapping import Mapping, MappingConfig
from .prompts import QueryPrompt

MODEL_FORMAT = "cirgen-cir-model-v2"      # v2: TSCIR modules (v1 runs were cirgen's first design)
DEFAULT_PROMPT = "a photo of *"          # stage I prompt and the map query of stage II (released)


class CIRModel(nn.Module):
    """Frozen CLIP + the stage I `Mapping` + an optional stage II `Composer`: what a run folder
    holds. `clip_spec` (`name`, `pretrained`, ...) is what `model.json` records to reload CLIP."""

    def __init__(self, clip: CIRClip, mapping_cfg: MappingConfig, compose_cfg: ComposeConfig | None = None,
                 clip_spec: dict | None = None):
        super().__init__()
        self.clip = clip.freeze()
        n_blocks = len(clip.clip.transformer.resblocks)
        self.mapping = Mapping(clip.embed_dim, clip.text_width, clip.vision_width, n_blocks, mapping_cfg)
        self.composer = Composer(clip.clip, compose_cfg) if compose_cfg is not None else None
        self.clip_spec = clip_spec or {"name": clip.name, "pretrained": None}
        self.cache_root: str | None = None

    @property
    def n_tokens(self) -> int:
        """Pseudo-word tokens per image (`MappingConfig.n_tokens`)."""
        return self.mapping.cfg.n_tokens

    @property
    def uses_patches(self) -> bool:
        """Whether queries need the reference images' visual tokens (the model has VSI)."""
        return self.mapping.vsi is not None

    @property
    def device(self) -> torch.device:
        """Where the trained modules (and, as built by `load_run`/stage I, CLIP) live; queries run here."""
        return next(self.mapping.parameters()).device

    def add_composer(self, cfg: ComposeConfig) -> None:
        """Attach a new stage II `Composer` built from `cfg` on this model's CLIP text tower."""
        self.composer = Composer(self.clip.clip, cfg)

    def encode_query(self, image_global: torch.Tensor, patches: torch.Tensor | None,
                     prompts: Sequence[QueryPrompt | str], use_composer: bool = True,
                     where: Sequence[str] | None = None) -> torch.Tensor:
        """Normalised composed-query features [B, D].

        image_global: [B, D] reference embeddings (normalised); patches: [B, P, vision_width]
        reference visual tokens (needed when the model has VSI, else None); prompts: one
        `QueryPrompt` (or a template string without `{}`, e.g. `a photo of *`) per row.
        Features may be on any device (the feature cache gives CPU tensors): they are moved to
        the model's (`device`), and so is the result.
        D is CLIP's embedding dimension (`CIRClip.embed_dim`).
        Errors: `PromptError` naming `where[i]` when a placeholder falls outside the context;
        ValueError when the model has VSI and `patches` is None."""
        clip = self.clip
        dev = self.device
        tokens, ph_index = clip.tokenize_queries(prompts, self.n_tokens, where)   # CPU; encode_text moves them
        pseudo = self.mapping.token_learner(image_global.to(dev, non_blocking=True))
        hooks = []
        if self.mapping.vsi is not None:
            if patches is None:
                raise ValueError("this model uses VSI and needs the reference images' visual tokens")
            hooks.append(self.mapping.vsi.hook(patches.to(dev, non_blocking=True)))
        if use_composer and self.composer is not None:
            hooks.append(self.composer.hook)
        return clip.encode_text(tokens, pseudo=pseudo, placeholder_index=ph_index, hooks=hooks, normalize=True)

    # ------------------------------------------------------------ persistence
    def trained_state(self) -> dict[str, torch.Tensor]:
        """The weights a run saves, as detached contiguous CPU tensors: `mapping.*`, and
        `composer.*` (low-rank, bottleneck, lora) or, for `full`, the text tower's `clip.*`."""
        return {k: v.detach().cpu().contiguous() for k, v in self._trained_tensors().items()}

    def _trained_tensors(self) -> dict[str, torch.Tensor]:
        """`trained_state`'s keys and the live tensors behind them (no copy)."""
        state = {f"mapping.{k}": v for k, v in self.mapping.state_dict().items()}
        if self.composer is not None:
            if self.composer.cfg.mode == "full":
                keep = {id(p) for p in self.composer.text_params}
                state.update({f"clip.{k}": v for k, v in self.clip.clip.state_dict(keep_vars=True).items()
                              if id(v) in keep})
            else:
                state.update({f"composer.{k}": v for k, v in self.composer.state_dict().items()})
        return state

    def save(self, run: str | Path, extra: dict | None = None) -> Path:
        """Write `run/model.safetensors` (`trained_state`) and `run/model.json` (format, CLIP spec
        and weights id, mapping and composer configs, plus `extra`), each atomically; the folder is
        created. Returns `run`. Errors: MachineError naming the file when a write fails."""
        from safetensors.torch import save_file

        run = Path(run)
        run.mkdir(parents=True, exist_ok=True)
        meta = {"format": MODEL_FORMAT, "clip": self.clip_spec, "clip_weights_id": self.clip.weights_id,
                "mapping": asdict(self.mapping.cfg),
                "composer": asdict(self.composer.cfg) if self.composer is not None else None, **(extra or {})}
        state = self.trained_state()
        write_atomic_with(run / "model.safetensors", lambda p: save_file(state, str(p)))
        write_atomic(run / "model.json", json.dumps(meta, indent=2, sort_keys=True))
        return run

    def load_trained(self, path: str | Path) -> None:
        """Load a `model.safetensors` written by `save` into this model (built with the same configs).

        The file must hold exactly `trained_state`'s keys (for full fine-tuning: the text tower's
        trained weights, never the image tower's). Errors: InputError for a key this configuration
        does not have, a key it needs that the file lacks, or a tensor whose shape differs."""
        from safetensors.torch import load_file

        state = load_file(str(path))
        own = self._trained_tensors()
        for k, v in state.items():
            if k not in own:
                raise InputError(f"{path}: unexpected key {k!r} for this model configuration")
            if own[k].shape != v.shape:
                raise InputError(f"{path}: key {k!r} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
        missing = sorted(set(own) - set(state))
        if missing:
            raise InputError(f"{path}: {len(missing)} weight(s) this model configuration needs are missing "
                             f"(first: {missing[0]!r})")
        self.mapping.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("mapping.")})
        if self.composer is not None and self.composer.cfg.mode != "full":
            self.composer.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("composer.")})
        clip_part = {k[5:]: v for k, v in state.items() if k.startswith("clip.")}
        if clip_part:
            self.clip.clip.load_state_dict(clip_part, strict=False)


def load_run(path: str | Path, device: "str | torch.device" = "auto", use_composer: bool = True) -> "RunModel":
    """Rebuild the trained model of run folder `path` on `device` (a name for
    `datagen.base.device.resolve_device`: auto = the GPU when there is one; an explicit `cuda`
    this machine lacks is a `DeviceError`). `use_composer=False` evaluates the stage I model.
    Errors: InputNotFound when `path` has no `model.json`; ConfigError when its format is not
    `MODEL_FORMAT` or a config in it is invalid; InputError when CLIP loads other weights than the
    run was trained on, or (`load_trained`) the weights do not fit the configuration."""
    from datagen.base.device import resolve_device
    from datagen.base.config import ConfigError, from_dict

    device = device if isinstance(device, torch.device) else resolve_device(device)
    path = Path(path)
    meta_path = path / "model.json"
    if not path.is_dir():
        raise InputNotFound(f"{path}: no such run folder")
    if not meta_path.exists():
        raise InputNotFound(f"{path}: not a cirgen model run (no model.json)")
    meta = read_json(meta_path, dict, ConfigError, "a cirgen model description")
    if meta.get("format") != MODEL_FORMAT:
        raise ConfigError(f"{meta_path}: format {meta.get('format')!r}; this cirgen reads {MODEL_FORMAT!r} "
                          "(retrain the run with this version)")
    clip = CIRClip.load(meta["clip"]["name"], meta["clip"].get("pretrained"), device,
                        random_init=meta["clip"].get("random_init", False))
    if meta.get("clip_weights_id") not in (None, clip.weights_id):
        raise InputError(f"{path}: trained on CLIP weights {meta['clip_weights_id']}, "
                         f"but {meta['clip']['name']} loads {clip.weights_id}")
    model = CIRModel(clip, from_dict(MappingConfig, meta["mapping"]),
                     from_dict(ComposeConfig, meta["composer"]) if meta.get("composer") else None, meta["clip"])
    model.load_trained(path / "model.safetensors")
    return RunModel(model.to(device).eval(), name=path.name, use_composer=use_composer)


class RunModel:
    """A trained model behind the evaluation harness's interface (paths in, features out)."""

    def __init__(self, model: CIRModel, name: str, use_composer: bool = True,
                 cache_root: str | None = None):
        from .features import FeatureCache

        self.model = model
        self.name = name
        self.use_composer = use_composer
        self.cache = FeatureCache(model.clip, cache_root)
        self.cache_key = f"{name}:{self.cache.model_key}"

    def _features(self, paths: list[Path], patches: bool):
        from .data import open_image

        # Keyed on the files' content (not their path strings): another copy of a benchmark, or
        # images replaced in place, get their own features.
        return self.cache.files_features(paths, lambda i: open_image(paths[i], str(paths[i])), patches=patches)

    def prompt_problems(self, prompts: list[QueryPrompt | str]) -> dict[int, str]:
        """{index: why} for prompts this model cannot encode as written: the text before the
        placeholder pushes it past the tokenizer's context length (text after it is cut, as
        open_clip cuts any text)."""
        clip = self.model.clip
        fits = clip.placeholder_fits(prompts, self.model.n_tokens)
        return {i: f"the text pushes the pseudo-word placeholder past the {clip.context_length}-token text context"
                for i, ok in enumerate(fits) if not ok}

    @torch.no_grad()
    def encode_images(self, paths: list[Path]) -> torch.Tensor:
        """[N, D] float32 L2-normalised CLIP image embeddings of `paths` on the CPU, from the
        feature cache (keyed on file content). Errors: the loader's ValueError (e.g. `ImageError`)
        naming a file that cannot be read or decoded."""
        f = self._features(paths, patches=False)
        return torch.from_numpy(f.global_.copy())

    @torch.no_grad()
    def encode_queries(self, ref_paths: list[Path], prompts: list[str], batch_size: int = 256) -> torch.Tensor:
        """[Q, D] float32 L2-normalised composed-query features on the CPU (beside
        `encode_images`'), one per (reference path, prompt); `batch_size` queries per text pass.
        Each batch of cached reference features goes to the model's device for the text pass.
        Errors: as `encode_images` and `CIRModel.encode_query`."""
        f = self._features(ref_paths, patches=self.model.uses_patches)
        out = []
        for s in range(0, len(prompts), batch_size):
            g, p = f.tensors(slice(s, s + batch_size))
            q = self.model.encode_query(g, p, prompts[s:s + batch_size], use_composer=self.use_composer)
            out.append(q.float().cpu())
        return torch.cat(out)
