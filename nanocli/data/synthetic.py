"""The built-in corpus ``synthetic:reasoning``: worked problems with short, regular reasoning.

One generator feeds every stage: pretraining (plain text), SFT (chat traces with thinking), DPO
(chosen/rejected pairs), GRPO (prompts with checkable answers) and evaluation. Everything is pure
Python and deterministic: the same ``(seed, split, tasks, difficulty)`` gives the same problems in any
process and on any Python version (``random.Random`` seeded from a sha256 digest; never ``hash()``).

Tasks (``TASKS``), difficulty 1..5 setting the number of digits or the list length:

- ``add``      multi-digit addition, one line per column with its carry
- ``sub``      subtraction (never negative), one line per column with its borrow
- ``mul``      digits x one digit column by column (difficulty 1-2); partial products (3-5)
- ``compare``  the larger of two numbers, digit by digit from the left
- ``sort``     a short list in increasing order, by repeated selection of the smallest
- ``count``    how often a letter occurs in a short string, with a running count
- ``equation`` ``a*x + b = c`` for an integer ``x``, in two steps
- ``max``      the largest of a list, with a running maximum

Splits: a problem's ``key`` (task + operands; operands of ``add``, ``mul`` and ``compare`` sorted, so
``3 + 4`` and ``4 + 3`` are one problem) is hashed with sha256 into 100 buckets; buckets below
``HELDOUT_PERCENT`` (10) are ``heldout``, the rest ``train``. Each split keeps only its own keys,
so no problem is ever in both, whatever the seeds.

Formats (difficulty <= 3 problems are under ~300 characters as text)::

    as_text:  "Question: What is 457 + 86?\\nReasoning:\\n7 + 6 = 13, write 3 carry 1\\n"
              "5 + 8 + 1 = 14, write 4 carry 1\\n4 + 0 + 1 = 5, write 5\\nAnswer: 543\\n"
    as_chat:  {"messages": [{"role": "system", "content": "/think"},
                            {"role": "user", "content": "What is 457 + 86?"},
                            {"role": "assistant", "content": "<think>\\n<steps, one per line>\\n"
                                                             "</think>\\nThe answer is 543."}]}

With ``think=False`` the system message ends in ``/no_think`` and the assistant says only
"The answer is 543." (nano's chat template then renders ``<think></think>`` itself).

Rewards: ``extract_answer`` reads the text after the last ``</think>`` (all of it when there is
none) and takes the last "The answer is X" or "Answer: X" (case-insensitive, to the end of the
line), normalised by ``normalize_answer``. ``reward_format`` is 1.0 only for a completion with
exactly one ``</think>`` (and at most one ``<think>``, before it) whose remainder, stripped, is one
line "The answer is X." or "Answer: X" with a non-empty X; it is meant for thinking-mode completions.

Data specs: ``synthetic:reasoning?tasks=add,sort&difficulty=1-3&seed=4&docs=20000&split=heldout``;
as pretraining / distillation documents, ``format=text`` (default) gives ``as_text`` and ``format=chat``
the ``as_chat`` conversation (reasoning off in every ``CHAT_NO_THINK_EVERY``-th), rendered by the model's
chat template when tokenized (the report distilled on reasoning SFT-style data mixed with pretraining text);
``parse_synthetic_options`` reads the part after ``?`` (defaults in ``DEFAULT_OPTIONS``).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from nanocli_model.errors import ConfigError

HELDOUT_PERCENT = 10  # share of all problem keys (by sha256 bucket) reserved for the heldout split
SPLITS = ("train", "heldout")
MIN_DIFFICULTY, MAX_DIFFICULTY = 1, 5
DEFAULT_DOCS = 10_000


@dataclass(frozen=True)
class Problem:
    """One worked problem: the question, its reasoning lines and the canonical answer."""

    task: str
    question: str  # e.g. "What is 457 + 86?"
    steps: tuple[str, ...]  # reasoning lines, e.g. "7 + 6 = 13, write 3 carry 1"
    answer: str  # canonical answer, e.g. "543"; for sort "3, 15, 42"
    difficulty: int
    key: str  # task + operands; decides the split


# ---------------------------------------------------------------------------------------------
# Small helpers


def _digits(rng: random.Random, n: int) -> int:
    """A random number with exactly ``n`` digits (1..9 for one digit)."""
    return rng.randrange(10 ** (n - 1), 10**n)


def _distinct(rng: random.Random, count: int, limit: int) -> list[int]:
    """``count`` distinct numbers in ``0..limit-1``, in draw order."""
    values: list[int] = []
    while len(values) < count:
        v = rng.randrange(limit)
        if v not in values:
            values.append(v)
    return values


def _join(values: Sequence[object], sep: str = ", ") -> str:
    return sep.join(str(v) for v in values)


def _columns(a: int, b: int) -> list[tuple[int, int]]:
    """Digit pairs of ``a`` and ``b`` from the right, the shorter one padded with zeros."""
    ra, rb = str(a)[::-1], str(b)[::-1]
    return [(int(ra[i]) if i < len(ra) else 0, int(rb[i]) if i < len(rb) else 0)
            for i in range(max(len(ra), len(rb)))]


def _make(task: str, question: str, steps: list[str], answer: object, difficulty: int, key: str) -> Problem:
    return Problem(task, question, tuple(steps), str(answer), difficulty, f"{task}:{key}")


# ---------------------------------------------------------------------------------------------
# The tasks: each generator takes (rng, difficulty) and returns a Problem


def _add_steps(a: int, b: int) -> list[str]:
    steps, carry = [], 0
    for x, y in _columns(a, b):
        s = x + y + carry
        lhs = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry = s // 10
        steps.append(f"{lhs} = {s}, write {s % 10}" + (" carry 1" if carry else ""))
    if carry:
        steps.append("write the carry 1")
    return steps


def _gen_add(rng: random.Random, d: int) -> Problem:
    a = _digits(rng, d + 1)
    b = _digits(rng, rng.choice((d, d + 1)))
    return _make("add", f"What is {a} + {b}?", _add_steps(a, b), a + b, d, f"{min(a, b)}+{max(a, b)}")


def _sub_steps(a: int, b: int) -> list[str]:
    steps, borrow, written = [], 0, []
    for x, y in _columns(a, b):
        v = x - y - borrow
        lhs = (f"1{x}" if v < 0 else str(x)) + f" - {y}" + (" - 1" if borrow else "")
        borrow = int(v < 0)
        v += 10 * borrow
        written.append(v)
        steps.append(f"{lhs} = {v}, write {v}" + (" borrow 1" if borrow else ""))
    raw = _join(reversed(written), "")
    if len(raw) > 1 and raw[0] == "0":
        steps.append(f"drop leading zeros: {int(raw)}")
    return steps


def _gen_sub(rng: random.Random, d: int) -> Problem:
    a = _digits(rng, d + 1)
    b = _digits(rng, rng.choice((d, d + 1)))
    a, b = max(a, b), min(a, b)
    return _make("sub", f"What is {a} - {b}?", _sub_steps(a, b), a - b, d, f"{a}-{b}")


def _mul_digit_steps(a: int, m: int) -> list[str]:
    """``a * m`` for a one-digit ``m``, column by column."""
    steps, carry = [], 0
    for x in reversed(str(a)):
        s = int(x) * m + carry
        lhs = f"{x} * {m}" + (f" + {carry}" if carry else "")
        carry = s // 10
        steps.append(f"{lhs} = {s}, write {s % 10}" + (f" carry {carry}" if carry else ""))
    if carry:
        steps.append(f"write the carry {carry}")
    return steps


def _mul_partial_steps(a: int, b: int) -> list[str]:
    """``a * b`` as one partial product per digit of ``b``, then their sum."""
    factors = [int(c) * 10**k for k, c in enumerate(reversed(str(b)))]
    steps = [f"{a} * {f} = {a * f}" for f in factors]
    return steps + [_join([a * f for f in factors], " + ") + f" = {a * b}"]


_MUL_SHAPES = {1: (2, 1), 2: (3, 1), 3: (2, 2), 4: (3, 2), 5: (4, 2)}  # digits of (a, b)


def _gen_mul(rng: random.Random, d: int) -> Problem:
    na, nb = _MUL_SHAPES[d]
    a = _digits(rng, na)
    b = rng.randrange(2, 10) if nb == 1 else _digits(rng, nb)
    steps = _mul_digit_steps(a, b) if nb == 1 else _mul_partial_steps(a, b)
    return _make("mul", f"What is {a} * {b}?", steps, a * b, d, f"{min(a, b)}*{max(a, b)}")


def _compare_steps(a: int, b: int) -> list[str]:
    sa, sb, big = str(a), str(b), max(a, b)
    if len(sa) != len(sb):
        return [f"{a} has {len(sa)} digits, {b} has {len(sb)} digits", f"so {big} is larger"]
    steps = [f"both have {len(sa)} digits"]
    for x, y in zip(sa, sb):
        if x != y:
            return steps + [f"{x} {'>' if x > y else '<'} {y}, so {big} is larger"]
        steps.append(f"{x} = {y}, next digit")
    raise AssertionError("compare needs two different numbers")


def _gen_compare(rng: random.Random, d: int) -> Problem:
    n = d + 1
    a = _digits(rng, n)
    if rng.randrange(5) == 0:  # different lengths: the longer one is larger
        b = _digits(rng, n - 1)
    else:  # same length: equal up to a random position, then different
        sa, k = str(a), rng.randrange(n)
        options = [c for c in "0123456789"[int(k == 0):] if c != sa[k]]
        b = int(sa[:k] + rng.choice(options) + _join([rng.randrange(10) for _ in range(n - k - 1)], ""))
    if rng.randrange(2):
        a, b = b, a
    return _make("compare", f"Which is larger: {a} or {b}?", _compare_steps(a, b), max(a, b), d,
                 f"{min(a, b)},{max(a, b)}")


def _gen_sort(rng: random.Random, d: int) -> Problem:
    values = _distinct(rng, d + 2, 100 if d <= 3 else 1000)
    steps, rest = [], list(values)
    while len(rest) > 1:
        steps.append(f"smallest of {_join(rest)} is {min(rest)}")
        rest.remove(min(rest))
    steps.append(f"{rest[0]} is left")
    return _make("sort", f"Sort in increasing order: {_join(values)}.", steps, _join(sorted(values)), d,
                 _join(values, ","))


_COUNT_LENGTHS = {1: 5, 2: 8, 3: 10, 4: 14, 5: 18}


def _gen_count(rng: random.Random, d: int) -> Problem:
    alphabet = [chr(ord("a") + i) for i in _distinct(rng, 3 if d == 1 else 4, 26)]
    text = _join([rng.choice(alphabet) for _ in range(_COUNT_LENGTHS[d])], "")
    target = rng.choice(alphabet)
    steps, count = [], 0
    for ch in text:
        count += ch == target
        steps.append(f"{ch}: {'yes' if ch == target else 'no'}, {count}")
    question = f'How many times does "{target}" appear in "{text}"?'
    return _make("count", question, steps, count, d, f"{target}:{text}")


# (largest |a|, x range, b range); a is negative too from difficulty 4
_EQUATION_RANGES = {1: (5, (1, 9), (1, 9)), 2: (9, (0, 12), (-9, 20)), 3: (12, (-12, 20), (-30, 50)),
                    4: (20, (-30, 30), (-99, 99)), 5: (30, (-99, 99), (-999, 999))}


def _nonzero(rng: random.Random, lo: int, hi: int) -> int:
    """A uniform integer in ``lo..hi`` other than 0: draw from one value fewer, then skip over 0."""
    v = rng.randrange(lo, hi + 1 if lo > 0 or hi < 0 else hi)
    return v + 1 if lo <= 0 <= v else v


def _gen_equation(rng: random.Random, d: int) -> Problem:
    a_max, (x_lo, x_hi), (b_lo, b_hi) = _EQUATION_RANGES[d]
    a = rng.randrange(2, a_max + 1) * (rng.choice((1, -1)) if d >= 4 else 1)
    x = rng.randrange(x_lo, x_hi + 1)
    b = _nonzero(rng, b_lo, b_hi)
    c = a * x + b
    move = f"subtract {b} from" if b > 0 else f"add {-b} to"
    steps = [f"{move} both sides: {a}x = {c - b}", f"divide both sides by {a}: x = {x}"]
    lhs = f"{a}x + {b}" if b > 0 else f"{a}x - {-b}"
    return _make("equation", f"Solve for x: {lhs} = {c}.", steps, x, d, f"{a},{b},{c}")


def _gen_max(rng: random.Random, d: int) -> Problem:
    values = _distinct(rng, d + 3, 100 if d <= 3 else 1000)
    steps, best = [f"start with {values[0]}"], values[0]
    for v in values[1:]:
        steps.append(f"{v} > {best}, take {v}" if v > best else f"{v} < {best}, keep {best}")
        best = max(best, v)
    return _make("max", f"What is the largest of {_join(values)}?", steps, best, d, _join(values, ","))


_GENERATORS: dict[str, Callable[[random.Random, int], Problem]] = {
    "add": _gen_add, "sub": _gen_sub, "mul": _gen_mul, "compare": _gen_compare,
    "sort": _gen_sort, "count": _gen_count, "equation": _gen_equation, "max": _gen_max,
}
TASKS: tuple[str, ...] = tuple(_GENERATORS)
DEFAULT_OPTIONS: dict[str, object] = {"tasks": TASKS, "difficulty": (1, 3), "seed": 0, "docs": DEFAULT_DOCS,
                                      "split": "train"}  # "format" appears only when given (text is the default)
DOC_FORMATS = ("text", "chat")  # pretraining documents: as_text, or as_chat rendered by the chat template
CHAT_NO_THINK_EVERY = 5  # format=chat: every 5th document has reasoning off (the rest on), as SFT's mix


# ---------------------------------------------------------------------------------------------
# Generation and splits


def split_of(key: str) -> str:
    """The split a problem key belongs to: ``"heldout"`` for sha256 buckets below HELDOUT_PERCENT."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def _check_tasks(tasks: Sequence[str] | str | None) -> tuple[str, ...]:
    if tasks is None:
        return TASKS
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    chosen = tuple(dict.fromkeys(names))
    bad = [t for t in chosen if t not in _GENERATORS]
    if bad or not chosen:
        raise ConfigError(f"synthetic:reasoning: unknown task {bad[0] if bad else '(none)'!r}; "
                          f"allowed: {', '.join(TASKS)}")
    return chosen


def _check_difficulty(difficulty: int | tuple[int, int]) -> tuple[int, int]:
    try:
        pair = (difficulty, difficulty) if isinstance(difficulty, int) else tuple(difficulty)
    except TypeError:
        pair = ()
    ok = (len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
          and MIN_DIFFICULTY <= pair[0] <= pair[1] <= MAX_DIFFICULTY)
    if not ok:
        raise ConfigError(f"synthetic:reasoning: difficulty must be {MIN_DIFFICULTY}..{MAX_DIFFICULTY} "
                          f"or a range lo-hi within it, got {difficulty!r}")
    return pair  # type: ignore[return-value]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"synthetic:reasoning: split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def _rng_for(seed: int) -> random.Random:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"synthetic:reasoning: seed must be an integer, got {seed!r}")
    digest = hashlib.sha256(f"nano.synthetic.reasoning:{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def iter_problems(seed: int = 0, split: str = "train", tasks: Sequence[str] | None = None,
                  difficulty: int | tuple[int, int] = (1, 3)) -> Iterator[Problem]:
    """An endless, deterministic stream of problems of one split (tasks and difficulty drawn uniformly).

    Candidates are drawn from one seeded stream and those whose key hashes to the other split are
    skipped, so train and heldout never share a problem. ``tasks`` may also be a comma-separated
    string. Bad settings raise ``ConfigError`` here, not at the first ``next``."""
    names, (lo, hi), split = _check_tasks(tasks), _check_difficulty(difficulty), _check_split(split)
    return _stream(_rng_for(seed), split, names, lo, hi)


def _stream(rng: random.Random, split: str, names: tuple[str, ...], lo: int, hi: int) -> Iterator[Problem]:
    while True:
        task = rng.choice(names)
        problem = _GENERATORS[task](rng, rng.randint(lo, hi))
        if split_of(problem.key) == split:
            yield problem


def generate(n: int, seed: int = 0, split: str = "train", tasks: Sequence[str] | None = None,
             difficulty: int | tuple[int, int] = (1, 3)) -> list[Problem]:
    """The first ``n`` problems of ``iter_problems(seed, split, tasks, difficulty)``."""
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"synthetic:reasoning: the number of problems must be an integer >= 0, got {n!r}")
    stream = iter_problems(seed, split, tasks, difficulty)
    return [next(stream) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Formats: pretraining text, chat, preference pairs, GRPO prompts


def as_text(p: Problem) -> str:
    """A pretraining document: ``Question: ...`` / ``Reasoning:`` / one step a line / ``Answer: ...``."""
    return f"Question: {p.question}\nReasoning:\n" + "".join(f"{s}\n" for s in p.steps) + f"Answer: {p.answer}\n"


def final_text(answer: str) -> str:
    """The assistant's final answer sentence: ``The answer is X.``"""
    return f"The answer is {answer}."


def _prompt(p: Problem, think: bool, system: str | None = None) -> list[dict]:
    tag = "/think" if think else "/no_think"
    return [{"role": "system", "content": f"{system} {tag}" if system else tag},
            {"role": "user", "content": p.question}]


def _assistant(p: Problem, answer: str, think: bool) -> dict:
    content = final_text(answer)
    if think:
        content = "<think>\n" + "\n".join(p.steps) + "\n</think>\n" + content
    return {"role": "assistant", "content": content}


def as_chat(p: Problem, think: bool = True, system: str | None = None) -> dict:
    """An SFT example ``{"messages": [system, user, assistant]}``; the system message carries the
    ``/think`` or ``/no_think`` switch (appended to ``system`` when given). With thinking the
    assistant writes the steps inside ``<think>...</think>`` before "The answer is X."."""
    return {"messages": _prompt(p, think, system) + [_assistant(p, p.answer, think)]}


def as_grpo(p: Problem, think: bool = True) -> dict:
    """A GRPO example: ``{"prompt": [system, user], "answer": p.answer, "task": p.task}``."""
    return {"prompt": _prompt(p, think), "answer": p.answer, "task": p.task}


def as_preference(p: Problem, rng: random.Random) -> dict:
    """A DPO pair in TRL's conversational format: ``{"prompt", "chosen", "rejected"}``.

    The rejected trace keeps the same reasoning but ends in a plausible wrong answer (a dropped
    carry or borrow, an unshifted partial product, an off-by-one, the smaller number, two
    neighbours swapped...), so the preference is on reading the answer off the reasoning."""
    return {"prompt": _prompt(p, True), "chosen": [_assistant(p, p.answer, True)],
            "rejected": [_assistant(p, wrong_answer(p, rng), True)]}


def _operands(p: Problem) -> list[int]:
    """The numbers in ``p.key`` (signed only for equations: ``sub:457-86`` is 457 and 86)."""
    return [int(v) for v in re.findall(r"-?\d+" if p.task == "equation" else r"\d+", p.key.split(":", 1)[1])]


def _wrong_candidates(p: Problem) -> list[str]:
    """Plausible mistakes for ``p`` (some may equal the answer; the caller filters them)."""
    if p.task == "sort":
        ordered = p.answer.split(", ")
        swaps = [ordered[:i] + [ordered[i + 1], ordered[i]] + ordered[i + 2:] for i in range(len(ordered) - 1)]
        return [_join(s) for s in swaps]
    if p.task in ("compare", "max"):
        return [str(v) for v in _operands(p)]
    ans, ops = int(p.answer), _operands(p)
    near = [ans + 1, ans - 1] + ([ans + 10, ans - 10] if abs(ans) >= 10 else [])
    if p.task == "add":
        near.append(int(_join([(x + y) % 10 for x, y in reversed(_columns(*ops))], "")))  # dropped carries
    elif p.task == "sub":
        near.append(int(_join([abs(x - y) for x, y in reversed(_columns(*ops))], "")))  # no borrows
    elif p.task == "mul":
        small, big = ops
        near += [small * (big + 1), sum(big * int(c) for c in str(small))]  # unshifted partials
        if small < 10:
            near.append(int(_join([int(c) * small % 10 for c in str(big)], "")))  # dropped carries
    elif p.task == "equation":
        a, b, c = ops
        near += [(c + b) // a] if (c + b) % a == 0 else []  # sign error moving b
    elif p.task == "count":
        near = [v for v in near if v >= 0]
    return [str(v) for v in near]


def wrong_answer(p: Problem, rng: random.Random) -> str:
    """A plausible wrong answer to ``p``, never equal to the right one."""
    right = normalize_answer(p.answer)
    options = list(dict.fromkeys(c for c in _wrong_candidates(p) if normalize_answer(c) != right))
    return rng.choice(options)


# ---------------------------------------------------------------------------------------------
# Answers and rewards

_ANSWER_RE = re.compile(r"(?:the answer is|answer:)[ \t]*([^\n]*)", re.IGNORECASE)
_FORMAT_RE = re.compile(r"(?:the answer is|answer:)[ \t]*([^\n]+)", re.IGNORECASE)
_INT_RE = re.compile(r"[+-]?\d+")


def normalize_answer(text: str) -> str:
    """Canonical form of an answer: stripped, no trailing period, ``", "`` between items, whitespace
    collapsed, integers without ``+`` or leading zeros, and a leading ``x =`` dropped."""
    text = text.strip().rstrip(".").strip()
    parts = [" ".join(part.split()) for part in text.split(",")]
    parts = [re.sub(r"^x\s*=\s*", "", part) for part in parts]
    return ", ".join(str(int(part)) if _INT_RE.fullmatch(part) else part for part in parts)


def extract_answer(completion: str) -> str | None:
    """The normalised answer in a completion: after the last ``</think>`` (or anywhere when there is
    none), the last "The answer is X" / "Answer: X"; ``None`` when there is no non-empty one."""
    tail = completion.rsplit("</think>", 1)[-1]
    matches = _ANSWER_RE.findall(tail)
    answer = normalize_answer(matches[-1]) if matches else ""
    return answer or None


def is_correct(completion: str, answer: str) -> bool:
    """Whether the completion's extracted answer equals ``answer`` (both normalised)."""
    got = extract_answer(completion)
    return got is not None and got == normalize_answer(answer)


def reward_exact(completion: str, answer: str) -> float:
    """1.0 when the completion's answer is correct, else 0.0."""
    return 1.0 if is_correct(completion, answer) else 0.0


def reward_format(completion: str) -> float:
    """1.0 for exactly one ``</think>`` (at most one ``<think>``, before it) followed by a single line
    "The answer is X." or "Answer: X" with a non-empty X; else 0.0."""
    if completion.count("</think>") != 1 or completion.count("<think>") > 1:
        return 0.0
    _, tail = completion.split("</think>")
    match = _FORMAT_RE.fullmatch(tail.strip())
    if "<think>" in tail or match is None or not normalize_answer(match.group(1)):
        return 0.0
    return 1.0


# ---------------------------------------------------------------------------------------------
# Data-spec options: "synthetic:reasoning?tasks=add,sort&difficulty=1-3&seed=4&docs=20000&split=heldout"


def _parse_int(key: str, value: str, minimum: int | None = None) -> int:
    if not _INT_RE.fullmatch(value) or (minimum is not None and int(value) < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ConfigError(f"synthetic:reasoning: {key} must be an integer{bound}, got {value!r}")
    return int(value)


def _parse_difficulty(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", value)
    if match is None:
        raise ConfigError(f"synthetic:reasoning: difficulty must be {MIN_DIFFICULTY}..{MAX_DIFFICULTY} "
                          f"or a range like 1-3, got {value!r}")
    lo = int(match.group(1))
    return _check_difficulty((lo, int(match.group(2) or lo)))


_EXAMPLES = {"tasks": "add,sort", "difficulty": "1-3", "seed": "0", "docs": "10000", "split": "heldout",
             "format": "chat"}


def _check_format(value: str) -> str:
    if value not in DOC_FORMATS:
        raise ConfigError(f"synthetic:reasoning: format must be {' or '.join(DOC_FORMATS)}, got {value!r}")
    return value
_OPTION_PARSERS: dict[str, Callable[[str], object]] = {
    "tasks": lambda v: TASKS if v == "all" else _check_tasks(v),
    "difficulty": _parse_difficulty,
    "seed": lambda v: _parse_int("seed", v),
    "docs": lambda v: _parse_int("docs", v, minimum=1),
    "split": _check_split,
    "format": _check_format,
}


def parse_synthetic_options(query: str) -> dict:
    """Parse the options after ``?`` in ``synthetic:reasoning?...`` into ``{"tasks", "difficulty",
    "seed", "docs", "split"}`` (``DEFAULT_OPTIONS`` for those not given; ``tasks=all`` means every
    task; difficulty ``2`` or ``1-3`` becomes a ``(lo, hi)`` pair). Unknown, repeated or empty keys
    and bad values raise ``ConfigError`` naming the key and what is allowed."""
    options, seen = dict(DEFAULT_OPTIONS), set()
    for item in query.strip().lstrip("?").split("&"):
        if not item.strip():
            continue
        key, _, value = (unquote(s).strip() for s in item.partition("="))
        if key not in _OPTION_PARSERS:
            raise ConfigError(f"synthetic:reasoning: unknown option {key!r}; allowed: {', '.join(_OPTION_PARSERS)}")
        if key in seen or not value:
            problem = "is given twice" if key in seen else "needs a value"
            raise ConfigError(f"synthetic:reasoning: option {key!r} {problem}, e.g. {key}={_EXAMPLES[key]}")
        seen.add(key)
        options[key] = _OPTION_PARSERS[key](value)
    if options.get("format") == "text":  # the default: leave it out, so the source's cache key is the same
        del options["format"]
    return options
