"""Dataclass configs from YAML: strict keys, dotted overrides, a stable hash.

Every recipe in the project (generation here, training and evaluation in `cir`) is a tree of
dataclasses built by `from_dict`, so an unknown or misspelled key is an error that names its
dotted path and the file, never a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import CirgenError

T = TypeVar("T")


class ConfigError(CirgenError, ValueError):
    """A recipe or config that cannot be used; the message names the file and the key."""


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp, where: str):
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: must not be empty")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-8` (no dot) as text; take it as the number it is meant to be.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, bool):
            # YAML 1.1 reads off/on/no/yes as booleans: `--set hard_negatives.kind=off` means "off".
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def at_least(lo: float, default: Any) -> Any:
    """A dataclass field with `default` whose value `from_dict` refuses below `lo` (the bound is
    data on the field, so a config class needs no `validate` for it)."""
    return dataclasses.field(default=default, metadata={"min": lo})


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys are errors.

    Values are coerced to the field types (nested dataclasses, lists, tuples, dicts, Literals, numbers; a
    float given as text such as `1e-8` is read as a number; a bool for a str field becomes "on"/"off"), then
    the object's `validate()` runs if it has one. Raises ConfigError naming the dotted key `where.name` for an
    unknown key, a wrong type, an empty (None) non-optional value, a value below its field's `at_least`
    bound, a missing required field, or a ValueError from `validate()`.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key {key!r} (known here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
        lo = fields[name].metadata.get("min")
        if lo is not None and kwargs[name] is not None and kwargs[name] < lo:
            raise ConfigError(f"{key}: must be >= {lo}, got {value!r}")
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{where or cls.__name__}: {e}") from None
    return obj


def to_dict(obj) -> dict:
    """Dataclass `obj` as plain JSON types (nested dicts and lists; tuples become lists) via a JSON round trip.
    Raises TypeError when a field holds something JSON cannot encode."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in place; returns `data`.

    Missing or null sections on the path are created. Raises ConfigError when an item has no `=`, the value
    is not valid YAML, or a part of the path names a value that is not a section.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """The YAML mapping in file `path`. Raises ConfigError when the file cannot be read, is malformed YAML
    (with the line when known), or its top level is not a mapping."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{line} malformed YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level")
    return data


def stable_hash(data: Any, length: int = 16) -> str:
    """First `length` hex digits of SHA-256 over `data` as canonical JSON (sorted keys, no spaces, `str()` for
    non-JSON values)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
