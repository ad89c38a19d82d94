"""Which pipeline stages exist yet: one table shared by the CLI (``not built yet``) and ``nano demo``.

When an issue lands its stage, set ``built=True`` here and wire the real command in ``cli.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One ``nano`` subcommand of the pipeline and the issue that builds it."""

    command: str
    issue: int
    short: str  # a few words for the command list of ``nano --help``
    summary: str  # what the command does (its help text starts with it)
    built: bool = False


STAGES: tuple[Stage, ...] = (
    Stage("pretrain", 5, "Pretrain a model from scratch",
          "Pretrain a NemotronH model from scratch on text: warmup-stable-decay schedule, "
          "checkpoint and resume, optional FP8.", built=True),
    Stage("align", 6, "SFT + preference alignment",
          "Align a base model: SFT on chat data with reasoning on and off (/think, /no_think), "
          "then preference optimisation.", built=True),
    Stage("prune", 7, "Prune a model to fit a GPU budget",
          "Prune a model Minitron-style (depth, hidden size, MLP width, group-aware Mamba heads) "
          "by activation importance, to fit a GPU budget.", built=True),
    Stage("distill", 8, "Distill a teacher into a student",
          "Distill a teacher into a (pruned) student with logit-only forward KL over the "
          "full vocabulary.", built=True),
    Stage("fit-check", 4, "Check a model fits a GPU",
          "Check whether a model's weights + KV cache + Mamba state + prefill activations fit a GPU "
          "(a profile, or the local GPU through NVML) at a given context length and batch size.",
          built=True),
    Stage("generate", 3, "Generate text, reasoning on or off",
          "Generate text from a checkpoint with the hybrid KV + Mamba-state cache, reasoning "
          "on or off, with an optional thinking budget.",
          built=True),
)


def stage(command: str) -> Stage:
    """The stage behind ``nano <command>``."""
    return next(s for s in STAGES if s.command == command)


def not_built_message(command: str) -> str:
    """The one line a not-yet-built command prints."""
    s = stage(command)
    return f"`nano {s.command}` is not built yet (issue #{s.issue} will build it)"
