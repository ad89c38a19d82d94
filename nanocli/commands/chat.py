"""The terminal side of ``nano generate -i``: reading lines, streaming answers, the figures line.

Lines are read with ``input()``; where the stdlib ``readline`` imports and stdin is a terminal it gives line
editing and a history kept in ``<cache dir>/chat_history`` (``resolve.cache_dir``: ``$NANO_CACHE``, else
``$XDG_CACHE_HOME/nano``, else ``~/.cache/nano``), read at the start and written at the end. A line starting
with ``\"\"\"`` opens a multi-line message, closed by a line ending with ``\"\"\"``; the block is one user
turn, even when it starts with ``/``. Every other line goes to the ``stages/chat.py`` session, which answers
commands itself.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from rich.markup import escape

from .. import ui
from ..stages.chat import ChatSession, help_text
from .generate import TextStream, show_generation_stats

BLOCK = '"""'
HISTORY_FILE = "chat_history"
HISTORY_LENGTH = 1000


def start_worker_threads_without_ctrl_c() -> None:
    """Start torch's worker threads (intra-op OpenMP pool, inter-op pool) with SIGINT blocked, so they keep it
    blocked for good. A Ctrl-C typed at the prompt is sent to the whole process, and the kernel may hand it to
    any thread that does not block it: taken by a worker, it never interrupts the main thread's ``input()``,
    and the chat would sit waiting for the next key (the pty test caught this after the first answer). ``cli.main``
    calls it for ``nano generate -i`` before anything else imports torch (its import starts a thread too)."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        import torch  # inside: importing it starts a thread of its own

        torch.ones(1 << 22).sum()  # a parallel region: the OpenMP threads start now, inheriting the mask
        torch.jit.wait(torch.jit.fork(torch.ones(1).sum))  # the inter-op pool too
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def chat(session: ChatSession, hide_thinking: bool = False) -> None:
    """Read a message, hand it to the session, show what it did; until /exit or end of input (Ctrl-D)."""
    out, loaded = ui.console(), session.loaded
    history = LineHistory.open() if sys.stdin.isatty() else None
    color = out.is_terminal and not out.no_color
    prompt, more = _prompt("you>", color, history is not None), _prompt("...", color, history is not None)
    out.print(f"[bold]nano chat[/] ({escape(str(session.options.model))}, {loaded.device} {loaded.dtype}) - "
              "/help lists the commands, Ctrl-D leaves")
    for note in loaded.notes:  # e.g. --dtype auto chose bf16 to fit this machine's memory
        out.print(f"[dim]note: {escape(note)}[/]")
    try:
        while True:
            try:
                message, block = read_message(prompt, more)
            except EOFError:  # Ctrl-D, or the end of piped input
                out.print()
                return
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line (or block), not the chat
                out.print("\n[dim](Ctrl-D or /exit leaves)[/]")
                continue
            if not block and message.strip() == "/help":
                out.print(help_text(), markup=False)
                out.print(escape(input_help(history)), style="dim")
                continue
            stream = TextStream(hide_thinking)
            turn = session.say(message, stream.write) if block else session.send(message, stream.write)
            if turn.done:
                return
            if turn.generated:
                stream.close()
            if turn.note:
                out.print(escape(turn.note), style="dim")
            if turn.error:
                out.print(escape(turn.error), style="red")
            if turn.result is not None and session.show_stats:
                show_generation_stats(turn.result)
    finally:
        if history is not None:
            history.save()


def read_message(prompt: str, more: str) -> tuple[str, bool]:
    """One line, or a ``\"\"\"`` block of lines joined by newlines; and whether it was a block."""
    line = input(prompt)
    head = line.strip()
    if not head.startswith(BLOCK):
        return line, False
    body = head[len(BLOCK):]
    if body.endswith(BLOCK):  # \"\"\"one line\"\"\"
        return body[:-len(BLOCK)], True
    parts = [body] if body else []
    while True:
        line = input(more)
        if line.rstrip().endswith(BLOCK):
            last = line.rstrip()[:-len(BLOCK)]
            if last:
                parts.append(last)
            return "\n".join(parts), True
        parts.append(line)


def input_help(history: LineHistory | None) -> str:
    kept = f"Up/Down recall earlier lines (kept in {history.path}); " if history is not None else ""
    return (f'{BLOCK} on a line of its own (or at its start) opens a multi-line message, a line ending in {BLOCK} '
            f"closes it and sends it, as text even when it starts with /.\n{kept}Ctrl-C stops an answer or drops "
            "the line being typed; Ctrl-D leaves.")


def _prompt(text: str, color: bool, readline_on: bool) -> str:
    """The prompt, bold green on a colour terminal (the escapes bracketed for readline's line width)."""
    if not color:
        return f"{text} "
    on, off = "\033[1;32m", "\033[0m"
    if readline_on:
        on, off = f"\001{on}\002", f"\001{off}\002"
    return f"{on}{text}{off} "


class LineHistory:
    """The stdlib ``readline``'s history, read from and written to a file in nano's cache directory."""

    def __init__(self, readline: Any, path: Path):
        self.readline, self.path = readline, path

    @classmethod
    def open(cls) -> LineHistory | None:
        """Line editing on, the saved history loaded; None where ``readline`` is not available."""
        try:
            import readline
        except ImportError:  # e.g. Windows without pyreadline: plain input(), no history
            return None
        from ..resolve import cache_dir

        history = cls(readline, cache_dir(None) / HISTORY_FILE)
        try:
            readline.read_history_file(str(history.path))
        except OSError:  # none yet, or unreadable: start empty
            pass
        readline.set_history_length(HISTORY_LENGTH)
        return history

    def save(self) -> None:
        """Write the history (private to the user); a failure to write is not the chat's concern."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(str(self.path))
            self.path.chmod(0o600)
        except OSError:
            pass
