"""Tokenize a source once into memory-mapped shards, cached by content.

A shard directory (format ``nano-tokens``) holds

- ``tokens.bin``: every document's ids followed by the pretraining EOS (``</s>``), concatenated, as
  little-endian uint32;
- ``doc_index.npy``: int64 start offsets, ``n_docs + 1`` long (document ``i`` is
  ``tokens[idx[i]:idx[i+1]]``, its EOS included; the last entry is ``n_tokens``);
- ``meta.json``: format, version, key, source description, content and tokenizer hashes, EOS id,
  ``n_docs``, ``n_tokens``, ``max_token_id``, the tokenizer's vocab size.

``prepare_source`` writes it under ``cache_dir/<key>/`` where ``key`` is the sha256 of the format
version, the source kind, the text field, the tokenizer (its serialized JSON) and the source's
contents (every file's bytes and extension, in order; for ``synthetic:reasoning`` its options and the
``synthetic.fingerprint()`` of what the generators produce), so a changed byte of data, tokenizer or generator
output re-tokenizes and an unchanged source is reused. Writing goes to a temporary directory renamed into place, so a
crashed or concurrent run never leaves a half-written shard behind.

Also here, because it is the other use of a tokenizer: ``train_bpe_tokenizer`` (nano's byte-level BPE
for tiny profiles) and ``sample_texts_for_tokenizer`` (its training text, drawn from the sources).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from .sources import SHARD_FORMAT, ChatDocument, DataError, Progress, SourceSpec, iter_documents

__all__ = ["TokenSource", "prepare_source", "prepare_sources", "open_shard", "source_key", "pretraining_eos_id",
           "tokenizer_hash", "describe_source", "sample_texts_for_tokenizer", "train_bpe_tokenizer", "FORMAT_VERSION"]

FORMAT_VERSION = 1
TOKENS_FILE, INDEX_FILE, META_FILE = "tokens.bin", "doc_index.npy", "meta.json"
_BATCH_DOCS = 1024   # documents per encode_batch call
_HASH_CHUNK = 1 << 20


@dataclass
class TokenSource:
    """A tokenized source, memory-mapped read-only. ``reused`` is True when it came from the cache (or
    was an existing shard directory) rather than being tokenized now; ``tokenizer_matches`` is False for
    a shard directory tokenized with another tokenizer than the one given."""

    name: str
    path: Path
    meta: dict[str, Any]
    tokens: np.ndarray      # (n_tokens,) uint32 memmap
    doc_index: np.ndarray   # (n_docs + 1,) int64
    reused: bool = False
    tokenizer_matches: bool = True

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    @property
    def max_id(self) -> int:
        """The largest token id in the shard."""
        return int(self.meta["max_token_id"])

    def document(self, i: int) -> np.ndarray:
        """The ids of document ``i``, its EOS included."""
        return np.asarray(self.tokens[self.doc_index[i]:self.doc_index[i + 1]])


# ---------------------------------------------------------------------------------------------- hashing
def pretraining_eos_id(tokenizer) -> int:
    """The id that ends each pretraining document: ``</s>`` when the tokenizer has it, else its EOS."""
    eos = tokenizer.token_to_id("</s>")
    if eos is None:
        eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    if eos is None:
        raise DataError("the tokenizer has no '</s>' token and no eos_token; add one to tokenizer_config.json")
    return int(eos)


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's serialized ``tokenizer.json`` (added tokens included)."""
    return hashlib.sha256(tokenizer.hf.to_str().encode("utf-8")).hexdigest()


def _content_hash(spec: SourceSpec) -> str:
    h = hashlib.sha256()
    if spec.kind == "synthetic":
        from .synthetic import fingerprint

        h.update(json.dumps(spec.options, sort_keys=True).encode())
        h.update(fingerprint().encode())  # a changed generator or format is a changed source
        return h.hexdigest()
    for path in spec.paths:
        h.update(f"\0{path.suffix.lower()}\0".encode())
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    h.update(chunk)
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror}); check that it exists and is readable") from None
    return h.hexdigest()


def source_key(spec: SourceSpec, tokenizer, content_hash: str | None = None) -> str:
    """The cache key of ``spec`` tokenized by ``tokenizer`` (see the module docstring)."""
    payload = {"version": FORMAT_VERSION, "kind": spec.kind, "text_field": spec.text_field,
               "content": content_hash or _content_hash(spec), "tokenizer": tokenizer_hash(tokenizer),
               "eos": pretraining_eos_id(tokenizer)}
    if spec.kind == "synthetic" and spec.options.get("format") == "chat":  # rendered by the chat template
        payload["chat_template"] = hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- reading
def open_shard(path: str | Path, name: str | None = None, vocab_size: int | None = None,
               tokenizer=None) -> TokenSource:
    """Open a shard directory read-only. ``vocab_size`` (or the tokenizer's) bounds its token ids."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable nano shard directory ({exc}); prepare the source again") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        raise DataError(f"{path}: meta.json is not a nano shard (format {SHARD_FORMAT!r}); prepare the source again")
    if meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: shard format version {meta.get('version')!r}, this nano reads "
                        f"{FORMAT_VERSION}; delete the directory and prepare the source again")
    n_tokens, n_docs = int(meta.get("n_tokens", -1)), int(meta.get("n_docs", -1))
    tokens_file = path / TOKENS_FILE
    size = tokens_file.stat().st_size if tokens_file.is_file() else -1
    if n_tokens <= 0 or size != 4 * n_tokens:
        raise DataError(f"{path}: {TOKENS_FILE} holds {max(size, 0) // 4} ids, meta.json says {n_tokens}; the "
                        "shard is damaged: delete it and prepare the source again")
    try:
        doc_index = np.load(path / INDEX_FILE, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: {INDEX_FILE} unreadable ({exc}); delete the shard and prepare again") from None
    if doc_index.shape != (n_docs + 1,) or doc_index[0] != 0 or doc_index[-1] != n_tokens:
        raise DataError(f"{path}: {INDEX_FILE} does not match meta.json; delete the shard and prepare again")
    vocab = vocab_size if vocab_size is not None else tokenizer.vocab_size if tokenizer is not None else None
    max_id = int(meta.get("max_token_id", -1))
    if vocab is not None and max_id >= vocab:
        raise DataError(f"{path}: token ids go up to {max_id} but the vocabulary has {vocab} ids; the shard "
                        "was made with another tokenizer: re-tokenize the text with this model's tokenizer")
    matches = tokenizer is None or meta.get("tokenizer_hash") == tokenizer_hash(tokenizer)
    tokens = np.memmap(tokens_file, dtype="<u4", mode="r", shape=(n_tokens,))
    return TokenSource(name or meta.get("name") or path.name, path, meta, tokens, doc_index, True, matches)


# ---------------------------------------------------------------------------------------------- writing
def prepare_source(spec: SourceSpec, tokenizer, cache_dir: str | Path, progress: Progress | None = None,
                   vocab_size: int | None = None) -> TokenSource:
    """Tokenize ``spec`` into ``cache_dir/<key>/`` (or reuse what is there) and open it. A shard
    directory source is opened in place after checking its ids fit ``vocab_size`` (default: the
    tokenizer's). ``progress(description, done, total)`` reports bytes (files) or documents (synthetic)."""
    if spec.kind == "shards":
        return open_shard(spec.paths[0], spec.name, vocab_size, tokenizer)
    if progress is not None:
        progress(f"hashing {spec.name}", 0, 1)
    content = _content_hash(spec)
    key = source_key(spec, tokenizer, content)
    cache = Path(cache_dir)
    final = cache / key[:32]
    if final.exists() and not (final / META_FILE).is_file():
        raise DataError(f"{final}: an incomplete shard directory is in the way; delete it and prepare again")
    if (final / META_FILE).is_file():
        source = open_shard(final, spec.name, vocab_size, tokenizer)
        if source.key != key:
            raise DataError(f"{final}: holds a different source than its name says; delete it and prepare again")
        return source
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = _write_shard(tmp, spec, tokenizer, progress)
        meta.update(key=key, content_hash=content)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep its copy
            if not (final / META_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    source = open_shard(final, spec.name, vocab_size, tokenizer)
    source.reused = False
    return source


def prepare_sources(specs: Iterable[SourceSpec], tokenizer, cache_dir: str | Path, progress: Progress | None = None,
                    vocab_size: int | None = None) -> dict[str, TokenSource]:
    """``prepare_source`` for each spec, by name (in order)."""
    return {s.name: prepare_source(s, tokenizer, cache_dir, progress, vocab_size) for s in specs}


def _write_shard(out: Path, spec: SourceSpec, tokenizer, progress: Progress | None) -> dict[str, Any]:
    eos = pretraining_eos_id(tokenizer)
    desc = f"tokenizing {spec.name}"
    lengths: list[np.ndarray] = []
    n_tokens, max_id = 0, -1
    with open(out / TOKENS_FILE, "wb") as f:
        batch: list[str] = []
        for doc in chain(iter_documents(spec, progress, desc), [None]):
            if doc is not None:
                batch.append(_render(doc, tokenizer, spec))
                if len(batch) < _BATCH_DOCS:
                    continue
            if not batch:
                break
            ids, lens = _encode_batch(tokenizer, batch, eos)
            f.write(ids.astype("<u4", copy=False).tobytes())
            lengths.append(lens)
            n_tokens += int(ids.size)
            max_id = max(max_id, int(ids.max()))
            batch = []
    n_docs = int(sum(len(x) for x in lengths))
    if n_docs == 0:
        raise no_documents(spec)
    doc_index = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=doc_index[1:])
    np.save(out / INDEX_FILE, doc_index)
    return {"format": SHARD_FORMAT, "version": FORMAT_VERSION, "name": spec.name, "kind": spec.kind,
            "source": spec.source, "paths": [str(p) for p in spec.paths], "options": spec.options,
            "text_field": spec.text_field, "tokenizer_hash": tokenizer_hash(tokenizer), "eos_id": eos,
            "vocab_size": tokenizer.vocab_size, "n_docs": n_docs, "n_tokens": n_tokens, "max_token_id": max_id,
            "dtype": "uint32", "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _render(doc: str, tokenizer, spec: SourceSpec) -> str:
    """The text to tokenize: a conversation goes through the tokenizer's chat template."""
    if not isinstance(doc, ChatDocument):
        return doc
    if tokenizer.chat_template is None:
        raise DataError(f"source {spec.name!r}: format=chat renders conversations with the chat template, and this "
                        "tokenizer has none; use format=text or a tokenizer with a chat_template")
    return tokenizer.apply_chat_template(doc.messages, add_generation_prompt=False)


def _encode_batch(tokenizer, texts: list[str], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids of ``texts``, each followed by ``eos``, concatenated; and each document's length (EOS included)."""
    hf = tokenizer.hf
    encode = getattr(hf, "encode_batch_fast", None) or hf.encode_batch
    encodings = encode(texts, add_special_tokens=False)
    lens = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter(chain.from_iterable(e.ids + [eos] for e in encodings), dtype=np.int64, count=int(lens.sum()))
    return ids, lens


def describe_source(source: TokenSource) -> Mapping[str, Any]:
    """A short summary of a tokenized source, for reports."""
    return {"name": source.name, "path": str(source.path), "docs": source.n_docs, "tokens": source.n_tokens,
            "reused": source.reused, "source": source.meta.get("source", "")}


# ---------------------------------------------------------------------------------------------- tokenizer
def sample_texts_for_tokenizer(specs: Sequence[SourceSpec], max_chars: int) -> list[str]:
    """Up to ``max_chars`` characters of documents (no tokenizing), shared among the text and synthetic
    sources by weight, each source read from its start; documents past a source's share are cut."""
    usable = [s for s in specs if s.kind in ("files", "synthetic")]
    if not usable:
        raise DataError("no text sources to train a tokenizer on (shard directories are already tokenized); "
                        "add a text or synthetic source")
    total_weight = sum(s.weight for s in usable)
    texts: list[str] = []
    for spec in usable:
        budget, found = int(max_chars * spec.weight / total_weight), False
        for doc in iter_documents(spec):
            found = found or bool(doc.strip())
            if budget <= 0 and found:
                break
            texts.append(doc[:max(budget, 0)])
            budget -= len(texts[-1])
        if not found:  # an empty file: say which, not "no text" for the whole blend
            raise no_documents(spec)
    return [t for t in texts if t]


def no_documents(spec: SourceSpec) -> DataError:
    """The error for a text source without a document, naming it and its files."""
    return DataError(f"source {spec.name!r} ({spec.source or spec.kind}) has no documents (empty files, blank "
                     "lines or empty texts only); check the data or the text field")


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int):
    """Train nano's byte-level BPE (chat special tokens, ``<think>``/``</think>``) on ``texts`` into
    ``out_dir`` (``build_test_tokenizer``) and return it loaded."""
    from nanocli_model.tokenizer import NANO_SPECIAL_TOKENS, build_test_tokenizer

    minimum = 256 + len(NANO_SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise DataError(f"tokenizer vocab_size must be an integer >= {minimum} (256 bytes + "
                        f"{len(NANO_SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
    texts = [t for t in texts if t]
    if not texts:
        raise DataError("no text to train the tokenizer on; check the data sources")
    return build_test_tokenizer(out_dir, texts, vocab_size=vocab_size)
