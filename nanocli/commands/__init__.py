"""One module per ``nano`` command: its options (the stage's options class plus any command-line-only
settings), its call into the stage and its rendering. Each module has ``register(app)``; ``flags.py`` is the
helper that turns options dataclasses into typer parameters.

Where a new command goes: ``commands/<name>.py`` with ``register(app)``, and its name in ``NAMES`` below.
"""

from __future__ import annotations

import importlib

import typer

# command name -> module (in the order of ``nano --help``)
NAMES = {
    "profiles": "profiles", "info": "info", "demo": "demo", "fit-check": "fit_check", "generate": "generate",
    "pretrain": "pretrain", "eval": "eval", "distill": "distill", "bench": "bench", "prune": "prune", "align": "align",
}


def register(app: typer.Typer, only: str | None = None) -> None:
    """Register every command on ``app``, or only ``only`` (a name in ``NAMES``)."""
    for name, module in NAMES.items():
        if only is None or name == only:
            importlib.import_module(f"{__name__}.{module}").register(app)
