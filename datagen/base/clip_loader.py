"""The one CLIP loader of the project: open_clip names/tags, local checkpoints, `shapes-clip`.

Filters (datagen) need CLIP first; `cir` wraps what this returns. Nothing here touches the
network unless the caller asks for a hub tag, and weights are loaded with safetensors or
`torch.load(weights_only=True)` (open_clip's default) only.

shapes-CLIP weights are stored compactly: of the 49,408-row token table only the rows that
training changed are kept (`token_embedding.rows` / `token_embedding.values`); every other row is
regenerated exactly from the seed recorded in the file (`token_init_seed`, N(0, 0.02) from a CPU
`torch.Generator`), which is how training initialised it. Training keeps the token table out of
weight decay, so untouched rows are still exactly at that initialisation.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from .errors import InputError, InputNotFound, MachineError, os_error_line

SHAPES_CLIP = "shapes-clip"
# Missing weights named like a file (or a path) are a missing file, not an open_clip tag to look up.
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
TOKEN_INIT_STD = 0.02


@dataclass
class LoadedClip:
    """What `load_clip` returns: the model (eval mode, on the requested device), its transforms and tokenizer."""

    model: "object"                 # open_clip.CLIP
    preprocess: Callable            # PIL image -> tensor (eval transform)
    tokenizer: Callable             # list[str] -> LongTensor [n, context_length]
    name: str
    weights_id: str                 # content hash of the weights ("random" when none)


EXTRA_CONFIGS_ENV = "CIRGEN_MODEL_CONFIGS"   # folders of extra open_clip configs (os.pathsep-separated)


def _register_shapes_config() -> None:
    """Register shapes-clip (assets/shapes_clip/shapes-clip.json) with open_clip, and the
    architecture configs of any folder named in $CIRGEN_MODEL_CONFIGS (experiments such as the
    shapes-CLIP sweep in tests/bench/shapes_clip_sweep/ keep their variants out of the package)."""
    import open_clip

    from .assets import asset_path

    if SHAPES_CLIP not in open_clip.list_models():
        open_clip.add_model_config(asset_path("shapes_clip"))
    for folder in filter(None, os.environ.get(EXTRA_CONFIGS_ENV, "").split(os.pathsep)):
        open_clip.add_model_config(folder)


def init_token_table(vocab_size: int, width: int, seed: int):
    """The initial token table, float32 [vocab_size, width]: N(0, `TOKEN_INIT_STD`=0.02) drawn from a CPU
    `torch.Generator` seeded with `seed` (how shapes-CLIP training initialised it), reproducible exactly."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(vocab_size, width, generator=g) * TOKEN_INIT_STD


def compact_state_dict(state: dict, token_init_seed: int, dtype=None) -> tuple[dict, dict]:
    """Split the token table into (trained rows, their ids); return (tensors, metadata).

    `state["token_embedding.weight"]` [vocab, width] becomes `token_embedding.rows` int64 [k] (rows differing
    from `init_token_table(vocab, width, token_init_seed)`) and `token_embedding.values` [k, width]; all tensors
    move to CPU, floating ones cast to `dtype` when given. Metadata values are strings (safetensors metadata).
    Raises KeyError when `state` has no `token_embedding.weight`.
    """
    import torch

    table = state["token_embedding.weight"].detach().float().cpu()
    init = init_token_table(table.shape[0], table.shape[1], token_init_seed)
    rows = torch.nonzero((table != init).any(dim=1)).flatten()
    out = {k: v.detach().cpu().contiguous() for k, v in state.items() if k != "token_embedding.weight"}
    out["token_embedding.rows"] = rows.to(torch.int64)
    out["token_embedding.values"] = table[rows].contiguous()
    if dtype is not None:
        out = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in out.items()}
    meta = {"token_init_seed": str(int(token_init_seed)), "vocab_size": str(table.shape[0]),
            "format": "cirgen-compact-clip-v1"}
    return out, meta


def expand_state_dict(tensors: dict, meta: dict) -> dict:
    """Inverse of `compact_state_dict`: rebuild `token_embedding.weight` [vocab_size, width] from the seed in
    `meta` plus the stored rows, and cast floating tensors to float32. A full (non-compact) state dict is
    returned unchanged. Raises KeyError when compact tensors come without `vocab_size`/`token_init_seed`."""
    if "token_embedding.rows" not in tensors:
        return tensors
    values = tensors["token_embedding.values"].float()
    table = init_token_table(int(meta["vocab_size"]), values.shape[1], int(meta["token_init_seed"]))
    table[tensors["token_embedding.rows"].long()] = values
    out = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()
           if not k.startswith("token_embedding.")}
    out["token_embedding.weight"] = table
    return out


def file_hash(path: str | Path) -> str:
    """Content hash of a file (first 16 hex digits of SHA-256); remembered per (path, inode, size, mtime,
    ctime), since study keys ask for the hash of the same (possibly GB-sized) weights file once per cell.
    Raises OSError (e.g. FileNotFoundError) when `path` cannot be read."""
    st = Path(path).stat()
    return _file_hash(str(Path(path).resolve()), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


@lru_cache(maxsize=64)
def _file_hash(path: str, version: tuple) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_weights_file(model, path: str | Path) -> None:
    """Load a safetensors (compact or full) or weights-only torch checkpoint into `model`.

    A `state_dict` entry of a checkpoint dict is used when present, and `module.` prefixes are dropped.
    Raises MachineError when the file cannot be read (OS error); InputError when it is not a readable
    safetensors file / weights-only checkpoint, not a state dict, or its keys or shapes do not match `model`
    (the message names the first mismatch and the counts).
    """
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except OSError as e:
            raise MachineError(os_error_line(e, path)) from None
        except SafetensorError as e:
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None
        state = expand_state_dict(tensors, meta)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except OSError as e:
            raise MachineError(os_error_line(e, path)) from None
        except Exception as e:                  # noqa: BLE001 - pickle/zip/torch raise many types
            raise InputError(f"{path}: not a weights file (.safetensors, or a torch checkpoint that "
                             f"loads with weights_only=True; {type(e).__name__})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise InputError(f"{path}: not a state dict ({type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if bad or missing or unexpected:
        detail = (f"shape mismatch at {bad[0]!r} ({tuple(state[bad[0]].shape)} in file, "
                  f"{tuple(own[bad[0]].shape)} in model)" if bad else
                  f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}")
        raise InputError(f"{path}: checkpoint does not fit this architecture: {detail} "
                         f"({len(bad)} mismatched, {len(missing)} missing, {len(unexpected)} unexpected)")
    model.load_state_dict(state)


def shipped_weights() -> Path:
    """Path of the shipped shapes-CLIP weights, `assets/shapes_clip/shapes-clip.safetensors`.

    The file may be absent (a checkout without the weights): callers say so in their own words
    (the CLIP filter: how to train them; the loader: InputNotFound naming the path)."""
    from .assets import assets_root

    return assets_root() / "shapes_clip" / "shapes-clip.safetensors"


class _QuietRandomInit(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" whenever it builds an
    architecture without a tag, which is how every local weights file is loaded (weights follow)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_architecture(name: str, device: str = "cpu"):
    """open_clip's model and preprocess for architecture `name` with random weights, quietly."""
    import open_clip

    _register_shapes_config()
    quiet, root = _QuietRandomInit(), logging.getLogger()
    root.addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device=device)
    finally:
        root.removeFilter(quiet)
    return model, preprocess


def _weights_source(name: str, pretrained: str | None) -> str | None:
    return str(shipped_weights()) if name == SHAPES_CLIP and pretrained is None else pretrained


def _looks_like_path(source: str) -> bool:
    """A missing file given as weights (not an open_clip tag such as `openai` or `hf-hub:org/x`)."""
    return not source.startswith("hf-hub:") and ("/" in source or Path(source).suffix in WEIGHT_SUFFIXES)


def weights_identity(name: str = SHAPES_CLIP, pretrained: str | None = None, random_init: bool = False) -> str:
    """What `load_clip(...).weights_id` will be, without building the model: a local file's content
    hash, `name:tag` for an open_clip tag, "random" for random weights. The study keys its outputs
    by it, so new weights under the same name redo them."""
    source = None if random_init else _weights_source(name, pretrained)
    if source is None:
        return "random"
    return file_hash(source) if Path(source).exists() else f"{name}:{source}"


def load_clip(name: str = SHAPES_CLIP, pretrained: str | None = None, device: str = "cpu",
              random_init: bool = False) -> LoadedClip:
    """Load a CLIP by open_clip model name.

    - `shapes-clip`: the shipped offline weights (or `pretrained` = a local weights file).
    - any open_clip architecture with `pretrained` = a tag (may download) or a local file.
    - `random_init=True`: the architecture with random weights (tests, benchmarks).

    Local weights and random weights are built on CPU with torch seed 0 (so every process builds the same
    random model), then moved to `device` in eval mode. Raises InputNotFound when `pretrained` looks like a
    path (has a `/` or a weights suffix, not `hf-hub:`) but does not exist; `load_weights_file`'s errors
    (InputError, MachineError) for a bad local file; open_clip's own errors for an unknown name or tag.
    """
    import open_clip

    import torch

    source = None if random_init else _weights_source(name, pretrained)
    if source is not None and not Path(source).exists() and _looks_like_path(source):
        raise InputNotFound(f"{source}: weights file not found")
    if source is not None and not Path(source).exists():      # an open_clip pretrained tag
        _register_shapes_config()
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=source, device="cpu")
    else:
        # Random weights are seeded so that every process (workers, a later load_run) builds the same model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, preprocess = create_architecture(name)
        if source is not None:
            load_weights_file(model, source)
    weights_id = weights_identity(name, pretrained, random_init)
    model = model.to(device).eval()
    return LoadedClip(model, preprocess, open_clip.get_tokenizer(name), name, weights_id)

