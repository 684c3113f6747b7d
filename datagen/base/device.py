"""One place that turns a recipe's `device` string into a `torch.device`.

`auto` means the CUDA device when torch sees one, else the CPU; `cpu`, `cuda`, `cuda:N`, `mps` and
`meta` are taken as given once checked. A device that was named but cannot be had is a user error
(`DeviceError`, one line), not a torch assertion deep inside a model load. torch is imported when
a name is resolved, so importing this module stays light.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .errors import CirgenError

if TYPE_CHECKING:
    import torch

DEVICE_NAMES = "auto, cpu, cuda, cuda:N, mps or meta"
_NAME = re.compile(r"auto|cpu|meta|mps|cuda(:\d+)?")


class DeviceError(CirgenError, ValueError):
    """A device name that is not one cirgen knows, or a named device this machine does not have."""


def check_device_name(name: object) -> str:
    """`name` if it is a device name `resolve_device` accepts (no torch needed); DeviceError else."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise DeviceError(f"device {name!r}: expected {DEVICE_NAMES}")
    return name


def wants_cuda(name: str) -> bool:
    """Whether running on `name` needs a CUDA GPU on this machine: an explicit `cuda`/`cuda:N`,
    or `auto` where torch sees one (without torch installed, `auto` is the CPU). Raises DeviceError
    for a name `check_device_name` rejects."""
    check_device_name(name)
    if name.startswith("cuda"):
        return True
    if name != "auto":
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_device(name: str) -> "torch.device":
    """The `torch.device` for a recipe's device name.

    `auto` -> `cuda` when available, else `cpu`. Raises DeviceError (one line) for an unknown name,
    for `cuda`/`cuda:N` when torch sees no such CUDA device, and for `mps` when it is unavailable."""
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
            raise DeviceError(f"device {name!r} requested but torch sees no CUDA device "
                              f"(torch {torch.__version__}, {build}); use device auto or cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} requested but torch sees {torch.cuda.device_count()} "
                              f"CUDA device(s)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("device 'mps' requested but torch has no usable MPS backend; use auto or cpu")
    return torch.device(name)


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def resolve_dtype(name: str, device: "str | torch.device") -> "torch.dtype":
    """The compute dtype for a model on `device` (the one rule for LLMs and diffusion models).

    `auto`: bfloat16 on a CUDA GPU that supports it (no float16 overflow), else float16 on CUDA,
    float32 elsewhere; or a name (float32/fp32, bfloat16/bf16, float16/fp16). ValueError for
    another name."""
    import torch

    if name == "auto":
        if not str(device).startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r}: expected auto, float32, bfloat16 or float16")
    return getattr(torch, _DTYPES[name])
