"""nano's cache directory (token shards, the chat history): ``--cache-dir``, else ``$NANO_CACHE``, else
``$XDG_CACHE_HOME/nano`` (set, non-empty and absolute, as the XDG base-directory specification asks), else
``~/.cache/nano``; one function, ``resolve.cache_dir``, says it for every command."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from nanocli import resolve

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("value, nano_cache, xdg, expected", [
    ("given", "/n", "/x", "given"),  # --cache-dir wins
    (None, "/n", "/x", "/n"),  # then $NANO_CACHE
    (None, None, "/x", "/x/nano"),  # then $XDG_CACHE_HOME/nano
    (None, "", "/x", "/x/nano"),  # an empty $NANO_CACHE is unset
    (None, None, "", "HOME/.cache/nano"),  # an empty $XDG_CACHE_HOME is unset
    (None, None, "relative/dir", "HOME/.cache/nano"),  # a relative one is invalid: ignored
    (None, None, None, "HOME/.cache/nano"),
])
def test_cache_dir_order(monkeypatch, tmp_path, value, nano_cache, xdg, expected):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, setting in (("NANO_CACHE", nano_cache), ("XDG_CACHE_HOME", xdg)):
        if setting is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, setting)
    assert resolve.cache_dir(value) == Path(expected.replace("HOME", str(tmp_path)))


def cache_literals(source: str) -> list[str]:
    """The string constants of ``source`` that build or read a cache path: ``".cache"``, ``"~/.cache..."``,
    ``"NANO_CACHE"``, ``"XDG_CACHE_HOME"`` (text that merely mentions them, a docstring or a help line, is not)."""
    return [node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and (node.value in (".cache", "NANO_CACHE", "XDG_CACHE_HOME") or node.value.startswith("~/.cache"))]


def test_no_other_module_builds_a_cache_path():
    """Every command reaches the cache through ``resolve.cache_dir`` and the model library through
    ``nanocli_model.cache_home`` (which ``resolve.cache_dir`` calls): no second rule anywhere else."""
    rule = ROOT / "nanocli_model" / "__init__.py"
    assert sorted(cache_literals(rule.read_text())) == [
        ".cache", "NANO_CACHE", "NANO_CACHE", "XDG_CACHE_HOME"]  # the one rule, found
    assert sorted(cache_literals('x = Path.home() / ".cache" / "nano"\ny = os.environ.get("NANO_CACHE")')) == [
        ".cache", "NANO_CACHE"]  # what the check below would catch
    files = [*(ROOT / "nanocli").rglob("*.py"), *(ROOT / "nanocli_model").rglob("*.py")]
    elsewhere = {str(p.relative_to(ROOT)): found for p in sorted(files)
                 if p != rule and (found := cache_literals(p.read_text(encoding="utf-8")))}
    assert elsewhere == {}
