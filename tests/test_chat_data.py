"""Chat data for nano align: assistant-only loss masks, reasoning on/off mix, thinking budgets,
packing, pure batches, DPO pairs and GRPO prompts (nanocli/data/chat.py, chat_io.py)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from nanocli.data import synthetic as syn
from nanocli.data.chat import (
    IGNORE_INDEX,
    Example,
    ReadStats,
    SFTConfig,
    batch_indices,
    build_preference_examples,
    build_prompts,
    build_sft_examples,
    pack_examples,
    preference_batch,
    prepare_sft,
    read_jsonl_records,
    sft_batches,
)
from nanocli.data.sources import DataError
from nanocli_model.tokenizer import Tokenizer, build_test_tokenizer, render_chat

END = "\n<SPECIAL_12>\n"  # nano's template closes the assistant turn with this
NO_AUG = {"think_mix": 1.0, "budget_fraction": 0.0}


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    problems = syn.generate(300, seed=11)
    texts = [syn.as_text(p) for p in problems]
    base = build_test_tokenizer(tmp_path_factory.mktemp("tok0"), texts, vocab_size=300)
    chats = [render_chat(base, syn.as_chat(p, think=i % 3 > 0)["messages"], add_generation_prompt=False)
             for i, p in enumerate(problems)]
    path = tmp_path_factory.mktemp("tok")
    build_test_tokenizer(path, texts + chats + ["You are terse. Let me add. hello world"], vocab_size=512)
    return path


@pytest.fixture(scope="session")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def labelled(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX])


def unlabelled_prefix(tok, ex) -> str:
    """Input text up to and including the position whose target is the first assistant token."""
    first = next(t for t, y in enumerate(ex.labels) if y != IGNORE_INDEX)
    return tok.decode(ex.input_ids[:first + 1])


def sft(tok, records, seq_len=512, **kw):
    stats = ReadStats()
    return build_sft_examples(records, tok, SFTConfig(seq_len=seq_len, **{**NO_AUG, **kw}), stats), stats


def chat(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return {"messages": msgs + [{"role": r, "content": c} for r, c in turns]}


# ---------------------------------------------------------------------------------------------- masks
def test_single_turn_loss_is_exactly_the_assistant_turn(tok):
    rec = chat(("user", "What is 2 + 3?"), ("assistant", "<think>\nLet me add.\n</think>\nThe answer is 5."))
    (ex,), stats = sft(tok, [rec])
    assert labelled(tok, ex) == "Let me add.\n</think>\nThe answer is 5." + END
    prompt = tok.apply_chat_template([{"role": "system", "content": "/think"}, rec["messages"][0]])
    assert prompt.endswith("<SPECIAL_11>Assistant\n<think>\n")
    assert unlabelled_prefix(tok, ex) == prompt   # the prompt ids are exactly generation's
    assert tok.decode(ex.input_ids) + "\n" == render_chat(tok, rec["messages"], think=True,
                                                          add_generation_prompt=False)
    # aligned: label t is the token at t + 1
    assert all(y == ex.input_ids[t + 1] for t, y in enumerate(ex.labels[:-1]) if y != IGNORE_INDEX)
    assert (stats.used, stats.think_on, stats.label_tokens) == (1, 1, ex.n_labels)


def test_expected_text_is_what_the_template_renders_after_the_generation_prompt(tok):
    rec = chat(("user", "Hi"), ("assistant", "<think>\nLet me add.\n</think>\nhello world"), system="You are terse.")
    (ex,), _ = sft(tok, [rec])
    full = render_chat(tok, rec["messages"], think=True, add_generation_prompt=False)
    expected = full.rsplit("<SPECIAL_11>Assistant\n<think>\n", 1)[1]
    assert labelled(tok, ex) == expected == "Let me add.\n</think>\nhello world" + END
    assert "System\nYou are terse.\n" in unlabelled_prefix(tok, ex)


def test_multi_turn_trains_the_last_assistant_turn_only(tok):
    rec = chat(("user", "What is 1 + 1?"), ("assistant", "<think>\nold thinking\n</think>\nThe answer is 2."),
               ("user", "And 2 + 3?"), ("assistant", "<think>\nLet me add.\n</think>\nThe answer is 5."),
               ("user", "thanks"))  # a trailing user turn is dropped
    (ex,), _ = sft(tok, [rec])
    assert labelled(tok, ex) == "Let me add.\n</think>\nThe answer is 5." + END
    context = unlabelled_prefix(tok, ex)
    assert "<SPECIAL_11>Assistant\nThe answer is 2.\n<SPECIAL_12>\n" in context  # past turn: answer only
    assert "old thinking" not in tok.decode(ex.input_ids) and "thanks" not in tok.decode(ex.input_ids)


def test_reasoning_content_and_prompt_completion_formats(tok):
    rc = {"messages": [{"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "hello world", "reasoning_content": "Let me add."}]}
    pc_str = {"prompt": "Hi", "completion": "<think>\nLet me add.\n</think>\nhello world"}
    pc_msgs = {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
               "completion": [{"role": "assistant", "content": "hello world", "reasoning_content": "Let me add."}]}
    examples, _ = sft(tok, [rc, pc_str, pc_msgs])
    for ex in examples:
        assert labelled(tok, ex) == "Let me add.\n</think>\nhello world" + END
    assert len({tuple(e.input_ids) for e in examples}) == 1


def test_think_off_renders_empty_think_and_drops_the_trace(tok):
    rec = chat(("user", "What is 2 + 3?"), ("assistant", "<think>\nLet me add.\n</think>\nThe answer is 5."))
    no_think = chat(("user", "What is 2 + 3?"), ("assistant", "<think>\nLet me add.\n</think>\nThe answer is 5."),
                    system="/no_think")
    no_trace = chat(("user", "What is 2 + 3?"), ("assistant", "The answer is 5."))
    (off,), stats = sft(tok, [rec], think_mix=0.0)
    (own, bare), _ = sft(tok, [no_think, no_trace], think_mix=1.0)  # the record's switch / no trace: off
    for ex in (off, own, bare):
        assert not ex.think
        assert labelled(tok, ex) == "The answer is 5." + END
        assert tok.decode(ex.input_ids).endswith("<SPECIAL_11>Assistant\n<think></think>The answer is 5.\n<SPECIAL_12>")
        assert "Let me add" not in tok.decode(ex.input_ids)
    assert (stats.think_on, stats.think_off) == (0, 1)


# ---------------------------------------------------------------------------------------------- errors
def test_no_assistant_is_counted_and_an_all_prompt_dataset_is_an_error(tok):
    good = chat(("user", "Hi"), ("assistant", "hello world"))
    only_user = chat(("user", "Hi"), system="You are terse.")
    examples, stats = sft(tok, [only_user, good, only_user])
    assert len(examples) == 1 and stats.no_assistant == 2
    with pytest.raises(DataError, match="without an assistant"):
        sft(tok, [only_user, {"prompt": "Hi", "completion": [{"role": "user", "content": "x"}]}])


def test_malformed_lines_stop_with_file_and_line_or_are_skipped(tmp_path):
    good = json.dumps(chat(("user", "Hi"), ("assistant", "hello")))
    lines = [good, "{broken", json.dumps({"messages": "Hi"}), "", json.dumps({"text": "no chat fields"}),
             json.dumps({"messages": [{"role": "user", "content": 5}]}), good]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: broken JSON"):
        read_jsonl_records(path)
    stats = ReadStats()
    records = read_jsonl_records(path, on_error="skip", stats=stats, kind="sft")
    assert len(records) == 2 and stats.skipped_malformed == 4 and stats.lines == 6 and stats.files == 1
    assert [e.split(": ")[0] for e in stats.errors] == [f"{path}:{n}" for n in (2, 3, 5, 6)]
    assert "content must be a string" in stats.errors[3]
    with pytest.raises(DataError, match="'chosen' and 'rejected'"):
        read_jsonl_records(path, on_error="stop", kind="dpo")


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"content": "hi"}]}, "role must be a string"),
    ({"messages": [{"role": "assistant", "content": "a", "reasoning_content": 3}]}, "reasoning_content"),
    ({"prompt": 7, "completion": "x"}, "prompt: expected a string"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                   {"role": "assistant", "content": "a"}]}, "only the first message may be a system"),
])
def test_wrong_fields_name_the_record(tok, record, message):
    with pytest.raises(DataError, match=message):
        sft(tok, [record])


def test_a_template_without_a_prefix_generation_prompt_is_refused(tok_dir):
    bad = Tokenizer.from_dir(tok_dir)
    bad.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}bot: {% endif %}")
    with pytest.raises(DataError, match="does not support assistant masks"):
        sft(bad, [chat(("user", "Hi"), ("assistant", "hello"))])


def test_prompt_and_completion_are_tokenized_separately(tok_dir):
    odd = Tokenizer.from_dir(tok_dir)  # the generation prompt ends in a space: a joint encode would merge it
    odd.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    (ex,), stats = sft(odd, [chat(("user", "Hi"), ("assistant", "the answer"))])
    assert odd.encode("assistant: the answer") != odd.encode("assistant: ") + odd.encode("the answer")
    assert labelled(odd, ex) == "the answer\n" and unlabelled_prefix(odd, ex) == "user: Hi\nassistant: "
    assert stats.boundary_merges == 1 and not ex.think  # no /no_think in the template: rendered as is


# ---------------------------------------------------------------------------------------------- mix, budgets
@pytest.fixture(scope="module")
def problems():
    return syn.generate(1500, seed=5)


def test_think_mix_proportion(tok, problems):
    records = [syn.as_chat(p) for p in problems]
    examples, stats = sft(tok, records, think_mix=0.7)
    share = sum(e.think for e in examples) / len(examples)
    assert abs(share - 0.7) < 0.04 and stats.think_on + stats.think_off == len(records)
    again, _ = sft(tok, records, think_mix=0.7)
    assert [e.input_ids for e in again] == [e.input_ids for e in examples]  # seeded
    for p, e in zip(problems, examples):
        assert labelled(tok, e).endswith(f"The answer is {p.answer}.{END}")
        assert ("</think>" in labelled(tok, e)) == e.think


@pytest.mark.parametrize("budget", [{}, {"budget_tokens": (2, 4)}])
def test_budgeted_thinking_is_cut_closed_and_keeps_the_answer(tok, problems, budget):
    records = [syn.as_chat(p) for p in problems[:600]]
    examples, stats = sft(tok, records, budget_fraction=0.5, **budget)
    cut = [(p, e) for p, e in zip(problems, examples) if e.budgeted]
    assert stats.budgeted == len(cut) and 0.35 < len(cut) / len(examples) <= 0.55
    for p, e in cut:
        start, end = e.input_ids.index(tok.think_start_id), e.input_ids.index(tok.think_end_id)
        thinking_tokens = end - start - 3  # minus the newlines the template writes around it
        assert thinking_tokens <= e.think_budget <= (4 if budget else len(tok.encode("\n".join(p.steps))) - 1)
        text = labelled(tok, e)
        assert text.count("</think>") == 1 and text.endswith(f"</think>\nThe answer is {p.answer}.{END}")
        assert "\n".join(p.steps).startswith(text.split("\n</think>")[0])  # a prefix of the real trace
    whole = [(p, e) for p, e in zip(problems, examples) if e.think and not e.budgeted]
    assert all(labelled(tok, e).startswith("\n".join(p.steps)) for p, e in whole)


# ---------------------------------------------------------------------------------------------- length, packing
def test_truncate_and_drop_counts(tok):
    short = chat(("user", "Hi"), ("assistant", "hello"))
    long_answer = chat(("user", "Hi"), ("assistant", "hello world " * 40))
    long_prompt = chat(("user", "hello world " * 60), ("assistant", "hello"))
    examples, stats = sft(tok, [short, long_answer, long_prompt], seq_len=48, too_long="truncate")
    assert (len(examples), stats.truncated, stats.dropped_too_long) == (2, 1, 1)
    assert len(examples[1].input_ids) == 48 and examples[1].n_labels > 0
    assert labelled(tok, examples[1]).startswith("hello world hello")
    examples, stats = sft(tok, [short, long_answer, long_prompt], seq_len=48, too_long="drop")
    assert (len(examples), stats.truncated, stats.dropped_too_long) == (1, 0, 2)


def test_packing_fills_rows_and_keeps_every_labelled_token(tok, problems):
    examples, _ = sft(tok, [syn.as_chat(p) for p in problems[:300]], seq_len=200, think_mix=0.8)
    rows = pack_examples(examples, 200, tok.pad_id)
    assert all(len(r.input_ids) == len(r.labels) == 200 for r in rows)
    assert sum(r.parts for r in rows) == len(examples)
    assert sum(r.n_labels for r in rows) == sum(e.n_labels for e in examples)
    assert Counter(t for r in rows for t in r.labels) == Counter(
        [t for e in examples for t in e.labels] + [IGNORE_INDEX] * sum(r.input_ids.count(tok.pad_id) for r in rows))
    total = sum(len(e.input_ids) for e in examples)
    assert len(rows) <= total / 200 * 1.05 + 1  # best-fit decreasing packs tightly
    system = tok.token_to_id("<SPECIAL_10>")
    for r in rows:
        starts = [t for t, i in enumerate(r.input_ids) if i == system]
        assert len(starts) == r.parts and starts[0] == 0
        for s in starts[1:]:  # no position is trained to predict the next example's start
            assert r.labels[s - 1] != system and r.labels[s - 1] == tok.encode("\n")[0]
        used = starts[-1] + next(len(e.input_ids) for e in examples if e.input_ids == r.input_ids[starts[-1]:][
            :len(e.input_ids)])
        assert set(r.labels[used:]) <= {IGNORE_INDEX} and set(r.input_ids[used:]) <= {tok.pad_id}
    with pytest.raises(DataError, match="more than seq_len"):
        pack_examples(examples, 20, tok.pad_id)


def test_sft_batches_are_pure_cover_each_epoch_and_split_over_ranks(tok, problems):
    rows = prepare_sft([syn.as_chat(p) for p in problems[:200]], tok, SFTConfig(seq_len=128))
    examples = rows[:48]
    x, y = sft_batches(examples, 8, step=3, seed=1)
    x2, y2 = sft_batches(examples, 8, step=3, seed=1)
    assert x.shape == y.shape == (8, 128) and x.equal(x2) and y.equal(y2)
    assert not x.equal(sft_batches(examples, 8, step=4, seed=1)[0])
    assert not x.equal(sft_batches(examples, 8, step=3, seed=2)[0])
    parts = [sft_batches(examples, 8, step=3, seed=1, rank=r, world=4) for r in range(4)]
    assert all(p[0].shape == (2, 128) for p in parts)
    import torch

    from nanocli_model.losses import IGNORE_INDEX as LOSS_IGNORE_INDEX
    assert IGNORE_INDEX == LOSS_IGNORE_INDEX
    assert torch.cat([p[0] for p in parts]).equal(x) and torch.cat([p[1] for p in parts]).equal(y)
    for epoch in range(2):  # 48 examples / 8 = 6 steps an epoch, each a new order
        seen = [i for s in range(6 * epoch, 6 * epoch + 6) for i in batch_indices(48, 8, s, seed=1)]
        assert sorted(seen) == list(range(48))
    assert batch_indices(48, 8, 0, 1) != batch_indices(48, 8, 6, 1)
    unpacked = [Example([1, 2, 3], [2, 3, IGNORE_INDEX]), Example([4, 5], [5, 6])]
    xs, ys = sft_batches(unpacked, 2, 0, pad_id=9)
    assert xs.shape == (2, 3) and sorted(xs[:, -1].tolist())[1] == 9 and IGNORE_INDEX in ys[:, -1].tolist()
    with pytest.raises(DataError, match="divisible by world"):
        sft_batches(examples, 6, 0, rank=0, world=4)


# ---------------------------------------------------------------------------------------------- DPO, GRPO
def test_preference_pairs_share_the_prompt_and_mask_it(tok):
    records = read_jsonl_records("synthetic:reasoning?docs=40&seed=3", kind="dpo")
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in records)
    stats = ReadStats()
    pairs = build_preference_examples(records, tok, seq_len=256, stats=stats)
    assert len(pairs) == 40 and stats.used == 40
    for rec, pair in zip(records, pairs):
        assert pair.chosen_ids != pair.rejected_ids
        assert tok.decode(pair.prompt_ids) == tok.apply_chat_template(rec["prompt"])
        answer = rec["chosen"][0]["content"].split("</think>\n")[1]
        assert tok.decode(pair.chosen_ids).endswith(answer + END)
        for which in ("chosen", "rejected"):
            ids, labels = pair.sequence(which)
            assert labels[:len(pair.prompt_ids) - 1] == [IGNORE_INDEX] * (len(pair.prompt_ids) - 1)
            assert [t for t in labels if t != IGNORE_INDEX] == getattr(pair, f"{which}_ids")
    batch = preference_batch(pairs, [0, 1, 2], pad_id=tok.pad_id)
    lengths = [len(pairs[i].sequence(w)[0]) for i in range(3) for w in ("chosen", "rejected")]
    assert {v.shape for v in batch.values()} == {(3, max(lengths))}
    for w in ("chosen", "rejected"):
        for j in range(3):
            n = len(pairs[j].sequence(w)[0])
            assert set(batch[f"{w}_input_ids"][j, n:].tolist()) <= {tok.pad_id}
            assert set(batch[f"{w}_labels"][j, n:].tolist()) <= {IGNORE_INDEX}


def test_preference_formats_and_limits(tok):
    conv = [{"role": "user", "content": "Hi"}]
    implicit = {"chosen": conv + [{"role": "assistant", "content": "hello world"}],
                "rejected": conv + [{"role": "assistant", "content": "world"}]}
    strings = {"prompt": "Hi", "chosen": "hello world", "rejected": "world"}
    same = {"prompt": "Hi", "chosen": "hello", "rejected": "hello"}
    stats = ReadStats()
    a, b = build_preference_examples([implicit, strings, same], tok, 256, stats=stats)
    assert (a.prompt_ids, a.chosen_ids, a.rejected_ids) == (b.prompt_ids, b.chosen_ids, b.rejected_ids)
    assert stats.identical_pairs == 1
    assert len(b.chosen_ids) > len(b.rejected_ids)
    seq_len = len(b.prompt_ids) + len(b.rejected_ids) - 1  # the rejected sequence fits exactly
    stats = ReadStats()
    (cut,) = build_preference_examples([strings], tok, seq_len, too_long="truncate", stats=stats)
    assert cut.rejected_ids == b.rejected_ids and cut.chosen_ids == b.chosen_ids[:len(b.rejected_ids)]
    assert len(cut.sequence("chosen")[0]) == seq_len and stats.truncated == 1
    with pytest.raises(DataError, match="1 too long"):
        build_preference_examples([strings], tok, seq_len, too_long="drop")
    with pytest.raises(DataError, match="one assistant message"):
        build_preference_examples([{"prompt": "Hi", "chosen": conv, "rejected": "x"}], tok, 256)


def test_grpo_prompts_carry_the_extra_fields(tok):
    records = read_jsonl_records("synthetic:reasoning?docs=30&seed=4&think=mix", kind="grpo")
    prompts = build_prompts(records, tok)
    offs = sum(not p.think for p in prompts)
    assert 0 < offs < 30
    for rec, p in zip(records, prompts):
        assert p.extra == {"answer": rec["answer"], "task": rec["task"]}
        assert p.prompt_ids == tok.encode_chat(rec["prompt"])
        assert p.text.endswith("<SPECIAL_11>Assistant\n<think>\n" if p.think else "<SPECIAL_11>Assistant\n<think></think>")
    forced = build_prompts(records, tok, think=False)
    assert all(not p.think and p.text.endswith("<think></think>") for p in forced)
    stats = ReadStats()
    limit = sorted(len(p.prompt_ids) for p in prompts)[15]
    kept = build_prompts(records, tok, max_prompt_len=limit, stats=stats)
    assert len(kept) + stats.dropped_too_long == 30 and stats.dropped_too_long > 0
    assert all(len(p.prompt_ids) <= limit for p in kept)


def test_synthetic_specs(tok):
    sft_recs = read_jsonl_records("synthetic:reasoning?docs=20&seed=2&think=off&tasks=add")
    assert all(r["messages"][0]["content"] == "/no_think" for r in sft_recs)
    assert all("What is" in r["messages"][1]["content"] and "+" in r["messages"][1]["content"] for r in sft_recs)
    with pytest.raises(DataError, match="cannot train dpo"):
        read_jsonl_records("synthetic:reasoning?format=sft", kind="dpo")
    with pytest.raises(DataError, match="unknown option"):
        read_jsonl_records("synthetic:reasoning?color=red")
    with pytest.raises(DataError, match="think on, off or mix"):
        read_jsonl_records("synthetic:reasoning?think=maybe")
    stats = ReadStats()
    read_jsonl_records("synthetic:reasoning?docs=7&split=heldout", stats=stats)
    assert stats.as_dict()["records"] == 7
