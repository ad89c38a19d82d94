"""What a command names, resolved in one place: model targets, devices, dtypes and the token cache directory.

A *model target* is what ``--model`` (``--teacher``, ``--student``, ``nano info TARGET``) may name: a model
profile (``tiny``, ``nemotron-nano-9b-v2`` or a ``.yaml`` file), a model directory (``config.json`` with or
without weights), a ``config.json`` file, or a run directory of ``nano pretrain`` / ``align`` / ``distill``
(its ``final/`` checkpoint, else its newest ``checkpoint-N/``, with a note on stderr saying which). Every
command that reads a model resolves it here; commands say which kinds they accept. One that accepts
directories only (checkpoint, run) loads their weights, so a directory without safetensors weights is
refused here, naming it (and, in a run, the checkpoints that have weights). A weights file or another file of a
model directory given as the model is refused with its directory to pass instead.
Everything here is cheap: no torch at import (``torch_dtype`` and ``device`` import it when called).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nanocli_model
from nanocli_model.config import NanoConfig
from nanocli_model.errors import CheckpointError, ConfigError, NanoError
from nanocli_model.headers import INDEX_NAME, SINGLE_NAME

from .profiles import ProfileError, known_names, load_model_profile, profile_names

Kind = Literal["profile", "checkpoint", "config", "run"]
DEVICES = ("auto", "cpu", "cuda")
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # nano's names -> torch's
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_NOTED: set[tuple[str, str, str]] = set()  # (flag, target, checkpoint) already noted on stderr


@dataclass(frozen=True)
class ModelTarget:
    """A resolved model target: its config and where it came from."""

    name: str  # the profile name, or the path as given
    kind: Kind  # profile | checkpoint (a directory with config.json) | config (a config.json file) | run
    config: NanoConfig
    path: Path | None  # the profile YAML, the model directory or the config.json
    description: str | None = None  # a profile's one-line description

    @property
    def directory(self) -> Path | None:
        """The model directory to load weights from (checkpoint and run targets), else None."""
        return self.path if self.kind in ("checkpoint", "run") else None


def read_config(path: Path) -> NanoConfig:
    """A ``config.json`` as a ``NanoConfig``; a one-line ``ConfigError`` naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a model directory needs a config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    return NanoConfig.from_dict(raw, source=str(path))


def run_checkpoint(run: Path) -> Path | None:
    """A run directory's model: ``final/``, else its newest complete ``checkpoint-N/``; None if it has neither."""
    if (run / "final" / "config.json").is_file():
        return run / "final"
    steps = [(int(m.group(1)), p) for p in run.glob("checkpoint-*")
             if (m := _CHECKPOINT.fullmatch(p.name)) and (p / "config.json").is_file()]
    return max(steps)[1] if steps else None


def model_target(target: str, flag: str = "--model", kinds: tuple[Kind, ...] = ("profile", "checkpoint", "config",
                                                                                "run")) -> ModelTarget:
    """Resolve ``target`` to one of ``kinds``; a one-line error naming ``flag`` and what was found otherwise."""
    path = Path(target).expanduser()
    found: ModelTarget | None = None
    if path.is_dir():
        if (path / "config.json").is_file():
            found = ModelTarget(str(path), "checkpoint", read_config(path / "config.json"), path)
        elif (model := run_checkpoint(path)) is not None:
            found = ModelTarget(str(path), "run", read_config(model / "config.json"), model)
        else:
            raise CheckpointError(f"{flag} {target}: no config.json in this directory (nor a final/ or "
                                  "checkpoint-N/ of a run); give a NemotronH model directory")
    elif path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".safetensors.index.json")):
        raise CheckpointError(f"{flag} {target}: this is a weights file, not a model; pass its directory "
                              f"({path.parent}), which holds config.json, the weights and the tokenizer")
    elif path.suffix == ".json" and path.is_file() and path.name != "config.json" and \
            (path.parent / "config.json").is_file():
        raise CheckpointError(f"{flag} {target}: this is a file of the model directory {path.parent}; pass the "
                              "directory")
    elif path.suffix == ".json" and path.is_file():
        found = ModelTarget(str(path), "config", read_config(path), path)
    elif path.is_file() or path.suffix in (".yaml", ".yml") or target in profile_names("models"):
        profile = load_model_profile(target)
        found = ModelTarget(profile.name, "profile", profile.config, profile.path, profile.description)
    if found is None:
        known = known_names("models")
        if os.sep in target or target.startswith("."):
            raise CheckpointError(f"{flag} {target}: no such model directory or config.json")
        raise ProfileError(f"{flag} {target}: unknown model profile, and no such model directory or config.json; "
                           f"known profiles: {known}")
    if found.kind not in kinds:
        wanted = " or ".join({"profile": "a model profile", "checkpoint": "a model directory",
                              "config": "a config.json", "run": "a run directory"}[k] for k in kinds)
        raise NanoError(f"{flag} {target}: this is {_article(found.kind)}; give {wanted}")
    if not set(kinds) - {"checkpoint", "run"}:  # a command that loads the weights
        _require_weights(found, flag, target)
    if found.kind == "run":  # after the checks: a refused target gets its error alone
        _note_run(flag, target, found.directory)
    return found


def has_weights(directory: Path) -> bool:
    """Whether a model directory holds safetensors weights (``model.safetensors`` or its sharded index)."""
    return (directory / SINGLE_NAME).is_file() or (directory / INDEX_NAME).is_file()


def _require_weights(found: ModelTarget, flag: str, target: str) -> None:
    """A one-line error when the directory to load has no safetensors weights (a checkpoint of nano's holds
    ``trainer_state.pt`` beside them, which is never loaded as weights), pointing at the run's checkpoints."""
    directory = found.directory
    if directory is None or has_weights(directory):
        return
    run = Path(target).expanduser() if found.kind == "run" else directory.parent
    others = [p for p in (*sorted(run.glob("checkpoint-*")), run / "final")
              if p != directory and (_CHECKPOINT.fullmatch(p.name) or p.name == "final") and has_weights(p)]
    hint = ("; checkpoints of this run with weights: " + ", ".join(map(str, others)) if others else
            f"; a run directory's models are its checkpoint-N/ and final/ (none of {run} has weights)"
            if found.kind == "run" else "; pass a NemotronH model directory (config.json, model.safetensors, "
            "tokenizer.json)")
    raise CheckpointError(f"{flag} {target}: no safetensors weights in {directory} ({SINGLE_NAME} or "
                          f"{INDEX_NAME}){hint}")


def _note_run(flag: str, target: str, model: Path) -> None:
    """One line on stderr (once per process) saying which checkpoint of a run directory is read."""
    key = (flag, target, str(model))
    if key in _NOTED:
        return
    _NOTED.add(key)
    which = "its final checkpoint" if model.name == "final" else "its newest checkpoint (no final/ yet)"
    print(f"note: {flag} {target} is a run directory; reading {which}, {model}", file=sys.stderr)


def _article(kind: Kind) -> str:
    return {"profile": "a model profile", "checkpoint": "a model directory", "config": "a config.json",
            "run": "a run directory"}[kind]


def visible_device(name: str, flag: str = "--device") -> str:
    """``auto`` -> ``cuda`` where a CUDA GPU is visible, else ``cpu``; ``cuda`` without one is a one-line error."""
    if name not in DEVICES:
        raise ConfigError(f"{flag} {name!r} is unknown; use one of {', '.join(DEVICES)}")
    if name == "cpu":
        return name
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if name == "cuda":
        raise ConfigError(f"{flag} cuda: no CUDA GPU is visible; use {flag} cpu")
    return "cpu"


def torch_dtype(name: str):
    """``bf16`` -> ``torch.bfloat16`` (also fp16, fp32); a one-line error for anything else."""
    import torch

    if name not in TORCH_DTYPES:
        raise ConfigError(f"dtype {name!r}: use one of {', '.join(TORCH_DTYPES)}")
    return getattr(torch, TORCH_DTYPES[name])


def cache_dir(value: str | None) -> Path:
    """nano's cache directory (tokenized shards, the chat history): ``value`` (``--cache-dir``), else
    ``$NANO_CACHE``, else ``$XDG_CACHE_HOME/nano``, else ``~/.cache/nano``. As the XDG base-directory
    specification says, an empty or relative ``$XDG_CACHE_HOME`` is ignored; an empty ``$NANO_CACHE`` too."""
    return Path(value) if value else nanocli_model.cache_home()
