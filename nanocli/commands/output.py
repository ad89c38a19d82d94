"""The end of a measuring command (``fit-check``, ``bench``): the PNG plot when asked for, then one JSON object
(the result's ``to_json()`` with the plot's path) or the tables."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import typer


def check_plot(path: str | None) -> None:
    """A bad ``--plot`` path fails before the work, not after it."""
    if path is not None:
        from ..plot import checked_png

        checked_png(path)


def emit(result: Any, *, json_out: bool, plot: str | None, draw: Callable[[Any, str], Any],
         show: Callable[[Any, str | None], None], extra: dict[str, Any] | None = None) -> None:
    """Draw ``plot`` (``draw(result, path)``), then print the JSON (``to_json()`` + ``plot`` + ``extra``) or
    ``show(result, plot_path)``."""
    plot_path = None if plot is None else str(draw(result, plot))
    if json_out:
        typer.echo(json.dumps({**result.to_json(), "plot": plot_path, **(extra or {})}, indent=2))
    else:
        show(result, plot_path)
