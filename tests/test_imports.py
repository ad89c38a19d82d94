"""The dependency rules of DESIGN.md: the model library never imports the CLI side, and the
cheap paths (config, memory, ``import nanocli.cli``) never import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = sorted((ROOT / "nanocli_model").rglob("*.py"))
CLI_SIDE = {"nanocli", "typer", "rich", "yaml", "click"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file (anywhere in it, lazy ones included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_model_library_exists():
    assert MODEL_FILES, "nanocli_model/ has no Python files"


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_model_library_never_imports_the_cli_side(path):
    assert not imported_modules(path) & CLI_SIDE, f"{path.name} imports {imported_modules(path) & CLI_SIDE}"


@pytest.mark.parametrize("name", ["config.py", "memory.py", "errors.py", "fit.py", "headers.py"])
def test_pure_modules_import_no_torch(name):
    assert "torch" not in imported_modules(ROOT / "nanocli_model" / name)


@pytest.mark.parametrize("module", ["nanocli.cli", "nanocli.profiles", "nanocli.demo", "nanocli_model",
                                    "nanocli.stages.fit_check", "nanocli.nvml", "nanocli.plot", "nanocli_model.fit",
                                    "nanocli.library_check", "nanocli.stages.prune", "nanocli.commands.prune",
                                    "nanocli.commands.demo", "nanocli.prune.search",
                                    "nanocli.commands.pretrain", "nanocli.commands.distill", "nanocli.commands.align"])
def test_importing_does_not_load_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("module", ["nanocli.commands.generate", "nanocli.commands.eval", "nanocli.commands.bench"])
def test_registering_a_serving_command_does_not_load_torch(module):
    """`nano generate --help` and a bad flag answer before torch loads: the command module, its options and the
    stage modules it imports for them stay torch-free at import."""
    test_importing_does_not_load_torch(module)
