"""How a long-running stage tells what it is doing: one ``Reporter`` protocol for every command.

Stages take a reporter and call it; they never print. The command line passes ``ui.Progress`` (rich progress
bars on stderr, or plain lines when stderr is not a terminal); the Python API passes nothing and gets
``SILENT``. Every method is optional to act on: a reporter may ignore any of them.
"""

from __future__ import annotations

from typing import Any, Protocol


class Reporter(Protocol):
    def section(self, title: str) -> None:
        """A new part of a long run begins (a stage of ``nano demo``)."""

    def status(self, message: str) -> None:
        """One line about what happens now."""

    def progress(self, task: str, done: int, total: int) -> None:
        """``done`` of ``total`` units of ``task`` (tokenizing a source, scoring, a pruning phase); total 0:
        unknown."""

    def start(self, start: int, total: int, info: dict[str, Any]) -> None:
        """Training runs from step ``start`` to ``total`` (``info``: device, processes)."""

    def step(self, metrics: dict[str, Any]) -> None:
        """A training step or an evaluation finished: its metrics (``step``, ``loss``, ``lr``, ``*_per_s``, ...)."""


class Silent:
    """The reporter that reports nothing (the Python API's default)."""

    def section(self, title: str) -> None:
        pass

    def status(self, message: str) -> None:
        pass

    def progress(self, task: str, done: int, total: int) -> None:
        pass

    def start(self, start: int, total: int, info: dict[str, Any]) -> None:
        pass

    def step(self, metrics: dict[str, Any]) -> None:
        pass


SILENT = Silent()
