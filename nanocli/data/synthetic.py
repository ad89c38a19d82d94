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

import functools
import hashlib
import random
import re
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import unquote

from nanocli_model.errors import ConfigError

from .reasoning_tasks import GENERATORS, Problem, digit_columns, join_values

HELDOUT_PERCENT = 10  # share of all problem keys (by sha256 bucket) reserved for the heldout split
SPLITS = ("train", "heldout")
MIN_DIFFICULTY, MAX_DIFFICULTY = 1, 5
DEFAULT_DOCS = 10_000


TASKS: tuple[str, ...] = tuple(GENERATORS)
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
    bad = [t for t in chosen if t not in GENERATORS]
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
        problem = GENERATORS[task](rng, rng.randint(lo, hi))
        if split_of(problem.key) == split:
            yield problem


def generate(n: int, seed: int = 0, split: str = "train", tasks: Sequence[str] | None = None,
             difficulty: int | tuple[int, int] = (1, 3)) -> list[Problem]:
    """The first ``n`` problems of ``iter_problems(seed, split, tasks, difficulty)``."""
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"synthetic:reasoning: the number of problems must be an integer >= 0, got {n!r}")
    stream = iter_problems(seed, split, tasks, difficulty)
    return [next(stream) for _ in range(n)]


@functools.cache
def fingerprint() -> str:
    """sha256 of a fixed probe of the corpus: four problems of every task at every difficulty, from both splits,
    as text and as chat. The token-shard cache keys on it (``shards.py``), so a change of any generator or
    format is a new source, while a refactor that changes no output keeps the caches and the held-out windows."""
    h = hashlib.sha256()
    for task in TASKS:
        for d in range(MIN_DIFFICULTY, MAX_DIFFICULTY + 1):
            for split in SPLITS:
                for p in generate(4, seed=7, split=split, tasks=[task], difficulty=d):
                    h.update(as_text(p).encode("utf-8"))
                    h.update(repr(as_chat(p, think=d % 2 == 0)).encode("utf-8"))
    return h.hexdigest()


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
        return [join_values(s) for s in swaps]
    if p.task in ("compare", "max"):
        return [str(v) for v in _operands(p)]
    ans, ops = int(p.answer), _operands(p)
    near = [ans + 1, ans - 1] + ([ans + 10, ans - 10] if abs(ans) >= 10 else [])
    if p.task == "add":
        near.append(int(join_values([(x + y) % 10 for x, y in reversed(digit_columns(*ops))], "")))  # dropped carries
    elif p.task == "sub":
        near.append(int(join_values([abs(x - y) for x, y in reversed(digit_columns(*ops))], "")))  # no borrows
    elif p.task == "mul":
        small, big = ops
        near += [small * (big + 1), sum(big * int(c) for c in str(small))]  # unshifted partials
        if small < 10:
            near.append(int(join_values([int(c) * small % 10 for c in str(big)], "")))  # dropped carries
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
    lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
    if not MIN_DIFFICULTY <= lo <= hi <= MAX_DIFFICULTY:  # say it as it was written, not as the pair it became
        raise ConfigError(f"synthetic:reasoning: difficulty must be {MIN_DIFFICULTY}..{MAX_DIFFICULTY} "
                          f"or a range lo-hi within it, got {value!r}")
    return _check_difficulty((lo, hi))


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
