"""``nano info``: a model's architecture, its parameters per layer kind and its memory at 128k; with
``--kernels``, which GPU kernels this install runs."""

from __future__ import annotations

from dataclasses import dataclass

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from .. import settings, ui
from ..settings import flag
from ..summary import KINDS, ModelSummary
from .flags import command

EXAMPLES = ["nano info nemotron-nano-9b-v2", "nano info -m runs/tiny-base/final", "nano info --kernels"]


@dataclass
class InfoOptions(settings.Group):
    panel = "Model"
    target: str | None = flag(None, argument=True, metavar="MODEL")
    """A model directory (with config.json), a config.json or profile .yaml file, or a model profile name."""
    model: str | None = flag(None, aliases=("-m",))
    """The model, as a flag (the same as MODEL)."""
    kernels: bool = False
    """Say which GPU kernels nano runs on this machine (mamba-ssm's Triton scan/step, causal-conv1d's conv) and why
    any is missing; imports torch (a second or two)."""

    def check(self) -> None:
        if self.target is not None and self.model is not None:
            raise settings.OptionError(f"give the model once: {self.target} or --model {self.model}")
        if self.target is None and self.model is None and not self.kernels:
            raise settings.OptionError("give a model (a directory, config.json, profile .yaml or profile name), "
                                       "or --kernels")


def register(app: typer.Typer) -> None:
    command(app, "info", info, InfoOptions, examples=EXAMPLES, panels={"kernels": "Kernels"})


def info(given: dict) -> None:
    """Show a model's architecture, its parameters per layer kind and its memory at 128k context."""
    o = InfoOptions(**given)
    settings.validate(o)
    if (target := o.target or o.model) is not None:
        from ..summary import resolve_model

        show_model_info(resolve_model(target))
    if o.kernels:
        import torch

        from nanocli_model import kernels

        show_kernels(kernels.status("cuda"), torch.cuda.is_available())


def show_model_info(s: ModelSummary) -> None:
    """``nano info``: the architecture, then parameters per layer kind, then memory at 128k."""
    c, p, out = s.config, s.params, ui.console()
    out.print(f"[bold]{s.name}[/bold]" + (f": {s.description}" if s.description else ""))
    arch = Table(show_header=False, box=None, padding=(0, 2))
    arch.add_column(style="dim", no_wrap=True)
    arch.add_column(overflow="fold")
    arch.add_row("pattern", c.hybrid_override_pattern)
    arch.add_row("layers", f"{c.num_hidden_layers} (M/-/*: {ui.layer_counts(s)})")
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
        table.add_row(f"{label} ({letter})", str(n), f"{each:,}", f"{p.per_kind[kind]:,}", _percent(p.per_kind[kind], p.total))
    table.add_row("embedding", "", "", f"{p.embedding:,}", _percent(p.embedding, p.total))
    table.add_row("lm_head", "", "", f"{p.lm_head:,}" if p.lm_head else "tied", _percent(p.lm_head, p.total))
    table.add_row("final norm", "", "", f"{p.final_norm:,}", _percent(p.final_norm, p.total))
    table.add_row("[bold]total[/bold]", str(c.num_hidden_layers), "", f"[bold]{p.total:,}[/bold]",
                  ui.human_count(p.total), end_section=True)
    out.print(table)

    mem = Table(title=f"Memory at {s.context:,} tokens, batch 1", title_justify="left", box=box.SIMPLE_HEAD,
                show_edge=False)
    mem.add_column("part", no_wrap=True)
    mem.add_column("bytes", justify="right", no_wrap=True)
    mem.add_row("weights (bf16)", ui.human_bytes(s.weight_bytes))
    mem.add_row("KV cache (bf16)", ui.human_bytes(s.kv_bytes))
    mem.add_row(f"Mamba state (conv bf16, SSM {c.mamba_ssm_cache_dtype})", ui.human_bytes(s.state_bytes))
    mem.add_row("[bold]total[/bold]", f"[bold]{ui.human_bytes(s.weight_bytes + s.kv_bytes + s.state_bytes)}[/bold]")
    out.print(mem)


def show_kernels(status, gpu_visible: bool) -> None:
    """``nano info --kernels``: what CUDA tensors run with this install (kernels.KernelStatus), and why."""
    out = ui.console()
    out.print(Text(status.describe()))
    if not gpu_visible:
        out.print(Text("no CUDA GPU is visible here: on this machine every tensor runs the pure-PyTorch reference",
                       style="dim"))




def _percent(part: int, total: int) -> str:
    return f"{part / total:.1%}" if total else "-"

