"""Chat data for ``nano align``: SFT examples with assistant-only loss, DPO pairs, GRPO prompts.

Assistant mask. A conversation is trained on its last assistant message (later messages are
dropped; earlier assistant turns are context: nano's template renders past turns without their
thinking, so only the last turn can be rendered the way the model writes it). The chat template is
the single source of the format: ``prompt = render(messages[:-1], add_generation_prompt=True)`` must
be a prefix of ``full = render(messages, add_generation_prompt=False)`` (``NANO_CHAT_TEMPLATE``
guarantees it; any template that does not is refused with a ``DataError``) and the completion is
``full[len(prompt):]``: for nano's template the thinking, ``</think>``, the answer and the
end-of-turn ``<SPECIAL_12>`` (with the newline the template writes after it).

Tokenization at the boundary. ``ids = encode(prompt) + encode(completion)``, always: the prompt ids are
then exactly what generation feeds the model (``encode_chat(messages[:-1])``), and the labels are
exactly the completion's tokens. Where a template ends the prompt mid-word, a joint ``encode(full)``
could merge across the boundary; such examples are counted in ``stats.boundary_merges`` (with
nano's template the prompt ends in a special token or a newline, and the two are identical).

Alignment. ``Example.input_ids = tokens[:-1]``; ``labels[t]`` is the target of position ``t``
(``tokens[t + 1]`` where that token is an assistant token, else ``IGNORE_INDEX``), as
``nanocli_model.losses.causal_lm_loss`` expects. An example with no assistant token is never built
(counted in ``stats.no_assistant`` / ``dropped_too_long``), and a dataset with none is a ``DataError``.

Reasoning on/off (Nemotron Nano 2 SFT, stage 1: ~10% of responses with their reasoning removed).
Each record with a thinking trace is reasoning-on with probability ``think_mix``: the system message
carries ``/think``. Otherwise, and for records that say ``/no_think`` or have no trace, it is
reasoning-off: ``/no_think``, thinking removed, and the template renders ``<think></think>answer``.
Budget augmentation (stage 3): a share ``budget_fraction`` of reasoning-on examples get their
thinking cut to its first k tokens (tokenize the trace, keep k, decode) and the template closes it
with ``</think>`` before the intact answer. Draws are seeded per record (``seed``, record index).
A template without ``/no_think`` cannot turn reasoning off: records are then rendered as they are
(no switch added, no reasoning-off mix; budgets still apply).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanocli_model.errors import TokenizerError
from nanocli_model.tokenizer import THINK_TAGS, Tokenizer, render_chat

from .batches import permute
from .chat_io import (
    KINDS,
    ReadStats,
    check_record,
    normalize_messages,
    preference_messages,
    read_jsonl_records,
    record_kind,
    record_switch,
    sft_messages,
)
from .sources import DataError, Progress

__all__ = ["IGNORE_INDEX", "ReadStats", "read_jsonl_records", "check_record", "record_kind", "KINDS",
           "SFTConfig", "Example", "build_sft_examples", "pack_examples", "prepare_sft", "batch_indices",
           "sft_batches", "PrefExample", "build_preference_examples", "preference_batch",
           "PromptExample", "build_prompts", "sft_messages", "preference_messages", "record_switch",
           "normalize_messages", "render_completion"]

IGNORE_INDEX = -100  # == nanocli_model.losses.IGNORE_INDEX (not imported: it would load torch)
TOO_LONG = ("truncate", "drop")


# ---------------------------------------------------------------------------------------------- shared
def render_completion(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], where: str,
                      think: bool | None = None) -> tuple[str, str]:
    """``(prompt, completion)`` texts of a conversation ending in the assistant turn to train on
    (``think`` as in ``render_chat``). ``DataError`` when the template cannot separate them."""
    try:
        prompt = render_chat(tokenizer, messages[:-1], think=think, add_generation_prompt=True)
        full = render_chat(tokenizer, messages, think=think, add_generation_prompt=False)
    except TokenizerError as exc:
        raise DataError(f"{where}: {exc}") from None
    if not full.startswith(prompt):
        raise DataError(f"{where}: the chat template of {tokenizer.source} does not support assistant masks: "
                        f"its generation prompt ({prompt[-40:]!r}) is not how it renders the assistant turn "
                        "(render(messages[:-1], add_generation_prompt=True) must be a prefix of render(messages)); "
                        "use a template that renders both the same way, e.g. nano's NANO_CHAT_TEMPLATE")
    return prompt, full[len(prompt):]


def _encode_pair(tokenizer: Tokenizer, prompt: str, completion: str, stats: ReadStats) -> tuple[list, list]:
    p, c = tokenizer.encode(prompt), tokenizer.encode(completion)
    if tokenizer.encode(prompt + completion) != p + c:
        stats.boundary_merges += 1
    return p, c


def _shifted(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of prompt + completion with labels aligned and -100 outside the completion."""
    tokens = list(prompt_ids) + list(completion_ids)
    mask = [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids)
    return tokens[:-1], mask[1:]


def _split_thinking(message: Mapping[str, Any]) -> tuple[str, str]:
    """``(thinking, answer)`` of an assistant message, as nano's template reads them."""
    content = message.get("content") or ""
    answer = content.split("</think>")[-1]
    if isinstance(message.get("reasoning_content"), str):
        return message["reasoning_content"], answer
    thinking = content.split("</think>")[0].replace("<think>", "") if "</think>" in content else ""
    return thinking, answer


def _check_choice(value: Any, allowed: Sequence[str], name: str) -> None:
    if value not in allowed:
        raise DataError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


# ---------------------------------------------------------------------------------------------- SFT
@dataclass
class SFTConfig:
    """How ``build_sft_examples`` turns chat records into training examples."""

    seq_len: int
    """Longest example in tokens (input positions); longer ones follow ``too_long``. Also the packed row length."""
    think_mix: float = 0.9
    """Share of records with a thinking trace trained reasoning-on; the rest become reasoning-off
    (``/no_think``, thinking removed). The Nano 2 report removed the reasoning from ~10% of responses."""
    budget_fraction: float = 0.1
    """Share of reasoning-on examples whose thinking is cut at a random token budget, closed with
    ``</think>`` and followed by the intact answer (0 turns the augmentation off)."""
    budget_tokens: tuple[int, int] | None = None
    """Budget range in thinking tokens (uniform, inclusive), e.g. ``(1000, 2000)`` as in the report's
    stage 3. None: use ``budget_share``. A trace no longer than the budget is left whole."""
    budget_share: tuple[float, float] = (0.1, 0.9)
    """Budget range as a share of the trace's tokens (uniform), used when ``budget_tokens`` is None."""
    too_long: str = "truncate"
    """``"truncate"``: cut from the end (dropped when no assistant token is left); ``"drop"``: drop."""
    pack: bool = True
    """``prepare_sft`` packs short examples into rows of ``seq_len`` (``pack_examples``)."""
    seed: int = 0
    """Seed of the per-record reasoning on/off and budget draws."""

    def __post_init__(self) -> None:
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise DataError(f"seq_len must be an integer >= 2, got {self.seq_len!r}")
        for name in ("think_mix", "budget_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        lo, hi = self.budget_share
        if not 0.0 <= lo <= hi <= 1.0:
            raise DataError(f"budget_share must be (lo, hi) with 0 <= lo <= hi <= 1, got {self.budget_share!r}")
        if self.budget_tokens is not None and not 0 <= self.budget_tokens[0] <= self.budget_tokens[1]:
            raise DataError(f"budget_tokens must be (lo, hi) with 0 <= lo <= hi, got {self.budget_tokens!r}")
        _check_choice(self.too_long, TOO_LONG, "too_long")


@dataclass
class Example:
    """One training sequence: ``input_ids`` and aligned ``labels`` (``IGNORE_INDEX`` where no loss).
    ``think`` / ``budgeted`` / ``think_budget`` (the thinking tokens kept) describe an unpacked
    example; a packed row holds ``parts`` examples."""

    input_ids: list[int]
    labels: list[int]
    think: bool = True
    budgeted: bool = False
    think_budget: int | None = None
    parts: int = 1

    @property
    def n_labels(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _draw_budget(rng: random.Random, n: int, config: SFTConfig) -> int:
    if config.budget_tokens is not None:
        return rng.randint(*config.budget_tokens)
    return min(n - 1, int(n * rng.uniform(*config.budget_share)))


def _cut(tokenizer: Tokenizer, text: str, k: int) -> tuple[str, int]:
    """The text of the first ``k`` tokens of ``text`` (fewer if the cut splits a UTF-8 character)."""
    ids = tokenizer.encode(text)
    while k > 0 and tokenizer.decode(ids[:k]).endswith("\ufffd"):
        k -= 1
    return tokenizer.decode(ids[:k]), k


def _sft_example(record: Mapping[str, Any], i: int, tokenizer: Tokenizer, config: SFTConfig,
                 stats: ReadStats) -> Example | None:
    where = f"record {i}"
    messages = sft_messages(record, where)
    if messages is None:
        stats.no_assistant += 1
        return None
    rng = random.Random(f"nano.sft:{config.seed}:{i}")
    draw_think, draw_budget = rng.random() < config.think_mix, rng.random() < config.budget_fraction
    final = messages[-1]
    thinking, answer = _split_thinking(final)
    switches = THINK_TAGS[1] in (tokenizer.chat_template or "")  # can the template turn reasoning off?
    think = bool(thinking.strip()) and (not switches or (record_switch(messages) is not False and draw_think))
    budget = None
    if think and draw_budget:
        n = len(tokenizer.encode(thinking.strip()))
        k = _draw_budget(rng, n, config)
        if k < n:
            thinking, budget = _cut(tokenizer, thinking.strip(), k)
    if not think or budget is not None:  # rewrite the turn; the template still decides the format
        final = {k: v for k, v in final.items() if k != "reasoning_content"}
        final["content"] = answer.strip()
        if think:
            final["reasoning_content"] = thinking
    prompt, completion = render_completion(tokenizer, messages[:-1] + [final], where,
                                           think=think if switches else None)
    p, c = _encode_pair(tokenizer, prompt, completion, stats)
    if not c:
        stats.no_assistant += 1
        return None
    input_ids, labels = _shifted(p, c)
    if len(input_ids) > config.seq_len:
        if config.too_long == "drop" or all(t == IGNORE_INDEX for t in labels[:config.seq_len]):
            stats.dropped_too_long += 1
            return None
        input_ids, labels = input_ids[:config.seq_len], labels[:config.seq_len]
        stats.truncated += 1
    return Example(input_ids, labels, think, budget is not None, budget)


def build_sft_examples(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, config: SFTConfig,
                       stats: ReadStats | None = None, progress: Progress | None = None) -> list[Example]:
    """One ``Example`` per usable record (module docstring: mask, reasoning mix, budgets, too long).
    ``DataError`` when no record yields an assistant token."""
    stats = stats if stats is not None else ReadStats()
    examples = []
    for i, record in enumerate(records):
        ex = _sft_example(record, i, tokenizer, config, stats)
        if ex is not None:
            examples.append(ex)
            stats.think_on += ex.think
            stats.think_off += not ex.think
            stats.budgeted += ex.budgeted
            stats.tokens += len(ex.input_ids)
            stats.label_tokens += ex.n_labels
        if progress is not None and ((i + 1) % 1000 == 0 or i + 1 == len(records)):
            progress("tokenizing chats", i + 1, len(records))
    stats.used += len(examples)
    if not examples:
        raise DataError(f"no SFT examples: {len(records)} records, {stats.no_assistant} without an assistant "
                        f"message, {stats.dropped_too_long} too long for seq_len {config.seq_len}; SFT trains on "
                        "assistant turns only, so give records with an assistant reply (or raise seq_len)")
    return examples


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int) -> list[Example]:
    """Pack examples into rows of exactly ``seq_len`` tokens (best-fit decreasing; each row keeps its
    examples in input order, then ``pad_id`` with ``IGNORE_INDEX`` labels). Labels stay per example,
    so no position is trained to predict the next example's first token.

    Packed examples can attend to each other: the model has no document masking (attention is plain
    causal and the Mamba state flows across), as in TRL's packing without position-id reset; the
    prompt of each example starts with the template's ``<SPECIAL_10>System`` header."""
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    rows: list[list[int]] = []
    for i in sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i)):
        n = len(examples[i].input_ids)
        if n > seq_len:
            raise DataError(f"example {i} has {n} tokens, more than seq_len {seq_len}; build with this seq_len")
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            rows.append([i])
            room, r = seq_len - n, len(rows) - 1
        else:
            room, r = free.pop(j)
            rows[r].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, r))
    packed = []
    for row in sorted(sorted(r) for r in rows):
        ids = [t for i in row for t in examples[i].input_ids]
        labels = [t for i in row for t in examples[i].labels]
        pad = seq_len - len(ids)
        packed.append(Example(ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, parts=len(row)))
    return packed


def prepare_sft(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, config: SFTConfig,
                stats: ReadStats | None = None, progress: Progress | None = None) -> list[Example]:
    """``build_sft_examples``, then ``pack_examples`` when ``config.pack`` (pad: the tokenizer's pad id,
    else its first EOS id, else 0)."""
    examples = build_sft_examples(records, tokenizer, config, stats, progress)
    if not config.pack:
        return examples
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_ids or (0,))[0]
    return pack_examples(examples, config.seq_len, pad)


# ---------------------------------------------------------------------------------------------- batches
def _check_world(batch_size: int, rank: int, world: int) -> int:
    if world < 1 or not 0 <= rank < world or batch_size < 1 or batch_size % world:
        raise DataError(f"rank {rank} of world {world} with batch_size {batch_size}: need 0 <= rank < world "
                        "and a batch_size >= 1 divisible by world")
    return batch_size // world


def batch_indices(n: int, batch_size: int, step: int, seed: int = 0, rank: int = 0, world: int = 1) -> list[int]:
    """Example indices of rank ``rank``'s rows of step ``step``: global row ``j`` reads position
    ``k = step * batch_size + j`` of an endless sequence of epochs, each a new seeded permutation
    (``permute``, keyed by seed and epoch) of ``[0, n)``. A pure function of its arguments, so resuming
    is "continue at step"; rank ``r`` of ``w`` takes rows ``[r*B/w, (r+1)*B/w)``."""
    per = _check_world(batch_size, rank, world)
    if n < 1 or step < 0:
        raise DataError(f"need at least one example (got {n}) and step >= 0 (got {step})")
    k = step * batch_size + np.arange(rank * per, (rank + 1) * per, dtype=np.int64)  # (per,)
    epoch, pos = k // n, k % n
    out = np.empty_like(k)
    for e in np.unique(epoch):
        sel = epoch == e
        out[sel] = permute(pos[sel], n, ["nano.chat", int(seed), int(e)])
    return [int(i) for i in out]


def _pad_rows(rows: Sequence[Sequence[int]], length: int, value: int):
    import torch

    out = torch.full((len(rows), length), value, dtype=torch.long)
    for j, r in enumerate(rows):
        out[j, :len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def sft_batches(examples: Sequence[Example], batch_size: int, step: int, seed: int = 0, rank: int = 0,
                world: int = 1, pad_id: int = 0):
    """``(input_ids, labels)``, two ``(batch_size // world, T)`` int64 tensors: this rank's rows of step
    ``step`` (``batch_indices``). ``T`` is the longest row of the whole global batch (``seq_len`` for
    packed rows), so every rank gets the same shape; shorter rows are right-padded (labels -100)."""
    per = _check_world(batch_size, rank, world)
    rows = [examples[i] for i in batch_indices(len(examples), batch_size, step, seed)]  # the global batch
    length = max(len(r.input_ids) for r in rows)
    mine = rows[rank * per:(rank + 1) * per]
    return (_pad_rows([r.input_ids for r in mine], length, pad_id),
            _pad_rows([r.labels for r in mine], length, IGNORE_INDEX))


# ---------------------------------------------------------------------------------------------- DPO
@dataclass
class PrefExample:
    """A preference pair: the shared prompt's ids and each completion's ids (to the end-of-turn)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def sequence(self, which: str) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of ``"chosen"`` or ``"rejected"``, labels -100 over the prompt."""
        _check_choice(which, ("chosen", "rejected"), "which")
        return _shifted(self.prompt_ids, self.chosen_ids if which == "chosen" else self.rejected_ids)


def build_preference_examples(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, seq_len: int,
                              too_long: str = "truncate", stats: ReadStats | None = None) -> list[PrefExample]:
    """One ``PrefExample`` per usable pair, rendered as they are (the record's own reasoning switch).
    Too long (prompt + completion - 1 > ``seq_len``): ``"truncate"`` cuts the completion's end (the pair
    is dropped when the prompt leaves no room), ``"drop"`` drops the pair. Pairs whose completions
    tokenize the same are skipped (``stats.identical_pairs``). ``DataError`` when none is left."""
    _check_choice(too_long, TOO_LONG, "too_long")
    stats = stats if stats is not None else ReadStats()
    out = []
    for i, record in enumerate(records):
        prompt, chosen, rejected = preference_messages(record, f"record {i}")
        p, c = _encode_pair(tokenizer, *render_completion(tokenizer, prompt + [chosen], f"record {i}"), stats)
        p2, r = _encode_pair(tokenizer, *render_completion(tokenizer, prompt + [rejected], f"record {i}"), stats)
        if p2 != p:
            raise DataError(f"record {i}: the prompt renders differently before chosen and rejected; the chat "
                            "template must not depend on the reply")
        room = seq_len + 1 - len(p)
        if max(len(c), len(r)) > room:
            if too_long == "drop" or room < 1:
                stats.dropped_too_long += 1
                continue
            c, r = c[:room], r[:room]
            stats.truncated += 1
        if c == r:
            stats.identical_pairs += 1
            continue
        out.append(PrefExample(p, c, r))
        stats.tokens += 2 * len(p) + len(c) + len(r) - 2
        stats.label_tokens += len(c) + len(r)
    stats.used += len(out)
    if not out:
        raise DataError(f"no preference pairs left from {len(records)} records ({stats.dropped_too_long} too long "
                        f"for seq_len {seq_len}, {stats.identical_pairs} with chosen == rejected)")
    return out


def preference_batch(examples: Sequence[PrefExample], indices: Sequence[int], pad_id: int = 0) -> dict:
    """``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``: int64
    tensors ``(len(indices), T)``, right-padded with ``pad_id`` (labels -100) to the longest of both."""
    seqs = {w: [examples[i].sequence(w) for i in indices] for w in ("chosen", "rejected")}
    length = max(len(ids) for pairs in seqs.values() for ids, _ in pairs)
    out = {}
    for w, pairs in seqs.items():
        out[f"{w}_input_ids"] = _pad_rows([ids for ids, _ in pairs], length, pad_id)
        out[f"{w}_labels"] = _pad_rows([labels for _, labels in pairs], length, IGNORE_INDEX)
    return out


# ---------------------------------------------------------------------------------------------- GRPO
@dataclass
class PromptExample:
    """A GRPO prompt: its ids (chat template, generation prompt added), text and messages, whether
    reasoning is on, and the record's other fields (``extra``, e.g. ``answer``) for reward functions."""

    prompt_ids: list[int]
    text: str
    messages: list[dict[str, Any]]
    think: bool
    extra: dict[str, Any] = field(default_factory=dict)


def build_prompts(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, think: bool | None = None,
                  max_prompt_len: int | None = None, stats: ReadStats | None = None) -> list[PromptExample]:
    """One ``PromptExample`` per record with a ``prompt`` (a string or messages not ending in an
    assistant message). ``think`` forces reasoning on/off (``render_chat``); None keeps the record's
    switch. Prompts longer than ``max_prompt_len`` tokens are dropped (``stats.dropped_too_long``)."""
    stats = stats if stats is not None else ReadStats()
    out = []
    for i, record in enumerate(records):
        where = f"record {i}"
        check_record(record, where, "grpo")
        messages = normalize_messages(record["prompt"], f"{where}: prompt", "user")
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{where}: a GRPO prompt must not end with an assistant message; put the reference "
                            "reply in another field (e.g. 'answer')")
        try:
            text = render_chat(tokenizer, messages, think=think, add_generation_prompt=True)
        except TokenizerError as exc:
            raise DataError(f"{where}: {exc}") from None
        ids = tokenizer.encode(text)
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            stats.dropped_too_long += 1
            continue
        on = think if think is not None else record_switch(messages) is not False
        ex = PromptExample(ids, text, messages, on, {k: v for k, v in record.items() if k != "prompt"})
        out.append(ex)
        stats.tokens += len(ids)
    stats.used += len(out)
    if not out:
        raise DataError(f"no GRPO prompts left from {len(records)} records ({stats.dropped_too_long} longer than "
                        f"{max_prompt_len} tokens)")
    return out
