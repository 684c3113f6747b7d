"""Where the files shipped beside the code live (phrase sets, prompt templates, shapes-CLIP).

Installed, they are the package `cirgen_assets` (mapped from the top-level `assets/` folder);
in a source checkout that package may not be importable, so fall back to the folder itself.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def assets_root() -> Path:
    try:
        import cirgen_assets

        root = Path(cirgen_assets.__file__).resolve().parent
        if root.is_dir():
            return root
    except ImportError:
        pass
    return Path(__file__).resolve().parents[1] / "assets"


def asset_path(*parts: str) -> Path:
    path = assets_root().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"shipped asset not found: {path}")
    return path
