"""nanocli_model: the NemotronH hybrid Mamba-2 / attention model library of nano.

Public surface::

    from nanocli_model import NanoConfig, NanoForCausalLM, load_pretrained, save_pretrained

plus ``HybridCache`` (incremental decoding), ``build_model`` (fresh initialisation) and the pure
``memory`` helpers. This package never imports the CLI side (typer, rich, yaml, nanocli).

``config``, ``memory`` and ``errors`` import no torch, and neither does ``import nanocli_model``:
the torch-backed names load on first use, so ``nano fit-check`` stays fast.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from . import memory
from .config import NanoConfig
from .errors import CacheError, CheckpointError, ConfigError, NanoError

_LAZY = {
    "NanoForCausalLM": "model", "build_model": "model", "HybridCache": "cache",
    "load_pretrained": "checkpoint", "save_pretrained": "checkpoint",
}

__all__ = ["NanoConfig", "memory", "cache_home", "NanoError", "ConfigError", "CheckpointError", "CacheError", *_LAZY]
__version__ = "0.1.0"


def cache_home() -> Path:
    """nano's cache directory: ``$NANO_CACHE``, else ``$XDG_CACHE_HOME/nano``, else ``~/.cache/nano``. As the
    XDG base-directory specification says, an empty or relative ``$XDG_CACHE_HOME`` is ignored; an empty
    ``$NANO_CACHE`` too."""
    if os.environ.get("NANO_CACHE"):
        return Path(os.environ["NANO_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "nano"


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
