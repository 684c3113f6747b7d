"""CLIP baselines that run in the same harness as the trained models.

- `image-only`: the reference image's feature (ignores the text).
- `text-only`: the prompt with the placeholder removed ("a photo of * that is red" ->
  "a photo of that is red").
- `sum`: normalised image feature + normalised feature of the modification part of the prompt
  (the text after the placeholder and its connective: "is red"), renormalised.

`resolve_model` returns one of these by name, or lazily loads a trained run through
`cir.model.load_run(spec)`. Features are cached in memory per image file version (absolute path,
inode, size, mtime, ctime); the model's `cache_key` records
the CLIP weights and the preprocessing, so the harness can print where the numbers came from.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import torch

from ..prompts import QueryPrompt
from . import EvalError

BASELINES = ("image-only", "text-only", "sum")
Mode = Literal["image-only", "text-only", "sum"]


def strip_placeholder(prompt: "QueryPrompt | str") -> str:
    """The prompt without the placeholder and without the spaces it leaves behind (a `*` or `$`
    in the user's text stays)."""
    text = f"{prompt.prefix} {prompt.suffix}" if isinstance(prompt, QueryPrompt) else prompt
    text = re.sub(r"\s+([,.;:?!])", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def modification_text(prompt: "QueryPrompt | str") -> str:
    """The part of a prompt after the placeholder and its connective ("that", ",", ":"); the whole
    prompt when it has no placeholder."""
    if not isinstance(prompt, QueryPrompt):
        return prompt.strip()
    rest = re.sub(r"^[\s,;:]*(that\b)?[\s,;:]*", "", prompt.suffix)
    return rest.strip() or strip_placeholder(prompt)


def _same(x):
    return x


def targetpad(img, target_ratio: float = 1.25):
    """SEARLE's `targetpad`: pad to a square (black, centred) when the aspect ratio exceeds
    `target_ratio`; images closer to square are left as they are."""
    from PIL import Image

    w, h = img.size
    if max(w, h) / max(min(w, h), 1) < target_ratio:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side))
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


class ClipBaseline:
    """A zero-shot baseline on a loaded CLIP (`datagen.base.clip_loader.LoadedClip`).
    `preprocess`: `clip` or SEARLE's `targetpad` (with `target_ratio`). Errors: ValueError for an
    unknown `mode`."""

    def __init__(self, clip, mode: Mode, preprocess: str = "clip", target_ratio: float = 1.25,
                 batch_size: int = 64, device: str = "cpu"):
        if mode not in BASELINES:
            raise ValueError(f"unknown baseline {mode!r}; expected one of {BASELINES}")
        self.clip, self.mode, self.device = clip, mode, device
        self.preprocess_mode, self.target_ratio, self.batch_size = preprocess, target_ratio, batch_size
        self.name = mode
        pre = preprocess if preprocess == "clip" else f"{preprocess}{target_ratio}"
        self.cache_key = f"{clip.name}@{clip.weights_id}/{pre}"
        self._cache: dict[tuple, torch.Tensor] = {}

    def _load(self, path: Path):
        from datagen.base.images import open_image

        img = open_image(path, str(path))      # ImageError (one line) naming the file
        if self.preprocess_mode == "targetpad":
            img = targetpad(img, self.target_ratio)
        return self.clip.preprocess(img)

    def prompt_problems(self, prompts: list[str]) -> dict[int, str]:
        """{}: the baselines have no placeholder to lose (long text is cut, as open_clip does)."""
        return {}

    @staticmethod
    def _key(p: Path) -> tuple:
        # The file as it is now (absolute path and version), not the path string: the same
        # relative path in another folder, or a file rewritten in place, is read again.
        try:
            st = os.stat(p)
            return (os.path.abspath(p), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            return (os.path.abspath(p),)

    @torch.no_grad()
    def encode_images(self, paths: list[Path]) -> torch.Tensor:
        """[N, D] float32 L2-normalised image embeddings on the CPU, cached in memory per file
        version; no paths give a [0, 0] tensor. Errors: `ImageError` naming a file that cannot be
        read."""
        from ..features import decoded_batches, default_decode_workers

        keys = [self._key(Path(p)) for p in paths]
        todo = [(k, p) for k, p in dict(zip(keys, paths)).items() if k not in self._cache]
        # Decoding and preprocessing in worker processes for large galleries (same pixels, in order).
        batches = decoded_batches(len(todo), lambda i: self._load(Path(todo[i][1])), _same, self.batch_size,
                                  default_decode_workers(len(todo)))
        for s, (x, errors) in zip(range(0, len(todo), self.batch_size), batches):
            for e in errors:
                if e is not None:
                    raise e
            f = self.clip.model.encode_image(x.to(self.device), normalize=True).float().cpu()
            self._cache.update(zip([k for k, _ in todo[s:s + self.batch_size]], f))
        if not keys:
            return torch.empty(0, 0)
        return torch.stack([self._cache[k] for k in keys])

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """[N, D] float32 L2-normalised text embeddings on the CPU (open_clip's tokenizer, cut to
        its context), 256 texts per pass. `texts` must not be empty (torch.cat raises RuntimeError)."""
        feats = []
        for s in range(0, len(texts), 256):
            tokens = self.clip.tokenizer(texts[s:s + 256]).to(self.device)
            feats.append(self.clip.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(feats)

    def encode_queries(self, ref_paths: list[Path], prompts: list[str]) -> torch.Tensor:
        """[Q, D] float32 L2-normalised query features on the CPU, one per (reference, prompt):
        `image-only` the reference's, `text-only` the prompt without its placeholder, `sum`
        normalise(image + modification text) (see the module docstring)."""
        if self.mode == "image-only":
            return self.encode_images(ref_paths)
        if self.mode == "text-only":
            return self.encode_texts([strip_placeholder(p) for p in prompts])
        img = self.encode_images(ref_paths)
        txt = self.encode_texts([modification_text(p) for p in prompts])
        return torch.nn.functional.normalize(img + txt, dim=1)


def resolve_model(spec: str, clip_name: str = "shapes-clip", weights: str | None = None,
                  preprocess: str = "clip", target_ratio: float = 1.25, device: str = "auto"):
    """A baseline by name (`image-only`, `text-only`, `sum`) or a trained run via cir.model.

    `weights`: a local weights file or open_clip tag; None = the default for `clip_name` (the
    shipped shapes-CLIP); "random" = random initialisation (smoke tests).
    `device`: where the model runs (`resolve_device`: auto = the GPU when there is one; an
    explicit cuda this machine lacks is a `DeviceError`).
    Errors: EvalError when the baseline's CLIP weights file is missing, for `preprocess` other
    than `clip` with a trained run, or when the run cannot be loaded (`load_run`'s
    FileNotFoundError and ValueError subclasses, e.g. InputNotFound, ConfigError, InputError).
    """
    from datagen.base.device import resolve_device

    device = resolve_device(device)
    if spec in BASELINES:
        from datagen.base.clip_loader import load_clip

        try:
            clip = load_clip(clip_name, pretrained=None if weights in (None, "random") else weights,
                             device=device, random_init=weights == "random")
        except FileNotFoundError as e:
            raise EvalError(f"{e} (train shapes-CLIP first, pass --weights FILE, or --weights random)") from None
        return ClipBaseline(clip, spec, preprocess, target_ratio, device=device)
    if preprocess != "clip":
        # Trained runs own their preprocessing; do not print a protocol they did not use.
        raise EvalError(f"model {spec!r}: preprocess={preprocess} is implemented for the baselines only")
    import importlib

    try:
        model_mod = importlib.import_module("cir.model")
    except ModuleNotFoundError as e:
        if e.name != "cir.model":
            raise
        raise EvalError(f"model {spec!r}: not a baseline ({', '.join(BASELINES)}) and cir.model "
                        "(trained runs) is not available yet") from None
    try:
        return model_mod.load_run(spec, device)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(f"model {spec!r}: {e}") from None
