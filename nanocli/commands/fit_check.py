"""``nano fit-check``: will a model fit a GPU at a context and batch? Answered before loading anything.

The command: ``FitCheckOptions`` (the stage's) plus what only the command line asks for (``--json``, ``--plot``,
``--measure``); the call into ``stages/fit_check.py`` (and ``measure.py`` with ``--measure``); the rendering
(the terms with bars, the verdict, the largest values that fit, the measured table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from .. import settings, ui
from ..stages.fit_check import FitCheckOptions
from .flags import command
from .output import JsonOutput, emit

if TYPE_CHECKING:
    from ..measure import Measurement
    from ..stages.fit_check import FitCheckResult
    from ..stages.fit_gpu import GpuLimit

EXAMPLES = ["nano fit-check --gpu a10g",
            "nano fit-check -m nemotron-nano-9b-v2 --gpu 24GiB --context 128k --reserve 0",
            "nano fit-check -m nemotron-nano-12b-v2-base --gpu h100-80gb --context 1m --batch 4 --json",
            "nano fit-check -m runs/tiny-base/final --gpu auto --plot fit.png"]
PANELS = {"model": "Model", "dtype": "Model", "ssm_cache_dtype": "Model", "gpu": "GPU", "device_index": "GPU",
          "reserve": "GPU",
          "context": "Workload", "batch": "Workload", "prefill_chunk": "Workload", "attention": "Workload"}


@dataclass
class FitCheckOutput(JsonOutput):
    json: bool = False
    """Print one JSON object (bytes) for CI, on one line."""
    plot: str | None = None
    """Write memory vs context (hybrid vs all-attention, GPU limit) to this .png."""
    measure: bool = False
    """CUDA only: build the model with random weights on the GPU, prefill + decode, report measured peak memory."""


def register(app: typer.Typer) -> None:
    command(app, "fit-check", fit_check, FitCheckOptions, FitCheckOutput, examples=EXAMPLES, panels=PANELS)


def fit_check(given: dict, output: dict) -> None:
    """Check whether a model fits a GPU at a context and batch, before loading anything.

    Adds up the weights (exact from safetensors headers when present), the attention KV cache,
    the Mamba conv and SSM state, and the activation peak of a chunked prefill.
    Judges them against a GPU profile's budget (any case: A10G, h100, 4090), a memory size (24GiB, 24GB)
    or the local GPU's free memory (NVML, the default). Without --model: the released nemotron-nano-9b-v2,
    so `nano fit-check --gpu a10g` answers the report's question (128k tokens, bf16, one A10G).
    Shows every term, the verdict, the largest context, batch and prefill chunk that fit,
    and what the same model would need if every Mamba layer were attention.
    Never loads weights or imports torch (except --measure).
    Exit codes: 0 fits, 1 does not fit, 2 bad input.
    """
    from ..stages import fit_check as stage

    options, out = FitCheckOptions(**given), FitCheckOutput(**output)
    settings.validate(options, stage.FitCheckError)
    settings.validate(out, stage.FitCheckError)
    if out.measure:
        from .. import measure

        measure.require_cuda()  # before NVML / profile questions: say the real obstacle first
    result = stage.run(options)
    measured = None
    if out.measure:
        e = result.estimate
        measured = measure.run(result.model.config, context=e.context, batch=e.batch, dtype=e.dtype,
                               ssm_dtype=e.ssm_dtype, prefill_chunk=result.prefill_chunk,
                               device_index=options.device_index)
    from dataclasses import asdict

    from ..plot import plot_fit

    try:
        emit(result, json_out=out.wants_json, indent=out.json_indent, plot=out.plot, draw=plot_fit,
             show=lambda r, plot_path: show_fit_check(r, measured, plot_path),
             extra={"measured": None if measured is None else asdict(measured)})
    except BrokenPipeError:  # the reader stopped (`| head -c 10`): the exit code still gives the verdict
        pass
    raise typer.Exit(result.exit_code)


# ------------------------------------------------------------------------------------------ rendering
BAR_WIDTH = 16
KIND_LABEL = {"mamba": "Mamba-2", "attention": "attention", "mlp": "MLP", "logits": "final norm + logits"}


def bar(part: int, whole: int, width: int = BAR_WIDTH) -> str:
    """A text bar: ``part / whole`` of ``width`` cells, eighths for the last cell."""
    if whole <= 0 or part <= 0:
        return ""
    eighths = round(min(part / whole, 1.0) * width * 8)
    full, rest = divmod(max(eighths, 1), 8)
    return "█" * full + (" ▏▎▍▌▋▊▉"[rest] if rest else "")


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
    elif e.dtype == "int8":
        q = fit.matmul_params(c) + param_count(c).lm_head
        how = (f"{q:,} x 1 B + {fit.int8_rows(c) + fit.int8_cols(c):,} scales and divisors x 4 B + "
               f"{params - q:,} x 4 B (int8")
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
            ("framework + CUDA", g.framework, "dim", f"{g.framework_share:.0%} of {ui.gib(g.total)}"),]
    if g.source == "profile" or g.reserved:
        rows.append(("reserved", g.reserved, "dim", _reserved_why(g)))
    return rows


def _reserved_why(g: GpuLimit) -> str:
    """What the reservation is for: the profile's reason, or --reserve (naming what it replaced)."""
    if g.reserve_given:
        replaced = (f"; replaces the profile's {ui.gib(g.profile_reserved)} for {g.reserved_for}"
                    if g.profile_reserved else "")
        return f"--reserve{replaced}"
    return f"for {g.reserved_for} (profile; --reserve 0 frees it)" if g.reserved else "nothing (profile)"


FORMULA_KEY = ("KV = attention layers x 2 (K, V) x kv heads x head_dim x tokens x batch x bytes; "
               "conv = Mamba layers x (I + 2GN) channels x (kernel - 1) x batch x bytes; "
               "SSM = Mamba layers x heads x head_dim x state x batch x bytes.")


def fit_table(r: FitCheckResult) -> Table:
    g = r.gpu
    table = Table(title="Memory, term by term", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("term", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column(f"of {ui.gib(g.available)}", no_wrap=True, min_width=BAR_WIDTH)
    table.add_column("formula", overflow="fold", style="dim")
    for label, n, style, how in _fit_rows(r):
        color = "cyan" if style == "" else "white" if style == "bold" else "bright_black"
        table.add_row(f"[{style}]{label}[/{style}]" if style else label, f"[{style}]{ui.human_bytes(n)}[/{style}]"
                      if style else ui.human_bytes(n), f"[{color}]{bar(n, g.available)}[/{color}]", how,
                      end_section=label == "model total")
    return table


def activation_table(r: FitCheckResult) -> Table:
    a = r.estimate.activations
    table = Table(title=f"Activation peak {ui.human_bytes(a.total)} = hidden states + the largest layer working set, "
                  f"prefill chunk {a.chunk:,} x batch {r.estimate.batch}", title_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("layer", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("buffers", overflow="fold", style="dim")
    table.add_row("hidden states", ui.human_bytes(a.hidden), "residual stream + normed layer input (every layer)")
    for kind, parts in a.layers.items():
        label = KIND_LABEL[kind] + (" [bold](peak)[/bold]" if kind == a.peak_kind else "")
        table.add_row(label, ui.human_bytes(a.working_set(kind)),
                      " + ".join(f"{name} {ui.human_bytes(n)}" for name, n in parts.items()))
    return table


def _gpu_line(r: FitCheckResult) -> str:
    g = r.gpu
    reserved = f" - {ui.human_bytes(g.reserved)} reserved"
    if g.reserve_given:
        reserved += " (--reserve" + (f"; the profile keeps {ui.gib(g.profile_reserved)} for {g.reserved_for})"
                                     if g.profile_reserved else ")")
    elif g.reserved:
        reserved += f" for {g.reserved_for} (--reserve 0 frees it)"
    budget = f" = [bold]{ui.human_bytes(g.budget)}[/bold] for the model"
    if g.source == "profile":
        vendor = f" ({g.vendor_memory_gb:g} GB card)" if g.vendor_memory_gb else ""
        return (f"GPU: profile [bold]{g.name}[/bold]{vendor}: {ui.human_bytes(g.total)} - {g.framework_share:.0%} "
                f"framework ({ui.human_bytes(g.framework)}){reserved}{budget}")
    if g.source == "size":
        return (f"GPU: [bold]{g.name}[/bold] (a memory size, no profile): {ui.human_bytes(g.total)} - "
                f"{g.framework_share:.0%} framework ({ui.human_bytes(g.framework)}){reserved}{budget}")
    return (f"GPU {g.device_index}: [bold]{g.name}[/bold] (NVML {g.nvml_api}): {ui.human_bytes(g.total)} total, "
            f"{ui.human_bytes(g.available)} free - {g.framework_share:.0%} of total for the framework + CUDA context "
            f"({ui.human_bytes(g.framework)}){reserved if g.reserved or g.reserve_given else ''}{budget}")


def _solve_lines(r: FitCheckResult) -> list[str]:
    e, c, b = r.estimate, r.model.config, r.estimate.batch
    lines = []
    if e.weights > r.gpu.budget:
        lines.append(f"the weights alone ({ui.gib(e.weights)}) exceed the {ui.gib(r.gpu.budget)} budget: no context "
                     "or batch fits; a smaller dtype, a pruned model or a larger GPU is needed")
    if r.max_context is None:
        why = "no attention layers" if not c.count("attention") else "2^40 tokens still fit"
        lines.append(f"largest context at batch {b}: no limit from memory ({why})")
    elif r.max_context or r.smaller_chunks:
        lines.append(f"largest context at batch {b}: [bold]{r.max_context:,}[/bold] tokens" + _chunk_hint(r))
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
                     f"{ui.gib(r.all_attention)} at {e.context:,} tokens; the hybrid saves "
                     f"[bold]{ui.gib(r.all_attention - e.total)}[/bold]{fits_cf}")
    return lines


def _chunk_hint(r: FitCheckResult) -> str:
    """``; with --prefill-chunk 1024: 54,723 tokens, 512: 61,307, ...`` (--batch > 1, where a smaller chunk gains)."""
    if not r.smaller_chunks:
        return ""
    (c, n), rest = r.smaller_chunks[0], r.smaller_chunks[1:]
    return f"; with --prefill-chunk {c}: [bold]{n:,}[/bold] tokens" + "".join(f", {c}: {n:,}" for c, n in rest)


def show_fit_check(r: FitCheckResult, measured: Measurement | None = None, plot_path: str | None = None) -> None:
    """``nano fit-check``: the setting, the terms with bars, the verdict, the largest values that fit."""
    e, out = r.estimate, ui.console()
    t = r.model.tensors
    src = {"profile": "profile", "config": "config.json", "checkpoint": "checkpoint"}[r.model.kind]
    out.print(f"[bold]{r.model.name}[/bold] ({src}): {e.context:,} tokens x batch {e.batch}, {e.dtype} weights, "
              f"SSM state {e.ssm_dtype}, prefill chunk {r.prefill_chunk:,}, {e.attention} attention")
    if t:
        dtypes = ", ".join(f"{k} x{v}" for k, v in t.dtypes.items())
        out.print(f"checkpoint: {len(t.files)} safetensors file(s), headers only: {t.params:,} params stored as "
                  f"{dtypes} ({ui.human_bytes(t.stored_bytes)} on disk)")
    out.print(_gpu_line(r))
    out.print(fit_table(r))
    out.print(f"[dim]{FORMULA_KEY}[/dim]")
    out.print(activation_table(r))
    if r.fits:
        out.print(f"[bold green]FITS[/bold green]: the model needs {ui.gib(e.total)} of {ui.gib(r.gpu.budget)}; "
                  f"headroom [bold]{ui.gib(r.headroom)}[/bold] ({r.headroom_pct:.1f}%)")
    else:
        out.print(f"[bold red]DOES NOT FIT[/bold red]: the model needs {ui.gib(e.total)} of {ui.gib(r.gpu.budget)}; "
                  f"short by [bold]{ui.gib(-r.headroom)}[/bold] ({-r.headroom_pct:.1f}% over)")
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
                  title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, caption=Text(m.kernels_detail),
                  caption_justify="left")
    for name in ("", "estimate", "measured", "difference"):
        table.add_column(name, justify="left" if not name else "right", no_wrap=True)

    def row(label: str, est: int, got: int | None) -> None:
        diff = "" if got is None or not est else f"{100.0 * (got - est) / est:+.1f}%"
        table.add_row(label, ui.human_bytes(est), "-" if got is None else ui.human_bytes(got), diff)

    row("weights", e.weights, m.weights)
    row("caches (KV + conv + SSM)", e.cache, m.cache)
    row("peak (torch max_memory_allocated)", e.total, m.peak_allocated)
    row("torch max_memory_reserved", e.total, m.peak_reserved)
    row("NVML used (whole GPU, incl. CUDA context)", e.total, m.nvml_used)
    return table


# ---------------------------------------------------------------------------------------- generate


