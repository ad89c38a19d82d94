"""The house rules of ``nanocli`` (issue #17), read from the source: no import cycle between its modules, no
module importing another module's private name, no file over 500 lines, and every command's ``--help`` showing
real defaults. (The model library's rules are test_imports.py's.)"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI_FILES = sorted((ROOT / "nanocli").rglob("*.py"))
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolved(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def module_level_imports(path: Path) -> set[str]:
    """The ``nanocli`` modules a file imports when it is imported (top-level statements, not function bodies)."""
    out: set[str] = set()
    known = {module_name(p) for p in CLI_FILES}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("nanocli."))
        elif isinstance(node, ast.ImportFrom):
            base = resolved(path, node)
            for alias in node.names:  # `from . import ui` imports the module nanocli.ui
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m.startswith("nanocli.") or m == "nanocli"}


def test_no_import_cycle():
    graph = {module_name(p): module_level_imports(p) for p in CLI_FILES}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if state.get(name) is None:
            visit(name, [name])


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in CLI_FILES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                if private:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {', '.join(private)}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", CLI_FILES, ids=lambda p: str(p.relative_to(ROOT / "nanocli")))
def test_files_stay_under_500_lines(path):
    lines = path.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (split it by responsibility)"


COMMANDS = ["profiles", "info", "demo", "fit-check", "generate", "pretrain", "align", "align merge", "eval",
            "distill", "bench", "prune"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_real_defaults(command):
    """Every option with a default shows it; none shows ``None`` as a default (a flag set only on the command
    line would hide the recipe's and the stage's real value). The help ends with examples and shows no type
    label (``<bool>``, ``<str>``) where a value's name belongs."""
    result = subprocess.run([sys.executable, "-m", "nanocli.cli", *command.split(), "--help"], capture_output=True,
                            text=True, timeout=60, env={"COLUMNS": "200", "PATH": "", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "[default: None]" not in text
    assert not re.search(r"<(bool|str|int|float|list\[[a-z]+\])>", text), text
    assert f"Examples: nano {command}" in text
    if command not in ("profiles", "info", "align merge"):  # every other command has settings with defaults
        assert re.search(r"\[default: [^\]]+\]", text), text[:500]


# ------------------------------------------------------------------------------------------ help (issue #19)
MODEL_READERS = ["info", "fit-check", "generate", "eval", "bench", "prune", "pretrain", "align"]  # distill: two


def _commands():
    """(path, click command) for every command and subcommand, as ``nano --help`` builds them."""
    import typer

    from nanocli.cli import build_app

    def walk(cmd, path):
        yield path, cmd
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            yield from walk(sub, f"{path} {name}")

    return list(walk(typer.main.get_command(build_app()), "nano"))


def test_every_command_has_examples_and_readable_metavars():
    """Every command's help ends with runnable examples (two or more where it has options); no metavar is a
    type label (``<bool>``, ``<list[str]>``): on/off flags show none, values a word such as N, FILE, a|b."""
    import typer

    for path, cmd in _commands():
        ctx = typer.Context(cmd)
        params = [p for p in cmd.get_params(ctx) if not getattr(p, "hidden", False)]
        for p in params:
            shown = p.metavar if p.param_type_name == "option" else p.display_type_rich(ctx)
            assert shown is None or ("<" not in shown and ">" not in shown and "[" not in shown), (path, p.name, shown)
            if p.param_type_name == "argument":
                assert p.metavar and p.metavar.isupper(), (path, p.name)
        if path == "nano":
            continue
        from nanocli.commands.flags import examples

        shown_examples = examples(cmd.epilog)
        wanted = 2 if len(params) > 1 else 1
        assert len(shown_examples) >= wanted, f"{path}: add examples (commands/*.py, command(..., examples=))"
        assert all(e[: len(path.split())] == path.split() for e in shown_examples), path


def test_every_model_reading_command_takes_dash_m():
    found = {path.split()[1]: cmd for path, cmd in _commands() if path.count(" ") == 1}
    for name in MODEL_READERS:
        opts = {o for p in found[name].params for o in p.opts if p.name == "model"}
        assert {"-m", "--model"} <= opts, f"nano {name}: -m/--model"


def test_one_meaning_per_flag_name():
    """A flag name is one kind of value everywhere (``--batch`` a whole number; ``--out`` a directory and
    ``--output`` a file, by metavar; ``--top-k`` only as generate's sampling)."""
    seen: dict[str, set] = {}
    for _path, cmd in _commands():
        for p in cmd.params:
            if p.param_type_name == "option" and not p.hidden:
                for o in p.opts:
                    seen.setdefault(o, set()).add(p.metavar)
    assert seen["--batch"] == {"N"} and seen["--out"] == {"DIR"} and seen["--output"] == {"FILE"}
    assert seen["--model"] == {"MODEL"} and seen["--seed"] == {"N"}
    top_k = [path for path, cmd in _commands() for p in cmd.params if "--top-k" in p.opts and not p.hidden]
    assert top_k == ["nano generate"]
