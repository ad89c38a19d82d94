"""nanocli.data.synthetic: every answer and reasoning step recomputed independently, the split never
leaks, generation is deterministic across processes, and the chat/DPO/GRPO formats and rewards."""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys

import pytest

from nanocli.data import synthetic as syn
from nanocli.data.synthetic import (
    TASKS,
    Problem,
    as_chat,
    as_grpo,
    as_preference,
    as_text,
    extract_answer,
    generate,
    is_correct,
    iter_problems,
    parse_synthetic_options,
    reward_exact,
    reward_format,
    split_of,
)
from nanocli_model.errors import ConfigError

PER_TASK = 300
PROBLEMS = {task: generate(PER_TASK, seed=11, tasks=[task], difficulty=(1, 5)) for task in TASKS}
ALL = [p for ps in PROBLEMS.values() for p in ps]


def _numbers(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"-?\d+", text)]


def solve(p: Problem) -> str:
    """The answer recomputed from the question text alone, with plain Python."""
    q = p.question
    if p.task in ("add", "sub", "mul"):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", q).groups()
        return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    if p.task == "compare":
        return str(max(_numbers(re.fullmatch(r"Which is larger: (\d+) or (\d+)\?", q).group(0))))
    if p.task == "sort":
        return ", ".join(map(str, sorted(_numbers(re.fullmatch(r"Sort in increasing order: ([\d, ]+)\.", q)[1]))))
    if p.task == "count":
        letter, text = re.fullmatch(r'How many times does "([a-z])" appear in "([a-z]+)"\?', q).groups()
        return str(text.count(letter))
    if p.task == "equation":
        a, sign, b, c = re.fullmatch(r"Solve for x: (-?\d+)x ([-+]) (\d+) = (-?\d+)\.", q).groups()
        a, b, c = int(a), int(b) * (1 if sign == "+" else -1), int(c)
        assert (c - b) % a == 0, q
        return str((c - b) // a)
    assert p.task == "max"
    return str(max(_numbers(re.fullmatch(r"What is the largest of ([\d, ]+)\?", q)[1])))


def test_tasks_include_the_required_ones():
    assert {"add", "sub", "mul", "compare", "sort", "count", "equation", "max"} <= set(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_answers_match_an_independent_solution(task):
    for p in PROBLEMS[task]:
        assert p.task == task and 1 <= p.difficulty <= 5
        assert p.answer == solve(p), p
        assert p.key.startswith(f"{task}:")


ARITH = re.compile(r"(?<![\w.])(\d+(?: [-+*] \d+)+) = (-?\d+)")


def test_every_arithmetic_step_is_right():
    checked = 0
    for p in ALL:
        for step in p.steps:
            for lhs, rhs in ARITH.findall(step):
                assert eval(lhs) == int(rhs), (p.question, step)  # lhs is digits and + - * only
                checked += 1
    assert checked > 1000


def _written_digits(p: Problem) -> int:
    digits = [m for s in p.steps for m in re.findall(r"write (?:the carry )?(\d+)", s)]
    return int("".join(reversed(digits)))


@pytest.mark.parametrize("task", ["add", "sub", "mul"])
def test_column_steps_spell_out_the_answer(task):
    for p in PROBLEMS[task]:
        if task == "mul" and "write" not in p.steps[0]:  # partial products: the last line sums them
            assert p.steps[-1].endswith(f"= {p.answer}") and len(p.steps) >= 3
            continue
        assert _written_digits(p) == int(p.answer), p
        if task == "add":
            for before, step in zip(p.steps, p.steps[1:]):  # a carry is added in the next column
                assert ("carry 1" in before) == bool(re.match(r"\d \+ \d \+ 1 = |write the carry", step)), p
        if task == "sub":
            for before, step in zip(p.steps, p.steps[1:]):  # a borrow is paid in the next column
                assert ("borrow 1" in before) == bool(re.match(r"\d+ - \d - 1 = ", step)), p


def test_sort_steps_select_the_smallest_each_time():
    for p in PROBLEMS["sort"]:
        picked = []
        for step in p.steps[:-1]:
            rest, smallest = re.fullmatch(r"smallest of ([\d, ]+) is (\d+)", step).groups()
            assert int(smallest) == min(_numbers(rest))
            picked.append(smallest)
        picked.append(re.fullmatch(r"(\d+) is left", p.steps[-1])[1])
        assert ", ".join(picked) == p.answer


def test_max_steps_keep_a_running_maximum():
    for p in PROBLEMS["max"]:
        best = int(re.fullmatch(r"start with (\d+)", p.steps[0])[1])
        for step in p.steps[1:]:
            v, rel, old, verb, new = re.fullmatch(r"(\d+) ([<>]) (\d+), (take|keep) (\d+)", step).groups()
            assert int(old) == best and (rel == ">") == (int(v) > best) and verb == ("take" if rel == ">" else "keep")
            best = max(best, int(v))
            assert int(new) == best
        assert str(best) == p.answer


def test_count_steps_keep_a_running_count():
    for p in PROBLEMS["count"]:
        letter, text = re.search(r'"([a-z])" appear in "([a-z]+)"', p.question).groups()
        assert len(p.steps) == len(text)
        for i, step in enumerate(p.steps):
            hit = "yes" if text[i] == letter else "no"
            assert step == f"{text[i]}: {hit}, {text[: i + 1].count(letter)}"


def test_compare_and_equation_steps_conclude_with_the_answer():
    for p in PROBLEMS["compare"]:
        assert p.steps[-1].endswith(f"so {p.answer} is larger")
        a, b = (str(v) for v in _numbers(p.question))
        if len(a) == len(b):  # digit by digit: the equal prefix, then the first different digit
            k = next(i for i in range(len(a)) if a[i] != b[i])
            assert len(p.steps) == k + 2 and all(" = " in s for s in p.steps[1:-1])
    for p in PROBLEMS["equation"]:
        a, sign, b, c = re.fullmatch(r"Solve for x: (-?\d+)x ([-+]) (\d+) = (-?\d+)\.", p.question).groups()
        b = int(b) if sign == "+" else -int(b)
        assert p.steps[0].endswith(f"{a}x = {int(c) - b}") and p.steps[1].endswith(f"x = {p.answer}")


def test_problems_are_short_at_low_difficulty():
    for task in TASKS:
        for p in generate(200, seed=3, tasks=[task], difficulty=(1, 3)):
            assert len(as_text(p)) < 300, as_text(p)


def test_difficulty_sets_the_size():
    small = generate(50, seed=1, tasks=["sort"], difficulty=1)
    large = generate(50, seed=1, tasks=["sort"], difficulty=5)
    assert all(len(p.steps) == 3 for p in small) and all(len(p.steps) == 7 for p in large)
    assert {p.difficulty for p in generate(300, seed=2, difficulty=(2, 4))} == {2, 3, 4}


def _digest(problems: list[Problem]) -> str:
    return hashlib.sha256("\x00".join(as_text(p) for p in problems).encode()).hexdigest()


def test_generation_is_deterministic_and_a_prefix_stream():
    first = generate(200, seed=5, difficulty=(1, 5))
    assert first == generate(200, seed=5, difficulty=(1, 5))
    assert first[:50] == generate(50, seed=5, difficulty=(1, 5))
    stream = iter_problems(seed=5, difficulty=(1, 5))
    assert [next(stream) for _ in range(20)] == first[:20]
    assert first != generate(200, seed=6, difficulty=(1, 5))


def test_generation_is_the_same_in_another_process():
    code = ("import hashlib; from nanocli.data.synthetic import generate, as_text; "
            "print(hashlib.sha256('\\x00'.join(as_text(p) for p in generate(300, seed=9, split='heldout'))"
            ".encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _digest(generate(300, seed=9, split="heldout"))


# Pinned so that the corpus cannot change silently (across Python versions or edits): a deliberate
# change of the generators updates this digest and says so in its commit.
GOLDEN = "44483e0aa4af3792496de998726916e0b2a1006f177de1fdfd82e57846a7642d"


def test_generation_matches_the_pinned_corpus():
    first = generate(1, seed=0, tasks=["add"], difficulty=2)[0]
    assert first == Problem("add", "What is 808 + 52?", ("8 + 2 = 10, write 0 carry 1", "0 + 5 + 1 = 6, write 6",
                                                         "8 + 0 = 8, write 8"), "860", 2, "add:52+808")
    assert _digest(generate(400, seed=0, difficulty=(1, 5))) == GOLDEN


def test_train_and_heldout_never_share_a_problem():
    train = {p.key for seed in (0, 1) for p in generate(2000, seed=seed)}
    heldout = {p.key for seed in (0, 2) for p in generate(500, seed=seed, split="heldout", difficulty=(1, 5))}
    assert not train & heldout
    assert all(split_of(k) == "train" for k in train) and all(split_of(k) == "heldout" for k in heldout)
    share = sum(split_of(f"add:{i}+{i + 7}") == "heldout" for i in range(5000)) / 5000
    assert 0.07 < share < 0.13


def test_chat_round_trips_through_extract_answer():
    for p in ALL[::3]:
        for think in (True, False):
            chat = as_chat(p, think=think)
            system, user, assistant = chat["messages"]
            assert system == {"role": "system", "content": "/think" if think else "/no_think"}
            assert user == {"role": "user", "content": p.question} and assistant["role"] == "assistant"
            content = assistant["content"]
            assert extract_answer(content) == p.answer and is_correct(content, p.answer)
            assert reward_exact(content, p.answer) == 1.0
            assert ("<think>" in content) == think
            if think:
                assert content == "<think>\n" + "\n".join(p.steps) + f"\n</think>\nThe answer is {p.answer}."
                assert reward_format(content) == 1.0
            else:
                assert content == f"The answer is {p.answer}."


def test_chat_system_prompt_carries_the_switch():
    p = ALL[0]
    assert as_chat(p, system="Be brief.")["messages"][0]["content"] == "Be brief. /think"
    assert as_chat(p, think=False, system="Be brief.")["messages"][0]["content"] == "Be brief. /no_think"


def test_preference_rejects_a_plausible_wrong_answer():
    rng = random.Random(0)
    for p in ALL:
        pair = as_preference(p, rng)
        assert pair["prompt"] == as_grpo(p)["prompt"]
        (chosen,), (rejected,) = pair["chosen"], pair["rejected"]
        assert chosen["role"] == rejected["role"] == "assistant"
        assert is_correct(chosen["content"], p.answer)
        wrong = extract_answer(rejected["content"])
        assert wrong is not None and wrong != p.answer and not is_correct(rejected["content"], p.answer)
        assert reward_format(rejected["content"]) == 1.0
    again = [as_preference(p, random.Random(1)) for p in ALL[:50]]
    assert again == [as_preference(p, random.Random(1)) for p in ALL[:50]]


def test_preference_mistakes_are_the_classic_ones():
    p = Problem("add", "What is 457 + 86?", (), "543", 2, "add:86+457")
    assert "433" in {syn.wrong_answer(p, random.Random(s)) for s in range(50)}  # every carry dropped


def test_grpo_example():
    p = PROBLEMS["sort"][0]
    example = as_grpo(p, think=False)
    assert example == {"prompt": [{"role": "system", "content": "/no_think"},
                                  {"role": "user", "content": p.question}], "answer": p.answer, "task": "sort"}


@pytest.mark.parametrize("completion, expected", [
    ("<think>\nstuff\n</think>\nThe answer is 543.", "543"),
    ("The answer is +007.", "7"),
    ("Answer: -05", "-5"),
    ("the answer is 3,15 ,  42.", "3, 15, 42"),
    ("The answer is x = 4.", "4"),
    ("<think>The answer is 5</think>\nThe answer is 6.", "6"),
    ("<think>The answer is 5</think>\nI am not sure.", None),
    ("The answer is 1.\nThe answer is 2.", "2"),
    ("The answer is .", None),
    ("no answer here", None),
    ("", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_is_correct_normalises_both_sides():
    assert is_correct("Answer: 3,15,42", "3, 15, 42") and is_correct("The answer is 07.", "7")
    assert not is_correct("The answer is 8.", "7") and not is_correct("nothing", "7")
    assert reward_exact("The answer is 8.", "7") == 0.0


@pytest.mark.parametrize("completion, expected", [
    ("steps\n</think>\nThe answer is 5.", 1.0),
    ("<think>\nsteps\n</think>\nAnswer: 5", 1.0),
    ("steps\nThe answer is 5.", 0.0),  # no </think>
    ("a</think>b</think>\nThe answer is 5.", 0.0),  # two </think>
    ("steps\n</think>\nThe answer is .", 0.0),  # empty answer
    ("steps\n</think>\n", 0.0),
    ("steps\n</think>\nThe answer is 5.\nAnd more words.", 0.0),  # not one answer line
    ("steps\n</think>\n<think>The answer is 5.", 0.0),
])
def test_reward_format(completion, expected):
    assert reward_format(completion) == expected


def test_bad_generation_settings_raise_config_errors():
    with pytest.raises(ConfigError, match="add, sub, mul"):
        generate(1, tasks=["add", "divide"])
    for bad in (0, 6, (3, 2), (0, 3), "2", True, (1, 2, 3)):
        with pytest.raises(ConfigError, match="difficulty"):
            generate(1, difficulty=bad)
    with pytest.raises(ConfigError, match="split"):
        generate(1, split="test")
    with pytest.raises(ConfigError):
        generate(-1)
    with pytest.raises(ConfigError, match="seed"):
        iter_problems(seed="1")  # raised when called, before any next()
    assert [p.task for p in generate(20, tasks="count, max")] and generate(0) == []


def test_parse_synthetic_options():
    options = parse_synthetic_options("tasks=add,sort&difficulty=1-3&seed=4&docs=20000&split=heldout&format=chat")
    assert options == {"tasks": ("add", "sort"), "difficulty": (1, 3), "seed": 4, "docs": 20000,
                       "split": "heldout", "format": "chat"}
    assert parse_synthetic_options("") == {"tasks": TASKS, "difficulty": (1, 3), "seed": 0,
                                           "docs": syn.DEFAULT_DOCS, "split": "train"}
    assert parse_synthetic_options("format=text") == parse_synthetic_options("")  # the default, same cache key
    assert parse_synthetic_options("?difficulty=2&tasks=all")["difficulty"] == (2, 2)
    assert parse_synthetic_options("tasks=all")["tasks"] == TASKS
    assert parse_synthetic_options("tasks=max%2Ccount")["tasks"] == ("max", "count")
    opts = parse_synthetic_options("tasks=equation&difficulty=4-5&seed=3")
    problems = generate(5, seed=opts["seed"], tasks=opts["tasks"], difficulty=opts["difficulty"])
    assert {p.task for p in problems} == {"equation"}


@pytest.mark.parametrize("query, names", [
    ("color=red", "tasks, difficulty, seed, docs, split"),
    ("tasks=add,divide", "add, sub, mul, compare"),
    ("tasks=", "tasks"),
    ("difficulty=0-9", "difficulty"),
    ("difficulty=1-x", "difficulty"),
    ("difficulty=3-1", "difficulty"),
    ("seed=abc", "seed"),
    ("docs=0", "docs"),
    ("docs=1e4", "docs"),
    ("split=test", "train, heldout"),
    ("seed=1&seed=2", "seed"),
    ("seed", "seed"),
])
def test_parse_synthetic_options_rejects_bad_input(query, names):
    with pytest.raises(ConfigError, match=re.escape(names)) as err:
        parse_synthetic_options(query)
    assert "\n" not in str(err.value)
