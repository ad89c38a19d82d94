"""``nano demo`` (``make demo``): the report's pipeline in miniature; with ``--library-check``, the model library
alone on one profile.

The command: its options (``DemoOptions``: the recipe, where it writes, ``--fresh``, ``--library-check`` and
its ``--profile``); the call into ``demo.py`` (with ``ui.Progress`` as the reporter: a section per stage) or
``library_check.py``; the rendering (the summary over every stage's model; the library check's panel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.panel import Panel
from rich.table import Table

from .. import settings, ui
from .flags import command

if TYPE_CHECKING:
    from ..demo import DemoResult
    from ..library_check import LibraryReport, ModelRun


EXAMPLES = ["nano demo", "nano demo --recipe demo-smoke --out runs/demo-smoke --fresh",
            "nano demo --library-check --profile tiny"]


@dataclass
class DemoOptions(settings.Group):
    panel = "Pipeline"

    recipe: str = "demo"
    """The pipeline recipe (name in nanocli/profiles/recipes/ or a .yaml path)."""
    out: str | None = None
    """Where the stages write (default: the recipe's, runs/demo; with --library-check: runs/demo-model)."""
    fresh: bool = False
    """Delete earlier artifacts and start over."""
    library_check: bool = False
    """Only check the model library on --profile (save/load, cached decode, cache bytes)."""
    profile: str = "small"
    """With --library-check: the model profile."""


def register(app: typer.Typer) -> None:
    command(app, "demo", demo, DemoOptions, examples=EXAMPLES,
            panels={"library_check": "Library check", "profile": "Library check"})


def demo(given: dict) -> None:
    """The report's pipeline in miniature (`make demo`): pretrain -> SFT -> GRPO -> prune -> distill on CPU.

    Every stage writes ordinary checkpoints under OUT/<stage>/; a rerun resumes or skips finished stages.
    Then every model is evaluated the same way (held-out accuracy, reasoning on and off), fit-check runs on
    the released Nemotron-Nano profiles, and the final model answers a question.
    """
    o = DemoOptions(**given)
    if o.library_check:
        from .. import library_check

        report = library_check.run()
        result = library_check.run_model(o.profile, o.out or library_check.DEFAULT_OUT)
        show_library_check(report, result)
        library_check.check(result)
        return
    from .. import demo as pipeline

    recipe = pipeline.read(o.recipe, o.out)
    with ui.Progress() as bar:
        result = pipeline.run(recipe, fresh=o.fresh, reporter=bar)
    show_demo_result(result)


# ------------------------------------------------------------------------------------------ rendering
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def show_demo_result(r: DemoResult) -> None:
    """``nano demo``: one table over every stage's model, the budget sweep, fit-check, the sample answer."""
    out = ui.console()
    out.rule("[bold]nano demo: summary")
    ctx = int(r.recipe.eval.get("context", 131072))
    ctx_label = f"{ctx // 1024}k" if ctx >= 1024 and ctx % 1024 == 0 else str(ctx)
    first = r.rows[0].accuracy.get("think") if r.rows else None
    t = Table(title=f"every stage, measured the same way ({first.n if first else 0} held-out problems, greedy)",
              box=box.SIMPLE_HEAVY)
    for name, justify in (("model", "left"), ("params", "right"), (f"memory@{ctx_label}", "right"),
                          ("think", "right"), ("no think", "right"), ("tok/s", "right"), ("stage", "right")):
        t.add_column(name, justify=justify)
    times = {s.model: s for s in r.stages}
    for row in r.rows:
        st = times.get(row.path)
        acc = {mode: _pct(a.accuracy) for mode, a in row.accuracy.items()}
        t.add_row(row.label, ui.human_count(row.params), ui.human_bytes(row.memory), acc.get("think", "-"),
                  acc.get("no_think", "-"), f"{row.tokens_per_s:,.0f}",
                  "" if st is None else (f"{st.seconds:,.0f} s" if st.status != "done before" else "earlier"))
    out.print(t)
    base = r.rows[0].text_accuracy if r.rows else None
    if base:
        chat = r.rows[0].accuracy.get("think")
        out.print(f"base model asked in its pretraining format (Question:/Reasoning:/Answer:): {_pct(base.accuracy)}; "
                  f"through the chat template it has not learned yet: {_pct(chat.accuracy if chat else 0.0)}")
    if len(r.rows) >= 2:
        teacher = next((x for x in r.rows if "teacher" in x.label), None)
        final = r.rows[-1]
        if teacher and "think" in teacher.accuracy and teacher.accuracy["think"].accuracy:
            keep = final.accuracy["think"].accuracy / teacher.accuracy["think"].accuracy
            out.print(f"the distilled student keeps {100 * keep:.0f}% of the teacher's accuracy (reasoning on) with "
                      f"{100 * final.memory / teacher.memory:.0f}% of its memory at {ctx_label} tokens and "
                      f"{100 * final.params / teacher.params:.0f}% of its parameters")
    if r.sweep:
        out.print("final model, accuracy vs thinking budget: " + ", ".join(
            f"{a.budget} tok {100 * a.accuracy:.0f}%" for a in r.sweep))
    for f in r.fits:
        e = f.estimate
        out.print(f"fit-check {f.model.name} on {f.gpu.name} at {e.context:,} tokens: [bold]{f.verdict}[/] "
                  f"({ui.gib(e.total)} of {ui.gib(f.gpu.budget)})")
    if r.sample is not None:
        o = r.sample.outputs[0]
        out.print(f"nano generate: {r.sample_prompt!r}")
        if o.thinking:
            out.print(f"<think>{o.thinking}</think>", style="dim", markup=False)
        out.print(o.answer.strip(), markup=False)
    out.print(f"demo finished in {r.seconds / 60:.1f} min; artifacts in {r.recipe.out}/")


def model_run_panel(run: ModelRun) -> Panel:
    """The live part of ``--library-check``: what the model library did, each check with its verdict."""

    def verdict(ok: bool) -> str:
        return "[green]ok[/green]" if ok else "[bold red]FAILED[/bold red]"

    grid = Table(show_header=False, box=None, padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_column(no_wrap=True)
    grid.add_row("params", f"{run.params:,} ({ui.human_count(run.params)}) = memory.param_count",
                 verdict(run.params == run.expected_params))
    grid.add_row("saved to", str(run.out_dir), "")
    grid.add_row("round trip", "bit-exact" if run.bit_exact else "logits differ after save/load",
                 verdict(run.bit_exact))
    grid.add_row("cached vs full", f"max rel err {run.max_rel_err:.2e} < {run.rel_tol:.0e} ({run.max_len} positions)",
                 verdict(run.max_rel_err < run.rel_tol))
    grid.add_row("prefill", f"{run.prefill_tok_s:,.0f} tok/s ({run.prompt_len} tokens in "
                 f"{run.prefill_seconds * 1e3:.0f} ms)", "")
    grid.add_row("decode", f"{run.decode_tok_s:,.1f} tok/s ({run.new_tokens} greedy steps, batch 1)", "")
    match = run.cache_bytes == run.expected_cache_bytes
    grid.add_row("cache bytes", f"{run.cache_bytes:,} ({ui.human_bytes(run.cache_bytes)}) "
                 + ("= memory.cache_bytes" if match else f"!= memory.cache_bytes {run.expected_cache_bytes:,}"),
                 verdict(match))
    title = f"Model library, live: profile [bold]{run.profile}[/bold], fp32, CPU, batch 1"
    return Panel(grid, title=title, title_align="left", expand=False, border_style="green" if run.passed else "red")


def show_library_check(report: LibraryReport, run: ModelRun) -> None:
    """``nano demo --library-check``: the shipped profiles, then the live model-library run."""
    out = ui.console()
    out.print("[bold]nano demo --library-check[/bold]: every shipped profile loaded, and the model library run for "
              "real (`nano demo` without the flag runs the whole pipeline).")
    out.print()
    ui.show_profiles(report.models, report.gpus)
    out.print()
    out.print(model_run_panel(run))
    out.print(f"{run.prompt_len}-token random prompt prefilled into a HybridCache, then {run.new_tokens} tokens "
              "greedy-decoded one at a time; the cached logits are compared with one full forward over prompt + "
              "generated tokens.")
