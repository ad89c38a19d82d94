"""What the commands print as JSON, and the end of a measuring command (``fit-check``, ``bench``).

``--json`` prints one JSON object on one line (a pipe or ``jq`` reads it); ``--json-indent N`` indents it for
a reader, with every list of numbers or strings (token ids, a layer's buffers) kept on one line. Every command
that prints JSON (``generate``, ``eval``, ``fit-check``, ``bench``) goes through :func:`dumps`, with the flags of
:class:`JsonOutput`. A measuring command ends in :func:`emit`: the PNG plot when asked for, then the JSON or
the tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer

from .. import settings


@dataclass
class JsonOutput(settings.Group):
    """``--json`` and ``--json-indent``: a command's Output group inherits them (and words ``--json`` its way)."""

    panel = "Output"

    json: bool = False
    """Print one JSON object, on one line."""
    json_indent: int | None = None
    """Print the JSON indented by N spaces for reading (implies --json); lists of numbers stay on one line."""

    def check(self) -> None:
        settings.at_least(self, 0, "json_indent")

    @property
    def wants_json(self) -> bool:
        return self.json or self.json_indent is not None


def dumps(value: Any, indent: int | None = None) -> str:
    """``value`` as JSON: one line, or (``indent``) one key per line with flat lists on one line."""
    if indent is None:
        return json.dumps(value, ensure_ascii=False)
    return _indented(value, " " * indent, 0)


def _indented(value: Any, pad: str, level: int) -> str:
    inner, outer = pad * (level + 1), pad * level
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k if isinstance(k, str) else json.dumps(k), ensure_ascii=False)}: "
                 f"{_indented(v, pad, level + 1)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{outer}}}"
    if isinstance(value, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) and x for x in value):
        return "[\n" + ",\n".join(inner + _indented(x, pad, level + 1) for x in value) + f"\n{outer}]"
    return json.dumps(value, ensure_ascii=False)


def print_json(value: Any, indent: int | None = None) -> None:
    """:func:`dumps` on stdout."""
    typer.echo(dumps(value, indent))


def check_plot(path: str | None) -> None:
    """A bad ``--plot`` path fails before the work, not after it."""
    if path is not None:
        from ..plot import checked_png

        checked_png(path)


def emit(result: Any, *, json_out: bool, plot: str | None, draw: Callable[[Any, str], Any],
         show: Callable[[Any, str | None], None], extra: dict[str, Any] | None = None,
         indent: int | None = None) -> None:
    """Draw ``plot`` (``draw(result, path)``), then print the JSON (``to_json()`` + ``plot`` + ``extra``, indented
    by ``indent``) or ``show(result, plot_path)``."""
    plot_path = None if plot is None else str(draw(result, plot))
    if json_out:
        print_json({**result.to_json(), "plot": plot_path, **(extra or {})}, indent)
    else:
        show(result, plot_path)
