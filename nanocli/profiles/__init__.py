"""Profiles: the YAML data under ``profiles/`` as typed, validated dataclasses.

``nanocli/profiles/models/<name>.yaml`` describes a model (``config:`` holds the Hugging Face ``config.json``
fields), ``profiles/gpus/<name>.yaml`` a GPU's memory, bandwidth and bf16 rate. A GPU is found by its file name
or one of its ``aliases``, in any case and spelling of separators (``A10G``, ``rtx4090``); an unknown one gets
"did you mean ...". Every problem is a ``ProfileError`` whose one-line message names the file, the field and
what to do.
YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import difflib
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
GPU_KEYS = {"name": str, "description": str, "aliases": list, "vendor_memory_gb": float, "memory_gib": float,
            "framework_overhead": float, "reserved_gib": float, "reserved_for": str, "bandwidth_gbs": float,
            "bf16": bool, "bf16_tflops": float, "fp16_tflops": float}
# bf16_tflops is required unless bf16 is false (then fp16_tflops is); reserved_for unless reserved_gib is 0.
GPU_OPTIONAL = {"aliases", "vendor_memory_gb", "reserved_for", "bf16", "bf16_tflops", "fp16_tflops"}
_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", dict: "a mapping", bool: "true or false",
               list: "a list"}
_FINITE = 1e15  # above any real figure: refuses inf and integers too large for a float
_SIZE_WORD = re.compile(r"\d+gb")  # the memory size in a GPU profile's name (a100-80gb)
# YAML 1.1 (PyYAML) reads ``1e-5`` or ``1.0e5`` as a string; only ``1.0e-5`` / ``1.0e+5`` are floats.
_EXPONENT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ProfileError(ConfigError):
    """A profile YAML that is missing, malformed, or disagrees with itself."""


class UnknownProfile(ProfileError):
    """A profile name that no file or alias has (the message lists what was likely meant and what there is)."""


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
    bf16_tflops: float | None  # dense bf16 tensor peak; None when the card has no bf16 (bf16 false)
    path: Path
    vendor_memory_gb: float | None = None  # the memory the vendor markets (GB, 10^9 bytes), as on the spec sheet
    reserved_for: str | None = None  # what reserved_gib is kept for (said in fit-check's output)
    bf16: bool = True  # False: no bf16 arithmetic (Turing: T4)
    fp16_tflops: float | None = None  # dense fp16 tensor peak (given for cards without bf16)
    aliases: tuple[str, ...] = ()  # other names --gpu accepts (h100 for h100-80gb)

    @property
    def budget_gib(self) -> float:
        """Memory left for weights + caches: memory * (1 - overhead) - reserved (A10G: 19.66 GiB)."""
        return self.memory_gib * (1.0 - self.framework_overhead) - self.reserved_gib

    @property
    def tensor_tflops(self) -> float:
        """The dense tensor rate training runs at: bf16, or fp16 on a card without bf16."""
        return self.bf16_tflops if self.bf16 else self.fp16_tflops


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


def _is_path(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or os.sep in text or Path(text).expanduser().is_file()


def _resolve(name_or_path: str | Path, kind: str) -> Path:
    """A profile name (looked up in ``profiles/<kind>/``) or a path to a YAML file."""
    text = str(name_or_path)
    as_path = Path(text).expanduser()
    if _is_path(text):
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
        ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
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
    """Load and validate a GPU profile by name (``profiles/gpus/<name>.yaml``), alias or path. Names and aliases
    match in any case and with any separators (``A10G``, ``RTX 4090``, ``rtx4090``)."""
    text = str(name_or_path)
    if _is_path(text) or (profiles_dir() / "gpus" / f"{text}.yaml").is_file():
        return _load_gpu(_resolve(name_or_path, "gpus"))
    gpus = list_gpu_profiles()
    keys = gpu_keys(gpus)
    hit = keys.get(canonical(text))
    if hit is not None:
        return next(g for g in gpus if g.name == hit)
    raise UnknownProfile(unknown_gpu_message(text, keys))


def canonical(text: str) -> str:
    """A GPU name as compared: lower case, letters and digits only (``RTX 4090`` == ``rtx-4090``)."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def gpu_keys(gpus: list[GpuProfile]) -> dict[str, str]:
    """Every canonical name and alias -> the profile's name; an alias that names two profiles is an error."""
    keys: dict[str, str] = {}
    for g in gpus:
        for word in (g.name, *g.aliases):
            key = canonical(word)
            if keys.get(key, g.name) != g.name:
                raise ProfileError(f"{g.path}: {word!r} also names the GPU profile {keys[key]!r}; "
                                   "rename or drop one of them")
            keys[key] = g.name
    return keys


def suggestions(text: str, keys: dict[str, str]) -> tuple[list[str], bool]:
    """Profile names ``text`` may have meant, and whether ``text`` begins each of them (``a100``: both A100s,
    ambiguous); else the close spellings (difflib)."""
    q = canonical(text)
    if not q:
        return [], False
    begun = sorted({name for key, name in keys.items() if key.startswith(q)})
    if begun:
        return begun, len(begun) > 1
    return list(dict.fromkeys(keys[k] for k in difflib.get_close_matches(q, list(keys), n=3, cutoff=0.6))), False


def unknown_gpu_message(text: str, keys: dict[str, str]) -> str:
    """``unknown gpu profile 'x'; did you mean ...? available: ...``: one line."""
    guess, ambiguous = suggestions(text, keys)
    head = f"gpu profile {text!r} is ambiguous" if ambiguous else f"unknown gpu profile {text!r}"
    mean = f"; did you mean {' or '.join([', '.join(guess[:-1])] * (len(guess) > 1) + guess[-1:])}?" if guess else ";"
    return (f"{head}{mean} available: {', '.join(sorted(set(keys.values()))) or 'none'} "
            f"(or give a path to a .yaml file; looked in {profiles_dir() / 'gpus'})")


def gpu_profile_for_device(device_name: str, gpus: list[GpuProfile] | None = None) -> GpuProfile | None:
    """The profile of a CUDA / NVML device name: every word of the profile's name other than a memory size is a
    word of the device's (``NVIDIA A10G`` is a10g, not a10; ``NVIDIA L40S`` is not l4), and among those the one
    whose size is there too wins (``NVIDIA A100-SXM4-80GB`` is a100-80gb). None when no profile matches."""
    words = set(re.findall(r"[a-z0-9]+", device_name.lower()))
    best, best_score = None, -1
    for g in list_gpu_profiles() if gpus is None else gpus:
        parts = g.name.lower().split("-")
        sizes = [p for p in parts if _SIZE_WORD.fullmatch(p)]
        if all(p in words for p in parts if p not in sizes):
            score = sum(p in words for p in sizes)
            if score > best_score:
                best, best_score = g, score
    return best


def _load_gpu(path: Path) -> GpuProfile:
    raw = _read_mapping(path)
    _check_fields(raw, GPU_KEYS, GPU_OPTIONAL, path)
    bf16 = raw.get("bf16")
    bf16 = True if bf16 is None else bf16
    rate = "bf16_tflops" if bf16 else "fp16_tflops"
    if not bf16 and raw.get("bf16_tflops") is not None:
        raise ProfileError(f"{path}: bf16 is false but bf16_tflops is given; drop bf16_tflops (a card without "
                           "bf16 has no bf16 rate) and give fp16_tflops")
    if raw.get(rate) is None:
        why = "" if bf16 else " (bf16 is false: the card's dense fp16 tensor rate)"
        raise ProfileError(f"{path}: missing field {rate!r}; add it (a number){why}")
    for key in ("memory_gib", "bandwidth_gbs", "bf16_tflops", "fp16_tflops", "vendor_memory_gb"):
        if raw.get(key) is not None and not 0 < raw[key] < _FINITE:
            raise ProfileError(f"{path}: {key} must be a finite number > 0, got {raw[key]!r}")
    if not 0 <= raw["framework_overhead"] < 1:
        raise ProfileError(f"{path}: framework_overhead is a share in [0, 1) (0.05 = 5%), "
                           f"got {raw['framework_overhead']!r}")
    if not 0 <= raw["reserved_gib"] < _FINITE:
        raise ProfileError(f"{path}: reserved_gib must be a finite number >= 0, got {raw['reserved_gib']!r}")
    reserved_for = (raw.get("reserved_for") or "").strip() or None
    aliases = raw.get("aliases") or []
    if not all(isinstance(a, str) and canonical(a) for a in aliases):
        raise ProfileError(f"{path}: aliases must be a list of names with letters or digits, "
                           f"such as [h100], got {aliases!r}")
    gpu = GpuProfile(name=raw["name"], description=raw["description"], memory_gib=raw["memory_gib"],
                     framework_overhead=raw["framework_overhead"], reserved_gib=raw["reserved_gib"],
                     bandwidth_gbs=raw["bandwidth_gbs"], bf16_tflops=raw.get("bf16_tflops"), path=path,
                     vendor_memory_gb=raw.get("vendor_memory_gb"), reserved_for=reserved_for, bf16=bf16,
                     fp16_tflops=raw.get("fp16_tflops"), aliases=tuple(aliases))
    if not gpu.budget_gib > 0:
        raise ProfileError(f"{path}: memory_gib * (1 - framework_overhead) - reserved_gib leaves "
                           f"{gpu.budget_gib:.2f} GiB; lower reserved_gib or framework_overhead")
    if gpu.reserved_gib > 0 and reserved_for is None:
        raise ProfileError(f"{path}: reserved_gib is {gpu.reserved_gib!r} but reserved_for is missing; "
                           "say what the memory is kept for (e.g. reserved_for: a vision encoder)")
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
    return [_load_gpu(profiles_dir() / "gpus" / f"{n}.yaml") for n in shipped_names("gpus")]
