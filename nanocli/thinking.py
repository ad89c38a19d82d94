"""The thinking span of a reasoning model: its tags, and the two tokenizer facts a thinking budget needs.

``nano generate`` (its ``--thinking-budget``), ``nano eval`` (the budget sweep) and GRPO rollouts all end
a thinking span the same way (the model card's rule, ``nanocli_model.generation.ThinkingBudget``): at the
next newline after the budget, by feeding the text the model's own chat template puts between the
thinking and the answer. This module says which ids are newlines and what that text is; both are cached on
the tokenizer (a chat calls them once per turn). No torch here.
"""

from __future__ import annotations

from nanocli_model.errors import NanoError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEFAULT_THINK_CLOSE = "</think>\n\n"
# Model card: with a budget, end the thinking at the first newline after it, else at budget + 500.
DEFAULT_GRACE = 500


def newline_ids(tokenizer) -> set[int]:
    """Ids whose text holds a newline; a scan of the vocabulary, done once per tokenizer (chat turns reuse it)."""
    cached = getattr(tokenizer, "_nano_newline_ids", None)
    if cached is None:
        cached = {i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i])}
        tokenizer._nano_newline_ids = cached
    return cached


def think_close_text(tokenizer) -> str:
    """What the thinking budget forces to end a thinking span: the text between the thinking and the answer
    in this model's own chat template (what SFT trained it to see), without its leading newlines (the span
    ends after a newline the model wrote). ``"</think>\n\n"`` when the template does not show it."""
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


def split_thinking(text: str, in_thinking: bool) -> tuple[str, str]:
    """(thinking, answer) of a generated text that starts inside the thinking span or not."""
    if not in_thinking:
        return "", text
    thinking, sep, answer = text.partition(THINK_CLOSE)
    return (thinking, answer) if sep else (text, "")
