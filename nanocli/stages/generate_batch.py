"""``nano generate --input FILE.jsonl``: a batch file of prompts, each line with its own settings if it likes.

A line is one JSON object: ``{"prompt": "..."}`` or ``{"messages": [...]}``, an optional ``"id"`` (a string
or an integer; default: the line's 0-based index among the prompts), and optional settings that override the
command line's for that line: ``think`` (true/false/null), ``system``, ``temperature``, ``top_p``, ``top_k``,
``min_p``, ``max_new_tokens``, ``seed``, ``stop`` (a string or a list, replacing ``--stop``) and
``thinking_budget`` (null: none). Each is checked as its flag is, and any other field is refused, so a setting
is never silently ignored. Lines with the same settings run as one batch; the results come back in the file's
order. Without ``--seed``, one seed is drawn for the whole run (reported), so ``--seed`` reproduces it; a
batch samples from one generator, so a sampled line depends on the lines batched with it.

:func:`record` is the result object of one line, what ``--output`` writes and batch stdout prints.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import secrets
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import settings
from .generate import GenerateError, GenerateOptions, GenerateResult, Loaded, prepare, run

ROW_SETTINGS = ("think", "system", "temperature", "top_p", "top_k", "min_p", "max_new_tokens", "seed", "stop",
                "thinking_budget")
ROW_FIELDS = ("id", "prompt", "messages") + ROW_SETTINGS
_TEMPLATE_ONLY = ("think", "system")  # no effect on an untemplated (--raw) prompt


@dataclass
class BatchRow:
    """One line of the batch file: where it is, its id, its prompt, and the settings it overrides."""

    where: str  # FILE:LINE, for errors
    id: str | int
    prompt: str | list[dict]
    settings: dict[str, Any]  # field name -> value, as GenerateOptions holds it

    @property
    def key(self) -> tuple:
        """Rows with equal keys run in one batch."""
        return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in self.settings.items()))

    def options(self, base: GenerateOptions) -> GenerateOptions:
        """``base`` with this row's settings (a row's temperature overrides ``--greedy``)."""
        extra = {"greedy": False} if "temperature" in self.settings else {}
        return dataclasses.replace(base, **self.settings, **extra)

    def as_input(self) -> dict[str, Any]:
        """The row's id and prompt (or messages) as the result record repeats them."""
        return {"id": self.id, "messages" if isinstance(self.prompt, list) else "prompt": self.prompt}


# ---------------------------------------------------------------------------------------- reading
def read_batch(path: Path, options: GenerateOptions) -> list[BatchRow]:
    """The rows of ``path``, every field checked (one-line ``GenerateError`` naming FILE:LINE and the field)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GenerateError(f"{path}: cannot be read ({e})") from None
    rows: list[BatchRow] = []
    checked: set[tuple] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerateError(f"{where}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise GenerateError(f"{where}: JSON nested too deeply; fix or remove the line") from None
        row = parse_row(raw, where, len(rows), options)
        if row.key not in checked:  # the settings checked once per distinct combination
            check_settings(row, options)
            checked.add(row.key)
        rows.append(row)
    if not rows:
        raise GenerateError(f"{path}: no prompts in the file")
    return rows


def parse_row(raw: Any, where: str, index: int, options: GenerateOptions) -> BatchRow:
    if not isinstance(raw, dict):
        raise GenerateError(f'{where}: expected an object, {{"prompt": "..."}} or {{"messages": [...]}}')
    unknown = [k for k in raw if k not in ROW_FIELDS]
    if unknown:
        raise GenerateError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(map(json.dumps, unknown))}; a line takes {', '.join(ROW_FIELDS)}")
    if ("prompt" in raw) == ("messages" in raw):
        raise GenerateError(f'{where}: give either "prompt" (a string) or "messages" (a list), '
                            f'{"not both" if "prompt" in raw else "found neither"}')
    if "prompt" in raw:
        prompt = raw["prompt"]
        if not isinstance(prompt, str):
            raise GenerateError(f'{where}: "prompt" must be a string, got {_kind(prompt)}; a chat goes in "messages"')
    else:
        prompt = _messages(raw["messages"], where, options)
    row_id = raw.get("id", index)
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise GenerateError(f'{where}: "id" must be a string or an integer, got {_kind(row_id)}')
    values = {k: _typed(raw[k], k, where) for k in ROW_SETTINGS if k in raw}
    if options.raw:
        used = [k for k in _TEMPLATE_ONLY if k in values]
        if used:
            raise GenerateError(f'{where}: "{used[0]}" has no effect with --raw (the prompt goes untemplated)')
    if "system" in values and isinstance(prompt, list) and any(m["role"] == "system" for m in prompt):
        raise GenerateError(f'{where}: "system" and a system message in "messages": give one of them')
    return BatchRow(where, row_id, prompt, values)


def _messages(value: Any, where: str, options: GenerateOptions) -> list[dict]:
    from ..data.chat_io import normalize_messages
    from ..data.sources import DataError

    if options.raw:
        raise GenerateError(f'{where}: "messages" with --raw: an untemplated prompt is a "prompt" string')
    try:
        return normalize_messages(value, f'{where}: "messages"', default_role=None)
    except DataError as e:
        raise GenerateError(str(e)) from None


def _typed(value: Any, name: str, where: str) -> Any:
    """``value`` as the type of the option ``name`` (null only where the option may be unset)."""
    hint = _hints()[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and optional else hint
    if value is None:
        if optional:
            return None
    elif base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(base) is list:  # stop: a string or a list of strings
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    wanted = {bool: "true, false", int: "an integer", float: "a number", str: "a string"}.get(
        base, "a string or a list of strings")
    raise GenerateError(f'{where}: "{name}" must be {wanted}{" or null" if optional else ""}, got {_kind(value)}')


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(GenerateOptions)


def check_settings(row: BatchRow, options: GenerateOptions) -> None:
    """The row's settings pass the flags' own checks; the error names the line and the field."""
    try:
        settings.validate(row.options(options))
    except settings.OptionError as e:
        message = str(e)
        for name in row.settings:  # "--top-p must be ..." -> '"top_p" must be ...'
            message = message.replace("--" + name.replace("_", "-"), f'"{name}"')
        raise GenerateError(f"{row.where}: {message}") from None


def _kind(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return f"{text[:40]}{'...' if len(text) > 40 else ''}"


# ---------------------------------------------------------------------------------------- running
def run_batch(options: GenerateOptions, rows: list[BatchRow], loaded: Loaded) -> GenerateResult:
    """Every row generated, rows with the same settings as one batch; the outputs in the rows' order and the
    figures summed over the batches (peak memory: the largest)."""
    if options.seed is None:  # one seed for every batch, reported: --seed SEED reruns the whole file
        options = dataclasses.replace(options, seed=secrets.randbits(63))
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.key, []).append(i)
    batches = [(rows[members[0]].options(options), [rows[i].prompt for i in members],
                [rows[i].where for i in members], members) for members in groups.values()]
    for batch_options, prompts, labels, _ in batches:  # every prompt fits its context before any generates
        prepare(batch_options, prompts, loaded, labels)
    outputs: list[Any] = [None] * len(rows)
    results = []
    for batch_options, prompts, labels, members in batches:
        result = run(batch_options, prompts, loaded, labels=labels)
        for i, out in zip(members, result.outputs):
            outputs[i] = out
        results.append(result)
    return merged(results, outputs, options.seed)


def merged(results: list[GenerateResult], outputs: list, seed: int) -> GenerateResult:
    """One result of several batches: token counts and seconds summed, the largest peak memory."""
    first = results[0]
    s = [r.stats for r in results]
    stats = dataclasses.replace(
        first.stats, completions=[c for x in s for c in x.completions],
        prompt_tokens=sum(x.prompt_tokens for x in s), generated_tokens=sum(x.generated_tokens for x in s),
        prefill_seconds=sum(x.prefill_seconds for x in s), decode_seconds=sum(x.decode_seconds for x in s),
        decode_tokens=sum(x.decode_tokens for x in s), peak_memory_bytes=max(x.peak_memory_bytes for x in s),
        compile_seconds=sum(x.compile_seconds for x in s), seed=seed)
    return dataclasses.replace(first, outputs=outputs, stats=stats, batches=len(results))


# ---------------------------------------------------------------------------------------- results
def record(row: BatchRow, output: Any) -> dict[str, Any]:
    """The result of one line: its id and prompt, then the text split at ``</think>`` and the token counts."""
    return {**row.as_input(), "text": output.text, "thinking": output.thinking, "answer": output.answer,
            "finish_reason": output.finish_reason, "prompt_tokens": len(output.prompt_ids),
            "generated_tokens": len(output.generated_ids), "thinking_tokens": output.thinking_tokens,
            "budget_forced": output.budget_forced}


def records(rows: list[BatchRow], result: GenerateResult) -> list[dict[str, Any]]:
    return [record(row, out) for row, out in zip(rows, result.outputs)]


def batch_json(rows: list[BatchRow], result: GenerateResult) -> dict[str, Any]:
    """``--json``: the one object of a run, each output its line's record plus the token ids."""
    whole = result.to_json()
    whole["outputs"] = [{**record(row, out), "prompt_ids": out.prompt_ids, "generated_ids": out.generated_ids}
                        for row, out in zip(rows, result.outputs)]
    return whole


def check_output(path: Path) -> None:
    """``--output``: fail before any work when the file cannot be written there."""
    if path.is_dir():
        raise GenerateError(f"--output {path}: is a directory; give a file name (.jsonl)")
    if not path.parent.is_dir():
        raise GenerateError(f"--output {path}: the directory {path.parent} does not exist; create it first")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """``--output``: one record per line, written to a temporary file and renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GenerateError(f"--output {path}: cannot be written ({e.strerror or e})") from None
