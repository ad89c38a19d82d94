"""``nano FILE``: the text editor's name used on a path, not a ``nano`` command.

With nano's environment active, ``nano`` on PATH is this program, and ``EDITOR=nano git commit`` runs
``nano .git/COMMIT_EDITMSG``. When the first word that is neither a flag (``-w``) nor an editor line number
(``+12``) is an existing path and no nano command, the command line is handed to the ``nano`` text editor: the
first ``nano`` on PATH that is not this program (``os.execv``, same arguments); without one, one line says what
this ``nano`` is and how to reach the editor, and the exit code is 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Sequence

WELL_KNOWN = ("/usr/bin/nano", "/bin/nano", "/usr/local/bin/nano", "/opt/homebrew/bin/nano")


def edited_path(args: Sequence[str], commands: Collection[str]) -> str | None:
    """The path an editor would open, when ``args`` are an editor's command line rather than nano's."""
    first = next((a for a in args if not a.startswith(("-", "+"))), None)
    if first is None or first in commands or not os.path.exists(first):
        return None
    return first


def is_this_program(path: str) -> bool:
    """Whether ``path`` is this program: the running script, or a console script that starts ``nanocli``."""
    real = os.path.realpath(path)
    if sys.argv and sys.argv[0] and real == os.path.realpath(sys.argv[0]):
        return True
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"#!") and b"nanocli" in head


def find_editor(search_path: str | None = None) -> str | None:
    """The first executable ``nano`` on ``search_path`` ($PATH) that is not this program."""
    for folder in (os.environ.get("PATH", "") if search_path is None else search_path).split(os.pathsep):
        candidate = os.path.join(folder or ".", "nano")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK) and not is_this_program(candidate):
            return candidate
    return None


def hand_over(args: Sequence[str], path: str) -> None:
    """Run the ``nano`` editor on ``args`` in place of this process; or say how to reach it and exit 2."""
    editor = find_editor()
    if editor is not None:
        try:
            os.execv(editor, ["nano", *args])
        except OSError:
            pass
    elsewhere = next((p for p in WELL_KNOWN if os.access(p, os.X_OK) and not is_this_program(p)), None)
    how = (f"run the editor as {elsewhere} {path}" if elsewhere else
           "install the nano editor or set EDITOR to another editor")
    print(f"error: this `nano` is the nano model toolchain (see `nano --help`), not the text editor, and no nano "
          f"editor is on PATH: {how}", file=sys.stderr)
    raise SystemExit(2)
