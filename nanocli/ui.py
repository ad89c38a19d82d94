"""All terminal rendering of nano (rich tables). Takes results, prints them; computes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

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
