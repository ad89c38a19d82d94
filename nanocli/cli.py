"""The ``nano`` command: the app, its command list and the error mapping.

Each command lives in ``commands/<name>.py`` (its options, its call into the stage, its rendering) and is
imported only when it runs: ``main`` registers just the command on the command line (every command for
``nano --help``), so ``nano fit-check`` never imports what ``nano pretrain`` needs (nor torch).

Errors: a ``NanoError`` from a command, and a bad flag or value on the command line, end as one line,
``error: <message>``, on stderr, with exit code 2 (a ``NanoError`` may carry its own: 1 for a failed check)
and no traceback.
"""

from __future__ import annotations

import sys

import typer

from nanocli_model.errors import NanoError

from . import commands

HELP = "nano: pretrain, align, prune, distill and serve hybrid Mamba-Transformer (NemotronH) models."
OUT_OF_MEMORY = ("CUDA out of memory: lower --batch, the context (--context / --max-new-tokens / --seq-len) or "
                 "--prefill-chunk; `nano fit-check --model MODEL --context N --batch B --gpu auto` predicts what fits")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nano {package_version()}")
        raise typer.Exit()


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nano")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def build_app(only: str | None = None) -> typer.Typer:
    """The typer app with every command, or with ``only`` that one (what ``main`` runs)."""
    app = typer.Typer(name="nano", help=HELP, no_args_is_help=True, add_completion=False,
                      pretty_exceptions_show_locals=False)

    @app.callback()
    def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
        """nano: pretrain, align, prune, distill and serve hybrid Mamba-Transformer (NemotronH) models."""

    commands.register(app, only)
    return app


def _command_in(args: list[str]) -> str | None:
    """The command named on the command line (its first word), if it is one of nano's."""
    first = next((a for a in args if not a.startswith("-")), None)
    return first if first in commands.NAMES else None


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise SystemExit(code)


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: runs the command; errors become one ``error:`` line and an exit code."""
    args = sys.argv[1:] if args is None else args
    app = build_app(_command_in(args))
    try:
        code = app(args=args, prog_name="nano", standalone_mode=False)
    except NanoError as e:
        _fail(str(e) or type(e).__name__, getattr(e, "exit_code", 2))
    except typer.TyperException as e:  # a bad flag or value: the parser's message, on one line
        if type(e).__name__ == "NoArgsIsHelpError":  # `nano` / `nano align` alone: the help, as --help would
            typer.echo(e.ctx.get_help())
            raise SystemExit(0) from None
        _fail(e.format_message(), e.exit_code)
    except typer.Abort:
        _fail("aborted", 130)
    except Exception as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError that no stage translated
            raise
        _fail(OUT_OF_MEMORY)
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
