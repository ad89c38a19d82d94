"""The tasks of the built-in corpus ``synthetic:reasoning``: one generator per task, each a worked problem with
short, regular reasoning lines (the formats, splits and rewards are ``synthetic.py``'s).

Every generator takes a seeded ``random.Random`` and a difficulty 1..5 (digits, or list length) and returns a
``Problem``; ``GENERATORS`` maps the task names to them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass


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


def join_values(values: Sequence[object], sep: str = ", ") -> str:
    return sep.join(str(v) for v in values)


def digit_columns(a: int, b: int) -> list[tuple[int, int]]:
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
    for x, y in digit_columns(a, b):
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
    for x, y in digit_columns(a, b):
        v = x - y - borrow
        lhs = (f"1{x}" if v < 0 else str(x)) + f" - {y}" + (" - 1" if borrow else "")
        borrow = int(v < 0)
        v += 10 * borrow
        written.append(v)
        steps.append(f"{lhs} = {v}, write {v}" + (" borrow 1" if borrow else ""))
    raw = join_values(reversed(written), "")
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
    return steps + [join_values([a * f for f in factors], " + ") + f" = {a * b}"]


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
        b = int(sa[:k] + rng.choice(options) + join_values([rng.randrange(10) for _ in range(n - k - 1)], ""))
    if rng.randrange(2):
        a, b = b, a
    return _make("compare", f"Which is larger: {a} or {b}?", _compare_steps(a, b), max(a, b), d,
                 f"{min(a, b)},{max(a, b)}")


def _gen_sort(rng: random.Random, d: int) -> Problem:
    values = _distinct(rng, d + 2, 100 if d <= 3 else 1000)
    steps, rest = [], list(values)
    while len(rest) > 1:
        steps.append(f"smallest of {join_values(rest)} is {min(rest)}")
        rest.remove(min(rest))
    steps.append(f"{rest[0]} is left")
    return _make("sort", f"Sort in increasing order: {join_values(values)}.", steps, join_values(sorted(values)), d,
                 join_values(values, ","))


_COUNT_LENGTHS = {1: 5, 2: 8, 3: 10, 4: 14, 5: 18}


def _gen_count(rng: random.Random, d: int) -> Problem:
    alphabet = [chr(ord("a") + i) for i in _distinct(rng, 3 if d == 1 else 4, 26)]
    text = join_values([rng.choice(alphabet) for _ in range(_COUNT_LENGTHS[d])], "")
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
    return _make("max", f"What is the largest of {join_values(values)}?", steps, best, d, join_values(values, ","))


GENERATORS: dict[str, Callable[[random.Random, int], Problem]] = {
    "add": _gen_add, "sub": _gen_sub, "mul": _gen_mul, "compare": _gen_compare,
    "sort": _gen_sort, "count": _gen_count, "equation": _gen_equation, "max": _gen_max,
}
