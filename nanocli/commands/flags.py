"""Options dataclasses -> typer parameters: the one helper between ``settings.py`` and the command line.

Each field becomes ``--field-name`` (or what ``settings.flag`` names), typed by its annotation (``Literal``
choices show in ``--help``), helped by its docstring, defaulting to the dataclass default (shown in
``--help``), in the help panel of the group that declares it. A command then learns which flags were given on
the command line (click's parameter source), so that a recipe can sit between the defaults and the flags.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import MISSING
from typing import Annotated, Any

import typer

from .. import settings

_SIMPLE = (str, int, float, bool)


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


def parameters(cls: type, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per command-line field of ``cls`` (arguments first, in field order)."""
    hints = typing.get_type_hints(cls)
    docs = settings.docs(cls)
    args, opts = [], []
    for f in dataclasses.fields(cls):
        spec = settings.cli_spec(f)
        if spec.hidden or f.name in skip:
            continue
        default, hint = _default(f), hints[f.name]
        help_text = docs.get(f.name, "")
        if spec.argument:
            info = typer.Argument(help=help_text, show_default=default is not None)
            args.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                          annotation=Annotated[_cli_type(hint), info]))
            continue
        name = settings.flag_name(f)
        if hint is bool and default is True and "/" not in name:
            name = f"{name}/--no-{name[2:]}"
        info = typer.Option(name, *spec.aliases, help=help_text, rich_help_panel=_panel(cls, f.name),
                            show_default=_shown(default))
        opts.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                      annotation=Annotated[_cli_type(hint), info]))
    return args + opts


def given(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The values that came from the command line (or the environment), not the defaults."""
    def source(k: str) -> str:
        s = ctx.get_parameter_source(k)
        return "" if s is None else s.name
    return {k: v for k, v in values.items() if source(k) not in ("", "DEFAULT", "DEFAULT_MAP")}


def command(app: typer.Typer, name: str, handler: Callable[..., Any], *groups: type, help: str | None = None,
            callback: bool = False, **typer_kwargs: Any) -> Callable[..., Any]:
    """Register ``nano NAME`` with the fields of ``groups`` (options dataclasses) as its parameters.

    ``handler(*given)`` receives, for each class in ``groups``, a dict of the fields given on the command line
    (``dict`` keyed by field name; the defaults are the dataclass's own, so an empty dict means "all defaults").
    ``callback``: ``app`` is a command group (``nano align``) and this is what it runs without a subcommand.
    """
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    owners: list[list[str]] = []
    for cls in groups:
        own = parameters(cls, skip=tuple(p.name for p in params))
        owners.append([p.name for p in own])
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
    if callback:
        app.callback(invoke_without_command=True, **typer_kwargs)(run)
    else:
        app.command(name, **typer_kwargs)(run)
    return run


def _shown(default: Any) -> bool:
    """Whether ``--help`` shows the default: not for None, False or an empty list (0 and 0.0 are shown)."""
    return not (default is None or default is False or default in ([], ()))


def _is_argument(p: inspect.Parameter) -> bool:
    meta = typing.get_args(p.annotation)[1:] if typing.get_origin(p.annotation) is Annotated else ()
    return any(isinstance(m, typer.models.ArgumentInfo) for m in meta)
