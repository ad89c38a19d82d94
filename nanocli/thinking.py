"""The thinking span of a reasoning model: where it opens, how a thinking budget closes it, and how the output splits.

``nano generate`` (its ``--thinking-budget``), ``nano eval`` (the budget sweep) and GRPO rollouts all end a
thinking span the same way (``budget_controller``): at the next newline after the budget (the model card's
rule, ``nanocli_model.generation.ThinkingBudget``), by forcing a closing text:

* a released template (the model card's, llama.cpp's copy, Megatron's SFT template, ...): the card's budget
  client's ``".\\n</think>\\n\\n"``, the period only when the thinking does not already end in one;
* nano's own template: the text that template puts between the thinking and the answer (what nano's SFT
  trained the model to see), read back from a probe render.

Whether generation starts inside the span is read from the rendered prompt (``prompt_opens_thinking``): the
last ``<think>`` comes after the last ``</think>``, whatever whitespace follows (``<think>\\n`` on the card,
``<think>\\n\\n`` in llama.cpp's copy), as vLLM's reasoning parsers read it. The vocabulary scans are cached
on the tokenizer (a chat calls them once per turn). No torch at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nanocli_model.errors import NanoError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEFAULT_THINK_CLOSE = "</think>\n\n"
# The model card's ThinkingBudgetClient: thinking cut by the budget is closed with f"{thinking}.\n</think>\n\n".
CARD_CLOSE, CARD_PERIOD = "\n</think>\n\n", "."
# Model card: with a budget, end the thinking at the first newline after it, else at budget + 500.
DEFAULT_GRACE = 500
# A phrase of nano's own chat template (every version of it), not of any released one.
_NANO_TEMPLATE_MARK = "only the first message may be a system message"


def prompt_opens_thinking(text: str) -> bool:
    """Whether a rendered prompt leaves the model inside a thinking span: its last ``<think>`` comes after its
    last ``</think>`` (``<think></think>``, reasoning off, does not)."""
    opened = text.rfind(THINK_OPEN)
    return opened >= 0 and opened > text.rfind(THINK_CLOSE)


def is_nano_template(template: str | None) -> bool:
    """Whether a chat template is nano's own (``nanocli_model.tokenizer.NANO_CHAT_TEMPLATE``, any version)."""
    return template is not None and _NANO_TEMPLATE_MARK in template


@dataclass(frozen=True)
class _VocabClasses:
    newline: frozenset[int]  # ids whose text holds a newline
    blank: frozenset[int]  # whitespace-only ids
    period_end: frozenset[int]  # ids whose text ends with a period (trailing whitespace aside)


def _vocab_classes(tokenizer) -> _VocabClasses:
    """One scan of the vocabulary, cached on the tokenizer."""
    cached = getattr(tokenizer, "_nano_vocab_classes", None)
    if cached is None:
        newline, blank, period = set(), set(), set()
        for i in range(tokenizer.vocab_size):
            text = tokenizer.decode([i])
            if "\n" in text:
                newline.add(i)
            if text and not text.strip():
                blank.add(i)
            elif text.rstrip().endswith("."):
                period.add(i)
        cached = _VocabClasses(frozenset(newline), frozenset(blank), frozenset(period))
        tokenizer._nano_vocab_classes = cached
    return cached


def newline_ids(tokenizer) -> frozenset[int]:
    """Ids whose text holds a newline; a scan of the vocabulary, done once per tokenizer (chat turns reuse it)."""
    return _vocab_classes(tokenizer).newline


def think_close_text(tokenizer) -> str:
    """What nano's own template puts between the thinking and the answer (what SFT trained the model to see),
    without its leading newlines (the span ends after a newline the model wrote): read back from a probe
    render. ``"</think>\\n\\n"`` when the template does not show it."""
    cached = getattr(tokenizer, "_nano_think_close", None)
    if cached is not None:
        return cached
    close = DEFAULT_THINK_CLOSE
    if tokenizer.chat_template is not None:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"},
                 {"role": "assistant", "content": f"{THINK_OPEN}\nTHOUGHTS\n{THINK_CLOSE}\nANSWER"}],
                add_generation_prompt=False)
        except NanoError:
            text = ""
        i = text.rfind("THOUGHTS")
        j = text.find("ANSWER", i) if i >= 0 else -1
        if j > 0 and THINK_CLOSE in text[i:j]:
            close = text[i + len("THOUGHTS"):j].lstrip("\n")
    tokenizer._nano_think_close = close
    return close


@dataclass(frozen=True)
class BudgetClose:
    """The text a thinking budget forces: ``text``, or ``period_text`` when the thinking does not end in a period
    (None: never a period)."""

    text: str
    period_text: str | None
    source: str  # "model card" | "nano template"


def budget_close(tokenizer) -> BudgetClose:
    """The model card's close for released templates; nano's own template's close for nano's models."""
    if is_nano_template(tokenizer.chat_template):
        return BudgetClose("\n" + think_close_text(tokenizer), None, "nano template")
    return BudgetClose(CARD_CLOSE, CARD_PERIOD + CARD_CLOSE, "model card")


def budget_controller(tokenizer, budget: int | None, grace: int, in_thinking: Sequence[bool]):
    """A ``nanocli_model.generation.ThinkingBudget`` for prompts that start inside (or outside) the span: with
    ``budget`` None it only counts the thinking tokens. None when the tokenizer has no single ``</think>``
    token (a budget then cannot be applied: the caller says so)."""
    from nanocli_model.generation import ThinkingBudget

    if tokenizer.think_end_id is None:
        return None
    close, vocab = budget_close(tokenizer), _vocab_classes(tokenizer)
    period = tokenizer.encode(close.period_text) if close.period_text else ()
    return ThinkingBudget(budget, tokenizer.encode(close.text), vocab.newline, grace, in_thinking=list(in_thinking),
                          close_ids={tokenizer.think_end_id}, period_close_ids=period,
                          period_end_ids=vocab.period_end, blank_ids=vocab.blank)


def split_thinking(text: str, in_thinking: bool) -> tuple[str, str]:
    """(thinking, answer) of a generated text that starts inside the thinking span or not: split at the first
    ``</think>`` (as vLLM's reasoning parsers split). A ``</think>`` the model writes outside a span (a stray
    close after a ``/no_think`` prompt) is not part of the answer."""
    if not in_thinking:
        return "", text.replace(THINK_CLOSE, "")
    thinking, sep, answer = text.partition(THINK_CLOSE)
    return (thinking, answer) if sep else (text, "")
