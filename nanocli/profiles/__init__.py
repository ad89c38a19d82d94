"""Profiles: the YAML data under ``profiles/`` as typed, validated dataclasses.

``nanocli/profiles/models/<name>.yaml`` describes a model (``config:`` holds the Hugging Face ``config.json``
fields), ``profiles/gpus/<name>.yaml`` a GPU's memory, bandwidth and bf16 rate. Every problem is a
``ProfileError`` whose one-line message names the file, the field and what to do.
YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nanocli_model.config import NanoConfig
from nanocli_model.errors import ConfigError
from nanocli_model.memory import param_count

MODEL_KEYS = {"name": str, "description": str, "source": str, "params": int, "config": dict}
MODEL_OPTIONAL = {"source", "params"}
GPU_KEYS = {"name": str, "description": str, "memory_gib": float, "framework_overhead": float,
            "reserved_gib": float, "bandwidth_gbs": float, "bf16_tflops": float}
_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", dict: "a mapping"}
# YAML 1.1 (PyYAML) reads ``1e-5`` or ``1.0e5`` as a string; only ``1.0e-5`` / ``1.0e+5`` are floats.
_EXPONENT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ProfileError(ConfigError):
    """A profile YAML that is missing, malformed, or disagrees with itself."""


@dataclass(frozen=True)
class ModelProfile:
    """A named model architecture: ``config`` is the validated ``NanoConfig``."""

    name: str
    description: str
    source: str | None
    params: int | None  # declared parameter count; when given it equals memory.param_count(config).total
    config: NanoConfig
    path: Path


@dataclass(frozen=True)
class GpuProfile:
    """A GPU: what it holds and how fast it moves and multiplies numbers."""

    name: str
    description: str
    memory_gib: float  # memory the CUDA runtime reports as total
    framework_overhead: float  # share of memory kept for the serving framework / CUDA context
    reserved_gib: float  # memory set aside for other models on the same GPU
    bandwidth_gbs: float
    bf16_tflops: float
    path: Path

    @property
    def budget_gib(self) -> float:
        """Memory left for weights + caches: memory * (1 - overhead) - reserved (A10G: 19.66 GiB)."""
        return self.memory_gib * (1.0 - self.framework_overhead) - self.reserved_gib


# ---------------------------------------------------------------------------- finding files
def profiles_dir() -> Path:
    """The profiles folder: ``$NANO_PROFILES_DIR`` if set, else the package's own (``nanocli/profiles/``, shipped
    in the wheel as package data)."""
    override = os.environ.get("NANO_PROFILES_DIR")
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent


def profile_names(kind: str) -> list[str]:
    """Names (file stems) of the profiles of one kind: ``models``, ``gpus`` or ``recipes``."""
    folder = profiles_dir() / kind
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _resolve(name_or_path: str | Path, kind: str) -> Path:
    """A profile name (looked up in ``profiles/<kind>/``) or a path to a YAML file."""
    text = str(name_or_path)
    as_path = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or os.sep in text or as_path.is_file():
        if not as_path.is_file():
            raise ProfileError(f"{as_path}: no such profile file")
        return as_path
    path = profiles_dir() / kind / f"{text}.yaml"
    if not path.is_file():
        raise ProfileError(f"unknown {kind[:-1]} profile {text!r}; available: {known_names(kind)} "
                           f"(or give a path to a .yaml file; looked in {path.parent})")
    return path


# ---------------------------------------------------------------------------- reading + checking
def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot be read ({e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ProfileError(f"{path}: not valid YAML ({where}{problem}); fix the syntax") from None
    except RecursionError:
        raise ProfileError(f"{path}: not valid YAML (nested too deeply); fix the file") from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else type(raw).__name__
        raise ProfileError(f"{path}: expected a mapping of keys (name:, description:, ...), got {got}")
    return raw


def _check_fields(raw: dict[str, Any], spec: dict[str, type], optional: set[str], path: Path) -> None:
    unknown = sorted(set(raw) - set(spec), key=str)
    if unknown:
        raise ProfileError(f"{path}: unknown key(s) {unknown}; allowed: {', '.join(spec)}")
    for key, want in spec.items():
        if key not in raw or raw[key] is None:
            if key in optional:
                continue
            raise ProfileError(f"{path}: missing field {key!r}; add it ({_TYPE_WORDS[want]})")
        value = raw[key]
        ok = isinstance(value, want) and not isinstance(value, bool)
        if want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ProfileError(f"{path}: field {key!r} must be {_TYPE_WORDS[want]}, got {value!r}")
    if not raw["name"].strip():
        raise ProfileError(f"{path}: field 'name' is empty; use the file name ({path.stem!r})")
    if raw["name"] != path.stem:
        raise ProfileError(f"{path}: name {raw['name']!r} differs from the file name; "
                           f"rename one so both read {path.stem!r}")


def load_model_profile(name_or_path: str | Path) -> ModelProfile:
    """Load and validate a model profile by name (``profiles/models/<name>.yaml``) or path."""
    path = _resolve(name_or_path, "models")
    raw = _read_mapping(path)
    _check_fields(raw, MODEL_KEYS, MODEL_OPTIONAL, path)
    for key, value in raw["config"].items():
        if isinstance(value, str) and _EXPONENT_TEXT.fullmatch(value):
            raise ProfileError(f"{path}: config: {key} is the text {value!r} (YAML reads exponents as numbers "
                               "only when written with a point and a sign); write it like 1.0e-5 or 1.0e+5")
    try:
        config = NanoConfig.from_dict(raw["config"], source=f"{path}: config")
    except ConfigError as e:
        raise ProfileError(str(e)) from None
    declared = raw.get("params")
    if declared is not None:
        actual = param_count(config).total
        if declared != actual:
            raise ProfileError(f"{path}: params is {declared:,} but the config has {actual:,} parameters; "
                               "the declared count must match (fix the config or the params line)")
    return ModelProfile(name=raw["name"], description=raw["description"], source=raw.get("source"),
                        params=declared, config=config, path=path)


def load_gpu_profile(name_or_path: str | Path) -> GpuProfile:
    """Load and validate a GPU profile by name (``profiles/gpus/<name>.yaml``) or path."""
    path = _resolve(name_or_path, "gpus")
    raw = _read_mapping(path)
    _check_fields(raw, GPU_KEYS, set(), path)
    for key in ("memory_gib", "bandwidth_gbs", "bf16_tflops"):
        if raw[key] <= 0:
            raise ProfileError(f"{path}: {key} must be > 0, got {raw[key]!r}")
    if not 0 <= raw["framework_overhead"] < 1:
        raise ProfileError(f"{path}: framework_overhead is a share in [0, 1) (0.05 = 5%), "
                           f"got {raw['framework_overhead']!r}")
    if raw["reserved_gib"] < 0:
        raise ProfileError(f"{path}: reserved_gib must be >= 0, got {raw['reserved_gib']!r}")
    gpu = GpuProfile(**{k: raw[k] for k in GPU_KEYS}, path=path)
    if gpu.budget_gib <= 0:
        raise ProfileError(f"{path}: memory_gib * (1 - framework_overhead) - reserved_gib leaves "
                           f"{gpu.budget_gib:.2f} GiB; lower reserved_gib or framework_overhead")
    return gpu


def no_profiles(kind: str) -> str:
    """Why ``profiles/<kind>/`` lists nothing, and what to do about it."""
    folder = profiles_dir() / kind
    why = "holds no .yaml files" if folder.is_dir() else "is missing"
    what = ("$NANO_PROFILES_DIR points there: unset it or give a folder with models/, gpus/ and recipes/"
            if os.environ.get("NANO_PROFILES_DIR") else "this install of nano is incomplete: reinstall it")
    return f"{folder} {why}; {what}"


def known_names(kind: str) -> str:
    """The profile names of one kind for an error message: ``a, b, c``, or ``none (why)``."""
    names = profile_names(kind)
    return ", ".join(names) if names else f"none ({no_profiles(kind)})"


def shipped_names(kind: str) -> list[str]:
    """``profile_names(kind)``, but a missing or empty folder is a ``ProfileError``: a listing of the shipped
    profiles is never empty (an install without its package data once printed empty tables with exit 0)."""
    names = profile_names(kind)
    if not names:
        raise ProfileError(f"no {kind[:-1]} profiles: {no_profiles(kind)}")
    return names


def list_model_profiles() -> list[ModelProfile]:
    """Every model profile under ``profiles/models/``, sorted by name (a broken one, or none, raises)."""
    return [load_model_profile(n) for n in shipped_names("models")]


def list_gpu_profiles() -> list[GpuProfile]:
    """Every GPU profile under ``profiles/gpus/``, sorted by name (a broken one, or none, raises)."""
    return [load_gpu_profile(n) for n in shipped_names("gpus")]
