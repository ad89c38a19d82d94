"""Learning-rate schedules: warmup-stable-decay (the report's) and cosine, as pure functions of the step.

WSD (docs/REFERENCE.md §4): linear warmup from 0 to ``lr`` over the first ``warmup`` steps, constant ``lr``
through the stable phase, then a decay to ``min_lr`` over the last ``decay`` steps (the 12B: warmup over
8B tokens, stable 4.5e-4, decay over the final 3.6T of 20T tokens to 4.5e-6; decay shape uncertain, so
it is a parameter: ``linear``, ``cosine`` or ``1-sqrt``). Cosine: the same warmup, then a half cosine
from ``lr`` to ``min_lr`` over all remaining steps. ``constant``: warmup then ``lr``.

``warmup`` and ``decay`` are given as a fraction of the total steps (a float < 1) or as a step count
(an int >= 1); ``resolve`` turns them into step counts once the total is known. The schedule is a pure
function of the step, so a resumed run recomputes it instead of storing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nanocli_model.errors import ConfigError

KINDS = ("wsd", "cosine", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass(frozen=True)
class Schedule:
    """An LR schedule over ``total`` optimizer steps; ``lr_at(step)`` is the LR used *at* that step (0-based)."""

    kind: str = "wsd"
    lr: float = 3e-4  # peak (stable) learning rate
    min_lr: float = 3e-6  # the value the decay ends at
    warmup: float = 0.01  # fraction of total steps (< 1) or a step count (>= 1)
    decay: float = 0.2  # WSD: fraction of total steps (< 1) or a step count (>= 1) spent decaying
    decay_shape: str = "linear"  # WSD decay: linear | cosine | 1-sqrt
    total: int = 1  # optimizer steps in the whole run

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"schedule kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ConfigError(f"decay_shape {self.decay_shape!r} is unknown; use one of {', '.join(DECAY_SHAPES)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr}")
        if self.total < 1:
            raise ConfigError(f"the run must have at least 1 step, got {self.total}")
        for name in ("warmup", "decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (a fraction of the steps or a step count), "
                                  f"got {getattr(self, name)}")
        w, d = self.warmup_steps, self.decay_steps
        if self.kind == "wsd" and w + d > self.total:
            raise ConfigError(f"warmup ({w} steps) + decay ({d} steps) exceed the {self.total} steps of the run; "
                              "shorten them or train longer")
        if w > self.total:
            raise ConfigError(f"warmup ({w} steps) exceeds the {self.total} steps of the run")

    def _steps(self, value: float) -> int:
        return round(value * self.total) if value < 1 else int(value)

    @property
    def warmup_steps(self) -> int:
        return self._steps(self.warmup)

    @property
    def decay_steps(self) -> int:
        return self._steps(self.decay) if self.kind == "wsd" else 0

    @property
    def decay_start(self) -> int:
        """First step of the decay (WSD); for cosine the decay starts right after warmup."""
        return self.total - self.decay_steps if self.kind == "wsd" else self.warmup_steps

    def lr_at(self, step: int) -> float:
        w = self.warmup_steps
        if step < w:
            return self.lr * (step + 1) / w  # reaches lr at the last warmup step
        if self.kind == "constant":
            return self.lr
        if self.kind == "cosine":
            span = max(self.total - w - 1, 1)
            progress = min((step - w) / span, 1.0)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))
        start = self.decay_start
        if step < start or self.decay_steps == 0:
            return self.lr
        progress = min((step - start + 1) / self.decay_steps, 1.0)  # 1 at the last step: ends at min_lr
        if self.decay_shape == "linear":
            factor = 1 - progress
        elif self.decay_shape == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * progress))
        else:  # 1-sqrt (Hägele et al. 2024)
            factor = 1 - math.sqrt(progress)
        return self.min_lr + (self.lr - self.min_lr) * factor

    def phases(self) -> dict[str, tuple[int, int]]:
        """Step ranges [start, end) of warmup / stable / decay, for ``--dry-run``."""
        w = self.warmup_steps
        if self.kind == "wsd":
            return {"warmup": (0, w), "stable": (w, self.decay_start), "decay": (self.decay_start, self.total)}
        if self.kind == "cosine":
            return {"warmup": (0, w), "cosine": (w, self.total)}
        return {"warmup": (0, w), "constant": (w, self.total)}
