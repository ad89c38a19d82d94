"""The settings every training stage shares, as option groups: ``nano pretrain``, ``nano distill`` and
``nano align`` are composed from them (``settings.py`` explains groups, docstrings and ``check``).

    Training       every training stage: Run, Checkpoints, Precision, Optimizer, Schedule, Batch
    TokenTraining  pretrain and distill (token streams): Training + Tokens, Measure, TokenData
    Epochs         align: a run length in passes over the examples instead of tokens

A stage's options class inherits the groups it has (its fields stay flat: ``o.lr``) and re-declares a field
only where its default differs (distill: ``lr``, ``schedule``). Each group checks its own fields once, in
``check``, before any work; a check that needs fields of two groups (``--min-lr`` at most ``--lr``) lives in
the group that owns the later one. No torch here: commands import this module to build their flags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..settings import Group, OptionError, at_least, finite, flag, within


# ------------------------------------------------------------------------------------------ every stage
@dataclass
class Batch(Group):
    panel = "Batch"

    steps: int | None = None
    """Optimizer steps."""
    seq_len: int = 256
    """Tokens per sequence."""
    global_batch: int = 16
    """Sequences per optimizer step, over all processes."""
    micro_batch: int | None = None
    """Sequences per forward per process (gradient accumulation; default: --global-batch / processes)."""

    def check(self) -> None:
        at_least(self, 1, "steps", "seq_len", "global_batch", "micro_batch")


@dataclass
class Schedule(Group):
    panel = "Schedule"
    min_lr_divisor: ClassVar[int] = 100  # --min-lr by default: --lr / this (distill and align: 10)

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float | None = None
    """LR at the end of the decay (default: --lr / 100 in pretrain, --lr / 10 in distill and align)."""
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    """wsd (warmup-stable-decay), cosine or constant."""
    warmup: float = 0.01
    """Warmup: a fraction of the steps (< 1) or a step count."""
    decay: float = 0.2
    """WSD decay: a fraction of the steps (< 1) or a step count."""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    """Shape of the WSD decay: linear, cosine or 1-sqrt."""

    def check(self) -> None:
        finite(self, "lr", positive=True)
        finite(self, "warmup", "decay", minimum=0)
        if self.min_lr is not None and not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise OptionError(f"--min-lr must be finite, >= 0 and at most --lr, got {self.min_lr}")

    @property
    def final_lr(self) -> float:
        """The LR the decay ends at: --min-lr, else the stage's share of --lr."""
        return self.lr / self.min_lr_divisor if self.min_lr is None else self.min_lr


@dataclass
class Optimizer(Group):
    panel = "Optimizer"

    weight_decay: float = 0.1
    """AdamW weight decay (on matrices only)."""
    grad_clip: float = 1.0
    """Max global gradient norm (0: off)."""
    betas: list[float] = flag(default_factory=lambda: [0.9, 0.95], hidden=True)
    """AdamW betas (a recipe setting)."""
    eps: float = flag(1e-8, hidden=True)
    """AdamW epsilon (a recipe setting)."""

    def check(self) -> None:
        finite(self, "weight_decay", "grad_clip", minimum=0)
        finite(self, "eps", positive=True)
        betas = self.betas
        if not (len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise OptionError(f"betas must be two numbers in [0, 1), got {betas!r}")


@dataclass
class Precision(Group):
    panel = "Precision"

    precision: Literal["fp32", "bf16", "fp8"] = "bf16"
    """fp32, bf16 (autocast, fp32 master weights) or fp8 (FP8 GEMMs + bf16)."""
    fp8_scaling: Literal["blockwise", "tensorwise"] = "blockwise"
    """Under fp8: blockwise (the report's, 128x128 weights and 1x128 activations) or tensorwise (Nemotron-H)."""
    fp8_keep: int = 2
    """Under fp8: the first and last N layers stay in bf16."""
    fp8_backend: Literal["auto", "scaled_mm", "emulate"] = "auto"
    """Under fp8: auto, scaled_mm (real FP8 GEMMs) or emulate (quantize-dequantize)."""

    def check(self) -> None:
        at_least(self, 0, "fp8_keep")


@dataclass
class Checkpoints(Group):
    panel = "Checkpoints"

    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """checkpoint-* directories to keep."""
    on_nan: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient: stop, or skip that step's update."""

    def check(self) -> None:
        at_least(self, 0, "save_every")
        at_least(self, 1, "keep_last")


@dataclass
class Run(Group):
    panel = "Run"

    out: str | None = None
    """Run directory (checkpoints, metrics, plot)."""
    resume: str | None = None
    """auto (the newest checkpoint in --out) or a checkpoint directory."""
    seed: int = 0
    """Seed (initialisation and data order)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto, cpu or cuda."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """ddp or fsdp (under torchrun)."""
    dry_run: bool = False
    """Print the resolved plan and exit; nothing is written."""

    def check(self) -> None:
        if self.out is None and not self.dry_run:
            raise OptionError("--out DIR is required: where checkpoints, metrics and plots go")


@dataclass
class Training(Run, Checkpoints, Precision, Optimizer, Schedule, Batch):
    """The settings of every training stage (bases listed last-panel-first: ``--help`` shows Batch first)."""


# ------------------------------------------------------------------------------------------ run length
def _steps_or(o: Any, other: str, spelled: str) -> None:
    if (o.steps is None) == (getattr(o, other) is None):
        raise OptionError(f"give exactly one of --steps N or {spelled}")


@dataclass
class Tokens(Group):
    panel = "Batch"

    tokens: int | None = None
    """Training tokens (instead of --steps): steps = tokens / (--global-batch x --seq-len), rounded up."""

    def check(self) -> None:
        at_least(self, 1, "tokens")
        _steps_or(self, "tokens", "--tokens N")


@dataclass
class Epochs(Group):
    panel = "Batch"

    epochs: float | None = None
    """Passes over the data (instead of --steps)."""

    def check(self) -> None:
        finite(self, "epochs", positive=True)
        _steps_or(self, "epochs", "--epochs E")


# ------------------------------------------------------------------------------------------ token streams
@dataclass
class TokenData(Group):
    panel = "Data"

    data: Any = None
    """Data spec: files, globs, directories, shards or synthetic:reasoning; SOURCE@WEIGHT;SOURCE@WEIGHT blends
    (a recipe may name sources and curriculum phases)."""
    cache_dir: str | None = None
    """Token shard cache (default $NANO_CACHE, else $XDG_CACHE_HOME/nano, else ~/.cache/nano)."""

    def check(self) -> None:
        if self.data is None:
            raise OptionError("--data is required: a file, glob, directory, shards or synthetic:reasoning, or a "
                              "blend (or give it in a --recipe)")


@dataclass
class Measure(Group):
    panel = "Evaluation"

    heldout_fraction: float = 0.005
    """Share of each source's windows kept out of training for the held-out loss."""
    eval_every: int = 0
    """Held-out loss every N steps (0: only at the end)."""
    eval_batches: int = 4
    """Held-out batches per evaluation."""
    peak_tflops: float | None = None
    """Device peak TFLOP/s for MFU (default: the GPU profile's bf16 rate)."""

    def check(self) -> None:
        within(self, "heldout_fraction", 0, 0.5, hi_open=True)
        at_least(self, 0, "eval_every")
        at_least(self, 1, "eval_batches")
        finite(self, "peak_tflops", positive=True)


@dataclass
class TokenTraining(Training, Tokens, Measure, TokenData):
    """The settings of the stages that train on token streams: pretrain and distill."""
