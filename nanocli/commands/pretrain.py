"""``nano pretrain``: registered from the legacy command module until it moves here (issue #17)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from ..cli_legacy import COMMANDS

    app.command("pretrain")(COMMANDS["pretrain"])
