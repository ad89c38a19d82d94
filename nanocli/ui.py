"""All terminal rendering of nano (rich tables). Takes results, prints them; computes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from nanocli_model.errors import NanoError

from .profiles import GpuProfile
from .roadmap import Stage
from .summary import KINDS, ModelSummary

if TYPE_CHECKING:
    from .demo import ModelRun

GIB = 2**30


def console() -> Console:
    """The stdout console (a fresh one, so tests and redirected output see the current streams)."""
    return Console(highlight=False)


def human_count(n: int) -> str:
    """``8888227328`` -> ``8.89B``; ``14894048`` -> ``14.9M``."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            value = n / scale
            return f"{value:.3g}{suffix}" if value < 100 else f"{value:.0f}{suffix}"
    return str(n)


def gib(n: float) -> str:
    """Always in GiB, two decimals (the unit of the verdict and the report)."""
    return f"{n / GIB:.2f} GiB"


def human_bytes(n: float) -> str:
    """Binary units: ``17776721920`` -> ``16.56 GiB``; small sizes in MiB / KiB."""
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    for scale, unit in ((2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def layer_counts(s: ModelSummary) -> str:
    """``27/25/4``: the Mamba / MLP / attention layer counts."""
    counts = s.layer_counts
    return "/".join(str(counts[kind]) for kind, _, _ in KINDS)


def model_table(models: Sequence[ModelSummary], title: str = "Model profiles") -> Table:
    """One row per model: layers, M/-/* counts, parameters, bf16 weights, KV cache at 128k."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("layers", justify="right", no_wrap=True)
    table.add_column("M/-/*", justify="right", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("weights", justify="right", no_wrap=True)
    table.add_column("KV@128k", justify="right", no_wrap=True)
    for s in models:
        table.add_row(s.name, str(s.config.num_hidden_layers), layer_counts(s), human_count(s.params.total),
                      human_bytes(s.weight_bytes), human_bytes(s.kv_bytes))
    return table


def gpu_table(gpus: Sequence[GpuProfile]) -> Table:
    """One row per GPU: memory, what the framework and other models keep, the budget left."""
    table = Table(title="GPU profiles", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("memory", justify="right", no_wrap=True)
    table.add_column("overhead", justify="right", no_wrap=True)
    table.add_column("reserved", justify="right", no_wrap=True)
    table.add_column("budget", justify="right", no_wrap=True)
    table.add_column("GB/s", justify="right", no_wrap=True)
    table.add_column("TFLOP/s", justify="right", no_wrap=True)
    for g in gpus:
        table.add_row(g.name, f"{g.memory_gib:.2f} GiB", f"{g.framework_overhead:.0%}", f"{g.reserved_gib:.2f} GiB",
                      f"{g.budget_gib:.2f} GiB", f"{g.bandwidth_gbs:g}", f"{g.bf16_tflops:g}")
    return table


def show_profiles(models: Sequence[ModelSummary], gpus: Sequence[GpuProfile]) -> None:
    """``nano profiles``: the model table, then the GPU table."""
    out = console()
    out.print(model_table(models))
    out.print("weights: bf16. KV@128k: bf16 K+V of every attention layer at 131,072 tokens, batch 1.")
    out.print()
    out.print(gpu_table(gpus))
    out.print("budget = memory x (1 - overhead) - reserved: what weights + caches may use. "
              "TFLOP/s: dense bf16 peak.")


def model_run_panel(run: ModelRun) -> Panel:
    """The live part of ``nano demo``: what the model library did, each check with its verdict."""

    def verdict(ok: bool) -> str:
        return "[green]ok[/green]" if ok else "[bold red]FAILED[/bold red]"

    grid = Table(show_header=False, box=None, padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_column(no_wrap=True)
    grid.add_row("params", f"{run.params:,} ({human_count(run.params)}) = memory.param_count",
                 verdict(run.params == run.expected_params))
    grid.add_row("saved to", str(run.out_dir), "")
    grid.add_row("round trip", "bit-exact" if run.bit_exact else "logits differ after save/load",
                 verdict(run.bit_exact))
    grid.add_row("cached vs full", f"max rel err {run.max_rel_err:.2e} < {run.rel_tol:.0e} ({run.max_len} positions)", verdict(run.max_rel_err < run.rel_tol))
    grid.add_row("prefill", f"{run.prefill_tok_s:,.0f} tok/s ({run.prompt_len} tokens in "
                 f"{run.prefill_seconds * 1e3:.0f} ms)", "")
    grid.add_row("decode", f"{run.decode_tok_s:,.1f} tok/s ({run.new_tokens} greedy steps, batch 1)", "")
    match = run.cache_bytes == run.expected_cache_bytes
    grid.add_row("cache bytes", f"{run.cache_bytes:,} ({human_bytes(run.cache_bytes)}) "
                 + ("= memory.cache_bytes" if match else f"!= memory.cache_bytes {run.expected_cache_bytes:,}"),
                 verdict(match))
    title = f"Model library, live: profile [bold]{run.profile}[/bold], fp32, CPU, batch 1"
    return Panel(grid, title=title, title_align="left", expand=False,
                 border_style="green" if run.passed else "red")


def show_demo(models: Sequence[ModelSummary], gpus: Sequence[GpuProfile], stages: Sequence[Stage],
              run: ModelRun | None = None) -> None:
    """``nano demo``: the profiles, the live model-library run, and the pipeline stages still to come."""
    out = console()
    out.print("[bold]nano demo[/bold]: what exists today (profiles, the model library run for real); "
              "the end-to-end pipeline demo arrives with the stage issues.")
    out.print()
    show_profiles(models, gpus)
    out.print()
    if run is not None:
        out.print(model_run_panel(run))
        out.print(f"{run.prompt_len}-token random prompt prefilled into a HybridCache, then {run.new_tokens} "
                  "tokens greedy-decoded one at a time; the cached logits are compared with one full forward "
                  "over prompt + generated tokens.")
        out.print()
    table = Table(title="Pipeline stages", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("command", no_wrap=True, style="bold")
    table.add_column("status", no_wrap=True)
    table.add_column("what it does")
    for st in stages:
        status = "built" if st.built else f"not built yet (#{st.issue})"
        table.add_row(f"nano {st.command}", status, st.summary)
    out.print(table)


class TextStream:
    """Streams generated text as it arrives: the thinking span dimmed, the answer plain.

    Text goes out with markup off, so ``<think>`` and ``</think>`` show as they are.
    """

    def __init__(self, hide_thinking: bool = False):
        self.out = console()
        self.hide_thinking = hide_thinking
        self.started = False

    def write(self, row: int, text: str, thinking: bool) -> None:
        if thinking and self.hide_thinking:
            return
        if thinking and not self.started:
            self.out.print("<think>", style="dim", end="", markup=False)
        self.started = True
        self.out.print(text, style="dim" if thinking else None, end="", markup=False, soft_wrap=True)
        self.out.file.flush()

    def close(self) -> None:
        self.out.print()


def show_generation_stats(result) -> None:
    """The timing line on stderr: tokens, prefill and decode tokens/s, peak memory."""
    s = result.stats
    err = Console(stderr=True, highlight=False)
    err.print(f"prompt {s.prompt_tokens} tokens, generated {s.generated_tokens} tokens | "
              f"prefill {s.prefill_tokens_per_s:,.1f} tok/s, decode {s.decode_tokens_per_s:,.1f} tok/s | "
              f"peak memory {human_bytes(s.peak_memory_bytes)} ({s.peak_memory_source}) | "
              f"{result.device} {result.dtype} | kernels {result.kernels}"
              + (f" | compiled decode (compile {s.compile_seconds:.1f} s)" if result.decode == "compiled" else ""),
              style="dim", markup=False)
    if result.device != "cpu" and result.kernels != "mamba-ssm+causal-conv1d":  # a GPU without every kernel
        err.print(f"note: {result.kernels_detail}", markup=False, highlight=False)
    if result.decode.startswith("eager ("):  # --compile asked for, and it fell back
        err.print(f"note: --compile: decode ran {result.decode}", markup=False)


CHAT_HELP = "/think, /no_think, /budget N (or off), /reset, /exit; Ctrl-C stops an answer"


def chat(gen, options) -> None:
    """``nano generate --interactive``: multi-turn chat through the chat template."""
    out = console()
    loaded = gen.load(options)
    history: list[dict] = []
    out.print(f"[bold]nano chat[/] ({options.model}, {loaded.device} {loaded.dtype}) - {CHAT_HELP}")
    while True:
        try:
            line = out.input("[bold green]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            out.print()
            return
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history.clear()
            out.print("[dim](history cleared)[/]")
            continue
        if command in ("/think", "/no_think"):
            options.think = command == "/think"
            out.print(f"[dim](reasoning {'on' if options.think else 'off'})[/]")
            continue
        if command.startswith("/budget"):
            value = command.split(maxsplit=1)[1:] or ["off"]
            if value[0] == "off":
                options.thinking_budget = None
            elif value[0].isdigit():
                options.thinking_budget = int(value[0])
            else:
                out.print("[red]/budget takes a number of tokens or 'off'[/]")
                continue
            out.print(f"[dim](thinking budget: {options.thinking_budget or 'off'})[/]")
            continue
        history.append({"role": "user", "content": line})
        stream = TextStream(hide_thinking=False)
        try:
            result = gen.run(options, [list(history)], loaded, on_text=stream.write)
        except KeyboardInterrupt:
            stream.close()
            out.print("[dim](stopped)[/]")
            history.pop()
            continue
        except NanoError as e:  # a bad turn (e.g. the context is full) ends the turn, not the chat
            stream.close()
            out.print(f"[red]error: {e}[/]")
            history.pop()
            continue
        stream.close()
        history.append({"role": "assistant", "content": result.outputs[0].answer})
        show_generation_stats(result)


# ---------------------------------------------------------------------------------------- training
class Progress:
    """The progress widget of every long-running command: a ``report.Reporter`` on stderr.

    Status lines above the bars; one bar per counted task (tokenizing a source, scoring, a pruning phase),
    removed when training starts; the training bar with step, loss, lr, tokens/s, MFU, the held-out loss and
    the ETA. Where stderr is not a terminal (CI, a pipe) it prints a line every ``log_every`` steps instead.
    ``section`` starts a new part (a stage of ``nano demo``) with a rule and fresh bars.
    """

    def __init__(self, log_every: int = 10, quiet: bool = False):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bars

        self.out = Console(stderr=True, highlight=False, quiet=quiet)
        self.log_every = log_every
        self.bars = Bars(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                         TimeRemainingColumn(), console=self.out, transient=False)
        self.tasks: dict[str, int] = {}  # counted tasks by name
        self.train: int | None = None
        self.last_info, self.last_eval = "", ""

    def __enter__(self) -> Progress:
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self._drop_tasks()
        self.bars.stop()

    def _drop_tasks(self) -> None:
        for task in self.tasks.values():
            self.bars.remove_task(task)
        self.tasks.clear()

    def section(self, title: str) -> None:
        self._drop_tasks()
        if self.train is not None:
            self.bars.remove_task(self.train)
            self.train, self.last_info, self.last_eval = None, "", ""
        self.bars.console.rule(title)

    def status(self, message: str) -> None:
        self.bars.console.print(message, style="dim", markup=False)

    def progress(self, task: str, done: int, total: int) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.bars.add_task(task, total=total or None, info="")
        self.bars.update(self.tasks[task], completed=done, total=total or None)

    def start(self, start: int, total: int, info: dict) -> None:
        self._drop_tasks()
        self.status(f"training steps {start}..{total} on {info.get('device')} x {info.get('processes')}")
        self.train = self.bars.add_task("train", total=total, completed=start, info="")

    def step(self, m: dict) -> None:
        if "eval_loss" in m:
            self.last_eval = f" | held-out {m['eval_loss']:.3f}"
        if "loss" in m:
            rate = next(k for k in m if k.endswith("_per_s"))  # tokens_per_s; pairs_per_s (DPO); sequences_per_s
            unit = "tok" if rate == "tokens_per_s" else rate[:-len("_per_s")]
            fmt = ",.0f" if unit == "tok" else ",.1f"
            self.last_info = (f"loss {m['loss']:.4f} | lr {m['lr']:.2e} | {m[rate]:{fmt}} {unit}/s"
                              + (f" | MFU {100 * m['mfu']:.1f}%" if "mfu" in m else ""))
        info = self.last_info + self.last_eval
        if self.train is not None:
            self.bars.update(self.train, info=info, **({"completed": m["step"]} if "loss" in m else {}))
        if not self.out.is_terminal and "loss" in m and m["step"] % self.log_every == 0:
            self.out.print(f"step {m['step']}: {info}", markup=False)

    # the names the stages used before the Reporter protocol (removed once every stage reports through it)
    tokenize = progress
    update = progress


TrainProgress = Progress


# The measuring and compressing commands render in ui_stages (imported last: it uses the helpers above).
from .ui_stages import (  # noqa: E402
    DemoStage,
    PruneProgress,
    prune_table,
    show_bench,
    show_demo_result,
    show_eval_result,
    show_prune_plan,
    show_prune_result,
)

__all__ = ["DemoStage", "PruneProgress", "prune_table", "show_bench", "show_demo_result",
           "show_eval_result", "show_prune_plan", "show_prune_result"]
