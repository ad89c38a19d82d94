"""Recipes: YAML files of stage settings (``nanocli/profiles/recipes/*.yaml``) merged under the command-line flags.

A recipe is a mapping whose keys are the fields of the stage's options dataclass (the same names as
the flags, with ``_`` for ``-``), plus an optional ``stage:`` naming the stage it is for. Precedence:
dataclass defaults < recipe < flags given on the command line. Unknown keys and wrong types are
``ConfigError`` naming the file and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from nanocli_model.errors import ConfigError

from ..profiles import known_names, profiles_dir


def recipe_path(name_or_path: str) -> Path:
    """A recipe name in ``nanocli/profiles/recipes/`` or a path to a YAML file."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"{p}: no such recipe file")
        return p
    found = profiles_dir() / "recipes" / f"{name_or_path}.yaml"
    if not found.is_file():
        raise ConfigError(f"unknown recipe {name_or_path!r}; available: {known_names('recipes')} "
                          "(or give a path to a .yaml file)")
    return found


def read_recipe(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    path = recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML ({where}{getattr(e, 'problem', None) or e}); fix the syntax") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of settings, got {type(raw).__name__}")
    return path, raw


def apply_recipe(options_cls: type, raw: dict[str, Any], path: Path, stage: str) -> dict[str, Any]:
    """Validate ``raw`` against the fields of ``options_cls``; returns the settings as keyword arguments."""
    declared = raw.get("stage")
    if declared is not None and declared != stage:
        raise ConfigError(f"{path}: this is a recipe for `nano {declared}`, not `nano {stage}`")
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    out = {}
    for key, value in raw.items():
        if key in ("stage", "description"):
            continue
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"{path}: unknown setting {key!r}; valid settings: {', '.join(sorted(fields))}")
        out[name] = check_type(value, hints[name], f"{path}: {key}")
    return out


def make_options(options_cls: type, stage: str, recipe: str | None, flags: dict[str, Any]):
    """Defaults < recipe < flags (``flags`` holds only what was given on the command line: None = not given)."""
    return options_cls(**given_settings(options_cls, stage, recipe, flags))


def given_settings(options_cls: type, stage: str, recipe: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    """What the recipe and the flags say, the flags winning (the layer over the defaults, or over a resumed
    run's saved settings)."""
    settings: dict[str, Any] = {}
    if recipe is not None:
        path, raw = read_recipe(recipe)
        settings.update(apply_recipe(options_cls, raw, path, stage))
    settings.update({k: v for k, v in flags.items() if v is not None})
    return settings


def check_type(value: Any, hint: Any, where: str) -> Any:
    """Accept ``value`` for the annotation ``hint`` (int for float is fine; a ``Literal`` takes one of its
    values); otherwise a ConfigError."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and value in allowed:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid value ({_name(hint)})")
    if hint is Any:
        return value
    if origin is typing.Literal:
        if isinstance(value, str) and value in typing.get_args(hint):
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, typing.get_args(hint)))}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    if origin in (list, tuple) and isinstance(value, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        items = [check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
        return items if origin is list else tuple(items)
    if origin is dict and isinstance(value, dict):
        return value
    raise ConfigError(f"{where}: expected {_name(hint)}, got {value!r}")




def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
