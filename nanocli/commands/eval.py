"""``nano eval``: held-out accuracy on the built-in reasoning tasks, a thinking-budget sweep, perplexity.

The command: ``EvalOptions`` (the stage's) plus what only the command line asks for (``--json``, ``--output``,
``--plot``); the call into ``stages/evaluate.py`` with ``ui.Progress`` reporting on a terminal's stderr; the rendering
(the accuracy table, perplexity, the problem set).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.table import Table

from .. import settings, ui
from ..stages.evaluate import EvalOptions
from .flags import command
from .output import JsonOutput, print_json

if TYPE_CHECKING:
    from ..reasoning_accuracy import Accuracy
    from ..stages.evaluate import EvalResult


EXAMPLES = ["nano eval -m runs/demo/grpo/final -n 100 --difficulty 1-2",
            "nano eval -m runs/demo/grpo/final --mode think --budgets 8,16,32 --plot sweep.png",
            "nano eval -m runs/tiny-base/final --problems 0 --data synthetic:reasoning --json --output ppl.json"]


@dataclass
class EvalOutput(JsonOutput):
    json: bool = False
    """Print one JSON object instead of the table, on one line."""
    output: str | None = settings.flag(None, deprecated=("--out",))
    """Also write the JSON to this file."""
    plot: str | None = None
    """Accuracy vs thinking budget, as a PNG."""


def register(app: typer.Typer) -> None:
    command(app, "eval", evaluate, EvalOptions, EvalOutput, examples=EXAMPLES)


def evaluate(given: dict, output: dict) -> None:
    """Held-out accuracy on the built-in reasoning tasks, a thinking-budget sweep, and held-out perplexity.

    Accuracy with reasoning on and off, and at each thinking budget; greedy unless --samples; problems from the
    held-out split, never seen in training. Perplexity on held-out text (--data).
    """
    from ..stages import evaluate as ev

    if given.get("budgets") is not None:  # spelled 8,16,32 on the command line
        given["budgets"] = ev.parse_budgets(given["budgets"])
    options, out = EvalOptions(**given), EvalOutput(**output)
    settings.validate(options, ev.EvalError)
    settings.validate(out, ev.EvalError)
    path = None if out.output is None else Path(out.output)
    if path is not None and not path.parent.is_dir():
        raise ev.EvalError(f"--output {path}: folder {path.parent} does not exist")
    if out.plot is not None:
        from ..plot import checked_png

        checked_png(out.plot)  # a bad path fails before the work, not after
    # what runs now, on a terminal's stderr only (a pipe gets the result, or one error line)
    result = ev.run(options, ui.Progress(quiet=not sys.stderr.isatty()))
    record = result.to_json()
    if path is not None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)
    if out.plot is not None:
        from ..plot import plot_budget_sweep

        plot_budget_sweep(result, out.plot)
    if out.wants_json:
        print_json(record, out.json_indent)
    else:
        show_eval_result(result, out.plot)


# ------------------------------------------------------------------------------------------ rendering
MODE_LABELS = {"think": "reasoning on", "no_think": "reasoning off", "text": "pretraining format"}


def _answers(a: Accuracy) -> int:
    return a.n * a.samples


def show_eval_result(r: EvalResult, plot_path: str | None = None) -> None:
    """Held-out accuracy per mode, the thinking-budget sweep, perplexity, and what was asked."""
    out, o = ui.console(), r.options
    rows = [(MODE_LABELS[mode], a) for mode, a in r.accuracy.items()]
    rows += [(f"thinking budget {a.budget}", a) for a in r.sweep]
    if rows:
        t = Table(title=f"nano eval: {o.model}", box=box.SIMPLE_HEAVY)
        for name in ("answers", "accuracy", "in form", "mean tokens"):
            t.add_column(name, justify="left" if name == "answers" else "right")
        for label, a in rows:
            t.add_row(label, f"{100 * a.accuracy:.1f}% ({a.correct}/{_answers(a)})", f"{a.formatted}/{_answers(a)}",
                      f"{a.mean_tokens:.1f}")
        out.print(t)
    if r.perplexity is not None:
        pp = r.perplexity
        out.print(f"held-out text: loss {pp.loss:.4f}, perplexity {pp.ppl:.3f} ({pp.tokens:,} tokens)")
    if rows:
        how = "greedy" if o.samples == 1 else f"{o.samples} samples each at temperature {o.temperature}"
        out.print(f"problems: {o.problems} held-out (tasks {o.tasks or 'all'}, difficulty {o.difficulty}, seed "
                  f"{o.seed}), {how}; {ui.human_count(r.params)} parameters, {r.device} {r.dtype}, {r.seconds:.1f} s")
    for note in r.notes:
        out.print(f"note: {note}", markup=False, highlight=False)
    if plot_path:
        out.print(f"plot: {plot_path}")
