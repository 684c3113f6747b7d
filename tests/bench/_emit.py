"""Shared tail of every benchmark script: print the result as JSON and write it to --json."""
from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, json_out: str | None) -> dict:
    text = json.dumps(result, indent=2)
    print(text)
    if json_out:
        Path(json_out).write_text(text + "\n")
    return result
