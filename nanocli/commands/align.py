"""``nano align`` and ``nano align merge``: their options (``AlignOptions`` and ``--recipe``; the merge's
checkpoints, weights and output), the calls into ``stages/align.py`` and the rendering of the plan
(``--dry-run``) and of the finished run (held-out accuracy before and after)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer

from .. import settings
from ..stages.align import AlignOptions
from . import flags, training
from .flags import command

if TYPE_CHECKING:
    from ..stages.align import AlignPlan, AlignResult


EXAMPLES = ["nano align --method sft -m runs/tiny-base/final --data synthetic:reasoning --epochs 1 --out runs/sft",
            "nano align --method dpo -m runs/sft/final --data prefs.jsonl --steps 200 --beta 0.1 --out runs/dpo",
            "nano align --method grpo -m runs/sft/final --data synthetic:reasoning --steps 50 --group-size 8 "
            "--out runs/grpo"]
MERGE_EXAMPLES = ["nano align merge runs/dpo/final runs/grpo/final --out runs/merged",
                  "nano align merge runs/dpo/final runs/grpo/final --weights 0.3,0.7 --out runs/merged-37"]


@dataclass
class MergeOptions(settings.Group):
    panel = "Merge"

    checkpoints: list[str] = settings.flag(default_factory=list, argument=True)
    """Two or more checkpoint directories."""
    out: str | None = None
    """Where the merged checkpoint goes (must not exist)."""
    weights: str | None = None
    """Comma-separated, summing to 1 (default: equal)."""

    def check(self) -> None:
        if self.out is None:
            raise settings.OptionError("--out DIR is required: where the merged checkpoint goes")
        try:
            self.parsed_weights()
        except ValueError:
            raise settings.OptionError(f"--weights {self.weights!r}: give numbers separated by commas, e.g. "
                                       "0.5,0.5") from None

    def parsed_weights(self) -> list[float] | None:
        return None if self.weights is None else [float(x) for x in self.weights.split(",")]


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Align a model: SFT with reasoning on/off and budget traces, DPO, GRPO; merge.",
                        no_args_is_help=False, cls=flags.Group)
    command(group, "align", align, AlignOptions, training.Recipe, callback=True, examples=EXAMPLES)
    command(group, "merge", merge, MergeOptions, examples=MERGE_EXAMPLES)
    app.add_typer(group, name="align")


def align(given: dict, recipe: dict) -> None:
    """Align a model: SFT (assistant-only loss, /think and /no_think mix, thinking-budget cuts), DPO, GRPO.

    `nano align merge A B --weights 0.5,0.5 --out DIR` averages checkpoints. Output as `nano pretrain`:
    OUT/checkpoint-N, OUT/final, metrics.jsonl, loss.png, plus eval.json (held-out accuracy before/after).
    """
    from ..stages import align as stage

    training.run(stage, AlignOptions, recipe, given, show_plan, show_result)


def merge(given: dict) -> None:
    """Write the weighted average of same-architecture checkpoints, (1-a)*w1 + a*w2 as the report merged."""
    from ..stages import align as stage

    o = MergeOptions(**given)
    settings.validate(o, stage.AlignError)
    path = stage.merge(o.checkpoints, o.parsed_weights(), o.out)
    typer.echo(f"merged {len(o.checkpoints)} checkpoints -> {path}")


def show_plan(p: AlignPlan) -> None:
    """``nano align --dry-run``: the examples read, the steps and the schedule."""
    o = p.options
    t = training.table(f"nano align ({o.method}): plan (dry run)")
    stats = ", ".join(f"{k} {v}" for k, v in p.data_stats.items() if v and k != "errors")
    t.add_row("examples", f"{p.examples:,} ({stats})")
    t.add_row("steps", f"{p.steps:,} x {o.global_batch}" + (f" ({p.rollout_batches:,} batches of rollouts, "
                                                              f"{o.mu} steps each)" if o.method == "grpo" else ""))
    training.schedule_row(t, p)
    training.print_plan(t, p, o.precision)


def show_result(r: AlignResult) -> None:
    """What the run did, with held-out accuracy before and after (and DPO's held-out pairs)."""
    t = training.result_table(f"nano align ({r.plan.options.method})", r, tokens=False)
    if t is None:
        return
    t.add_row("examples", f"{r.plan.examples:,} in {r.seconds:,.1f} s")
    t.add_row("loss", f"{r.first_loss:.4f} -> {r.last_loss:.4f}")
    for mode, a in r.after.items():
        before = f"{100 * r.before[mode].accuracy:.1f}% -> " if mode in r.before else ""
        t.add_row(f"held-out accuracy ({mode})", f"{before}{100 * a.accuracy:.1f}% of {a.n}")
    if r.pairs_after is not None:
        b = r.pairs_before
        t.add_row("held-out pairs: chosen > rejected", (f"{100 * b.chosen_over_rejected:.1f}% -> " if b else "")
                  + f"{100 * r.pairs_after.chosen_over_rejected:.1f}%")
    training.print_result(t, r, resources=False)
