"""``nano distill``: its options (``DistillOptions`` and ``--recipe``), the call into ``stages/distill.py`` and
the rendering of the plan (``--dry-run``) and of the finished run (held-out CE and KL before and after)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from .. import ui
from ..stages.distill import DistillOptions
from . import training
from .flags import command

if TYPE_CHECKING:
    from ..stages.distill import DistillPlan, DistillResult


EXAMPLES = ["nano distill --recipe distill-tiny --teacher runs/teacher --student runs/student --out runs/distill",
            "nano distill --teacher runs/tiny-base --student runs/pruned --data synthetic:reasoning --steps 200 "
            "--kd-top-k 64 --out runs/kd",
            "nano distill --recipe distill-tiny --teacher runs/teacher --student runs/student --out runs/d --dry-run"]


def register(app: typer.Typer) -> None:
    command(app, "distill", distill, DistillOptions, training.Recipe, examples=EXAMPLES)


def distill(given: dict, recipe: dict) -> None:
    """Distill a frozen teacher into a student: forward KL over the full vocabulary at T=1 (the report's).

    Output as `nano pretrain`: OUT/checkpoint-N, OUT/final (HF NemotronH + tokenizer), metrics.jsonl (loss,
    kd, ce per step), loss.png; held-out CE and KL to the teacher before and after. Ctrl-C / SIGTERM writes a
    checkpoint (exit 130 / 143); `--out OUT --resume auto` alone continues with the saved settings.
    """
    from ..stages import distill as stage

    training.run(stage, DistillOptions, recipe, given, show_plan, show_result)


def show_plan(p: DistillPlan) -> None:
    """``nano distill --dry-run``: the pair, the loss, the data and the step plan."""
    from nanocli_model import memory

    o = p.options
    t = training.table("nano distill: plan (dry run)")
    t.add_row("teacher", f"{o.teacher} ({ui.human_count(memory.param_count(p.teacher_config).total)} parameters, "
              f"{p.teacher_dtype})")
    t.add_row("student", f"{o.student} ({ui.human_count(memory.param_count(p.config).total)} parameters)")
    t.add_row("vocabulary", f"{p.config.vocab_size:,} tokens, same tokenizer.json")
    t.add_row("loss", p.loss + (f"; top-k cache {o.teacher_cache}" if o.teacher_cache else ""))
    training.token_plan_rows(t, p)
    training.print_plan(t, p, f"student {o.precision}, teacher {p.teacher_dtype}")


def show_result(r: DistillResult) -> None:
    """What the run did, with held-out CE and KL to the teacher before and after."""
    t = training.result_table("nano distill", r)
    if t is None:
        return
    training.data_rows(t, r)
    t.add_row("loss", f"{r.first_loss:.4f} -> {r.last_loss:.4f} (last step: KD {r.last_kd:.4f}, CE {r.last_ce:.4f})")
    for key, label in (("eval_kl", "held-out KL to teacher"), ("eval_loss", "held-out CE")):
        if key in r.eval:
            before = f"{r.before[key]:.4f} -> " if key in r.before else ""
            t.add_row(label, f"{before}{r.eval[key]:.4f}")
    if r.teacher_cache is not None:
        c = r.teacher_cache
        t.add_row("teacher top-k cache", f"{c.hits} windows read, {c.misses} computed ({c.path})")
    training.print_result(t, r)
