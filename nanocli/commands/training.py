"""What the training commands (``nano pretrain``, ``nano distill``, ``nano align``) share on the command line:
``--recipe``, the run under the progress widget, and the pieces of their plan and result tables.

Not a command itself (no ``register``); ``commands/pretrain.py``, ``distill.py`` and ``align.py`` use it.
"""

from __future__ import annotations

import os
import shlex
import signal
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from rich import box
from rich.table import Table

from .. import settings, ui

if TYPE_CHECKING:
    from ..train.run import Plan, TrainResult
    from ..train.tokens import TokenPlan


@dataclass
class Recipe(settings.Group):
    panel = "Run"

    recipe: str | None = None
    """Settings YAML (a nanocli/profiles/recipes/ name or a path); flags override it."""


def run(stage: ModuleType, options_cls: type, recipe: dict, given: dict, show_plan: Callable[[Any], None],
        show_result: Callable[[Any], None]) -> None:
    """A training command: the options (defaults < ``--recipe`` < the flags given), the stage's plan (every
    check before any work, before the progress bar starts), then ``--dry-run``'s plan or the run under the
    progress widget and its summary (only rank 0 of a torchrun reports).

    A run stopped by SIGINT / SIGTERM has written its checkpoint; its summary ends with the command that
    resumes it, and the command exits 128 + the signal's number (130 / 143), as a shell reports a process the
    signal ended."""
    from ..train import resume
    from ..train.recipe import given_settings

    quiet = int(os.environ.get("RANK", "0")) != 0
    settings = given_settings(options_cls, stage.STAGE, Recipe(**recipe).recipe, given)
    saved = resume.saved_run(settings.get("out"), settings.get("resume"))
    if saved is not None:  # --resume: the run's saved settings under what is given again
        world = int(os.environ.get("WORLD_SIZE", "1"))
        options = options_cls(**resume.layer(options_cls, saved, settings, world))
    else:
        options = options_cls(**settings)
    plan = stage.plan(options)
    note = resume.check_given(plan, saved, set(settings)) if saved is not None else None
    if note and not quiet:
        ui.console(stderr=True).print(note, markup=False, soft_wrap=True)
    if options.dry_run:
        show_plan(plan)
        return
    with ui.Progress(quiet=quiet) as progress:
        result = stage.run(options, progress, plan)
    if not quiet:
        show_result(result)
    if result.interrupted:
        if not quiet:
            ui.console().print(f"resume with: {resume_command(stage.STAGE, options.out)}", markup=False,
                               soft_wrap=True)
        raise SystemExit(128 + (result.signal or signal.SIGINT))


def resume_command(stage: str, out: str) -> str:
    """The command line that resumes the run in ``out``: ``--resume auto`` reads its settings from its newest
    checkpoint. Under torchrun, the same number of processes per node."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    launcher = "nano"
    if world > 1:
        nodes = f"--nnodes {world // local} " if local != world else ""
        launcher = f"torchrun {nodes}--nproc-per-node {local} -m nanocli"
    return f"{launcher} {stage} --out {shlex.quote(str(out))} --resume auto"


# ------------------------------------------------------------------------------------------ rendering
def table(title: str) -> Table:
    t = Table(title=title, box=box.SIMPLE_HEAVY, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    return t


def schedule_row(t: Table, p: Plan) -> None:
    s = p.schedule
    ranges = ", ".join(f"{k} {a}..{b}" for k, (a, b) in s.phases().items())
    t.add_row("schedule", f"{s.kind}: lr {s.lr:.2e} -> {s.min_lr:.2e}; {ranges}")


def token_plan_rows(t: Table, p: TokenPlan) -> None:
    """The data, steps, batch and schedule of a token-stream run (pretrain, distill)."""
    for name, spec in p.sources.items():
        files = f", {len(spec.paths)} files" if spec.kind == "files" else ""
        t.add_row(f"data: {name}", f"{spec.source or name} ({spec.kind}{files})")
    if len(p.phases) > 1:
        for i, (phase, (a, b)) in enumerate(zip(p.phases, p.phase_ranges)):
            blend = ", ".join(f"{k} {100 * v:.0f}%" for k, v in phase.weights.items())
            t.add_row(f"phase {i + 1}", f"steps {a}..{b}: {blend}")
    t.add_row("steps", f"{p.steps:,} x {p.tokens_per_step:,} tokens = {ui.human_count(p.tokens)} tokens")
    t.add_row("epochs", "each source's tokens and epochs are counted once it is tokenized (the run's first lines)")
    o = p.options
    t.add_row("batch", f"{o.global_batch} sequences x {o.seq_len} tokens; micro-batch {p.micro_batch} x "
              f"{p.accumulation} accumulation x {p.world} processes")
    schedule_row(t, p)


def print_plan(t: Table, p: Plan, precision: str) -> None:
    """The precision and output rows, then the plan table."""
    t.add_row("precision", precision)
    t.add_row("output", str(p.options.out))
    ui.console().print(t)


def result_table(command: str, r: TrainResult, tokens: bool = True) -> Table | None:
    """The title, the steps and (``tokens``) the tokens of a finished or interrupted run; None (and a line
    saying so) when the run had nothing left to do."""
    if r.already_done:
        ui.console().print(f"nothing to do: {r.final} already holds step {r.steps_done} of {r.plan.steps} (a longer "
                           "--steps / --tokens / --epochs with --resume auto extends the run)", markup=False,
                           soft_wrap=True)
        return None
    t = table(f"{command}: " + ("interrupted, checkpoint written" if r.interrupted else "done"))
    t.add_row("steps", f"{r.start_step} -> {r.steps_done} of {r.plan.steps}")
    if tokens:
        t.add_row("tokens", f"{ui.human_count(r.tokens)} in {r.seconds:,.1f} s = {r.tokens_per_s:,.0f} tokens/s")
    return t


def data_rows(t: Table, r: TrainResult) -> None:
    """Each token source's size and the epochs the run reads of it (its whole length, not this invocation)."""
    from ..train.tokens import MANY_EPOCHS

    for name, s in r.data.items():
        t.add_row(f"data: {name}", f"{ui.human_count(s['tokens'])} tokens, {s['epochs']:.2f} epochs over the run"
                  + (f" (more than {MANY_EPOCHS}: repeated)" if s["epochs"] > MANY_EPOCHS else ""))


def print_result(t: Table, r: TrainResult, resources: bool = True) -> None:
    """Peak memory, MFU and FP8 (``resources``), where the checkpoint and the loss curve are; the table."""
    if resources:
        t.add_row("peak memory", ui.human_bytes(r.peak_memory_bytes))
        if r.mfu is not None:
            t.add_row("MFU", f"{100 * r.mfu:.1f}%")
    if r.fp8:
        t.add_row("fp8", f"{len(r.fp8.fp8)} linear layers in FP8, {len(r.fp8.high_precision)} kept in bf16; "
                  f"GEMMs: {r.fp8.gemm}")
    t.add_row("checkpoint", str(r.final))
    if r.plot:
        t.add_row("loss curve", str(r.plot))
    ui.console().print(t)
