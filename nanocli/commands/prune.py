"""``nano prune``: Minitron structured pruning to an explicit shape or under a memory / parameter budget.

The command: ``PruneOptions`` (the stage's groups: model, target shape, budget, calibration, depth and search,
run) plus ``--recipe``; the call into ``stages/prune.py`` with ``ui.Progress`` as its reporter; the rendering
(the budget and the search space, the candidates table, the chosen shape and where it went).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.table import Table

from .. import settings, ui
from ..stages.prune import PruneOptions
from .flags import command

if TYPE_CHECKING:
    from ..prune.search import Budget, Candidate
    from ..stages.prune import PruneResult


@dataclass
class PruneRecipe(settings.Group):
    panel = "Run"

    recipe: str | None = None
    """Settings YAML (nanocli/profiles/recipes/ name or path); flags override it."""


EXAMPLES = ["nano prune -m nemotron-nano-12b-v2-base --gpu a10g --context 128k --dry-run",
            "nano prune -m runs/tiny-base/final --out runs/pruned --target-params 250000",
            "nano prune -m runs/tiny-base/final --out runs/pruned-explicit --hidden-size 48 --ffn-hidden-size 192"]


def register(app: typer.Typer) -> None:
    command(app, "prune", prune, PruneOptions, PruneRecipe, examples=EXAMPLES)


def prune(given: dict, extra: dict) -> None:
    """Prune a model Minitron-style (depth, hidden size, MLP width, group-aware Mamba heads, GQA heads).

    Importance from activations on calibration data (one pass, cached with --scores); depth by the
    report's greedy logit-MSE rule. Give the target widths (ModelOpt names) or a budget: --target-memory
    GiB or --gpu PROFILE at --context/--batch (fit-check's memory model), or --target-params. With a budget
    the fitting shapes are searched, the largest scored by KL to the parent, the --distill-candidates best briefly distilled,
    the best written to OUT with pruning.json.
    """
    from ..stages import prune as stage

    options = stage.make_options(PruneRecipe(**extra).recipe, given)
    if options.dry_run:
        show_prune_plan(stage.run(options))
        return
    with ui.Progress() as bar:
        result = stage.run(options, bar)
    show_prune_result(result)


# ------------------------------------------------------------------------------------------ rendering
def _shape_cells(c: Candidate) -> list[str]:
    s = c.shape
    return [f"{s.num_layers}", f"{s.num_attention_layers}", f"{s.hidden_size}", f"{s.ffn_hidden_size}",
            f"{s.mamba_num_heads}x{s.mamba_head_dim}", f"{s.num_attention_heads}/{s.num_query_groups}"]


def _score(x: float | None, missing: str = "") -> str:
    return missing if x is None else f"{x:.4f}"


def prune_table(candidates: list[Candidate], budget: Budget, title: str, scored: bool) -> Table:
    """The search table: shape, parameters, memory at the target context, proxy and distilled scores."""
    t = Table(title=title, box=box.SIMPLE_HEAVY)
    for name in ("", "layers", "attn", "hidden", "ffn", "mamba", "q/kv", "params"):
        t.add_column(name, justify="right")
    memory = budget.kind == "memory"
    if memory:
        t.add_column(f"memory @ {budget.context:,}", justify="right")
    if scored:
        for name in ("proxy KL", "LM loss", "KL after distill"):
            t.add_column(name, justify="right")
    for i, c in enumerate(candidates, 1):
        row = [("* " if c.chosen else "") + str(i), *_shape_cells(c), ui.human_count(c.params) if memory
               else f"{c.params:,}"]
        if memory:
            row.append(budget.describe(c.value))
        if scored:
            row += [_score(c.proxy), _score(c.lm_loss), _score(c.distilled, "-")]
        t.add_row(*row)
    return t


def _space_lines(r: PruneResult) -> list[str]:
    sp, b, a = r.space, r.budget, r.space.axes
    return [f"budget: {b.describe(b.limit)} ({b.source}) for weights + KV + Mamba state + activations at "
            f"{b.context:,} tokens, batch {b.batch}, {b.dtype}" if b.kind == "memory" else
            f"budget: {b.describe(b.limit)} ({b.source})",
            f"search space: {sp.total:,} shapes; {sp.fitting:,} fit; {len(sp.frontier):,} on the frontier "
            f"(no fitting shape is larger on every axis); layer patterns: {sp.pattern_source}",
            f"smallest reachable: {b.describe(sp.smallest.value)} ({sp.smallest.shape.label()})",
            f"axes: depth {sorted({n for n, _ in a.depth})} x attention layers {sorted({x for _, x in a.depth})}, "
            f"hidden {a.hidden_size[0]}..{a.hidden_size[-1]} ({len(a.hidden_size)}), "
            f"ffn {a.ffn_hidden_size[0]}..{a.ffn_hidden_size[-1]} ({len(a.ffn_hidden_size)}), "
            f"mamba heads {a.mamba_num_heads}"]


def show_prune_plan(r: PruneResult, rows: int = 15) -> None:
    """``nano prune --dry-run``: the parent, the budget, the search space and its largest fitting shapes."""
    out = ui.console()
    p = r.parent
    out.print(f"nano prune (dry run): {r.parent_name}: {p.num_hidden_layers} layers "
              f"({p.count('mamba')} Mamba-2 / {p.count('mlp')} MLP / {p.count('attention')} attention), hidden "
              f"{p.hidden_size}, ffn {p.intermediate_size}, mamba {p.mamba_num_heads}x{p.mamba_head_dim}")
    if r.space is None:
        c = r.chosen
        out.print(f"target: {c.shape.label()}; {c.params:,} parameters; {ui.gib(c.value)} at "
                  f"{r.options.context:,} tokens (heaviest layer mix {c.pattern})")
        return
    for line in _space_lines(r):
        out.print(line)
    shown = r.space.frontier[:rows]
    out.print(prune_table(shown, r.budget, f"largest fitting shapes ({len(shown)} of {len(r.space.frontier)} on "
                          "the frontier, by memory; no scores in a dry run)", scored=False))


def show_prune_result(r: PruneResult) -> None:
    """The end of ``nano prune``: the search table (budget runs), the chosen shape, where things went."""
    from nanocli_model.memory import param_count

    out = ui.console()
    if r.space is not None:
        for line in _space_lines(r):
            out.print(line)
        out.print(prune_table(r.candidates, r.budget, "candidates scored (proxy: KL to the parent on held-out "
                              "calibration rows; * kept)", scored=True))
    c = r.chosen
    out.print(f"pruned: {c.shape.label()} pattern {c.pattern}; {c.params:,} parameters "
              f"({100 * c.params / max(1, param_count(r.parent).total):.1f}% of the parent)")
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items())
    scores = f"; scores {'reused from' if r.scores_reused else 'saved to'} {r.scores_path}" if r.scores_path else ""
    out.print(f"checkpoint: {r.out} (pruning.json beside the weights){scores}")
    out.print(f"time: {timing}", style="dim")
