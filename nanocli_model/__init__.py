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
import time
from pathlib import Path

from . import memory
from .config import NanoConfig
from .errors import CacheError, CheckpointError, ConfigError, NanoError

_LAZY = {
    "NanoForCausalLM": "model", "build_model": "model", "HybridCache": "cache",
    "load_pretrained": "checkpoint", "save_pretrained": "checkpoint",
}

__all__ = ["NanoConfig", "memory", "cache_home", "mark_used", "prune_kept", "NanoError", "ConfigError",
           "CheckpointError", "CacheError", *_LAZY]
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


STALE_TMP_SECONDS = 24 * 3600  # a temporary file this old in a cache directory was left by a killed build


def mark_used(path: Path) -> None:
    """A kept file's modification time is when it was last used, for ``prune_kept`` (read-only: left as it is)."""
    try:
        os.utime(path)
    except OSError:
        pass


def prune_kept(directory: Path, stem: str, suffix: str, keep: int) -> list[Path]:
    """Delete all but the ``keep`` most recently used ``<stem>-*<suffix>`` files in ``directory``, and temporary
    ``.<stem>-*`` files a killed build left (older than a day); the paths deleted. A process that has a deleted
    file open or mapped keeps it; one about to load it builds it again."""
    now, removed, kept = time.time(), [], []
    for p in Path(directory).glob(f"*{stem}-*"):
        try:
            mtime = p.stat().st_mtime
        except OSError:  # deleted meanwhile
            continue
        if p.name.startswith("."):
            if ".tmp" in p.name and now - mtime > STALE_TMP_SECONDS:
                removed.append(p)
        elif p.name.startswith(f"{stem}-") and p.name.endswith(suffix):
            kept.append((mtime, p))
    removed += [p for _, p in sorted(kept, reverse=True)[keep:]]
    gone = []
    for p in removed:
        try:
            p.unlink(missing_ok=True)
            gone.append(p)
        except OSError:  # a read-only directory: kept as it is
            pass
    return gone


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
