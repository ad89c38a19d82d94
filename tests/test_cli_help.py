"""``--help`` and docs/CLI.md (issue #19, item 6): the reference page is what the option layer says (regenerate
it with ``python -m nanocli.commands.reference > docs/CLI.md``), every example in a command's help parses with
that command's own flags, and those that need no files of a run really run."""

from __future__ import annotations

import contextlib
import io
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest
import typer

from nanocli.cli import build_app, main
from nanocli.commands import reference
from nanocli.commands.flags import examples

ROOT = Path(__file__).resolve().parent.parent
# examples that read nothing a run writes and write nothing: run for real (the rest are parsed only)
RUNNABLE = ["nano profiles", "nano info nemotron-nano-9b-v2", "nano info --kernels",
            "nano fit-check -m nemotron-nano-9b-v2 --gpu a10g --context 128k",
            "nano fit-check -m nemotron-nano-12b-v2-base --gpu h100-80gb --context 1m --batch 4 --json",
            "nano prune -m nemotron-nano-12b-v2-base --gpu a10g --context 128k --dry-run",
            "nano pretrain --profile tiny --data synthetic:reasoning --steps 100 --out runs/t --dry-run"]


def all_examples() -> list[list[str]]:
    root = typer.main.get_command(build_app())
    found = examples(root.epilog)

    def walk(cmd):
        nonlocal found
        for sub in (getattr(cmd, "commands", None) or {}).values():
            found += examples(sub.epilog)
            walk(sub)

    walk(root)
    return found


def test_cli_reference_page_is_up_to_date():
    page = (ROOT / "docs" / "CLI.md").read_text(encoding="utf-8")
    assert page == reference.markdown(), ("docs/CLI.md is stale: python -m nanocli.commands.reference > "
                                          "docs/CLI.md")


def test_every_flag_is_on_the_reference_page():
    page = (ROOT / "docs" / "CLI.md").read_text(encoding="utf-8")
    root = typer.main.get_command(build_app())
    for name, cmd in root.commands.items():
        for sub in [cmd, *(getattr(cmd, "commands", None) or {}).values()]:
            for p in sub.params:
                if p.param_type_name == "option" and not p.hidden and p.name != "help":
                    assert any(f"`{o}" in page for o in p.opts), (name, p.opts)


@pytest.mark.parametrize("example", [shlex.join(e) for e in all_examples()])
def test_every_example_parses(example):
    """The flags and values of every example are the command's own (click parses them; nothing runs)."""
    words = shlex.split(example)[1:]
    cmd, name = typer.main.get_command(build_app()), "nano"
    while words and words[0] in (getattr(cmd, "commands", None) or {}):  # nano align merge ...
        name, cmd, words = words[0], cmd.commands[words[0]], words[1:]
    ctx = cmd.make_context(name, list(words))  # a bad flag or value raises here
    assert not ctx.args, (example, ctx.args)


def test_the_top_level_help_promises_only_real_commands():
    from nanocli import commands
    from nanocli.cli import HELP

    assert "serve" not in HELP
    for verb, command in (("pretrain", "pretrain"), ("align", "align"), ("prune", "prune"), ("distill", "distill"),
                          ("evaluate", "eval"), ("benchmark", "bench"), ("generate", "generate"),
                          ("fits a GPU", "fit-check")):
        assert verb in HELP and command in commands.NAMES


@pytest.mark.parametrize("example", RUNNABLE)
def test_examples_that_need_no_run_really_run(example, tmp_path, monkeypatch):
    assert shlex.split(example) in all_examples(), "RUNNABLE lists an example no command shows"
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", shlex.split(example)), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, 1), err.getvalue()  # fit-check: 1 = does not fit
    assert list(tmp_path.iterdir()) == []  # wrote nothing
