"""Rule-based rewards for GRPO (and for scoring any completions): built-ins plus your own Python functions.

A reward is ``fn(completion: str, record: dict) -> float``: the completion's text (special tokens
removed) and the data record of its prompt (for ``synthetic:reasoning`` GRPO data: ``{"prompt",
"answer", "task"}``, see ``nanocli.data.synthetic.as_grpo``).

Built-ins (``REWARDS``):

- ``exact``   1.0 when the completion's final answer equals ``record["answer"]`` (``reward_exact``)
- ``format``  1.0 for "<thinking></think>" then one line "The answer is X." (``reward_format``)

Specs (``resolve_rewards``): a list of items, or one comma-separated string, each ``NAME`` or
``NAME:WEIGHT`` where NAME is a built-in or ``module.path:function`` (importable from ``PYTHONPATH``;
``module.path:Class.method`` works too). Default weight 1.0; the total reward of a completion is
``sum(weight * reward)`` (TRL's ``reward_weights``). Example: ``exact:1.0,format:0.2,my_rewards:brevity:0.1``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from nanocli.data.synthetic import reward_exact, reward_format
from nanocli_model.errors import ConfigError, NanoError

RewardFn = Callable[[str, Mapping], float]


class RewardError(NanoError, ValueError):
    """A reward function that failed or returned something other than a finite number."""


def _exact(completion: str, record: Mapping) -> float:
    if "answer" not in record:
        raise RewardError("reward 'exact' needs an 'answer' field in every record; use GRPO data with answers "
                          "(e.g. synthetic:reasoning) or another reward")
    return reward_exact(completion, str(record["answer"]))


def _format(completion: str, record: Mapping) -> float:
    return reward_format(completion)


REWARDS: dict[str, RewardFn] = {"exact": _exact, "format": _format}


# ------------------------------------------------------------------------------------------ resolving
def _builtins() -> str:
    return ", ".join(sorted(REWARDS))


def _split_weight(item: str) -> tuple[str, float]:
    """``name[:weight]`` -> (name, weight); the last ``:`` part is a weight only when it parses as a number."""
    head, sep, tail = item.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return item, 1.0
        if not math.isfinite(weight):
            raise ConfigError(f"reward {head!r}: weight must be a finite number, got {tail!r}")
        return head, weight
    return item, 1.0


def _import(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    hint = f"built-ins: {_builtins()}; or module.path:function importable from PYTHONPATH"
    if not module_name or not attr:
        raise ConfigError(f"reward {spec!r}: expected module.path:function ({hint})")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the same answer for the user
        raise ConfigError(f"reward {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
                          f"{hint}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}; {hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward {spec!r}: {attr!r} is a {type(obj).__name__}, not callable; it must be "
                          "fn(completion: str, record: dict) -> float")
    return obj


def resolve_rewards(specs: str | Sequence[str]) -> list[tuple[str, RewardFn, float]]:
    """Reward specs (module docstring) -> [(name, fn, weight)]; one-line ``ConfigError`` for any bad one."""
    items = specs.split(",") if isinstance(specs, str) else [s for spec in specs for s in str(spec).split(",")]
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise ConfigError(f"no rewards given; name at least one (built-ins: {_builtins()})")
    out: list[tuple[str, RewardFn, float]] = []
    for item in items:
        name, weight = _split_weight(item)
        if name in REWARDS:
            fn = REWARDS[name]
        elif ":" in name:
            fn = _import(name)
        else:
            raise ConfigError(f"unknown reward {name!r}; built-ins: {_builtins()}; or give "
                              "module.path:function importable from PYTHONPATH")
        if any(n == name for n, _, _ in out):
            raise ConfigError(f"reward {name!r} is given twice; give it once with the summed weight")
        out.append((name, fn, weight))
    return out


# ------------------------------------------------------------------------------------------- scoring
def score(rewards: Sequence[tuple[str, RewardFn, float]], completions: Sequence[str],
          records: Sequence[Mapping]) -> tuple[torch.Tensor, dict[str, float]]:
    """Total rewards (N,) float32 = sum of weight * reward, and each reward's unweighted mean (for logging).

    ``records[i]`` is the data record of ``completions[i]`` (repeat a prompt's record for its group).
    """
    if len(completions) != len(records):
        raise ConfigError(f"{len(completions)} completions but {len(records)} records; give one record per "
                          "completion")
    total = torch.zeros(len(completions), dtype=torch.float32)
    means: dict[str, float] = {}
    for name, fn, weight in rewards:
        values = torch.tensor([_call(name, fn, c, r, i) for i, (c, r) in enumerate(zip(completions, records))],
                              dtype=torch.float32)
        total += weight * values
        means[name] = values.mean().item() if len(values) else 0.0
    return total, means


def _call(name: str, fn: RewardFn, completion: str, record: Mapping, index: int) -> float:
    try:
        value = fn(completion, record)
    except NanoError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's function: name it and the completion, keep one line
        raise RewardError(f"reward {name!r} failed on completion {index} ({type(e).__name__}: {e})") from e
    number = None
    if not isinstance(value, (str, bytes)):
        try:
            number = float(value)  # int, float, bool, numpy scalars, 0-dim tensors
        except (TypeError, ValueError, RuntimeError):
            pass
    if number is None or not math.isfinite(number):
        raise RewardError(f"reward {name!r} returned {value!r} for completion {index}; it must return a "
                          "finite number")
    return number
