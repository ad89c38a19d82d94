"""``nano generate --interactive``: the multi-turn chat, without the terminal.

``ChatSession`` holds the history and the session's own copy of the settings. ``send(line)`` runs a command
(a line starting with ``/``: see ``COMMANDS``) or answers the line as a user turn; ``say(text)`` is always a
user turn (a multi-line block may start with ``/``). Commands are answered here, never sent to the model:
an unknown one is an error. Each call returns a ``ChatTurn`` (a note, an error, or the generation); the
reading of lines, the streaming and the figures line are ``commands/chat.py``'s.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanocli_model.errors import NanoError

from .. import settings
from .generate import GenerateError, GenerateOptions, GenerateResult, Loaded, OnText, load, messages_for, run

# command -> what it does (the order of /help)
COMMANDS = {
    "/think": "reasoning on",
    "/no_think": "reasoning off",
    "/set NAME VALUE": "temperature, top_p, top_k, min_p, max_new_tokens, budget or system "
                       "('off' unsets budget, max_new_tokens and system); /set alone shows them",
    "/budget N": "thinking budget in tokens ('off': none); = /set budget N",
    "/stats": "figures line after each answer on/off",
    "/save FILE": "write the conversation as JSON ({\"messages\": [...]})",
    "/load FILE": "restore a conversation /save wrote (its system message too)",
    "/reset": "clear the history",
    "/help": "this list",
    "/exit": "leave (also /quit, Ctrl-D)",
}

# /set NAME -> (GenerateOptions field, type); None: 'off' unsets it
SETTABLE: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
    "min_p": ("min_p", float), "max_new_tokens": ("max_new_tokens", int), "budget": ("thinking_budget", int),
    "system": ("system", str),
}
UNSETTABLE = ("max_new_tokens", "budget", "system")


@dataclass
class ChatTurn:
    """What one line typed into the chat did: a command's note, an answer, or an error that ended the turn."""

    note: str = ""  # "(reasoning off)", "(history cleared)", "(stopped)", the /help text, ...
    error: str = ""  # a bad command, or a turn that failed (the chat goes on)
    result: GenerateResult | None = None  # the answer's generation
    generated: bool = False  # the line went to the model (text may have streamed)
    done: bool = False  # /exit or /quit


class ChatSession:
    """A multi-turn chat through the chat template, with its own settings (the caller's are left alone)."""

    def __init__(self, options: GenerateOptions, loaded: Loaded | None = None, show_stats: bool = False):
        settings.validate(options, GenerateError)
        self.options = dataclasses.replace(options, stop=list(options.stop))  # the session changes its own
        self.loaded = loaded or load(options, options.compile)
        self.history: list[dict[str, Any]] = []
        self.show_stats = show_stats  # whether the caller shows the figures line after an answer (/stats)

    def send(self, line: str, on_text: OnText | None = None) -> ChatTurn:
        """A command (a line starting with ``/``) or a user turn."""
        text = line.strip()
        if not text:
            return ChatTurn()
        if not text.startswith("/"):
            return self.say(line, on_text)
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return ChatTurn(done=True)
        if name == "/help":
            return ChatTurn(note=help_text())
        if name in ("/think", "/no_think", "/reset", "/stats") and arg:
            return ChatTurn(error=f"{name} takes no value")
        if name == "/reset":
            self.history.clear()
            return ChatTurn(note="(history cleared)")
        if name in ("/think", "/no_think"):
            self.options.think = name == "/think"
            return ChatTurn(note=f"(reasoning {'on' if self.options.think else 'off'})")
        if name == "/stats":
            self.show_stats = not self.show_stats
            return ChatTurn(note=f"(figures line {'on' if self.show_stats else 'off'})")
        if name == "/budget":
            if arg and arg != "off" and not arg.isdigit():
                return ChatTurn(error="/budget takes a number of tokens or 'off'")
            return self.set("budget", arg or "off")
        if name == "/set":
            if not arg:
                return ChatTurn(note=self.describe())
            key, _, value = arg.partition(" ")
            return self.set(key, value.strip())
        if name in ("/save", "/load"):
            if not arg:
                return ChatTurn(error=f"{name} takes a file name")
            return self.save(Path(arg).expanduser()) if name == "/save" else self.load(Path(arg).expanduser())
        return ChatTurn(error=f"unknown command {name}; /help lists them")

    def say(self, text: str, on_text: OnText | None = None) -> ChatTurn:
        """A user turn, answered with the history so far (the history keeps the answer, not the thinking)."""
        if not text.strip():
            return ChatTurn()
        self.history.append({"role": "user", "content": text})
        try:
            result = run(self.options, [list(self.history)], self.loaded, on_text=on_text)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            self.history.pop()
            return ChatTurn(note="(stopped)", generated=True)
        except NanoError as e:  # a bad turn (e.g. the context is full) ends the turn, not the chat
            self.history.pop()
            return ChatTurn(error=f"error: {e}", generated=True)
        self.history.append({"role": "assistant", "content": result.outputs[0].answer})
        return ChatTurn(result=result, generated=True)

    # ------------------------------------------------------------------------------------ settings
    def set(self, key: str, value: str) -> ChatTurn:
        """``/set KEY VALUE``: checked as the flag is; a bad value leaves the setting as it was."""
        key = key.replace("-", "_")
        key = "budget" if key == "thinking_budget" else key
        if key not in SETTABLE:
            return ChatTurn(error=f"/set {key}: unknown setting; use one of {', '.join(SETTABLE)}")
        field, kind = SETTABLE[key]
        if not value:
            return ChatTurn(error=f"/set {key} needs a value")
        try:
            parsed = None if key in UNSETTABLE and value == "off" else kind(value)
        except ValueError:
            return ChatTurn(error=f"/set {key}: {value!r} is not {'an integer' if kind is int else 'a number'}")
        changes: dict[str, Any] = {field: parsed}
        if key == "temperature":
            changes["greedy"] = False  # --greedy would override it
        candidate = dataclasses.replace(self.options, **changes)
        try:
            settings.validate(candidate)
        except settings.OptionError as e:
            return ChatTurn(error=f"/set {str(e).replace('--' + field.replace('_', '-'), key)}")
        was_greedy, self.options = self.options.greedy, candidate
        if key == "budget":
            return ChatTurn(note=f"(thinking budget: {'off' if parsed is None else parsed})")
        greedy = ", --greedy off" if was_greedy and not candidate.greedy else ""
        return ChatTurn(note=f"({key}: {'off' if parsed is None else parsed}{greedy})")

    def describe(self) -> str:
        o = self.options
        think = {None: "as the messages say", True: "on", False: "off"}[o.think]
        return (f"temperature {o.sampling_temperature:g}{' (--greedy)' if o.greedy else ''}, top_p {o.top_p:g}, "
                f"top_k {o.top_k}, min_p {o.min_p:g}, max_new_tokens {o.max_new_tokens or 'default'}, "
                f"budget {'off' if o.thinking_budget is None else o.thinking_budget}, reasoning {think}, "
                f"system {json.dumps(o.system) if o.system is not None else 'off'}")

    # ------------------------------------------------------------------------------------ files
    def messages(self) -> list[dict[str, Any]]:
        """The conversation: the system message (if set) and the history."""
        return messages_for(self.history, self.options.system)

    def save(self, path: Path) -> ChatTurn:
        messages = self.messages()
        try:
            path.write_text(json.dumps({"messages": messages}, ensure_ascii=False, indent=2) + "\n",
                            encoding="utf-8")
        except OSError as e:
            return ChatTurn(error=f"/save {path}: cannot be written ({e.strerror or e})")
        return ChatTurn(note=f"(saved {len(messages)} messages to {path})")

    def load(self, path: Path) -> ChatTurn:
        try:
            system, history = read_conversation(path)
        except GenerateError as e:
            return ChatTurn(error=f"/load {e}")
        self.options.system, self.history = system, history
        return ChatTurn(note=f"(loaded {len(history)} messages from {path}"
                             f"{', with its system message' if system is not None else ''})")


def help_text() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join(f"{c.ljust(width)}  {what}" for c, what in COMMANDS.items())


def read_conversation(path: Path) -> tuple[str | None, list[dict[str, Any]]]:
    """A conversation /save wrote (or a bare list of messages): its system message and the rest, checked."""
    from ..data.chat_io import normalize_messages

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise GenerateError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise GenerateError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except RecursionError:
        raise GenerateError(f"{path}: not valid JSON (nested too deeply)") from None
    value = raw.get("messages") if isinstance(raw, dict) else raw
    if not isinstance(value, list):
        raise GenerateError(f'{path}: expected {{"messages": [...]}} (what /save writes) or a list of messages')
    try:
        messages = normalize_messages(value, f"{path}: messages", default_role=None) if value else []
    except NanoError as e:
        raise GenerateError(str(e)) from None
    system = messages.pop(0)["content"] if messages and messages[0]["role"] == "system" else None
    for j, m in enumerate(messages):
        if m["role"] not in ("user", "assistant"):
            raise GenerateError(f"{path}: messages[{j + (system is not None)}] has role {m['role']!r}; after an "
                                "optional first system message a chat holds user and assistant messages")
    return system, messages
