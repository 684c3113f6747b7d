"""Where the files shipped beside the code live: assets (phrase sets, prompt templates,
shapes-CLIP) and recipes.

Installed, they are the packages `cirgen_assets` and `cirgen_recipes` (mapped from the top-level
`assets/` and `recipes/` folders); in a source checkout those packages may not be importable, so
fall back to the folders themselves.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def shipped_folder(package: str, folder: str) -> Path:
    """The folder of a data package (`cirgen_assets`, `cirgen_recipes`), installed or in the checkout.

    `folder` is the checkout's top-level folder the package is mapped from (`assets`, `recipes`).
    """
    try:
        root = Path(importlib.import_module(package).__file__).resolve().parent
        if root.is_dir():
            return root
    except ImportError:
        pass
    return Path(__file__).resolve().parents[2] / folder


def assets_root() -> Path:
    """The shipped assets folder (phrase sets, prompt templates, shapes-CLIP weights)."""
    return shipped_folder("cirgen_assets", "assets")


def asset_path(*parts: str) -> Path:
    """A shipped asset by its parts below `assets/`; FileNotFoundError if it is not shipped."""
    path = assets_root().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"shipped asset not found: {path}")
    return path
