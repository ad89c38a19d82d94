"""Pretraining data sources: the ``--data`` spec grammar, resolving sources, reading their documents.

Spec grammar (``parse_data_spec``)::

    SPEC   := ITEM (SEP ITEM)*          SEP is ';' when the SPEC holds a ';', else ','
    ITEM   := [NAME '='] SOURCE ['#field=' FIELD] ['@' WEIGHT]
    SOURCE := FILE | GLOB | DIR | 'synthetic:reasoning' ['?' QUERY]

- ``FILE``: a ``.txt`` (the whole file is one document), ``.jsonl`` (one JSON object a line; the
  document is its ``FIELD``, ``text`` unless ``#field=NAME``) or ``.parquet`` (column ``FIELD``,
  needs pyarrow). Blank lines, null and empty texts are skipped. Files are read as strict UTF-8.
- ``GLOB``: ``*``, ``?``, ``[..]`` and ``**`` patterns; matched files sorted by path.
- ``DIR``: a nano shard directory (``meta.json`` of format ``nano-tokens``, as ``prepare_source``
  writes them) is used as it is, already tokenized; any other directory means every ``.txt``,
  ``.jsonl`` and ``.parquet`` file under it, recursively, sorted (hidden names skipped).
- ``synthetic:reasoning?QUERY``: the built-in corpus; QUERY is ``key=value`` pairs joined by ``&``
  (``tasks=add,sub&difficulty=1-3&seed=0&docs=20000&split=train``, see ``nanocli.data.synthetic``).
- ``WEIGHT``: a number > 0 (default 1), the source's share of the blend after normalising.
- ``NAME``: what phases and reports call the source (letters, digits, ``_.-``); by default the file
  stem, the directory name, the last literal folder of a glob, or ``synthetic``, made unique with
  ``-2``, ``-3``, ... A path that itself looks like ``word=rest`` needs a ``./`` in front.

Commas: with ',' as the separator, a synthetic ``?QUERY`` runs to its ``@WEIGHT`` (or the end of the
spec), so ``synthetic:reasoning?tasks=add,sub@0.3,data/web@0.7`` is two sources. To follow an
unweighted query with another source, or for file names with commas, separate items with ';'.

Recipes give sources as mappings instead: ``SourceSpec.from_mapping(name, {...})``.
"""

from __future__ import annotations

import glob
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice, takewhile
from pathlib import Path
from typing import Any

from nanocli_model.errors import NanoError

__all__ = ["DataError", "SourceSpec", "parse_data_spec", "iter_documents", "is_shard_dir", "TEXT_EXTENSIONS",
           "SHARD_FORMAT", "Progress"]

Progress = Callable[[str, int, int], None]  # (description, done, total)

TEXT_EXTENSIONS = (".txt", ".jsonl", ".parquet")
SHARD_FORMAT = "nano-tokens"
SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_CORPORA = ("reasoning",)
_NAME_RE = re.compile(r"^([A-Za-z_][\w.-]*)=(?!=)")
_GLOB_CHARS = set("*?[")
_MAPPING_KEYS = ("path", "synthetic", "source", "weight", "text_field")


class DataError(NanoError, ValueError):
    """A data source, spec or blend that cannot be used as it is; the message says what to do."""


# ---------------------------------------------------------------------------------------------- specs
@dataclass
class SourceSpec:
    """One data source of a blend.

    ``kind`` is ``"files"`` (``paths``: the text files, in reading order), ``"shards"`` (``paths``: one
    nano shard directory, already tokenized) or ``"synthetic"`` (``options``: the parsed
    ``synthetic:reasoning`` query). ``source`` is the item as written, for reports."""

    name: str
    kind: str
    paths: tuple[Path, ...] = ()
    weight: float = 1.0
    text_field: str = "text"
    options: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def from_mapping(cls, name: str, mapping: Mapping[str, Any], base_dir: str | Path | None = None) -> SourceSpec:
        """A source from a recipe: exactly one of ``path`` (a file, glob or directory, or a list of
        them), ``synthetic`` (a mapping of synthetic options, or a query string) or ``source`` (one
        spec item); plus optional ``weight`` and ``text_field``. Relative paths start at ``base_dir``."""
        where = f"data source {name!r}"
        if not isinstance(mapping, Mapping):
            raise DataError(f"{where}: expected a mapping with path/synthetic/source, got {type(mapping).__name__}")
        unknown = [k for k in mapping if k not in _MAPPING_KEYS]
        if unknown:
            raise DataError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(_MAPPING_KEYS)}")
        given = [k for k in ("path", "synthetic", "source") if k in mapping]
        if len(given) != 1:
            raise DataError(f"{where}: give exactly one of path, synthetic or source (got {', '.join(given) or 'none'})")
        weight = _check_weight(mapping.get("weight", 1.0), where)
        text_field = mapping.get("text_field", "text")
        if not isinstance(text_field, str) or not text_field:
            raise DataError(f"{where}: text_field must be a non-empty string, got {text_field!r}")
        name = _check_name(name, where)
        if "source" in mapping:
            spec = _parse_item(str(mapping["source"]), base_dir)
            if "text_field" in mapping:
                spec.text_field = text_field
            spec.name = name
            if "weight" in mapping:
                spec.weight = weight
            return spec
        if "synthetic" in mapping:
            options = _synthetic_options(_as_query(mapping["synthetic"], where), where)
            return cls(name, "synthetic", (), weight, text_field, options, f"synthetic:reasoning ({name})")
        raw = mapping["path"]
        items = [raw] if isinstance(raw, (str, Path)) else list(raw) if isinstance(raw, Sequence) else None
        if not items or not all(isinstance(p, (str, Path)) for p in items):
            raise DataError(f"{where}: path must be a path or a list of paths, got {raw!r}")
        resolved = [_resolve(str(p), base_dir) for p in items]
        if any(kind == "shards" for kind, _ in resolved) and len(resolved) > 1:
            raise DataError(f"{where}: a shard directory must be a source of its own; list it separately")
        paths = tuple(p for _, ps in resolved for p in ps)
        return cls(name, resolved[0][0], paths, weight, text_field, {}, ", ".join(map(str, items)))


def parse_data_spec(spec: str, base_dir: str | Path | None = None) -> list[SourceSpec]:
    """Parse a ``--data`` SPEC (grammar in the module docstring) into sources, resolving paths now so
    a missing file fails before anything is tokenized."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("empty data spec; give e.g. --data 'data/web/*.jsonl@0.7,synthetic:reasoning@0.3'")
    items = _split_items(spec)
    specs = [_parse_item(item, base_dir) for item in items]
    explicit = [s.name for s, item in zip(specs, items) if _NAME_RE.match(item)]
    dup = next((n for n in explicit if explicit.count(n) > 1), None)
    if dup is not None:
        raise DataError(f"data spec {spec!r}: two sources are named {dup!r}; give them distinct NAME= prefixes")
    used = set(explicit)
    for s, item in zip(specs, items):  # default names made unique: web, web-2, web-3 ...
        if not _NAME_RE.match(item):
            name, i = s.name, 1
            while name in used:
                i += 1
                name = f"{s.name}-{i}"
            s.name = name
            used.add(name)
    return specs


def _split_items(spec: str) -> list[str]:
    if ";" in spec:
        items = spec.split(";")
    else:
        items, current, in_query = [], "", False
        for ch in spec:
            if ch == "," and not in_query:
                items.append(current)
                current = ""
                continue
            current += ch
            if ch == "?" and _NAME_RE.sub("", current.lstrip()).startswith(SYNTHETIC_PREFIX):
                in_query = True
            elif ch == "@":
                in_query = False
        items.append(current)
    items = [i.strip() for i in items]
    if not all(items):
        raise DataError(f"data spec {spec!r} has an empty item (two separators in a row, or one at an end); "
                        "remove it")
    return items


def _parse_item(item: str, base_dir: str | Path | None) -> SourceSpec:
    body, name, weight = item.strip(), None, 1.0
    match = _NAME_RE.match(body)
    if match:
        name, body = match.group(1), body[match.end():]
    if "@" in body:
        head, tail = body.rsplit("@", 1)
        try:
            weight = float(tail)
        except ValueError:
            raise DataError(f"{item!r}: weight {tail!r} is not a number; write SOURCE@WEIGHT, e.g. "
                            "data/web@0.7") from None
        body = head
        weight = _check_weight(weight, repr(item))
    if body.startswith(SYNTHETIC_PREFIX):
        corpus, _, query = body[len(SYNTHETIC_PREFIX):].partition("?")
        if corpus not in SYNTHETIC_CORPORA:
            raise DataError(f"{item!r}: unknown synthetic corpus {corpus!r}; use synthetic:reasoning[?options]")
        options = _synthetic_options(query, repr(item))
        return SourceSpec(name or "synthetic", "synthetic", (), weight, "text", options, item)
    text_field = "text"
    if "#field=" in body:
        body, text_field = body.rsplit("#field=", 1)
        if not re.fullmatch(r"[^#@;,]+", text_field):
            raise DataError(f"{item!r}: empty or bad text field after #field=; write e.g. file.jsonl#field=content")
    if not body:
        raise DataError(f"{item!r}: no source before the weight; write PATH@WEIGHT")
    kind, paths = _resolve(body, base_dir)
    if kind == "shards" and text_field != "text":
        raise DataError(f"{item!r}: #field= does not apply to an already tokenized shard directory; remove it")
    return SourceSpec(name or _default_name(body, paths), kind, paths, weight, text_field, {}, item)


def _check_weight(weight: Any, where: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise DataError(f"{where}: weight must be a number > 0, got {weight!r}")
    return float(weight)


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", name):
        raise DataError(f"{where}: source names use letters, digits, '_', '.', '-' and start with a letter")
    return name


def _as_query(value: Any, where: str) -> str:
    """A recipe's ``synthetic:`` value as a query string (so one parser validates both forms)."""
    if value is None or value is True:
        return ""
    if isinstance(value, str):
        return value.removeprefix("synthetic:reasoning").lstrip("?")
    if not isinstance(value, Mapping):
        raise DataError(f"{where}: synthetic must be a mapping of options (tasks, difficulty, seed, docs, split)")
    parts = []
    for key, v in value.items():
        if isinstance(v, (list, tuple)) and key == "difficulty":
            v = "-".join(str(x) for x in v)
        elif isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        parts.append(f"{key}={v}")
    return "&".join(parts)


def _synthetic_options(query: str, where: str) -> dict[str, Any]:
    from .synthetic import parse_synthetic_options

    try:
        options = parse_synthetic_options(query)
    except NanoError as exc:
        hint = "; separate sources with ';' when a query holds commas" if "," in query else ""
        raise DataError(f"{where}: {exc}{hint}") from None
    options["tasks"] = list(options["tasks"])
    options["difficulty"] = list(options["difficulty"])
    return options


# ---------------------------------------------------------------------------------------------- paths
def is_shard_dir(path: str | Path) -> bool:
    """Whether ``path`` is a nano shard directory (its meta.json says format ``nano-tokens``)."""
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == SHARD_FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError):
        return False


def _resolve(text: str, base_dir: str | Path | None) -> tuple[str, tuple[Path, ...]]:
    path = Path(text).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    if any(c in _GLOB_CHARS for c in text):
        matches = sorted(glob.glob(str(path), recursive=True))
        files = [f for m in matches for f in (_dir_files(Path(m)) if Path(m).is_dir() else [_check_ext(Path(m))])]
        if not files:
            raise DataError(f"{text}: no files match; check the pattern (and quote it so the shell leaves it alone)")
        return "files", tuple(files)
    if path.is_dir():
        if is_shard_dir(path):
            return "shards", (path,)
        files = _dir_files(path)
        if not files:
            raise DataError(f"{text}: the directory holds no .txt, .jsonl or .parquet files; point at the data")
        return "files", tuple(files)
    if path.is_file():
        return "files", (_check_ext(path),)
    raise DataError(f"{text}: no such file or directory; check the path")


def _dir_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _check_ext(path: Path) -> Path:
    if path.suffix.lower() not in TEXT_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; use .txt, .jsonl "
                        "or .parquet (or a directory of them)")
    return path


def _default_name(text: str, paths: tuple[Path, ...]) -> str:
    if any(c in _GLOB_CHARS for c in text):
        literal = list(takewhile(lambda part: not any(c in _GLOB_CHARS for c in part), Path(text).parts))
        base = literal[-1] if literal else "data"
    else:
        base = Path(text).stem if paths and paths[0].is_file() else Path(text).name
    base = re.sub(r"[^\w.-]", "_", base.strip(".")) or "data"
    return base if re.match(r"[A-Za-z_]", base) else f"d{base}"


# ---------------------------------------------------------------------------------------------- documents
def iter_documents(spec: SourceSpec, progress: Progress | None = None, desc: str | None = None) -> Iterator[str]:
    """The documents of a text or synthetic source, in order. ``progress(desc, done, total)`` counts
    bytes for files and documents for synthetic sources."""
    desc = desc or f"reading {spec.name}"
    if spec.kind == "synthetic":
        yield from _synthetic_docs(spec.options, progress, desc)
    elif spec.kind == "files":
        sizes = [_size(p) for p in spec.paths]
        total, done = sum(sizes), 0
        for path, size in zip(spec.paths, sizes):
            reader = {".txt": _txt_docs, ".jsonl": _jsonl_docs, ".parquet": _parquet_docs}[path.suffix.lower()]
            for doc, consumed in reader(path, spec.text_field):
                if progress is not None and consumed:
                    progress(desc, done + consumed, total)
                yield doc
            done += size
            if progress is not None:
                progress(desc, done, total)
    else:
        raise DataError(f"source {spec.name!r} is already tokenized ({spec.kind}); it has no text to read")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror}); check that it exists and is readable") from None


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror}); check that it exists and is readable") from None


def _txt_docs(path: Path, _field: str) -> Iterator[tuple[str, int]]:
    with _open(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (bad byte at offset {exc.start}); convert the file to "
                        "UTF-8 or leave it out of the source") from None
    text = text.removeprefix("\ufeff")
    if text:
        yield text, 0


def _jsonl_docs(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    consumed = 0
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            consumed += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 (bad byte at column {exc.start + 1}); convert the "
                                "file to UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: broken JSON ({exc.msg} at column {exc.colno}); fix or remove "
                                "the line (one JSON object per line)") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: JSON nested too deeply; fix or remove the line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}; write one "
                                "object per line")
            if text_field not in obj:
                keys = ", ".join(list(obj)[:8]) or "none"
                raise DataError(f"{path}:{lineno}: no {text_field!r} field (fields: {keys}); name the text field "
                                "with PATH#field=NAME (text_field: in a recipe)")
            text = obj[text_field]
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not text; "
                                "point #field= at a string field")
            yield text, consumed if lineno % 1024 == 0 else 0


def _parquet_docs(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow; pip install pyarrow (or convert the file "
                        "to .jsonl)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError family
        raise DataError(f"{path}: not a readable parquet file ({str(exc)[:120]}); check or re-export it") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names[:8])}); name the text "
                        "column with PATH#field=NAME (text_field: in a recipe)")
    rows, size = max(1, pf.metadata.num_rows), _size(path)
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}: row {row}: column {text_field!r} is {type(value).__name__}, not text; "
                                "point #field= at a string column")
            row += 1
            if value:
                yield value, size * row // rows if row % 1024 == 0 else 0


class ChatDocument(str):
    """A document that is a conversation: tokenizing renders ``messages`` with the model's chat template
    (``shards.prepare_source``); as a plain string (tokenizer training) it is the messages' contents."""

    messages: list[dict]

    def __new__(cls, messages: list[dict]) -> ChatDocument:
        doc = super().__new__(cls, "\n".join(f"{m['role']}: {m['content']}" for m in messages))
        doc.messages = messages
        return doc


def _synthetic_docs(options: Mapping[str, Any], progress: Progress | None, desc: str) -> Iterator[str]:
    from .synthetic import CHAT_NO_THINK_EVERY, as_chat, as_text, iter_problems

    total = int(options["docs"])
    chat = options.get("format", "text") == "chat"
    problems = iter_problems(seed=options["seed"], split=options["split"], tasks=list(options["tasks"]),
                             difficulty=tuple(options["difficulty"]))
    for i, problem in enumerate(islice(problems, total), 1):
        if chat:
            yield ChatDocument(as_chat(problem, think=i % CHAT_NO_THINK_EVERY != 0)["messages"])
        else:
            yield as_text(problem)
        if progress is not None and (i % 1000 == 0 or i == total):
            progress(desc, i, total)
