"""``nano pretrain``: its options (``PretrainOptions`` and ``--recipe``), the call into ``stages/pretrain.py``
and the rendering of the plan (``--dry-run``) and of the finished run."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from .. import ui
from ..stages.pretrain import PretrainOptions
from . import training
from .flags import command

if TYPE_CHECKING:
    from ..stages.pretrain import PretrainPlan, PretrainResult


EXAMPLES = ["nano pretrain --recipe pretrain-tiny --out runs/tiny-base",
            'nano pretrain --profile small --data "data/*.jsonl@0.7;synthetic:reasoning@0.3" --tokens 50000000 '
            "--out runs/small",
            "nano pretrain --profile tiny --data synthetic:reasoning --steps 100 --out runs/t --dry-run"]


def register(app: typer.Typer) -> None:
    command(app, "pretrain", pretrain, PretrainOptions, training.Recipe, examples=EXAMPLES)


def pretrain(given: dict, recipe: dict) -> None:
    """Pretrain a NemotronH model: WSD schedule, bf16 or FP8, exact resume, torchrun data parallel.

    Checkpoints (HF NemotronH format + training state) go to OUT/checkpoint-N and OUT/final; metrics to
    OUT/metrics.jsonl and the loss curve to OUT/loss.png. Ctrl-C or SIGTERM writes a checkpoint and exits
    130 / 143. `--out OUT --resume auto` alone continues a run with its saved settings; a larger --steps or
    --tokens extends it (the LR schedule re-derived over the new total).
    """
    from ..stages import pretrain as stage

    training.run(stage, PretrainOptions, recipe, given, show_plan, show_result)


def show_plan(p: PretrainPlan) -> None:
    """``nano pretrain --dry-run``: the resolved settings and the token/step plan."""
    t = training.table("nano pretrain: plan (dry run)")
    t.add_row("model", f"{p.model_source} ({ui.human_count(p.parameters)} parameters)")
    training.token_plan_rows(t, p)
    training.print_plan(t, p, p.options.precision)


def show_result(r: PretrainResult) -> None:
    """The end-of-run summary: tokens, time, tokens/s, losses, peak memory, MFU, where things are."""
    t = training.result_table("nano pretrain", r)
    if t is None:
        return
    training.data_rows(t, r)
    t.add_row("loss", f"{r.first_loss:.4f} -> {r.last_loss:.4f}")
    if r.eval:
        t.add_row("held-out", f"loss {r.eval['eval_loss']:.4f}, perplexity {r.eval['eval_ppl']:.2f}")
    training.print_result(t, r)
