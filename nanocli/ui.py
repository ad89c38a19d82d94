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
    from .measure import Measurement
    from .stages.fit_check import FitCheckResult

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


def human_bytes(n: float) -> str:
    """Binary units: ``17776721920`` -> ``16.56 GiB``; small sizes in MiB / KiB."""
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    for scale, unit in ((2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _layers(s: ModelSummary) -> str:
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
        table.add_row(s.name, str(s.config.num_hidden_layers), _layers(s), human_count(s.params.total),
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


def show_model_info(s: ModelSummary) -> None:
    """``nano info``: the architecture, then parameters per layer kind, then memory at 128k."""
    c, p, out = s.config, s.params, console()
    out.print(f"[bold]{s.name}[/bold]" + (f": {s.description}" if s.description else ""))
    arch = Table(show_header=False, box=None, padding=(0, 2))
    arch.add_column(style="dim", no_wrap=True)
    arch.add_column(overflow="fold")
    arch.add_row("pattern", c.hybrid_override_pattern)
    arch.add_row("layers", f"{c.num_hidden_layers} (M/-/*: {_layers(s)})")
    arch.add_row("hidden / vocab", f"{c.hidden_size} / {c.vocab_size}" + ("  (tied)" if c.tie_word_embeddings else ""))
    arch.add_row("MLP (relu2)", f"{c.intermediate_size}")
    arch.add_row("attention", f"{c.num_attention_heads} q / {c.num_key_value_heads} kv heads x {c.head_dim}")
    arch.add_row("Mamba-2", f"{c.mamba_num_heads} heads x {c.mamba_head_dim} (inner {c.mamba_intermediate_size}), "
                 f"{c.n_groups} groups, state {c.ssm_state_size}, conv {c.conv_kernel}, chunk {c.chunk_size}")
    out.print(arch)

    table = Table(title="Parameters", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for name in ("part", "layers", "each", "total", "share"):
        table.add_column(name, justify="left" if name == "part" else "right", no_wrap=True)
    counts = s.layer_counts
    for kind, label, letter in KINDS:
        n = counts[kind]
        each = p.per_kind[kind] // n if n else 0
        table.add_row(f"{label} ({letter})", str(n), f"{each:,}", f"{p.per_kind[kind]:,}", _share(p.per_kind[kind], p.total))
    table.add_row("embedding", "", "", f"{p.embedding:,}", _share(p.embedding, p.total))
    table.add_row("lm_head", "", "", f"{p.lm_head:,}" if p.lm_head else "tied", _share(p.lm_head, p.total))
    table.add_row("final norm", "", "", f"{p.final_norm:,}", _share(p.final_norm, p.total))
    table.add_row("[bold]total[/bold]", str(c.num_hidden_layers), "", f"[bold]{p.total:,}[/bold]",
                  human_count(p.total), end_section=True)
    out.print(table)

    mem = Table(title=f"Memory at {s.context:,} tokens, batch 1", title_justify="left", box=box.SIMPLE_HEAD,
                show_edge=False)
    mem.add_column("part", no_wrap=True)
    mem.add_column("bytes", justify="right", no_wrap=True)
    mem.add_row("weights (bf16)", human_bytes(s.weight_bytes))
    mem.add_row("KV cache (bf16)", human_bytes(s.kv_bytes))
    mem.add_row(f"Mamba state (conv bf16, SSM {c.mamba_ssm_cache_dtype})", human_bytes(s.state_bytes))
    mem.add_row("[bold]total[/bold]", f"[bold]{human_bytes(s.weight_bytes + s.kv_bytes + s.state_bytes)}[/bold]")
    out.print(mem)


def _share(part: int, total: int) -> str:
    return f"{part / total:.1%}" if total else "-"


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


# ---------------------------------------------------------------------------- nano fit-check
BAR_WIDTH = 16
KIND_LABEL = {"mamba": "Mamba-2", "attention": "attention", "mlp": "MLP", "logits": "final norm + logits"}


def bar(part: int, whole: int, width: int = BAR_WIDTH) -> str:
    """A text bar: ``part / whole`` of ``width`` cells, eighths for the last cell."""
    if whole <= 0 or part <= 0:
        return ""
    eighths = round(min(part / whole, 1.0) * width * 8)
    full, rest = divmod(max(eighths, 1), 8)
    return "█" * full + (" ▏▎▍▌▋▊▉"[rest] if rest else "")


def gib(n: float) -> str:
    """Always in GiB, two decimals (the unit of the verdict and the report)."""
    return f"{n / GIB:.2f} GiB"


def _fit_rows(r: FitCheckResult) -> list[tuple[str, int, str, str]]:
    """(term, bytes, style, formula) for every term of the estimate, then the GPU's overheads."""
    from nanocli_model import fit
    from nanocli_model.memory import dtype_bytes, param_count

    e, c, g, a = r.estimate, r.model.config, r.gpu, r.estimate.activations
    s, t, b = dtype_bytes(fit.compute_dtype(e.dtype)), r.model.tensors, e.batch
    params = t.params if t else param_count(c).total
    if e.dtype == "fp8":
        mm = fit.matmul_params(c)
        how = f"{mm:,} x 1 B + {params - mm:,} x 2 B (fp8"
    else:
        how = f"{params:,} x {dtype_bytes(e.dtype)} B ({e.dtype}"
    how += ", exact from headers)" if t else ")"
    n_a, n_m = c.count("attention"), c.count("mamba")
    rows = [("weights", e.weights, "", how),
            ("KV cache", e.kv, "", f"{n_a} x 2 x {c.num_key_value_heads} x {c.head_dim} x {e.context:,} x {b} x {s} B"
             if n_a else "no attention layers"),
            ("Mamba conv state", e.conv, "", f"{n_m} x {c.mamba_conv_dim:,} x {c.conv_kernel - 1} x {b} x {s} B"
             if n_m else "no Mamba layers"),
            ("Mamba SSM state", e.ssm, "", f"{n_m} x {c.mamba_num_heads} x {c.mamba_head_dim} x {c.ssm_state_size} x "
             f"{b} x {dtype_bytes(e.ssm_dtype)} B ({e.ssm_dtype})" if n_m else "no Mamba layers"),
            ("activations", a.total, "", f"{KIND_LABEL[a.peak_kind]} layer peak, chunk {a.chunk:,} x {b} (below)"),
            ("model total", e.total, "bold", ""),
            ("framework + CUDA", g.framework, "dim", f"{g.framework_share:.0%} of {gib(g.total)}"),]
    if g.source == "profile":
        rows.append(("reserved", g.reserved, "dim", "other models on the GPU (profile)"))
    return rows


FORMULA_KEY = ("KV = attention layers x 2 (K, V) x kv heads x head_dim x tokens x batch x bytes; "
               "conv = Mamba layers x (I + 2GN) channels x (kernel - 1) x batch x bytes; "
               "SSM = Mamba layers x heads x head_dim x state x batch x bytes.")


def fit_table(r: FitCheckResult) -> Table:
    g = r.gpu
    table = Table(title="Memory, term by term", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("term", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column(f"of {gib(g.available)}", no_wrap=True, min_width=BAR_WIDTH)
    table.add_column("formula", overflow="fold", style="dim")
    for label, n, style, how in _fit_rows(r):
        color = "cyan" if style == "" else "white" if style == "bold" else "bright_black"
        table.add_row(f"[{style}]{label}[/{style}]" if style else label, f"[{style}]{human_bytes(n)}[/{style}]"
                      if style else human_bytes(n), f"[{color}]{bar(n, g.available)}[/{color}]", how,
                      end_section=label == "model total")
    return table


def activation_table(r: FitCheckResult) -> Table:
    a = r.estimate.activations
    table = Table(title=f"Activation peak {human_bytes(a.total)} = hidden states + the largest layer working set, "
                  f"prefill chunk {a.chunk:,} x batch {r.estimate.batch}", title_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("layer", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("buffers", overflow="fold", style="dim")
    table.add_row("hidden states", human_bytes(a.hidden), "residual stream + normed layer input (every layer)")
    for kind, parts in a.layers.items():
        label = KIND_LABEL[kind] + (" [bold](peak)[/bold]" if kind == a.peak_kind else "")
        table.add_row(label, human_bytes(a.working_set(kind)),
                      " + ".join(f"{name} {human_bytes(n)}" for name, n in parts.items()))
    return table


def _gpu_line(r: FitCheckResult) -> str:
    g = r.gpu
    if g.source == "profile":
        return (f"GPU: profile [bold]{g.name}[/bold]: {human_bytes(g.total)} - {g.framework_share:.0%} framework "
                f"({human_bytes(g.framework)}) - {human_bytes(g.reserved)} reserved = "
                f"[bold]{human_bytes(g.budget)}[/bold] for the model")
    return (f"GPU {g.device_index}: [bold]{g.name}[/bold] (NVML {g.nvml_api}): {human_bytes(g.total)} total, "
            f"{human_bytes(g.available)} free - {g.framework_share:.0%} of total for the framework + CUDA context "
            f"({human_bytes(g.framework)}) = [bold]{human_bytes(g.budget)}[/bold] for the model")


def _solve_lines(r: FitCheckResult) -> list[str]:
    e, c, b = r.estimate, r.model.config, r.estimate.batch
    lines = []
    if e.weights > r.gpu.budget:
        lines.append(f"the weights alone ({gib(e.weights)}) exceed the {gib(r.gpu.budget)} budget: no context "
                     "or batch fits; a smaller dtype, a pruned model or a larger GPU is needed")
    if r.max_context is None:
        lines.append(f"largest context at batch {b}: no limit from memory (no attention layers)")
    elif r.max_context:
        lines.append(f"largest context at batch {b}: [bold]{r.max_context:,}[/bold] tokens")
    if r.max_batch:
        lines.append(f"largest batch at {e.context:,} tokens: [bold]{r.max_batch:,}[/bold]")
    if r.max_prefill_chunk >= e.context:
        lines.append(f"largest prefill chunk at {e.context:,} tokens: the whole prompt at once")
    elif r.max_prefill_chunk:
        lines.append(f"largest prefill chunk at {e.context:,} tokens, batch {b}: "
                     f"[bold]{r.max_prefill_chunk:,}[/bold] tokens")
    if r.all_attention is not None:
        n = c.count("attention") + c.count("mamba")
        cf = r.all_attention_max_context
        fits_cf = (f"; it fits at most {cf:,} tokens at batch {b}" if cf else
                   "" if cf is None or e.weights > r.gpu.budget else f"; it does not fit even 1 token at batch {b}")
        lines.append(f"all-attention counterfactual ({n} attention layers with KV, no Mamba state): needs "
                     f"{gib(r.all_attention)} at {e.context:,} tokens; the hybrid saves "
                     f"[bold]{gib(r.all_attention - e.total)}[/bold]{fits_cf}")
    return lines


def show_fit_check(r: FitCheckResult, measured: Measurement | None = None, plot_path: str | None = None) -> None:
    """``nano fit-check``: the setting, the terms with bars, the verdict, the largest values that fit."""
    e, out = r.estimate, console()
    t = r.model.tensors
    src = {"profile": "profile", "config": "config.json", "checkpoint": "checkpoint"}[r.model.kind]
    out.print(f"[bold]{r.model.name}[/bold] ({src}): {e.context:,} tokens x batch {e.batch}, {e.dtype} weights, "
              f"SSM state {e.ssm_dtype}, prefill chunk {r.prefill_chunk:,}, {e.attention} attention")
    if t:
        dtypes = ", ".join(f"{k} x{v}" for k, v in t.dtypes.items())
        out.print(f"checkpoint: {len(t.files)} safetensors file(s), headers only: {t.params:,} params stored as "
                  f"{dtypes} ({human_bytes(t.stored_bytes)} on disk)")
    out.print(_gpu_line(r))
    out.print(fit_table(r))
    out.print(f"[dim]{FORMULA_KEY}[/dim]")
    out.print(activation_table(r))
    if r.fits:
        out.print(f"[bold green]FITS[/bold green]: the model needs {gib(e.total)} of {gib(r.gpu.budget)}; "
                  f"headroom [bold]{gib(r.headroom)}[/bold] ({r.headroom_pct:.1f}%)")
    else:
        out.print(f"[bold red]DOES NOT FIT[/bold red]: the model needs {gib(e.total)} of {gib(r.gpu.budget)}; "
                  f"short by [bold]{gib(-r.headroom)}[/bold] ({-r.headroom_pct:.1f}% over)")
    for line in _solve_lines(r):
        out.print(line)
    for note in r.notes:
        out.print(f"[dim]note: {note}[/dim]")
    if plot_path:
        out.print(f"plot: {plot_path}")
    if measured is not None:
        out.print(measure_table(r, measured))


def measure_table(r: FitCheckResult, m: Measurement) -> Table:
    e = r.estimate
    table = Table(title=f"Measured on {m.device} ({m.kernels} kernels; prefill + decode {m.seconds:.1f} s)",
                  title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for name in ("", "estimate", "measured", "difference"):
        table.add_column(name, justify="left" if not name else "right", no_wrap=True)

    def row(label: str, est: int, got: int | None) -> None:
        diff = "" if got is None or not est else f"{100.0 * (got - est) / est:+.1f}%"
        table.add_row(label, human_bytes(est), "-" if got is None else human_bytes(got), diff)

    row("weights", e.weights, m.weights)
    row("caches (KV + conv + SSM)", e.cache, m.cache)
    row("peak (torch max_memory_allocated)", e.total, m.peak_allocated)
    row("torch max_memory_reserved", e.total, m.peak_reserved)
    row("NVML used (whole GPU, incl. CUDA context)", e.total, m.nvml_used)
    return table


# ---------------------------------------------------------------------------------------- generate
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
              f"{result.device} {result.dtype}", style="dim", markup=False)


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
class TrainProgress:
    """A rich progress bar for a training run: step, loss, lr, tokens/s, ETA; status lines above it.

    Used as the stage's hooks (``status``, ``progress`` for tokenization, ``start``, ``step``). On a
    terminal that is not interactive (CI, a pipe) it prints a line every ``log_every`` steps instead.
    """

    def __init__(self, log_every: int = 10, quiet: bool = False):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.out = Console(stderr=True, highlight=False, quiet=quiet)
        self.log_every = log_every
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=self.out, transient=False)
        self.task = None
        self.tok_task = None
        self.last_eval = ""

    def __enter__(self) -> TrainProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def status(self, message: str) -> None:
        self.progress.console.print(f"[dim]{message}[/]", markup=True)

    def tokenize(self, description: str, done: int, total: int) -> None:
        if self.tok_task is None:
            self.tok_task = self.progress.add_task("prepare", total=total or None, info=description)
        self.progress.update(self.tok_task, completed=done, total=total or None, info=description)

    def start(self, start: int, total: int, info: dict) -> None:
        if self.tok_task is not None:
            self.progress.remove_task(self.tok_task)
            self.tok_task = None
        self.status(f"training steps {start}..{total} on {info.get('device')} x {info.get('processes')}")
        self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def step(self, m: dict) -> None:
        if "eval_loss" in m:
            self.last_eval = f" | held-out {m['eval_loss']:.3f}"
        if "loss" in m:
            rate = next(k for k in m if k.endswith("_per_s"))  # tokens_per_s; pairs_per_s (DPO); sequences_per_s
            unit = "tok" if rate == "tokens_per_s" else rate[:-len("_per_s")]
            fmt = ",.0f" if unit == "tok" else ",.1f"
            self.last_info = (f"loss {m['loss']:.4f} | lr {m['lr']:.2e} | {m[rate]:{fmt}} {unit}/s"
                              + (f" | MFU {100 * m['mfu']:.1f}%" if "mfu" in m else ""))
        info = getattr(self, "last_info", "") + self.last_eval
        if "loss" in m:
            self.progress.update(self.task, completed=m["step"], info=info)
        else:
            self.progress.update(self.task, info=info)
        if not self.out.is_terminal and "loss" in m and m["step"] % self.log_every == 0:
            self.out.print(f"step {m['step']}: {info}", markup=False)


def show_pretrain_plan(plan: dict) -> None:
    """``nano pretrain --dry-run``: the resolved settings and the token/step plan."""
    out = console()
    t = Table(title="nano pretrain: plan (dry run)", box=box.SIMPLE_HEAVY, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model", f"{plan['model']} ({human_count(plan['parameters'])} parameters)")
    for name, spec in plan["data"].items():
        files = f", {spec['files']} files" if spec["kind"] == "files" else ""
        t.add_row(f"data: {name}", f"{spec['source']} ({spec['kind']}{files})")
    for i, p in enumerate(plan["phases"]):
        blend = ", ".join(f"{k} {100 * v:.0f}%" for k, v in p["blend"].items())
        t.add_row(f"phase {i + 1}", f"steps {p['steps'][0]}..{p['steps'][1]}: {blend}")
    t.add_row("steps", f"{plan['steps']:,} x {plan['tokens_per_step']:,} tokens = {human_count(plan['tokens'])} tokens")
    t.add_row("batch", f"{plan['global_batch']} sequences x {plan['seq_len']} tokens; micro-batch "
              f"{plan['micro_batch']} x {plan['accumulation']} accumulation x {plan['processes']} processes")
    s = plan["schedule"]
    ranges = ", ".join(f"{k} {v[0]}..{v[1]}" for k, v in s.items() if isinstance(v, list))
    t.add_row("schedule", f"{s['kind']}: lr {s['lr']:.2e} -> {s['min_lr']:.2e}; {ranges}")
    t.add_row("precision", plan["precision"])
    t.add_row("output", str(plan["out"]))
    out.print(t)


def show_pretrain_result(r) -> None:
    """The end-of-run summary: tokens, time, tokens/s, losses, peak memory, MFU, where things are."""
    out = console()
    if r.already_done:
        out.print(f"nothing to do: {r.final} already holds step {r.steps_done} of {r.resolved.steps}")
        return
    t = Table(title="nano pretrain: " + ("interrupted, checkpoint written" if r.interrupted else "done"),
              box=box.SIMPLE_HEAVY, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("steps", f"{r.start_step} -> {r.steps_done} of {r.resolved.steps}")
    t.add_row("tokens", f"{human_count(r.tokens)} in {r.seconds:,.1f} s = {r.tokens_per_s:,.0f} tokens/s")
    t.add_row("loss", f"{r.first_loss:.4f} -> {r.last_loss:.4f}")
    if r.eval:
        t.add_row("held-out", f"loss {r.eval['eval_loss']:.4f}, perplexity {r.eval['eval_ppl']:.2f}")
    t.add_row("peak memory", human_bytes(r.peak_memory_bytes))
    if r.mfu is not None:
        t.add_row("MFU", f"{100 * r.mfu:.1f}%")
    if r.fp8:
        t.add_row("fp8", f"{len(r.fp8['fp8'])} linear layers in FP8, {len(r.fp8['high_precision'])} kept in bf16")
    t.add_row("checkpoint", str(r.final))
    if r.plot:
        t.add_row("loss curve", str(r.plot))
    out.print(t)


def _pct(a: dict) -> str:
    return f"{100 * a['accuracy']:.1f}% ({a['correct']}/{a['n'] * a.get('samples', 1)})"


def _form(a: dict) -> str:
    return f"{a['formatted']}/{a['n'] * a.get('samples', 1)}"


def show_eval_result(r, plot_path: str | None = None) -> None:
    """``nano eval``: held-out accuracy per mode, the thinking-budget sweep, perplexity."""
    out = console()
    d = r.as_dict()
    p = d["problems"]
    if d["accuracy"] or d["budget_sweep"]:
        t = Table(title=f"nano eval: {r.options.model}", box=box.SIMPLE_HEAVY)
        for name in ("answers", "accuracy", "in form", "mean tokens"):
            t.add_column(name, justify="left" if name == "answers" else "right")
        for mode, a in d["accuracy"].items():
            label = {"think": "reasoning on", "no_think": "reasoning off", "text": "pretraining format"}[mode]
            t.add_row(label, _pct(a), _form(a),
                      f"{a['mean_tokens']:.1f}")
        for a in d["budget_sweep"]:
            t.add_row(f"thinking budget {a['budget']}", _pct(a), _form(a), f"{a['mean_tokens']:.1f}")
        out.print(t)
    if d["perplexity"]:
        pp = d["perplexity"]
        out.print(f"held-out text: loss {pp['loss']:.4f}, perplexity {pp['ppl']:.3f} ({pp['tokens']:,} tokens)")
    if d["accuracy"] or d["budget_sweep"]:
        how = "greedy" if p.get("samples", 1) == 1 else f"{p['samples']} samples each at temperature {p['temperature']}"
        out.print(f"problems: {p['n']} held-out (tasks {p['tasks']}, difficulty {p['difficulty']}, seed {p['seed']}), "
                  f"{how}; {human_count(d['params'])} parameters, {d['device']} {d['dtype']}, {d['seconds']:.1f} s")
    if plot_path:
        out.print(f"plot: {plot_path}")


class DemoStage:
    """One stage of ``nano demo``: a rule naming it, then its training progress bar."""

    def __init__(self, index: int, total: int, name: str, kind: str):
        self.index, self.total, self.name, self.kind = index, total, name, kind
        self.bar: TrainProgress | None = None

    def __enter__(self) -> TrainProgress:
        console().rule(f"[bold]stage {self.index}/{self.total}: {self.name}[/] (nano {self.kind})")
        self.bar = TrainProgress().__enter__()
        return self.bar

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def show_demo_result(r) -> None:
    """``nano demo``: one table over every stage's model, the budget sweep, fit-check, the sample answer."""
    out = console()
    out.rule("[bold]nano demo: summary")
    ctx = int(r.recipe.eval.get("context", 131072))
    ctx_label = f"{ctx // 1024}k" if ctx >= 1024 and ctx % 1024 == 0 else str(ctx)
    t = Table(title=f"every stage, measured the same way ({r.rows[0].accuracy.get('think', {}).get('n', 0)} "
              "held-out problems, greedy)", box=box.SIMPLE_HEAVY)
    for name, justify in (("model", "left"), ("params", "right"), (f"memory@{ctx_label}", "right"),
                          ("think", "right"), ("no think", "right"), ("tok/s", "right"), ("stage", "right")):
        t.add_column(name, justify=justify)
    times = {s.model: s for s in r.stages}
    for row in r.rows:
        st = times.get(row.path)
        acc = {m: f"{100 * a['accuracy']:.1f}%" for m, a in row.accuracy.items()}
        t.add_row(row.label, human_count(row.params), human_bytes(row.memory), acc.get("think", "-"),
                  acc.get("no_think", "-"), f"{row.tokens_per_s:,.0f}",
                  "" if st is None else (f"{st.seconds:,.0f} s" if st.status != "done before" else "earlier"))
    out.print(t)
    base = r.rows[0].text_accuracy if r.rows else None
    if base:
        out.print(f"base model asked in its pretraining format (Question:/Reasoning:/Answer:): "
                  f"{100 * base['accuracy']:.1f}%; through the chat template it has not learned yet: "
                  f"{100 * r.rows[0].accuracy.get('think', {}).get('accuracy', 0):.1f}%")
    if len(r.rows) >= 2:
        teacher = next((x for x in r.rows if "teacher" in x.label), None)
        final = r.rows[-1]
        if teacher and teacher.accuracy.get("think", {}).get("accuracy"):
            keep = final.accuracy["think"]["accuracy"] / teacher.accuracy["think"]["accuracy"]
            out.print(f"the distilled student keeps {100 * keep:.0f}% of the teacher's accuracy (reasoning on) with "
                      f"{100 * final.memory / teacher.memory:.0f}% of its memory at {ctx_label} tokens and "
                      f"{100 * final.params / teacher.params:.0f}% of its parameters")
    if r.sweep:
        out.print("final model, accuracy vs thinking budget: " + ", ".join(
            f"{a['budget']} tok {100 * a['accuracy']:.0f}%" for a in r.sweep))
    for f in r.fits:
        e = f.estimate
        out.print(f"fit-check {f.model.name} on {f.gpu.name} at {e.context:,} tokens: [bold]{f.verdict}[/] "
                  f"({gib(e.total)} of {gib(f.gpu.budget)})")
    if r.sample is not None:
        o = r.sample.outputs[0]
        out.print(f"nano generate: {r.sample_prompt!r}")
        if o.thinking:
            out.print(f"<think>{o.thinking}</think>", style="dim", markup=False)
        out.print(o.answer.strip(), markup=False)
    out.print(f"demo finished in {r.seconds / 60:.1f} min; artifacts in {r.recipe.out}/")


def show_align_result(r) -> None:
    """``nano align``: the plan (dry run) or what the run did, with held-out accuracy before and after."""
    out = console()
    o = r.options
    if r.dry_run:
        t = Table(title=f"nano align ({o.method}): plan (dry run)", box=box.SIMPLE_HEAVY, show_header=False)
        t.add_column(style="bold")
        t.add_column()
        t.add_row("examples", f"{r.examples:,} ({', '.join(f'{k} {v}' for k, v in r.data_stats.items() if v and k != 'errors')})")
        t.add_row("steps", f"{r.steps:,} x {o.global_batch}")
        out.print(t)
        return
    if r.already_done:
        out.print(f"nothing to do: {r.final} already holds step {r.steps_done} of {r.steps}")
        return
    t = Table(title=f"nano align ({o.method}): " + ("interrupted, checkpoint written" if r.interrupted else "done"),
              box=box.SIMPLE_HEAVY, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("steps", f"{r.start_step} -> {r.steps_done} of {r.steps} ({r.examples:,} examples, {r.seconds:,.1f} s)")
    t.add_row("loss", f"{r.first_loss:.4f} -> {r.last_loss:.4f}")
    for mode in ("think", "no_think"):
        if mode in r.after:
            a = r.after[mode]
            before = f"{100 * r.before[mode]['accuracy']:.1f}% -> " if mode in r.before else ""
            t.add_row(f"held-out accuracy ({mode})", f"{before}{100 * a['accuracy']:.1f}% of {a['n']}")
    if "after" in r.preference:
        b, a = r.preference.get("before", {}), r.preference["after"]
        t.add_row("held-out pairs: chosen > rejected",
                  (f"{100 * b['chosen_over_rejected']:.1f}% -> " if b else "") + f"{100 * a['chosen_over_rejected']:.1f}%")
    t.add_row("checkpoint", str(r.final))
    if r.plot:
        t.add_row("loss curve", str(r.plot))
    out.print(t)


def show_distill_result(r) -> None:
    """``nano distill``: the plan (dry run) or what the run did, with held-out CE and KL before and after."""
    out = console()
    if r.dry_run:
        p = r.resolved.describe()
        t = Table(title="nano distill: plan (dry run)", box=box.SIMPLE_HEAVY, show_header=False)
        t.add_column(style="bold")
        t.add_column()
        t.add_row("teacher", f"{p['teacher']} ({human_count(p['teacher_parameters'])} parameters, {p['teacher_dtype']})")
        t.add_row("student", f"{p['student']} ({human_count(p['student_parameters'])} parameters)")
        t.add_row("vocabulary", f"{p['vocab_size']:,} tokens, same tokenizer.json")
        t.add_row("loss", p["loss"] + (f"; top-k cache {p['teacher_cache']}" if p["teacher_cache"] else ""))
        for name, spec in p["data"].items():
            t.add_row(f"data: {name}", f"{spec['source']} ({spec['kind']})")
        t.add_row("steps", f"{p['steps']:,} x {p['tokens_per_step']:,} tokens = {human_count(p['tokens'])} tokens")
        t.add_row("batch", f"{p['global_batch']} sequences x {p['seq_len']} tokens; micro-batch "
                  f"{p['micro_batch']} x {p['accumulation']} accumulation x {p['processes']} processes")
        s = p["schedule"]
        ranges = ", ".join(f"{k} {v[0]}..{v[1]}" for k, v in s.items() if isinstance(v, list))
        t.add_row("schedule", f"{s['kind']}: lr {s['lr']:.2e} -> {s['min_lr']:.2e}; {ranges}")
        t.add_row("precision", f"student {p['precision']}, teacher {p['teacher_dtype']}")
        t.add_row("output", str(p["out"]))
        out.print(t)
        return
    if r.already_done:
        out.print(f"nothing to do: {r.final} already holds step {r.steps_done} of {r.resolved.steps}")
        return
    t = Table(title="nano distill: " + ("interrupted, checkpoint written" if r.interrupted else "done"),
              box=box.SIMPLE_HEAVY, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("steps", f"{r.start_step} -> {r.steps_done} of {r.resolved.steps}")
    t.add_row("tokens", f"{human_count(r.tokens)} in {r.seconds:,.1f} s = {r.tokens_per_s:,.0f} tokens/s")
    t.add_row("loss", f"{r.first_loss:.4f} -> {r.last_loss:.4f} (last step: KD {r.last_kd:.4f}, CE {r.last_ce:.4f})")
    for key, label in (("eval_kl", "held-out KL to teacher"), ("eval_loss", "held-out CE")):
        if key in r.eval:
            before = f"{r.before[key]:.4f} -> " if key in r.before else ""
            t.add_row(label, f"{before}{r.eval[key]:.4f}")
    if r.teacher_cache:
        c = r.teacher_cache
        t.add_row("teacher top-k cache", f"{c['hits']} windows read, {c['misses']} computed ({c['path']})")
    t.add_row("peak memory", human_bytes(r.peak_memory_bytes))
    if r.mfu is not None:
        t.add_row("MFU", f"{100 * r.mfu:.1f}%")
    t.add_row("checkpoint", str(r.final))
    if r.plot:
        t.add_row("loss curve", str(r.plot))
    out.print(t)


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def show_bench(r, plot_path: str | None = None) -> None:
    """``nano bench``: the models compared, throughput per (prompt, output) pair with the hybrid /
    Transformer ratio, cache bytes (memory.py's prediction and the allocated cache), and the time per
    output token as the context grows."""
    out = console()
    h, t = r.hybrid, r.transformer
    out.print(f"[bold]nano bench[/bold]: {h.name} ({h.source}) | {r.device} {r.dtype}, {r.threads} thread(s), "
              f"batch {r.batch} | {r.repeats} run(s) per model, interleaved, medians | kernels {r.kernels}")
    models = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for name, justify in (("model", "left"), ("pattern", "left"), ("M/-/*", "right"), ("parameters", "right"),
                          ("KV / token", "right"), ("Mamba state / seq", "right")):
        models.add_column(name, justify=justify, overflow="fold")
    for m in r.models:
        diff = "" if m is h else f" ({100 * (m.params - h.params) / h.params:+.2f}%)"
        models.add_row(m.role, m.pattern, "/".join(str(m.layers[k]) for k, _, _ in KINDS), f"{m.params:,}{diff}",
                       human_bytes(m.kv_bytes_per_token), human_bytes(m.state_bytes_per_sequence))
    out.print(models)

    table = Table(title="Generation throughput", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  caption="tokens per second; output/s = output tokens / (prefill + decode time); ratio = hybrid "
                  "/ transformer output/s; cache = the HybridCache allocated for in + out tokens",
                  caption_justify="left")
    for name in ("in:out", "model", "batch", "prefill/s", "decode/s", "output/s", "ratio", "cache"):
        table.add_column(name, justify="left" if name in ("in:out", "model") else "right", no_wrap=True)
    mismatch = []
    for p in r.pairs:
        for m in (p.hybrid, p.transformer):
            if m is None:
                continue
            if m.cache_predicted["total"] != m.cache_measured:
                mismatch.append(f"{p.prompt}:{p.output} {m.role}: memory.py predicts "
                                f"{m.cache_predicted['total']:,} B, allocated {m.cache_measured:,} B")
            table.add_row(f"{p.prompt}:{p.output}" if m is p.hybrid else "", m.role, str(m.batch),
                          f"{m.prefill_tokens_per_s:,.0f}", f"{m.decode_tokens_per_s:,.1f}",
                          f"{m.output_tokens_per_s:,.1f}", _ratio(p.ratio) if m is p.hybrid else "",
                          human_bytes(m.cache_measured))
    out.print(table)
    out.print("cache bytes: " + ("; ".join(mismatch) if mismatch else "allocated = memory.py's prediction, "
                                 "byte for byte, for every row"), style="dim" if not mismatch else "bold red")

    tpot = Table(title="Time per output token as the context grows (ms per decode step, medians)",
                 title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for name in ("in:out", "context", "hybrid ms", *(("transformer ms", "transformer / hybrid") if t else ())):
        tpot.add_column(name, justify="left" if name == "in:out" else "right")
    for p in r.pairs:
        for i, (ctx, ms) in enumerate(p.hybrid.ms_per_token):
            row = [f"{p.prompt}:{p.output}" if i == 0 else "", f"{ctx:,}", f"{ms:.2f}"]
            if p.transformer is not None:
                tms = p.transformer.ms_per_token[i][1]
                row += [f"{tms:.2f}", f"{tms / ms:.2f}x"]
            tpot.add_row(*row)
    out.print(tpot)
    load = (f"load average {r.load_before[0]:.2f} before, {r.load_after[0]:.2f} after"
            if r.load_before and r.load_after else "load average unknown")
    out.print(f"{r.seconds:,.0f} s in all; {load}; torch {r.torch_version}, {r.machine}", style="dim")
    for note in r.notes:
        out.print(f"note: {note}", style="dim")
    if plot_path:
        out.print(f"plot: {plot_path}")


# ---------------------------------------------------------------------------------------- pruning
class PruneProgress:
    """``nano prune``'s hooks: status lines and one progress bar per phase (tokenize, importance, depth, ...)."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.out = Console(stderr=True, highlight=False)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.out, transient=True)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> PruneProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def status(self, message: str) -> None:
        self.progress.console.print(f"[dim]{message}[/]", markup=True)

    def update(self, description: str, done: int, total: int) -> None:
        if description not in self.tasks:
            self.tasks[description] = self.progress.add_task(description, total=total or None)
        self.progress.update(self.tasks[description], completed=done, total=total or None)


def _prune_shape_cells(c) -> list[str]:
    s = c.shape
    return [f"{s.num_layers}", f"{s.num_attention_layers}", f"{s.hidden_size}", f"{s.ffn_hidden_size}",
            f"{s.mamba_num_heads}x{s.mamba_head_dim}", f"{s.num_attention_heads}/{s.num_query_groups}"]


def prune_table(candidates, budget, title: str, scored: bool) -> Table:
    """The search table: shape, parameters, memory at the target context, proxy and distilled scores."""
    t = Table(title=title, box=box.SIMPLE_HEAVY)
    for name in ("", "layers", "attn", "hidden", "ffn", "mamba", "q/kv", "params"):
        t.add_column(name, justify="right")
    if budget.kind == "memory":
        t.add_column(f"memory @ {budget.context:,}", justify="right")
    if scored:
        t.add_column("proxy KL", justify="right")
        t.add_column("LM loss", justify="right")
        t.add_column("KL after distill", justify="right")
    for i, c in enumerate(candidates, 1):
        row = [("* " if c.chosen else "") + str(i), *_prune_shape_cells(c),
               human_count(c.params) if budget.kind == "memory" else f"{c.params:,}"]
        if budget.kind == "memory":
            row.append(budget.describe(c.value))
        if scored:
            row += [f"{c.proxy:.4f}" if c.proxy is not None else "", f"{c.lm_loss:.4f}" if c.lm_loss is not None else "",
                    f"{c.distilled:.4f}" if c.distilled is not None else "-"]
        t.add_row(*row)
    return t


def _prune_space_lines(r) -> list[str]:
    sp, b = r.space, r.budget
    lines = [f"budget: {b.describe(b.limit)} ({b.source}) for weights + KV + Mamba state + activations at "
             f"{b.context:,} tokens, batch {b.batch}, {b.dtype}" if b.kind == "memory" else
             f"budget: {b.describe(b.limit)} ({b.source})",
             f"search space: {sp.total:,} shapes; {sp.fitting:,} fit; {len(sp.frontier):,} on the frontier "
             f"(no fitting shape is larger on every axis); layer patterns: {sp.pattern_source}",
             f"smallest reachable: {b.describe(sp.smallest.value)} ({sp.smallest.shape.label()})"]
    a = sp.axes
    lines.append(f"axes: depth {sorted({n for n, _ in a.depth})} x attention layers {sorted({x for _, x in a.depth})}, "
                 f"hidden {a.hidden_size[0]}..{a.hidden_size[-1]} ({len(a.hidden_size)}), "
                 f"ffn {a.ffn_hidden_size[0]}..{a.ffn_hidden_size[-1]} ({len(a.ffn_hidden_size)}), "
                 f"mamba heads {a.mamba_num_heads}")
    return lines


def show_prune_plan(r, rows: int = 15) -> None:
    """``nano prune --dry-run``: the parent, the budget, the search space and its largest fitting shapes."""
    out = console()
    p = r.parent
    out.print(f"nano prune (dry run): {r.parent_name}: {p.num_hidden_layers} layers "
              f"({p.count('mamba')} Mamba-2 / {p.count('mlp')} MLP / {p.count('attention')} attention), hidden "
              f"{p.hidden_size}, ffn {p.intermediate_size}, mamba {p.mamba_num_heads}x{p.mamba_head_dim}")
    if r.space is None:
        c = r.chosen
        out.print(f"target: {c.shape.label()}; {c.params:,} parameters; {gib(c.value)} at "
                  f"{r.options.context:,} tokens (heaviest layer mix {c.pattern})")
        return
    for line in _prune_space_lines(r):
        out.print(line)
    shown = r.space.frontier[:rows]
    out.print(prune_table(shown, r.budget, f"largest fitting shapes ({len(shown)} of {len(r.space.frontier)} on "
                          "the frontier, by memory; no scores in a dry run)", scored=False))


def show_prune_result(r) -> None:
    """The end of ``nano prune``: the search table (budget runs), the chosen shape, where things went."""
    out = console()
    if r.space is not None:
        for line in _prune_space_lines(r):
            out.print(line)
        out.print(prune_table(r.candidates, r.budget, "candidates scored (proxy: KL to the parent on held-out "
                              "calibration rows; * kept)", scored=True))
    c = r.chosen
    out.print(f"pruned: {c.shape.label()} pattern {c.pattern}; {c.params:,} parameters "
              f"({100 * c.params / max(1, _params(r.parent)):.1f}% of the parent)")
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items())
    scores = f"; scores {'reused from' if r.scores_reused else 'saved to'} {r.scores_path}" if r.scores_path else ""
    out.print(f"checkpoint: {r.out} (pruning.json beside the weights){scores}")
    out.print(f"time: {timing}", style="dim")


def _params(config) -> int:
    from nanocli_model.memory import param_count

    return param_count(config).total
