"""The released Nemotron-Nano-v2 chat templates (the model card's, llama.cpp's copy, Megatron's SFT template;
tests/fixtures/chat_templates/) rendered by nano exactly as transformers' ``apply_chat_template`` renders them,
``continue_final_message`` and ``add_generation_prompt`` in every combination; nano's own template against the
card's on the reasoning switches; and how generation reads the thinking span and closes it under a budget."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanocli.thinking import (
    CARD_CLOSE,
    budget_close,
    budget_controller,
    is_nano_template,
    prompt_opens_thinking,
    split_thinking,
)
from nanocli_model.errors import TokenizerError
from nanocli_model.tokenizer import NANO_CHAT_TEMPLATE, Tokenizer, build_test_tokenizer

TEMPLATES = {p.stem: p.read_text(encoding="utf-8")
             for p in sorted((Path(__file__).parent / "fixtures" / "chat_templates").glob("*.jinja"))}
CARD = TEMPLATES["nemotron-nano-9b-v2-card"]
LLAMA_CPP = TEMPLATES["llama.cpp-NVIDIA-Nemotron-Nano-v2"]
TEXTS = ["The quick brown fox. Let me think about this step by step.\n", "What is 2+2? It is 4.\n"] * 40

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What is 2+2?"}
THINKING = {"role": "assistant", "content": "Okay, the user asked, What is 2+2? That's a basic.\n</think>\n\n"}
CONVERSATIONS = {
    "user": [USER],
    "system_user": [SYSTEM, USER],
    "system_think": [{"role": "system", "content": "You are a helpful assistant. /think"}, USER],
    "system_no_think": [{"role": "system", "content": "/no_think You are a helpful assistant."}, USER],
    "both_think_first": [{"role": "system", "content": "/think then /no_think"}, USER],
    "both_no_think_first": [{"role": "system", "content": "/no_think then /think"}, USER],
    "user_overrides": [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "Hi /think"}],
    "multi_turn": [SYSTEM, USER, {"role": "assistant", "content": "Two plus two.\n</think>\nIt is 4."},
                   {"role": "user", "content": "And 3+3? /no_think"}],
    "budget_continuation": [{"role": "system", "content": "You are a helpful assistant. /think"}, USER, THINKING],
    "final_answer": [SYSTEM, USER, {"role": "assistant", "content": "2 and 2.\n</think>\n\nIt is **4**."}],
    "final_no_think": [{"role": "system", "content": "/no_think"}, USER, {"role": "assistant", "content": "4."}],
    "reasoning_field": [SYSTEM, USER, {"role": "assistant", "content": "It is 4.", "reasoning_content": "2+2."}],
    "empty_final": [SYSTEM, USER, {"role": "assistant", "content": ""}],
}
COMBINATIONS = list(itertools.product([False, True], [False, True]))  # (add_generation_prompt, continue_final)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_tok")
    build_test_tokenizer(path, TEXTS, vocab_size=400)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"),
                                                bos_token="<s>", eos_token="<SPECIAL_12>")


def _outcome(render):
    """The rendered text, or "error" when the renderer refuses the request."""
    try:
        return render()
    except (TokenizerError, ValueError, TypeError) as e:  # transformers: ValueError / jinja errors (TypeError...)
        return ("error", type(e).__name__)
    except Exception as e:  # jinja2.TemplateError and friends (transformers lets them through)
        return ("error", type(e).__name__)


@pytest.mark.parametrize("agp, cfm", COMBINATIONS)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("template", [*TEMPLATES, "nano"])
def test_renders_exactly_as_transformers(tok, hf_tok, template, conversation, agp, cfm):
    text = NANO_CHAT_TEMPLATE if template == "nano" else TEMPLATES[template]
    messages = CONVERSATIONS[conversation]
    ours = _outcome(lambda: tok.apply_chat_template(messages, add_generation_prompt=agp, chat_template=text,
                                                     continue_final_message=cfm))
    theirs = _outcome(lambda: hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp,
                                                         continue_final_message=cfm, chat_template=text))
    if isinstance(theirs, tuple):
        assert isinstance(ours, tuple), f"transformers refuses ({theirs[1]}), nano renders {ours!r}"
    else:
        assert ours == theirs


def test_continue_final_message_ends_at_the_content(tok):
    """The issue's case: Megatron's template closes the turn itself; continuing cuts it, as transformers does."""
    messages = CONVERSATIONS["budget_continuation"]
    sft = TEMPLATES["megatron-nemotron-nano-v2-sft"]
    assert tok.apply_chat_template(messages, chat_template=sft, add_generation_prompt=False).endswith(
        "basic.\n</think>\n<SPECIAL_12>\n")
    assert tok.apply_chat_template(messages, chat_template=sft, continue_final_message=True).endswith(
        "That's a basic.\n</think>")
    for template in (CARD, LLAMA_CPP):  # the card's budget client: the prompt to continue after the forced close
        text = tok.apply_chat_template(messages, chat_template=template, continue_final_message=True)
        assert text.endswith("<SPECIAL_11>Assistant\n<think>\n" + ("\n" if template is LLAMA_CPP else "")
                             + "Okay, the user asked, What is 2+2? That's a basic.\n</think>")
    with pytest.raises(TokenizerError, match="exclude each other"):
        tok.apply_chat_template(messages, chat_template=CARD, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(TokenizerError, match="no 'content' to continue"):
        tok.apply_chat_template([{"role": "user"}], chat_template=CARD, continue_final_message=True)


def test_continue_a_named_field(tok, hf_tok):
    """``continue_final_message="reasoning_content"`` continues the thinking of nano's training turn."""
    messages = [SYSTEM, USER, {"role": "assistant", "content": "", "reasoning_content": "Two and two"}]
    ours = tok.apply_chat_template(messages, continue_final_message="reasoning_content")
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, continue_final_message="reasoning_content",
                                        chat_template=NANO_CHAT_TEMPLATE)
    assert ours == theirs and ours.endswith("<think>\nTwo and two")


# --------------------------------------------------------------------------- nano's template vs the card's
_WORDS = st.sampled_from(["", "hi", "What is 2+2?", "  padded  ", "Solve x", "/think", "/no_think",
                          "a /think b /no_think", "a /no_think b /think", "line\nbreak"])


@st.composite
def card_form_conversations(draw):
    """System/user/assistant conversations written in the card's own form: past answers optionally after a
    closed thinking, a final assistant turn as "thinking\\n</think>\\nanswer" (reasoning on) or the answer (off)."""
    messages = [{"role": "system", "content": draw(_WORDS)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 2))):
        messages.append({"role": "user", "content": draw(_WORDS)})
        answer = draw(st.sampled_from(["It is 4.", "Sure.", " x "]))
        prefix = draw(st.sampled_from(["", "thought\n</think>\n", "<think>\nthought\n</think>\n\n"]))
        messages.append({"role": "assistant", "content": prefix + answer})
    messages.append({"role": "user", "content": draw(_WORDS)})
    final = draw(st.sampled_from([None, "Thinking it over.", "Done."]))
    return messages, final


def _card_thinks(messages) -> bool:
    think = True
    for m in messages:
        if m["role"] in ("system", "user"):
            think = True if "/think" in m["content"] else False if "/no_think" in m["content"] else think
    return think


@settings(max_examples=150, deadline=None)
@given(card_form_conversations())
def test_nano_template_agrees_with_the_card(tok, drawn):
    messages, final = drawn
    for agp in (True, False):
        chat = messages
        if final is not None and not agp:
            content = f"{final}\n</think>\nThe answer." if _card_thinks(messages) else "The answer."
            chat = [*messages, {"role": "assistant", "content": content}]
        elif not agp:
            continue  # the card renders a conversation ending with a user turn without any prompt; nano too
        assert (tok.apply_chat_template(chat, add_generation_prompt=agp, chat_template=NANO_CHAT_TEMPLATE)
                == tok.apply_chat_template(chat, add_generation_prompt=agp, chat_template=CARD))


@pytest.mark.parametrize("system, think", [("/think /no_think", True), ("/no_think /think", True),
                                           ("/no_think", False), ("", True)])
def test_both_switches_in_one_message_mean_think_as_on_the_card(tok, system, think):
    messages = [{"role": "system", "content": system}, USER]
    for template in (NANO_CHAT_TEMPLATE, CARD, LLAMA_CPP):
        text = tok.apply_chat_template(messages, chat_template=template)
        assert prompt_opens_thinking(text) is think, template[:40]
        assert "/no_think" not in text and text.count("/think") == text.count("</think>")  # the switches are gone


# --------------------------------------------------------------------------- the thinking span
@pytest.mark.parametrize("text, inside", [
    ("<SPECIAL_11>Assistant\n<think>\n", True), ("<SPECIAL_11>Assistant\n<think>\n\n", True),
    ("<SPECIAL_11>Assistant\n<think>", True), ("<SPECIAL_11>Assistant\n<think>  \n\t", True),
    ("<SPECIAL_11>Assistant\n<think></think>", False), ("<think>a</think>\nAnswer", False),
    ("no tags at all", False), ("<think>\nold</think>x<think>\n", True)])
def test_prompt_opens_thinking(text, inside):
    assert prompt_opens_thinking(text) is inside


def test_every_release_template_opens_the_span_nano_reads(tok):
    for template in (CARD, LLAMA_CPP, NANO_CHAT_TEMPLATE):
        on = tok.apply_chat_template([SYSTEM, USER], chat_template=template)
        off = tok.apply_chat_template([{"role": "system", "content": "/no_think"}, USER], chat_template=template)
        assert prompt_opens_thinking(on) and not prompt_opens_thinking(off)


def test_budget_close_follows_the_card_for_released_templates(tok_dir, tmp_path):
    nano_tok = Tokenizer.from_dir(tok_dir)
    assert is_nano_template(nano_tok.chat_template) and budget_close(nano_tok).source == "nano template"
    assert budget_close(nano_tok).text == "\n</think>\n" and budget_close(nano_tok).period_text is None
    for name, template in TEMPLATES.items():
        d = tmp_path / name
        shutil.copytree(tok_dir, d)
        (d / "chat_template.jinja").write_text(template, encoding="utf-8")
        released = Tokenizer.from_dir(d)
        close = budget_close(released)
        assert not is_nano_template(released.chat_template)
        assert (close.text, close.period_text, close.source) == (CARD_CLOSE, "." + CARD_CLOSE, "model card")


def _forced(tok, budget, generated_texts, *, in_thinking=True, grace=0):
    """Feed ``generated_texts`` (one token each) to the budget controller; return the text it forces."""
    ctrl = budget_controller(tok, budget, grace, [in_thinking])
    ctrl.start(1)
    for piece in generated_texts:
        ids = tok.encode(piece)
        assert len(ids) == 1, piece
        ctrl.observe(0, ids[0], forced=False)
        if ctrl.forced_token(0) is not None:
            break
    forced = []
    while (t := ctrl.forced_token(0)) is not None:
        forced.append(t)
        ctrl.observe(0, t, forced=True)
    return tok.decode(forced), ctrl.rows[0]


def test_the_card_close_adds_a_period_only_when_the_thinking_lacks_one(tok_dir, tmp_path):
    d = tmp_path / "card"
    shutil.copytree(tok_dir, d)
    (d / "chat_template.jinja").write_text(CARD, encoding="utf-8")
    card = Tokenizer.from_dir(d)
    one = [t for t in ("The", " quick", " brown", " fox", ".", "\n") if len(card.encode(t)) == 1]
    assert one == ["The", " quick", " brown", " fox", ".", "\n"]
    # cut mid-sentence (grace 0 at the budget): the card's ".\n</think>\n\n"
    assert _forced(card, 3, ["The", " quick", " brown", " fox"])[0] == ".\n</think>\n\n"
    # the thinking already ends in a period: no second one
    assert _forced(card, 4, ["The", " quick", " fox", "."])[0] == "\n</think>\n\n"
    # ended at a newline after a period: the newline the model wrote is the close's first
    text, row = _forced(card, 2, ["The", " fox", ".", "\n"], grace=5)
    assert text == "</think>\n\n" and row.forced_end and row.tokens == 4
    # ended at a newline without a period: the card's whole text after it (as its client appends it)
    assert _forced(card, 2, ["The", " quick", " fox", "\n"], grace=5)[0] == ".\n</think>\n\n"


def test_counting_without_a_budget(tok):
    ctrl = budget_controller(tok, None, 0, [True])
    ctrl.start(1)
    for piece in ("The", " quick", " fox"):
        ctrl.observe(0, tok.encode(piece)[0], forced=False)
        assert ctrl.forced_token(0) is None
    ctrl.observe(0, tok.think_end_id, forced=False)
    ctrl.observe(0, tok.encode("The")[0], forced=False)
    assert ctrl.rows[0].tokens == 3 and ctrl.rows[0].answer_start == 4 and not ctrl.rows[0].forced_end


@pytest.mark.parametrize("text, inside, expected", [
    ("a\nb</think>\n\nAnswer", True, ("a\nb", "\n\nAnswer")),
    ("still thinking", True, ("still thinking", "")),
    ("</think>\n\nAnswer", False, ("", "\n\nAnswer")),  # a stray close after /no_think is not the answer's
    ("Answer</think> more", False, ("", "Answer more")),
    ("x</think>y</think>z", True, ("x", "y</think>z")),  # vLLM's split: at the first close
])
def test_split_thinking(text, inside, expected):
    assert split_thinking(text, inside) == expected
