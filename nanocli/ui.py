"""All terminal rendering of nano (rich tables). Takes results, prints them; computes nothing."""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from .profiles import GpuProfile
from .summary import KINDS, ModelSummary

GIB = 2**30


def console(stderr: bool = False) -> Console:
    """The stdout (or stderr) console (a fresh one, so tests and redirected output see the current streams)."""
    return Console(highlight=False, stderr=stderr)


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


def name_table(title: str, columns: Sequence[str]) -> Table:
    """A table of named rows: the bold ``name`` column, then right-aligned number columns."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("name", no_wrap=True, style="bold")
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    return table


def model_table(models: Sequence[ModelSummary], title: str = "Model profiles") -> Table:
    """One row per model: layers, M/-/* counts, parameters, bf16 weights, KV cache at 128k."""
    table = name_table(title, ("layers", "M/-/*", "params", "weights", "KV@128k"))
    for s in models:
        table.add_row(s.name, str(s.config.num_hidden_layers), layer_counts(s), human_count(s.params.total),
                      human_bytes(s.weight_bytes), human_bytes(s.kv_bytes))
    return table


def gpu_table(gpus: Sequence[GpuProfile]) -> Table:
    """One row per GPU: the vendor's memory, what CUDA reports, what the framework and other models keep, the
    budget left, bandwidth and the dense tensor rate (bf16; fp16 on a card without bf16)."""
    table = name_table("GPU profiles", ("vendor", "memory", "overhead", "reserved", "budget", "GB/s", "TFLOP/s"))
    for g in gpus:
        vendor = "-" if g.vendor_memory_gb is None else f"{g.vendor_memory_gb:g} GB"
        rate = f"{g.bf16_tflops:g}" if g.bf16 else f"{g.fp16_tflops:g} fp16"
        table.add_row(g.name, vendor, f"{g.memory_gib:.2f}", f"{g.framework_overhead:.0%}", f"{g.reserved_gib:.2f}",
                      f"{g.budget_gib:.2f}", f"{g.bandwidth_gbs:g}", rate)
    return table


def show_profiles(models: Sequence[ModelSummary], gpus: Sequence[GpuProfile]) -> None:
    """``nano profiles``: the model table, then the GPU table."""
    out = console()
    out.print(model_table(models))
    out.print("weights: bf16. KV@128k: bf16 K+V of every attention layer at 131,072 tokens, batch 1.")
    out.print()
    out.print(gpu_table(gpus))
    out.print("vendor: the marketed memory (GB = 10^9 bytes). memory, reserved, budget: GiB (2^30 bytes), memory "
              "as CUDA reports the total; budget = memory x (1 - overhead) - reserved: what weights + caches may "
              "use. TFLOP/s: dense bf16 tensor peak; fp16 where the card has no bf16.")




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
        self.bars.console.print(message, style="dim", markup=False, soft_wrap=True)  # one line, however long

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
