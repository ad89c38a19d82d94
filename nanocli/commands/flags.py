"""Options dataclasses -> typer parameters: the one helper between ``settings.py`` and the command line.

Each field becomes ``--field-name`` (or what ``settings.flag`` names), typed by its annotation (``Literal``
choices show in ``--help``), helped by its docstring, defaulting to the dataclass default (shown in
``--help``), in the help panel of the group that declares it. A command then learns which flags were given on
the command line (click's parameter source), so that a recipe can sit between the defaults and the flags.

The naming scheme (docs/CLI.md states it for users): a field reads the same in every command. Its metavar
comes from its name (``METAVARS``: ``--model MODEL``, ``--out DIR``, ``--output FILE``, ...), else from its
type (``N``, ``FLOAT``, ``TEXT``, ``a|b|c`` for a choice, nothing for an on/off flag). A renamed flag keeps its
old spelling as a hidden alias that still works and warns once (``settings.flag(deprecated=...)``). Every
command carries two or three runnable examples, shown at the end of its ``--help``.
"""

from __future__ import annotations

import dataclasses
import inspect
import shlex
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING
from typing import Annotated, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from .. import settings

_SIMPLE = (str, int, float, bool)
DEPRECATED = "_deprecated_"  # prefix of the hidden parameters that carry a renamed flag's old spelling

# field name -> metavar, for free-form values (a Literal shows its choices, a bool nothing)
METAVARS = {
    "model": "MODEL", "teacher": "MODEL", "student": "MODEL", "checkpoints": "CHECKPOINT",
    "out": "DIR", "cache_dir": "DIR", "tokenizer": "DIR", "teacher_cache": "DIR", "resume": "auto|DIR",
    "output": "FILE", "output_file": "FILE", "input_file": "FILE", "file": "FILE", "plot": "FILE", "scores": "FILE",
    "target": "FILE", "recipe": "NAME|FILE", "profile": "NAME", "gpu": "NAME", "data": "SPEC", "calib_data": "SPEC",
    "rewards": "SPEC", "budgets": "A,B,C", "tasks": "A,B,C", "weights": "A,B,...", "lengths": "IN:OUT,...",
    "difficulty": "N|LO-HI", "prompt": "PROMPT", "dtype": "bf16|fp16|fp8|fp32", "ssm_cache_dtype": "fp32|bf16",
}


def _cli_type(hint: Any) -> Any:
    """The annotation typer is given: the field's own when typer takes it, ``str`` for free-form settings."""
    if hint is Any:
        return str | None
    origin = typing.get_origin(hint)
    if hint in _SIMPLE or origin is typing.Literal or origin is list:
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and (args[0] in _SIMPLE or typing.get_origin(args[0]) in (typing.Literal, list)):
        return hint  # X | None
    return str | None


def metavar(name: str, hint: Any) -> str:
    """What ``--help`` shows after the flag: the choices of a Literal, nothing for a bool, the name's entry in
    ``METAVARS``, else ``N`` (whole numbers, also ``int | str`` token counts such as 128k), ``FLOAT`` or ``TEXT``."""
    choices = settings.choices(hint)
    if choices is not None:
        return "|".join(map(str, choices))
    args = set(typing.get_args(hint)) - {type(None)} or {hint}
    if args == {bool}:
        return ""
    if name in METAVARS:
        return METAVARS[name]
    if int in args:
        return "N"
    return "FLOAT" if float in args else "TEXT"


def _panel(cls: type, name: str) -> str:
    """The help panel of the group that declares ``name`` first (its ``panel``), else ``Options``."""
    for klass in reversed(cls.__mro__):
        if name in klass.__dict__.get("__annotations__", {}):
            return getattr(klass, "panel", "Options")
    return "Options"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _shown(default: Any) -> bool:
    """Whether ``--help`` shows a default: not for None, False or an empty list (0 and 0.0 are shown)."""
    return not (default is None or default is False or (isinstance(default, (list, tuple)) and not default))


def parameters(cls: type, skip: tuple[str, ...] = (), panels: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """One keyword parameter per command-line field of ``cls`` (arguments first, in field order), and a hidden
    one per old spelling of a renamed flag. ``panels``: field name -> help panel, over the groups' own."""
    hints = typing.get_type_hints(cls)
    docs = settings.docs(cls)
    args, opts = [], []
    for f in dataclasses.fields(cls):
        spec = settings.cli_spec(f)
        if spec.hidden or f.name in skip:
            continue
        default, hint = _default(f), hints[f.name]
        help_text = docs.get(f.name, "")
        shown = spec.metavar if spec.metavar is not None else metavar(f.name, hint)
        if spec.argument:
            info = typer.Argument(help=help_text, show_default=default is not None, metavar=shown)
            args.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                          annotation=Annotated[_cli_type(hint), info]))
            continue
        name = settings.flag_name(f)
        if hint is bool and default is True and "/" not in name:
            name = f"{name}/--no-{name[2:]}"
        panel = (panels or {}).get(f.name) or _panel(cls, f.name)
        info = typer.Option(name, *spec.aliases, help=help_text, rich_help_panel=panel, show_default=_shown(default),
                            metavar=shown)
        opts.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                      annotation=Annotated[_cli_type(hint), info]))
        for i, old in enumerate(spec.deprecated):
            hidden = typer.Option(old, hidden=True, metavar=shown)
            opts.append(inspect.Parameter(f"{DEPRECATED}{i}_{f.name}", inspect.Parameter.KEYWORD_ONLY, default=None,
                                          annotation=Annotated[_cli_type(hint) | None, hidden]))
    return args + opts


def given(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The values that came from the command line (or the environment), not the defaults; a renamed flag's old
    spelling counts as the new one (with a warning, once), unless the new one was given too."""
    def source(k: str) -> str:
        s = ctx.get_parameter_source(k)
        return "" if s is None else s.name
    came = {k: v for k, v in values.items() if source(k) not in ("", "DEFAULT", "DEFAULT_MAP")}
    for key in [k for k in came if k.startswith(DEPRECATED)]:
        value, field = came.pop(key), key[len(DEPRECATED):].split("_", 1)[1]
        old = next(p.opts[0] for p in ctx.command.params if p.name == key)
        new = next(p.opts[0] for p in ctx.command.params if p.name == field)
        warn_once(f"{old} is deprecated in {ctx.command_path}; use {new}")
        came.setdefault(field, value)
    return came


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """``warning: MESSAGE`` on stderr, the first time this process says it."""
    if message not in _WARNED:
        _WARNED.add(message)
        typer.echo(f"warning: {message}", err=True)


# ------------------------------------------------------------------------------------------ help
class _PlainArgument(TyperArgument):
    """An argument whose ``--help`` row shows its metavar (``PROMPT``), not typer's ``<str>`` type label."""

    def display_type_rich(self, ctx: typer.Context) -> str | None:
        return None


def _tidy(params: list) -> list:
    """No ``<bool>`` after ``--help`` / ``--version``, no ``<str>`` after an argument's name."""
    for p in params:
        if type(p) is TyperArgument:
            p.__class__ = _PlainArgument
        elif getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class Command(TyperCommand):
    """A ``nano`` command: typer's, with readable metavars (see ``_tidy``)."""

    def get_params(self, ctx: typer.Context) -> list:
        return _tidy(super().get_params(ctx))


class Group(TyperGroup):
    """``nano`` and ``nano align``: typer's group, with readable metavars (see ``_tidy``)."""

    def get_params(self, ctx: typer.Context) -> list:
        return _tidy(super().get_params(ctx))


def epilog(examples: Sequence[str]) -> str:
    """The ``Examples:`` block at the end of a command's ``--help`` (one command per line; the leading newline
    keeps typer's ``cleandoc`` from taking the indentation off the commands)."""
    return "\nExamples:\n" + "\n".join(f"  {e}" for e in examples)


def examples(epilog_text: str | None) -> list[list[str]]:
    """The example command lines of a command's epilog, split as a shell would (``["nano", "info", ...]``)."""
    lines = (epilog_text or "").split("Examples:\n", 1)[-1].splitlines() if "Examples:" in (epilog_text or "") else []
    return [shlex.split(line) for line in lines if line.strip().startswith("nano ")]


def command(app: typer.Typer, name: str, handler: Callable[..., Any], *groups: type, help: str | None = None,
            callback: bool = False, examples: Sequence[str] = (), panels: dict[str, str] | None = None,
            **typer_kwargs: Any) -> Callable[..., Any]:
    """Register ``nano NAME`` with the fields of ``groups`` (options dataclasses) as its parameters.

    ``handler(*given)`` receives, for each class in ``groups``, a dict of the fields given on the command line
    (``dict`` keyed by field name; the defaults are the dataclass's own, so an empty dict means "all defaults").
    ``callback``: ``app`` is a command group (``nano align``) and this is what it runs without a subcommand.
    ``examples``: runnable command lines for the end of ``--help``; ``panels``: field -> help panel overrides.
    """
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    owners: list[list[str]] = []
    for cls in groups:
        own = parameters(cls, skip=tuple(p.name for p in params), panels=panels)
        owners.append([p.name for p in own if not p.name.startswith(DEPRECATED)])
        params += own
    params = params[:1] + sorted(params[1:], key=lambda p: not _is_argument(p))  # arguments first

    def run(ctx: typer.Context, **values: Any) -> Any:
        if callback and ctx.invoked_subcommand is not None:
            return None  # `nano align merge ...`: the group's own options are not used
        came = given(ctx, values)
        return handler(*({k: v for k, v in came.items() if k in names} for names in owners))

    run.__signature__ = inspect.Signature(params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__doc__ = help if help is not None else handler.__doc__
    run.__name__ = f"{name.replace('-', '_')}_command"
    if examples:
        typer_kwargs["epilog"] = epilog(examples)
    if callback:
        app.callback(invoke_without_command=True, **typer_kwargs)(run)
    else:
        app.command(name, cls=Command, **typer_kwargs)(run)
    return run


def _is_argument(p: inspect.Parameter) -> bool:
    meta = typing.get_args(p.annotation)[1:] if typing.get_origin(p.annotation) is Annotated else ()
    return any(isinstance(m, typer.models.ArgumentInfo) for m in meta)
