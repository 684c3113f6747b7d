"""Shared tail of every benchmark script: the machine it ran on, then the result as JSON on stdout
and in --json."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine(**extra) -> dict:
    """Where a measurement was taken: CPU count, load average (this project's machines are shared,
    so a number without its load says little), Python and platform, plus a bench's own `extra`."""
    return {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "platform": platform.platform(), **extra}


def emit(result: dict, json_out: str | None) -> dict:
    """Print `result` (with `machine()` added when the bench gave none) as JSON; also write it to
    `json_out` when given. Returns the result."""
    result.setdefault("machine", machine())
    text = json.dumps(result, indent=2)
    print(text)
    if json_out:
        Path(json_out).write_text(text + "\n")
    return result
