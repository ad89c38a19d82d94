"""``nano FILE`` (issue #19, item 8): with nano's environment active, ``EDITOR=nano git commit`` runs
``nano .git/COMMIT_EDITMSG``; that command line goes to the ``nano`` text editor on PATH that is not this
program, with the same arguments, or ends in one line saying how to reach the editor (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanocli import editor

ROOT = Path(__file__).resolve().parent.parent


def nano(args: list[str], path: str, cwd: Path) -> subprocess.CompletedProcess:
    """This program as a real process, with ``PATH`` set to ``path``."""
    env = {"PATH": path, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "nanocli.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=env)


def script(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nano"
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def commit_message(tmp_path) -> Path:
    path = tmp_path / ".git" / "COMMIT_EDITMSG"
    path.parent.mkdir()
    path.write_text("a message\n")
    return path


@pytest.mark.parametrize("args", [[".git/COMMIT_EDITMSG"], ["+12", ".git/COMMIT_EDITMSG"],
                                  ["-w", ".git/COMMIT_EDITMSG"]])
def test_an_existing_path_goes_to_the_editor_on_path_with_the_same_arguments(tmp_path, commit_message, args):
    # first on PATH: a console script of this program (skipped), then the editor
    ours = script(tmp_path / "venv-bin", f"#!{sys.executable}\nfrom nanocli.cli import main\nmain()\n")
    script(tmp_path / "usr-bin", '#!/bin/sh\nprintf "editor:%s\\n" "$@"\n')
    result = nano(args, f"{ours.parent}{os.pathsep}{tmp_path / 'usr-bin'}", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"editor:{a}" for a in args]


def test_without_an_editor_one_line_says_what_this_nano_is(tmp_path, commit_message):
    ours = script(tmp_path / "venv-bin", f"#!{sys.executable}\nfrom nanocli.cli import main\nmain()\n")
    result = nano([".git/COMMIT_EDITMSG"], str(ours.parent), tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this `nano` is the nano model toolchain"), result.stderr
    assert "not the text editor" in lines[0] and ("/nano .git/COMMIT_EDITMSG" in lines[0] or "EDITOR" in lines[0])
    assert commit_message.read_text() == "a message\n"


def test_commands_and_missing_paths_stay_nano_commands(tmp_path):
    (tmp_path / "info").mkdir()  # a directory named like a command: the command wins
    assert editor.edited_path(["info", "tiny"], {"info"}) is None
    assert editor.edited_path(["no-such-file"], {"info"}) is None
    assert editor.edited_path(["--version"], {"info"}) is None
    assert editor.edited_path(["-w", "+3", str(tmp_path)], {"info"}) == str(tmp_path)
    result = nano(["no-such-file.txt"], "", tmp_path)
    assert result.returncode == 2 and "no such command 'no-such-file.txt'" in result.stderr


def test_this_programs_console_script_is_never_the_editor(tmp_path):
    ours = script(tmp_path / "bin", f"#!{sys.executable}\n# -*- coding: utf-8 -*-\nimport re\nimport sys\n"
                                    "from nanocli.cli import main\n")
    assert editor.is_this_program(str(ours))
    assert editor.find_editor(str(ours.parent)) is None
    other = script(tmp_path / "other", "#!/bin/sh\nexit 0\n")
    assert editor.find_editor(os.pathsep.join([str(ours.parent), str(other.parent)])) == str(other)
