"""Reading chat, preference and prompt records for ``nano align`` (TRL's dataset conventions).

Record shapes (one JSON object a line in ``.jsonl`` files)::

    SFT   {"messages": [{"role": "system"|"user"|"assistant", "content": "...",
                         "reasoning_content": "..." (optional)}, ...]}
          {"prompt": "..." | [messages], "completion": "..." | [assistant message(s)]}
    DPO   {"prompt": "..." | [messages], "chosen": "..." | [assistant message],
           "rejected": "..." | [assistant message]}
          {"chosen": [whole conversation], "rejected": [whole conversation]}  (implicit prompt:
           the messages both share before their last one)
    GRPO  {"prompt": "..." | [messages], ...any other fields (e.g. "answer"), passed to rewards}

A string prompt is one user message; a string completion / chosen / rejected is one assistant
message. ``content`` is a string, null, or a list of ``{"type": "text", "text": ...}`` parts (joined).
The assistant's reasoning is either inside ``<think>...</think>`` at the start of ``content`` or in
``reasoning_content``. Other message keys (``name``, ``tool_calls``...) are passed to the template.

``read_jsonl_records`` also reads the built-in corpus: ``synthetic:reasoning?QUERY`` where QUERY holds
the ``synthetic`` options (``tasks``, ``difficulty``, ``seed``, ``docs`` = number of records,
``split``) plus ``format=sft|dpo|grpo`` (default: the ``kind`` asked for, else ``sft``) and
``think=on|off|mix`` (default ``on``; ``mix`` draws on/off with probability 1/2 per record, seeded;
``dpo`` supports ``on`` only). Records are ``as_chat`` / ``as_preference`` / ``as_grpo`` of the problems.
"""

from __future__ import annotations

import glob
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from nanocli_model.errors import NanoError
from nanocli_model.tokenizer import THINK_TAGS

from .sources import DataError, Progress

__all__ = ["ReadStats", "read_jsonl_records", "check_record", "record_kind", "normalize_messages", "sft_messages",
           "preference_messages", "record_switch", "KINDS"]

KINDS = ("sft", "dpo", "grpo")
ON_ERROR = ("stop", "skip")
_MAX_ERRORS = 5  # skipped-line messages kept in ReadStats.errors


@dataclass
class ReadStats:
    """Counts of what reading and building did with the data (one object can follow a dataset from
    ``read_jsonl_records`` through the ``build_*`` functions)."""

    files: int = 0              # files read
    lines: int = 0              # non-blank lines read (records generated, for synthetic specs)
    records: int = 0            # records returned by the reader
    skipped_malformed: int = 0  # lines skipped with on_error="skip" (broken JSON, wrong fields)
    used: int = 0               # examples the build_* functions returned (before packing)
    no_assistant: int = 0       # records without an assistant message (or an empty assistant turn)
    truncated: int = 0          # examples cut to seq_len (too_long="truncate")
    dropped_too_long: int = 0   # examples dropped: too long with too_long="drop", or nothing left to learn
    think_on: int = 0           # SFT examples trained with reasoning on
    think_off: int = 0          # SFT examples trained reasoning-off ("/no_think", thinking removed)
    budgeted: int = 0           # reasoning-on SFT examples whose thinking was cut at a token budget
    identical_pairs: int = 0    # DPO pairs skipped because chosen and rejected render the same
    boundary_merges: int = 0    # examples where tokenizing prompt+completion jointly differs (see chat.py)
    tokens: int = 0             # input tokens of the built examples
    label_tokens: int = 0       # tokens with a loss (assistant tokens)
    errors: list[str] = field(default_factory=list)  # the first few skipped-line messages

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- messages
def _content(value: Any, where: str) -> str:
    """A message content as text: a string, null (empty) or a list of text parts (joined)."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise DataError(f"{where}: content must be a string or a list of {{'type': 'text', 'text': ...}} parts, "
                    f"got {_short(value)}")


def normalize_messages(value: Any, where: str, default_role: str | None = "user") -> list[dict[str, Any]]:
    """``value`` as a list of message dicts (copies) with string ``role`` and ``content``: a string is
    one ``default_role`` message (refused when None); a list must hold objects with a ``role``.
    ``DataError`` otherwise."""
    if isinstance(value, str) and default_role is not None:
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        what = "a string or a non-empty list" if default_role is not None else "a non-empty list"
        raise DataError(f"{where}: expected {what} of messages, got {_short(value)}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise DataError(f"{where}[{j}]: a message must be an object with role and content, got {_short(m)}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise DataError(f"{where}[{j}]: message role must be a string (system, user, assistant), got {role!r}")
        msg = dict(m)
        msg["content"] = _content(m.get("content"), f"{where}[{j}].content")
        rc = m.get("reasoning_content")
        if rc is not None and not isinstance(rc, str):
            raise DataError(f"{where}[{j}]: reasoning_content must be a string, got {_short(rc)}")
        out.append(msg)
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


# ---------------------------------------------------------------------------------------------- records
_NEEDS = {"sft": "'messages', or 'prompt' and 'completion'", "dpo": "'chosen' and 'rejected' (and 'prompt')",
          "grpo": "'prompt'"}


def record_kind(record: Mapping[str, Any]) -> str | None:
    """Which kind of data a record's fields make it: ``"dpo"`` (chosen + rejected), ``"sft"``
    (messages, or prompt + completion), ``"grpo"`` (a prompt alone), or None."""
    if "chosen" in record and "rejected" in record:
        return "dpo"
    if "messages" in record or ("prompt" in record and "completion" in record):
        return "sft"
    return "grpo" if "prompt" in record else None


def check_record(record: Any, where: str, kind: str | None = None) -> None:
    """Raise ``DataError`` unless ``record`` is an object usable as ``kind`` data (any kind when None),
    with the fields of the right types."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; write one object per line")
    found = record_kind(record)
    ok = found == kind or (kind == "grpo" and "prompt" in record) if kind else found is not None
    if not ok:
        keys = ", ".join(list(record)[:8]) or "none"
        need = _NEEDS[kind] if kind else "; or ".join(_NEEDS.values())
        raise DataError(f"{where}: no {need} field (fields: {keys}); see TRL's dataset formats")
    if "messages" in record and found == "sft":
        normalize_messages(record["messages"], f"{where}: messages", None)
    for key, role in (("prompt", "user"), ("completion", "assistant"), ("chosen", "assistant"),
                      ("rejected", "assistant")):
        if key in record and (key == "prompt" or found in ("sft", "dpo")):
            normalize_messages(record[key], f"{where}: {key}", role)


# ---------------------------------------------------------------------------------------------- reading
def read_jsonl_records(path_or_spec: str | Path, on_error: str = "stop", stats: ReadStats | None = None,
                       kind: str | None = None, progress: Progress | None = None) -> list[dict[str, Any]]:
    """The records of a ``.jsonl`` file, a glob of them, a directory (its ``*.jsonl``, recursively,
    sorted), or a ``synthetic:reasoning?...`` spec (see the module docstring).

    Every record is checked (``check_record``, against ``kind`` when given). A broken line raises
    ``DataError("FILE:LINE: ...")`` with ``on_error="stop"``; with ``"skip"`` it is counted in
    ``stats.skipped_malformed`` (its message kept in ``stats.errors``, first few). ``progress(desc,
    done, total)`` counts bytes."""
    if on_error not in ON_ERROR:
        raise DataError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if kind is not None and kind not in KINDS:
        raise DataError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    stats = stats if stats is not None else ReadStats()
    spec = str(path_or_spec)
    if spec.startswith("synthetic:"):
        records = _synthetic_records(spec, kind)
        stats.lines += len(records)
        stats.records += len(records)
        return records
    paths = _resolve_jsonl(spec)
    total, done, records = sum(p.stat().st_size for p in paths), 0, []
    for path in paths:
        stats.files += 1
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                done += len(raw)
                if not raw.strip():
                    continue
                stats.lines += 1
                try:
                    records.append(_parse_line(raw, f"{path}:{lineno}", kind, lineno == 1))
                except DataError as exc:
                    if on_error == "stop":
                        raise
                    stats.skipped_malformed += 1
                    if len(stats.errors) < _MAX_ERRORS:
                        stats.errors.append(str(exc))
                if progress is not None and lineno % 1000 == 0:
                    progress(f"reading {path.name}", done, total)
        if progress is not None:
            progress(f"reading {path.name}", done, total)
    stats.records += len(records)
    if not records:
        raise DataError(f"{spec}: no usable records ({stats.skipped_malformed} malformed lines skipped"
                        f"{': ' + stats.errors[0] if stats.errors else ''}); check the file")
    return records


def _parse_line(raw: bytes, where: str, kind: str | None, first: bool) -> dict[str, Any]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 (bad byte at column {exc.start + 1}); convert the file to UTF-8") from None
    try:
        record = json.loads(line.removeprefix("\ufeff") if first else line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: broken JSON ({exc.msg} at column {exc.colno}); fix or remove the line "
                        "(one JSON object per line)") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply; fix or remove the line") from None
    check_record(record, where, kind)
    return record


def _resolve_jsonl(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
    elif path.is_dir():
        paths = sorted(p for p in path.rglob("*.jsonl") if not any(s.startswith(".") for s in p.relative_to(path).parts))
    elif path.is_file():
        paths = [path]
    else:
        raise DataError(f"{spec}: no such file or directory; check the path")
    if not paths:
        raise DataError(f"{spec}: no .jsonl files found; point at a .jsonl file, a glob or a directory of them")
    bad = [p for p in paths if p.suffix.lower() != ".jsonl"]
    if bad:
        raise DataError(f"{bad[0]}: chat data must be .jsonl (one JSON object per line); convert it "
                        "(e.g. datasets' to_json(lines=True))")
    return paths


def _synthetic_records(spec: str, kind: str | None) -> list[dict[str, Any]]:
    from . import synthetic as syn

    corpus, _, query = spec.removeprefix("synthetic:").partition("?")
    if corpus != "reasoning":
        raise DataError(f"{spec}: unknown synthetic corpus {corpus!r}; use synthetic:reasoning[?options]")
    rest, own = [], {"format": kind or "sft", "think": "on"}
    for item in query.split("&"):
        key, _, value = (unquote(s).strip() for s in item.partition("="))
        if key in own:
            own[key] = value
        elif item.strip():
            rest.append(item)
    fmt, think = own["format"], own["think"]
    if fmt not in KINDS or think not in ("on", "off", "mix"):
        raise DataError(f"{spec}: format must be sft, dpo or grpo and think on, off or mix (got format={fmt!r}, "
                        f"think={think!r})")
    if kind is not None and fmt != kind:
        raise DataError(f"{spec}: format={fmt} data cannot train {kind}; use format={kind}")
    if fmt == "dpo" and think != "on":
        raise DataError(f"{spec}: format=dpo has reasoning on only; remove think={think}")
    try:
        opts = syn.parse_synthetic_options("&".join(rest))
        problems = syn.generate(opts["docs"], opts["seed"], opts["split"], opts["tasks"], opts["difficulty"])
    except NanoError as exc:
        raise DataError(f"{spec}: {exc}") from None
    rng = random.Random(f"nano.chat.synthetic:{opts['seed']}:{fmt}")
    out = []
    for p in problems:
        on = think == "on" or (think == "mix" and rng.random() < 0.5)
        out.append(syn.as_chat(p, think=on) if fmt == "sft" else syn.as_grpo(p, think=on) if fmt == "grpo"
                   else syn.as_preference(p, rng))
    return out


# ---------------------------------------------------------------------------------------------- conversations
def sft_messages(record: Mapping[str, Any], where: str) -> list[dict[str, Any]] | None:
    """The conversation of an SFT record up to and including its last assistant message (None when
    it has no assistant message)."""
    check_record(record, where, "sft")
    if "messages" in record:
        messages = normalize_messages(record["messages"], f"{where}: messages", None)
    else:
        messages = (normalize_messages(record["prompt"], f"{where}: prompt", "user")
                    + normalize_messages(record["completion"], f"{where}: completion", "assistant"))
    last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return None if last is None else messages[:last + 1]


def record_switch(messages: Sequence[Mapping[str, Any]]) -> bool | None:
    """The record's own reasoning switch, read as the template does: the last ``/think`` or
    ``/no_think`` in the system and user messages (None when there is none)."""
    state = None
    for m in messages:
        text = m.get("content") if m.get("role") in ("system", "user") else None
        if isinstance(text, str):
            think_at, off_at = text.rfind(THINK_TAGS[0]), text.rfind(THINK_TAGS[1])
            state = False if off_at > think_at else True if think_at > off_at else state
    return state


def preference_messages(record: Mapping[str, Any], where: str) -> tuple[list, dict, dict]:
    """``(prompt messages, chosen message, rejected message)`` of a DPO record (explicit or implicit
    prompt); chosen and rejected must each be one assistant message."""
    check_record(record, where, "dpo")
    chosen = normalize_messages(record["chosen"], f"{where}: chosen", "assistant")
    rejected = normalize_messages(record["rejected"], f"{where}: rejected", "assistant")
    if "prompt" in record:
        prompt = normalize_messages(record["prompt"], f"{where}: prompt", "user")
    else:  # implicit prompt: the conversation both share before their last message
        prompt = chosen[:-1]
        if rejected[:-1] != prompt or not prompt:
            raise DataError(f"{where}: without a 'prompt' field, chosen and rejected must be conversations that "
                            "differ only in their last message; add a 'prompt' field")
        chosen, rejected = chosen[-1:], rejected[-1:]
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise DataError(f"{where}: {name} must be one assistant message (TRL's conversational preference "
                            f"format), got roles {[m['role'] for m in msgs]}")
    return prompt, chosen[0], rejected[0]
