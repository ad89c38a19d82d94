"""``nano bench``: generation throughput of a model, and the report's hybrid-vs-Transformer comparison.

The command: ``BenchOptions`` (``bench.py``'s) plus what only the command line asks for (``--json``,
``--plot``); the call into ``bench.run`` with ``ui.Progress`` reporting each run on stderr; the rendering (the
models compared, throughput per (prompt, output) pair, time per output token as the context grows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.table import Table

from .. import settings, ui
from ..bench import BenchOptions
from ..summary import KINDS
from .flags import command
from .output import JsonOutput, check_plot, emit

if TYPE_CHECKING:
    from ..bench_results import BenchResult


@dataclass
class BenchOutput(JsonOutput):
    json: bool = False
    """Print one JSON object instead of tables, on one line."""
    plot: str | None = None
    """Write tokens/s per pair and ms per output token vs context to this .png."""


EXAMPLES = ["nano bench -m small --quick", "nano bench -m small --threads 1 --json --plot bench.png",
            "nano bench -m small --threads 1 --lengths 2k:4k --max-batch --memory 2 --prefill-chunk 256",
            "nano bench -m runs/tiny-base/final --lengths 1k:2k,8k:16k --max-batch --device cuda"]


def register(app: typer.Typer) -> None:
    command(app, "bench", bench, BenchOptions, BenchOutput, examples=EXAMPLES)


def bench(given: dict, output: dict) -> None:
    """Generation throughput of a model, and the report's hybrid-vs-Transformer comparison.

    Prefills a random prompt and decodes OUTPUT tokens (greedy, EOS ignored) through nano's cached
    generator, for every PROMPT:OUTPUT pair; with --compare-transformer (default) the same for a
    pure-attention twin built by nano (same hidden size and vocabulary, attention + MLP layers only,
    parameters within 5%). Runs alternate hybrid, twin, hybrid, twin; the table gives medians: prefill,
    decode and output tokens/s, the hybrid/Transformer ratio, cache bytes (predicted by memory.py and
    really allocated) and ms per output token as the context grows.
    """
    from .. import bench as stage

    options, out = BenchOptions(**given), BenchOutput(**output)
    settings.validate(options, stage.BenchError)
    settings.validate(out, stage.BenchError)
    from ..plot import plot_bench

    check_plot(out.plot)
    result = stage.run(options, ui.Progress())  # status lines on stderr (no bars: nothing is counted)
    emit(result, json_out=out.wants_json, indent=out.json_indent, plot=out.plot, draw=plot_bench, show=show_bench)


# ------------------------------------------------------------------------------------------ rendering
def whole_cells(table: Table, headers: list[str], rows: list[list[str]], left: int = 1,
                loose: tuple[int, ...] = ()) -> Table:
    """``table`` with these columns and rows, every cell shown whole: a column is at least as wide as its longest
    cell (headers wrap at their newlines instead; at 80 columns every table of ``nano bench`` fits), and a cell
    wider than the terminal folds onto a second line rather than end in an ellipsis. The first ``left`` columns
    are left-aligned; ``loose`` columns (a layer pattern) fold to whatever width is left."""
    for i, name in enumerate(headers):
        width = max([len(row[i]) for row in rows] + [len(word) for word in name.split()])
        table.add_column(name, justify="left" if i < left else "right", min_width=None if i in loose else width,
                         overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def _show_batch_memory(out, r: BenchResult) -> None:
    """--max-batch: the budget, and per model and pair what nano's memory model predicts the batch needs
    against what it really used (CPU: the peak RSS rise over the run)."""
    rows = []
    for p in r.pairs:
        for m in (p.hybrid, p.transformer):
            if m is not None:
                real = ui.human_bytes(m.peak_memory_bytes) if m.peak_memory_source.endswith("rise over the run") else ""
                rows.append([f"{p.prompt}:{p.output}" if m is p.hybrid else "", m.role, str(m.batch),
                             ui.human_bytes(m.cache_predicted.total), ui.human_bytes(m.memory_predicted), real])
    budget = f"{r.memory_budget / 2**30:.2f} GiB ({r.memory_budget_source})"
    out.print(whole_cells(Table(title=f"--max-batch: each model's largest batch in {budget}", title_justify="left",
                                box=box.SIMPLE_HEAD, show_edge=False, caption="predicted = cache + prefill "
                                "activations (fit.estimate), the weights aside; peak RSS rise: the process's "
                                "(CPU), allocator slack included", caption_justify="left"),
                          ["in:out", "model", "batch", "cache", "predicted", "peak RSS\nrise"], rows, left=2))


def show_bench(r: BenchResult, plot_path: str | None = None) -> None:
    """``nano bench``: the models compared, throughput per (prompt, output) pair with the hybrid /
    Transformer ratio, cache bytes (memory.py's prediction and the allocated cache), and the time per
    output token as the context grows."""
    out = ui.console()
    h, t = r.hybrid, r.transformer
    out.print(f"[bold]nano bench[/bold]: {h.name} ({h.source}) | {r.device} {r.dtype}, {r.threads} thread(s), "
              f"batch {r.batch} | {r.repeats} run(s) per model, interleaved, medians | kernels {r.kernels}"
              + (" | compiled decode" if r.decode == "compiled" else ""))
    if r.device != "cpu" and r.kernels_detail:  # on a GPU: which kernels ran, and why any other did not
        out.print(r.kernels_detail, style="dim", markup=False, highlight=False)
    rows = [[m.role, m.pattern, "/".join(str(m.layers[k]) for k, _, _ in KINDS), f"{m.params:,}",
             "" if m is h else f"{100 * (m.params - h.params) / h.params:+.2f}%", ui.human_bytes(m.kv_bytes_per_token),
             ui.human_bytes(m.state_bytes_per_sequence)] for m in r.models]
    out.print(whole_cells(Table(box=box.SIMPLE_HEAD, show_edge=False), ["model", "pattern", "M/-/*", "parameters",
                                                                       "vs hybrid", "KV\n/ token", "Mamba state\n/ seq"],
                          rows, left=2, loose=(1,)))

    mismatch, rows = [], []
    for p in r.pairs:
        for m in (p.hybrid, p.transformer):
            if m is None:
                continue
            if m.cache_predicted.total != m.cache_measured:
                mismatch.append(f"{p.prompt}:{p.output} {m.role}: memory.py predicts "
                                f"{m.cache_predicted.total:,} B, allocated {m.cache_measured:,} B")
            rows.append([f"{p.prompt}:{p.output}" if m is p.hybrid else "", m.role, str(m.batch),
                         f"{m.prefill_tokens_per_s:,.0f}", f"{m.decode_tokens_per_s:,.1f}",
                         f"{m.output_tokens_per_s:,.1f}", _ratio(p.ratio) if m is p.hybrid else "",
                         ui.human_bytes(m.cache_measured)])
    table = whole_cells(Table(title="Generation throughput", title_justify="left", box=box.SIMPLE_HEAD,
                              show_edge=False, caption="tokens per second; output/s = output tokens / (prefill + "
                              "decode time); ratio = hybrid / transformer output/s; cache = the HybridCache "
                              "allocated for in + out tokens", caption_justify="left"),
                        ["in:out", "model", "batch", "prefill\n/s", "decode\n/s", "output\n/s", "ratio", "cache"],
                        rows, left=2)
    out.print(table)
    out.print("cache bytes: " + ("; ".join(mismatch) if mismatch else "allocated = memory.py's prediction, "
                                 "byte for byte, for every row"), style="dim" if not mismatch else "bold red")

    rows = []
    for p in r.pairs:
        for i, (ctx, ms) in enumerate(p.hybrid.ms_per_token):
            row = [f"{p.prompt}:{p.output}" if i == 0 else "", f"{ctx:,}", f"{ms:.2f}"]
            if p.transformer is not None:
                tms = p.transformer.ms_per_token[i][1]
                row += [f"{tms:.2f}", f"{tms / ms:.2f}x"]
            rows.append(row)
    if r.memory_budget is not None:
        _show_batch_memory(out, r)
    tpot = whole_cells(Table(title="Time per output token as the context grows (ms per decode step, medians)",
                             title_justify="left", box=box.SIMPLE_HEAD, show_edge=False),
                       ["in:out", "context", "hybrid\nms", *(("transformer\nms", "transformer\n/ hybrid") if t else ())],
                       rows, left=1)
    out.print(tpot)
    load = (f"load average {r.load_before[0]:.2f} before, {r.load_after[0]:.2f} after"
            if r.load_before and r.load_after else "load average unknown")
    out.print(f"{r.seconds:,.0f} s in all; {load}; torch {r.torch_version}, {r.machine}", style="dim")
    for note in r.notes:
        out.print(f"note: {note}", style="dim")
    if plot_path:
        out.print(f"plot: {plot_path}")
