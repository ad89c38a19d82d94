"""The declarative option layer: one dataclass field per setting, read three ways.

A stage's options class is built from *groups* (small dataclasses: the run directory, the batch, the optimiser,
the schedule, ...) by inheritance, so its fields are flat (``o.lr``) and every stage that trains shares the same
declarations. Each field has a default, a type (``Literal[...]`` for a choice) and a docstring, and is at once:

* a stage input: ``PretrainOptions(lr=1e-3)``;
* a recipe key (``nanocli/profiles/recipes/*.yaml``; ``train/recipe.py`` checks names and types);
* a command-line flag: ``commands/flags.py`` turns the fields into typer parameters, the docstring becoming
  the help text and the default the ``--help`` default, grouped into one help panel per group.

Precedence: defaults < recipe < flags given on the command line. Validation runs once, before any work: every
group's ``check()`` in the options class, through :func:`validate`. ``flag(...)`` adds what a field needs on
the command line only (a short alias, a flag name other than the field's, a positional argument, a metavar, the
old spelling of a renamed flag).
No typer, rich or torch here: stages import this module.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, Literal

from nanocli_model.errors import NanoError

CLI = "nano_cli"  # the key of a field's command-line metadata


class OptionError(NanoError):
    """A setting out of range; ``validate`` re-raises it as the stage's own error class."""


@dataclass(frozen=True)
class CliSpec:
    """How a field appears on the command line."""

    name: str | None = None  # the flag without dashes (default: the field name with - for _)
    aliases: tuple[str, ...] = ()  # e.g. ("-m",)
    argument: bool = False  # a positional argument instead of an option
    hidden: bool = False  # not on the command line (a recipe or API setting only)
    metavar: str | None = None  # what --help shows after the flag (default: commands/flags.py's by name or type)
    deprecated: tuple[str, ...] = ()  # old spellings of a renamed flag: hidden, still accepted, warned once


def flag(default: Any = MISSING, *, default_factory: Any = MISSING, name: str | None = None,
         aliases: tuple[str, ...] = (), argument: bool = False, hidden: bool = False, metavar: str | None = None,
         deprecated: tuple[str, ...] = ()) -> Any:
    """A dataclass field with command-line details (see :class:`CliSpec`); the help is the docstring."""
    spec = CliSpec(name, tuple(aliases), argument, hidden, metavar, tuple(deprecated))
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={CLI: spec})
    return field(default=default, metadata={CLI: spec})


def cli_spec(f: dataclasses.Field) -> CliSpec:
    return f.metadata.get(CLI, CliSpec())


def flag_name(f: dataclasses.Field) -> str:
    """``--micro-batch`` for the field ``micro_batch`` (or the name given to :func:`flag`)."""
    return "--" + (cli_spec(f).name or f.name.replace("_", "-"))


@functools.cache
def docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it (a string literal after the annotated assignment), for
    ``cls`` and its bases (a subclass's own docstring wins). One line: the help text of the flag."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a class made at run time): no help texts
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                out[node.target.id] = " ".join(after.value.value.split())
    return out


class Group:
    """A group of settings: a dataclass mixin with a help-panel title and a ``check`` of its own fields."""

    panel: ClassVar[str] = "Options"

    def check(self) -> None:
        """Raise :class:`OptionError` naming the flag when a value of this group is out of range."""


def choices(hint: Any) -> tuple | None:
    """The allowed values of a ``Literal[...]`` annotation (also inside ``X | None``), else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


def validate(options: Any, error: type[NanoError] = OptionError) -> None:
    """Check ``options`` before any work: every ``Literal`` field holds one of its values (the command line
    checks that itself; the Python API and recipes come here), then ``check`` of every group ``options`` is
    made of, once each, base groups first. An ``OptionError`` becomes ``error`` (the stage's own class)."""
    seen = set()
    try:
        for name, hint in typing.get_type_hints(type(options)).items():
            allowed = choices(hint)
            value = getattr(options, name, None)
            if allowed is not None and value is not None and value not in allowed:
                raise OptionError(f"{_name(name, options)} {value!r} is unknown; use one of "
                                  f"{', '.join(map(str, allowed))}")
        for klass in reversed(type(options).__mro__):
            check = klass.__dict__.get("check")
            if check is not None and check not in seen:
                seen.add(check)
                check(options)
    except OptionError as e:
        if error is OptionError:
            raise
        raise error(str(e)) from None


# ------------------------------------------------------------------------------------------ checks
def _name(field_name: str, options: Any = None) -> str:
    """The flag of a field of ``options`` as the command line spells it (``top_k`` of distill: --kd-top-k)."""
    fields = {f.name: f for f in dataclasses.fields(options)} if dataclasses.is_dataclass(options) else {}
    return flag_name(fields[field_name]) if field_name in fields else "--" + field_name.replace("_", "-")


def at_least(o: Any, minimum: int | float, *names: str) -> None:
    """Each named setting (when not None) is a number >= ``minimum``."""
    for n in names:
        value = getattr(o, n)
        if value is not None and not value >= minimum:
            raise OptionError(f"{_name(n, o)} must be at least {minimum}, got {value}")


def finite(o: Any, *names: str, minimum: float | None = None, positive: bool = False) -> None:
    """Each named setting (when not None) is finite, and >= ``minimum`` / > 0 when asked."""
    for n in names:
        value = getattr(o, n)
        if value is None:
            continue
        ok = math.isfinite(value) and (minimum is None or value >= minimum) and (not positive or value > 0)
        if not ok:
            bound = " > 0" if positive else f" >= {minimum:g}" if minimum is not None else ""
            raise OptionError(f"{_name(n, o)} must be a finite number{bound}, got {value}")


def within(o: Any, name: str, lo: float, hi: float, *, hi_open: bool = False) -> None:
    value = getattr(o, name)
    if value is None:
        return
    if not (math.isfinite(value) and lo <= value and (value < hi if hi_open else value <= hi)):
        raise OptionError(f"{_name(name, o)} must be in [{lo:g}, {hi:g}{')' if hi_open else ']'}, got {value}")
