"""The ``nano`` command: the app, its command list and the error mapping.

Each command lives in ``commands/<name>.py`` (its options, its call into the stage, its rendering) and is
imported only when it runs: ``main`` registers just the command on the command line (every command for
``nano --help``), so ``nano fit-check`` never imports what ``nano pretrain`` needs (nor torch).

Errors: a ``NanoError`` from a command, and a bad flag or value on the command line, end as one line,
``error: <message>``, on stderr, with exit code 2 (a ``NanoError`` may carry its own: 1 for a failed check)
and no traceback.

Exit codes: 0 done; 1 a failed check (``nano fit-check``: does not fit); 2 bad input; 130 / 143 a training
run stopped by SIGINT / SIGTERM after writing its checkpoint (128 + the signal, as a shell reports it; a second
signal stops at once, with the same code). A closed stdout (``nano profiles | head -1``: the reader stopped)
ends the command quietly: no traceback, nothing more written, and exit 0, or the code the command had already
decided (``fit-check``'s verdict): a reader that has what it wanted is no failure, so ``set -o pipefail``
scripts keep working (git and ls die of SIGPIPE instead, which such a script sees as 141).
"""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

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


class ReaderGone(Exception):
    """stdout was closed by its reader (EPIPE): not an ``OSError``, so that click does not turn it into exit 1."""


class StoppedAtOnce(Exception):
    """A second stop signal during a training run (``train.loop.Stopped``; typer would make any
    KeyboardInterrupt a silent exit 130): ``exit_code`` is 128 + the signal."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code


class _Group(TyperGroup):
    """nano's command group: a write to a closed stdout (``--help`` included) leaves as :class:`ReaderGone`, a
    second stop signal as :class:`StoppedAtOnce`."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:
            raise ReaderGone from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise ReaderGone from None
        except KeyboardInterrupt as e:
            if not hasattr(e, "signum"):  # a plain Ctrl-C (outside a training loop): typer's exit 130
                raise
            raise StoppedAtOnce(e.exit_code) from None


def build_app(only: str | None = None) -> typer.Typer:
    """The typer app with every command, or with ``only`` that one (what ``main`` runs)."""
    app = typer.Typer(name="nano", help=HELP, no_args_is_help=True, add_completion=False,
                      pretty_exceptions_show_locals=False, cls=_Group)

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


def _on_broken_pipe(console) -> None:
    """rich's ``Console.on_broken_pipe`` for every console of the process (nano's and typer's ``--help``; rich's
    own exits 1): a closed stdout raises ``BrokenPipeError`` as a plain write would; a closed stderr is no
    reason to stop (a training run goes on to its checkpoint): that console just stops writing."""
    console.quiet = True
    if not console.stderr:
        raise BrokenPipeError


def _silence_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered, and the flush at exit, then cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (a test's captured stdout)
        pass


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: runs the command; errors become one ``error:`` line and an exit code.

    A closed stdout (``ReaderGone``, or a failing flush) is the reader's choice, not an error: stdout is
    silenced and the exit code is the one the command had decided (0 unless it had already failed, e.g.
    ``fit-check``'s verdict or a stopped training run's 130 / 143)."""
    from rich.console import Console

    Console.on_broken_pipe = _on_broken_pipe  # rich documents overriding it; here for typer's consoles too
    try:
        code = _main(sys.argv[1:] if args is None else args)
    except (ReaderGone, BrokenPipeError):  # BrokenPipeError: `nano | head -1` (the help, written outside click)
        code = 0
        _silence_stdout()
    except SystemExit as e:
        code = e.code
    try:
        sys.stdout.flush()  # here, not at exit: a closed stdout is then ours to answer
    except BrokenPipeError:
        _silence_stdout()
    raise SystemExit(code)


def _main(args: list[str]) -> int:
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
    except StoppedAtOnce as e:
        _fail("stopped at once by a second signal; the checkpoints written before are intact (--resume auto "
              "continues from the newest)", e.exit_code)
    except typer.Abort:
        _fail("aborted", 130)
    except Exception as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError that no stage translated
            raise
        _fail(OUT_OF_MEMORY)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
