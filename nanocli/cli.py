"""The ``nano`` command: the app, its command list and the error mapping.

Each command lives in ``commands/<name>.py`` (its options, its call into the stage, its rendering) and is
imported only when it runs: ``main`` registers just the command on the command line (every command for
``nano --help``), so ``nano fit-check`` never imports what ``nano pretrain`` needs (nor torch).

Errors: a ``NanoError`` from a command, and a bad flag or value on the command line, end as one line,
``error: <message>``, on stderr, with exit code 2 (a ``NanoError`` may carry its own: 1 for a failed check)
and no traceback; a command-line mistake ends with where to look (``see `nano pretrain --help```) and, for an
unknown option or command close to a real one, ``did you mean ...?``. ``nano FILE`` with an existing FILE is
the text editor's command line: ``editor.py`` hands it over.

Exit codes: 0 done; 1 a failed check (``nano fit-check``: does not fit); 2 bad input; 130 / 143 a training
run stopped by SIGINT / SIGTERM after writing its checkpoint (128 + the signal, as a shell reports it; a second
signal stops at once, with the same code). A closed stdout (``nano profiles | head -1``: the reader stopped)
ends the command quietly: no traceback, nothing more written, and exit 0, or the code the command had already
decided (``fit-check``'s verdict): a reader that has what it wanted is no failure, so ``set -o pipefail``
scripts keep working (git and ls die of SIGPIPE instead, which such a script sees as 141).
"""

from __future__ import annotations

import difflib
import os
import shlex
import sys
from collections.abc import Iterable, Sequence

import typer

from nanocli_model.errors import NanoError

from . import commands, editor
from .commands import flags

HELP = ("nano: pretrain, align, prune, distill, evaluate, benchmark and generate with hybrid Mamba-Transformer "
        "(NemotronH) models, and check what fits a GPU.")
EXAMPLES = ["nano profiles", "nano fit-check -m nemotron-nano-9b-v2 --gpu a10g --context 128k",
            "nano demo --recipe demo-smoke"]
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


class _Group(flags.Group):
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
    app = typer.Typer(name="nano", help=HELP, epilog=flags.epilog(EXAMPLES), no_args_is_help=True,
                      add_completion=False, pretty_exceptions_show_locals=False, cls=_Group)

    @app.callback()
    def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
        """nano: the hybrid Mamba-Transformer (NemotronH) toolchain."""

    commands.register(app, only)
    return app


def _command_in(args: list[str]) -> str | None:
    """The command named on the command line (its first word), if it is one of nano's."""
    first = next((a for a in args if not a.startswith("-")), None)
    return first if first in commands.NAMES else None


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise SystemExit(code)


# ------------------------------------------------------------------------------------------ usage errors
def _close(word: str, names: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(names), n=1, cutoff=0.7)
    return f" (did you mean {match[0]}?)" if match else ""


def _value(args: Sequence[str], opts: Sequence[str]) -> str | None:
    """What the command line gave ``opts`` (the last time: click keeps the last value)."""
    found = None
    for i, a in enumerate(args):
        if a in opts and i + 1 < len(args):
            found = args[i + 1]
        elif "=" in a and a.split("=", 1)[0] in opts:
            found = a.split("=", 1)[1]
    return found


def _reason(message: str) -> str:
    """typer's words for a value it could not convert, made short."""
    for start, short in (("Input should be a valid integer", "not a whole number"),
                         ("Input should be a valid number", "not a number"),
                         ("Input should be a valid boolean", "not true or false")):
        if message.startswith(start):
            return short
    message = message.removeprefix("Value error, ").rstrip(".")
    if " is not one of " in message:  # a Literal's choices
        return "use one of " + message.split(" is not one of ", 1)[1].replace("'", "")
    return message


def _is(e: BaseException, name: str) -> bool:
    """Whether ``e`` is click's ``name`` error (by name: typer vendors click and does not export its errors)."""
    return any(k.__name__ == name for k in type(e).__mro__)


def usage_message(e: typer.TyperException, args: Sequence[str]) -> str:
    """One line for a command-line mistake: what was wrong, a close name if there is one, where to look."""
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else " ".join(["nano", *filter(None, [_command_in(list(args))])])
    visible = [o for p in (ctx.command.params if ctx is not None else []) if not getattr(p, "hidden", False)
               for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
    if _is(e, "NoSuchOption"):
        text = f"no such option {e.option_name} for {path}" + _close(e.option_name, visible)
    elif _is(e, "MissingParameter"):
        text = e.format_message()
    elif _is(e, "BadParameter") and e.param is not None:
        opts = [o for o in e.param.opts if o.startswith("--")] or list(e.param.opts)
        name = opts[0] if e.param.param_type_name == "option" else (e.param.metavar or e.param.name).upper()
        value = _value(args, e.param.opts) if e.param.param_type_name == "option" else None
        text = f"{name}{'' if value is None else ' ' + shlex.quote(value)}: {_reason(e.message)}"
    elif _is(e, "BadOptionUsage") and "requires an argument" in e.message:
        text = f"{e.option_name} needs a value"
    elif e.message.startswith("No such command"):
        word = e.message.split("'")[1] if "'" in e.message else ""
        text = f"no such command '{word}'" + _close(word, commands.NAMES)
    else:
        text = e.format_message()
    text = text[:1].lower() + text[1:]
    return f"{text.rstrip('.')}; see `{path} --help`"


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

    args = sys.argv[1:] if args is None else args
    path = editor.edited_path(args, commands.NAMES)
    if path is not None:  # `EDITOR=nano git commit` with nano's environment active
        editor.hand_over(args, path)
    if _command_in(args) == "generate" and {"-i", "--interactive"} & set(args):
        from .commands.chat import start_worker_threads_without_ctrl_c

        start_worker_threads_without_ctrl_c()  # first, before anything imports torch and starts its threads
    Console.on_broken_pipe = _on_broken_pipe  # rich documents overriding it; here for typer's consoles too
    try:
        code = _main(args)
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
    except typer.TyperException as e:  # a bad flag or value: one line, with where to look
        if _is(e, "NoArgsIsHelpError"):  # `nano` / `nano align` alone: the help, as --help would
            typer.echo(e.ctx.get_help())
            raise SystemExit(0) from None
        _fail(usage_message(e, args) if _is(e, "UsageError") else e.format_message(), getattr(e, "exit_code", 2))
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
