"""``nano align`` and ``nano align merge``: registered from the legacy command module until they move here."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from ..cli_legacy import align_app

    app.add_typer(align_app, name="align")
