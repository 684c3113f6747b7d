"""Evaluation of composed image retrieval: FashionIQ, CIRR, CIRCO and the shapes benchmarks.

`protocol` holds every protocol choice that differs between published methods, `benchmarks`
reads the official layouts (with integrity checks), `metrics` scores rankings, `submission`
writes and validates test-server files, `harness` runs a model through all of it and
`baselines` are the CLIP baselines that share the harness. Imports stay light: torch and
open_clip are only pulled in by the modules that need them.
"""
from __future__ import annotations

from datagen.base.errors import CirgenError


class EvalError(CirgenError, ValueError):
    """An evaluation input that cannot be used; the message names the file and the entry."""
