"""Recipe loading for every recipe kind: a shipped name or a path, `--set key=value` overrides,
then the kind's dataclass (`datagen.base.config.from_dict` checks every key and type).

Recipes are YAML files in `recipes/<kind>/` (gen, train, study, eval); each package defines the
dataclasses of its own kinds and loads them through `load_recipe`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .assets import shipped_folder
from .config import ConfigError, apply_overrides, from_dict, read_yaml


# Fields that describe a recipe and never change what it computes: identities leave them out.
PROSE_FIELDS = ("name", "description", "expected_cost")


@dataclass(kw_only=True)
class RecipeProse:
    """What every recipe kind says about itself besides `kind` and `name` (whose defaults differ
    per kind): `description` (what it is for) and `expected_cost` (a measured cost, with where it
    was measured). Neither is part of a run's identity (`PROSE_FIELDS`)."""
    description: str = ""
    expected_cost: str = ""


def recipes_root() -> Path:
    """The shipped recipes folder (`recipes/` in a checkout, `cirgen_recipes` installed)."""
    return shipped_folder("cirgen_recipes", "recipes")


def resolve_recipe_path(name_or_path: str, kind: str) -> Path:
    """A path as given, or a shipped recipe by name (`shapes-high` -> recipes/gen/shapes-high.yaml).

    A name ending in .yaml/.yml, or an existing path, is a path. Raises ConfigError for a .yaml path that
    does not exist, or a name with no shipped recipe of `kind` (the message lists the known names)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"{p}: recipe file not found")
        return p
    shipped = recipes_root() / kind / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    known = sorted(q.stem for q in (recipes_root() / kind).glob("*.yaml"))
    raise ConfigError(f"no recipe named {name_or_path!r} in recipes/{kind}/ (known: {', '.join(known)})")


def load_recipe(cls, name_or_path: str, folder: str, overrides: list[str] | None = None):
    """Any recipe dataclass from a shipped name (recipes/<folder>/) or a path, with overrides.

    Raises ConfigError (naming the file) for a missing recipe, unreadable or malformed YAML, a bad
    override, an unknown key, a wrong type or a value the dataclass's `validate()` refuses."""
    path = resolve_recipe_path(name_or_path, folder)
    data = apply_overrides(read_yaml(path), list(overrides or []))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
