"""nanocli_model.tokenizer: loading, nano's chat template (reasoning on/off), transformers parity,
streaming detokenization and one-line errors. The tokenizer is trained here, once per module."""

from __future__ import annotations

import json
import shutil

import pytest

from nanocli_model.errors import NanoError, TokenizerError
from nanocli_model.tokenizer import (
    NANO_CHAT_TEMPLATE,
    NANO_SPECIAL_TOKENS,
    StreamDecoder,
    Tokenizer,
    build_test_tokenizer,
    render_chat,
)

# English only, so accented, CJK and emoji characters stay split across byte-level tokens.
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Let me think about this step by step.",
         "You are a helpful assistant. What is two plus two? The answer is four."] * 30
UNICODE = "héllo wörld — 日本語 🙂"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What is 2+2?"}
HEAD = "<SPECIAL_10>System\nYou are a helpful assistant.\n<SPECIAL_11>User\nWhat is 2+2?\n"
ON, OFF = "<SPECIAL_11>Assistant\n<think>\n", "<SPECIAL_11>Assistant\n<think></think>"

MULTI_TURN = [
    SYSTEM, USER,
    {"role": "assistant", "content": "<think>\n2 plus 2 is 4.\n</think>\nIt is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6.", "reasoning_content": "3 plus 3 is 6."},
    {"role": "user", "content": "Thanks"},
]
CASES = {
    "system_user_on": ([SYSTEM, USER], HEAD + ON),
    "no_think_in_system": ([{"role": "system", "content": "You are a helpful assistant. /no_think"}, USER],
                           HEAD + OFF),
    "think_in_user": ([{"role": "system", "content": "/no_think You are a helpful assistant."},
                       {"role": "user", "content": "What is 2+2? /think"}], HEAD + ON),
    "no_think_in_user": ([SYSTEM, {"role": "user", "content": "/no_think What is 2+2?"}], HEAD + OFF),
    "multi_turn_drops_thinking": (MULTI_TURN, HEAD + "<SPECIAL_11>Assistant\nIt is 4.\n<SPECIAL_12>\n"
                                  "<SPECIAL_11>User\nAnd 3+3?\n<SPECIAL_11>Assistant\nIt is 6.\n<SPECIAL_12>\n"
                                  "<SPECIAL_11>User\nThanks\n" + ON),
    "no_system": ([USER], "<SPECIAL_10>System\n\n<SPECIAL_11>User\nWhat is 2+2?\n" + ON),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_test_tokenizer(path, TEXTS, vocab_size=512)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def edited_copy(tok_dir, tmp_path, name, edit):
    """A copy of the tokenizer directory whose file ``name`` is rewritten by ``edit(text) -> text``."""
    out = tmp_path / "edited"
    shutil.copytree(tok_dir, out)
    (out / name).write_text(edit((out / name).read_text(encoding="utf-8")), encoding="utf-8")
    return out


def edit_config(**changes):
    return lambda text: json.dumps({**json.loads(text), **changes})


# ---------------------------------------------------------------------------- encode / decode
@pytest.mark.parametrize("text", ["The quick brown fox.", UNICODE, "a\n\n  b\t<think>x</think> c<SPECIAL_12>", ""])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_ids(tok):
    for i, token in enumerate(NANO_SPECIAL_TOKENS):
        assert tok.encode(token) == [i] == [tok.token_to_id(token)]
        assert tok.id_to_token(i) == token
    assert (tok.think_start_id, tok.think_end_id) == (7, 8)
    assert (tok.bos_id, tok.pad_id, tok.unk_id) == (1, 3, 0)
    assert tok.vocab_size > len(NANO_SPECIAL_TOKENS) + 256
    # think tags stay visible when special tokens are skipped; the turn markers do not
    ids = tok.encode("<SPECIAL_11>Assistant\n<think>\nhm</think>ok<SPECIAL_12>")
    assert tok.decode(ids, skip_special_tokens=True) == "Assistant\n<think>\nhm</think>ok"


def test_eos_ids_are_the_union_with_generation_config(tok, tok_dir, tmp_path):
    assert tok.eos_ids == (6, 2)  # <SPECIAL_12> from tokenizer_config, then </s> from generation_config
    path = edited_copy(tok_dir, tmp_path, "generation_config.json", edit_config(eos_token_id=6))
    assert Tokenizer.from_dir(path).eos_ids == (6,)
    (path / "generation_config.json").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert Tokenizer.from_dir(path).eos_ids == (2,)


# ---------------------------------------------------------------------------- chat template
@pytest.mark.parametrize("case", CASES)
def test_template_renders_expected_text(tok, case):
    messages, expected = CASES[case]
    assert tok.apply_chat_template(messages) == expected
    assert tok.encode_chat(messages) == tok.encode(expected)
    assert tok.encode_chat(messages)[:1] == [tok.token_to_id("<SPECIAL_10>")]


@pytest.mark.parametrize("think", [True, False])
def test_final_assistant_turn_keeps_thinking_and_extends_the_prompt(tok, think):
    """add_generation_prompt=False with a trailing assistant message: the turn to train on."""
    system = {"role": "system", "content": "/think" if think else "/no_think"}
    answer = {"role": "assistant", "content": "<think>4 it is.</think>\nIt is 4."}
    prompt = tok.apply_chat_template([system, USER])
    full = tok.apply_chat_template([system, USER, answer], add_generation_prompt=False)
    assert full.startswith(prompt)
    assert full[len(prompt):] == ("4 it is.\n</think>\nIt is 4." if think else "It is 4.") + "\n<SPECIAL_12>\n"
    other = {"role": "assistant", "content": "It is 4.", "reasoning_content": "4 it is."}
    assert tok.apply_chat_template([system, USER, other], add_generation_prompt=False) == full


def test_render_chat_forces_the_mode(tok):
    assert render_chat(tok, [SYSTEM, USER], think=None) == HEAD + ON
    assert render_chat(tok, [SYSTEM, USER], think=False) == HEAD + OFF
    messages = [{"role": "system", "content": "You are a helpful assistant. /no_think"},
                {"role": "user", "content": "What is 2+2? /no_think"}]
    assert render_chat(tok, messages, think=True) == HEAD + ON
    assert messages[0]["content"].endswith("/no_think")  # the caller's messages are left alone
    assert render_chat(tok, [USER], think=False) == "<SPECIAL_10>System\n\n<SPECIAL_11>User\nWhat is 2+2?\n" + OFF


@pytest.mark.parametrize("messages", [[{"role": "tool", "content": "x"}], [USER, SYSTEM],
                                      [{"role": "user", "content": [{"type": "text", "text": "x"}]}]])
def test_template_rejects_what_it_cannot_render(tok, messages):
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        tok.apply_chat_template(messages)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"),
                                                bos_token="<s>", eos_token="<SPECIAL_12>")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_template_matches_transformers(tok, hf_tok, case, add_generation_prompt):
    messages = CASES[case][0]
    if not add_generation_prompt:
        messages = [*messages, {"role": "assistant", "content": "<think>hm</think>Done."}]
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                          chat_template=NANO_CHAT_TEMPLATE)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_saved_directory_loads_in_transformers(tok, tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    assert hf.apply_chat_template(MULTI_TURN, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(MULTI_TURN)
    assert hf.encode(UNICODE + "<think>", add_special_tokens=False) == tok.encode(UNICODE + "<think>")
    assert hf.convert_tokens_to_ids(hf.eos_token) == tok.eos_ids[0]


def test_named_and_separate_templates(tok_dir, tmp_path):
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ bos_token }}hi"}]
    path = edited_copy(tok_dir, tmp_path, "tokenizer_config.json", edit_config(chat_template=named))
    tok = Tokenizer.from_dir(path)
    assert tok.apply_chat_template([USER]) == "<s>hi"
    assert tok.apply_chat_template([USER], chat_template="tool_use") == "tools"
    (path / "chat_template.jinja").write_text("{{ messages[0].content }}{{ extra }}")
    assert Tokenizer.from_dir(path).apply_chat_template([USER], extra="!") == "What is 2+2?!"
    # transformers' filters, globals and {% generation %} marker work too
    template = "{% generation %}{{ messages | tojson }}{% endgeneration %}{{ strftime_now('%Y') | length }}"
    assert tok.apply_chat_template([USER], chat_template=template) == json.dumps([USER]) + "4"


# ---------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_decoder_reproduces_decode(tok, skip_special_tokens):
    ids = tok.encode(f"<think>\n{UNICODE}\n</think>\nok {UNICODE}!<SPECIAL_12>")
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test text should split characters across ids"
    stream = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    pieces = [stream.put(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # something was held back while a character was incomplete


def test_stream_decoder_holds_back_then_flushes_incomplete_text(tok):
    ids = tok.encode("ab🙂")[:-1]  # the emoji's last byte never arrives
    stream = StreamDecoder(tok, context_ids=tok.encode("prompt"))
    assert "".join(stream.put(i) for i in ids) == "ab"
    assert stream.flush() == "\ufffd"
    assert stream.flush() == ""


# ---------------------------------------------------------------------------- errors
def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not found") as err:
        Tokenizer.from_dir(tmp_path)
    assert isinstance(err.value, NanoError) and isinstance(err.value, ValueError)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json", "tokenizer.json"])
def test_malformed_files_name_the_file(tok_dir, tmp_path, name):
    path = edited_copy(tok_dir, tmp_path, name, lambda text: text[: len(text) // 2])
    with pytest.raises(TokenizerError, match=name.replace(".", r"\.")) as err:
        Tokenizer.from_dir(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("changes, match", [
    ({"eos_token": "<nope>"}, "eos_token '<nope>' is not a token"),
    ({"added_tokens_decoder": {"5": {"content": "<think>", "special": False}}}, "declared with id 5"),
])
def test_inconsistent_config(tok_dir, tmp_path, changes, match):
    path = edited_copy(tok_dir, tmp_path, "tokenizer_config.json", edit_config(**changes))
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_dir(path)


def test_declared_added_tokens_missing_from_tokenizer_json_are_added(tok, tok_dir, tmp_path):
    new = {str(tok.vocab_size): {"content": "<TOOLCALL>", "special": False}}
    path = edited_copy(tok_dir, tmp_path, "tokenizer_config.json", edit_config(added_tokens_decoder=new))
    assert Tokenizer.from_dir(path).encode("x<TOOLCALL>")[-1] == tok.vocab_size


@pytest.mark.parametrize("template, match", [
    ("{{ raise_exception('no tools here') }}", "no tools here"),
    ("{% for m in messages %}", "does not parse"),
    (None, "no chat_template"),
])
def test_template_errors_name_the_file(tok_dir, tmp_path, template, match):
    path = edited_copy(tok_dir, tmp_path, "tokenizer_config.json", edit_config(chat_template=template))
    with pytest.raises(TokenizerError, match=match) as err:
        Tokenizer.from_dir(path).apply_chat_template([USER])
    assert str(path / "tokenizer_config.json") in str(err.value) and "\n" not in str(err.value)
