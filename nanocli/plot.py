"""Every PNG nano draws: ``nano fit-check --plot`` (memory vs context, hybrid vs all-attention, the GPU limit),
``nano eval --plot`` (accuracy vs thinking budget), ``nano bench --plot`` and a training run's ``loss.png``.

Axes that count steps or tokens have whole-number ticks; the y range is set from the data (a loss curve's
isolated spikes and non-finite values do not flatten it). matplotlib is imported here, lazily (Agg backend, no
display), only when a plot is asked for.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from nanocli_model import fit
from nanocli_model.errors import NanoError

from .stages.fit_check import FitCheckResult

if TYPE_CHECKING:
    from .bench_results import BenchResult
    from .stages.evaluate import EvalResult

GIB = 2**30


class PlotError(NanoError):
    """The plot cannot be written (bad path, matplotlib missing)."""


def _contexts(lo: int, hi: int, n: int = 160) -> list[int]:
    """``n`` context lengths spread evenly on a log scale from lo to hi."""
    ratio = (hi / lo) ** (1 / (n - 1))
    return sorted({max(1, round(lo * ratio**i)) for i in range(n)})


def _tick_label(n: int) -> str:
    return f"{n // 2**20}M" if n >= 2**20 else f"{n // 1024}k" if n >= 1024 else str(n)


def _token_label(x: float, _pos=None) -> str:
    """A whole token count for a linear axis: 512, 1,536, 8k (multiples of 1024 as k)."""
    n = int(round(x))
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


def _whole_ticks(axis, formatter=None) -> None:
    """Ticks at whole numbers only (steps, tokens), optionally labelled by ``formatter(x, pos)``."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))
    if formatter is not None:
        axis.set_major_formatter(FuncFormatter(formatter))


def loss_range(values: list[float], keep: list[float]) -> tuple[float, float]:
    """The y range of a loss plot: the finite ``values`` up to their 98th percentile (an isolated spike does not
    flatten the curve), always including every finite value of ``keep`` (the smoothed and held-out curves)."""
    finite = sorted(v for v in values if math.isfinite(v))
    kept = [v for v in keep if math.isfinite(v)]
    if not finite and not kept:
        return 0.0, 1.0
    top = finite[int(0.98 * (len(finite) - 1))] if finite else max(kept)
    lo, hi = min(finite + kept), max([top, *kept])
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    return max(0.0, lo - pad), hi + pad


def plot_fit(r: FitCheckResult, path: str | Path) -> Path:
    """Draw the model's memory vs context (hybrid and all-attention) against the GPU budget; save a PNG."""
    path = checked_png(path)
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, NullLocator

    c, e = r.model.config, r.estimate
    kw = dict(batch=e.batch, dtype=e.dtype, ssm_cache_dtype=e.ssm_dtype, prefill_chunk=r.prefill_chunk,
              attention=e.attention, weights=e.weights)
    top = max(4 * e.context, 2 * (r.max_context or 0), 2**15)
    xs = _contexts(1024, min(top, 2**24))
    hybrid = [fit.estimate(c, context=n, **kw) for n in xs]
    budget = r.gpu.budget / GIB

    fig, ax = plt.subplots(figsize=(8.5, 5.0), dpi=120)
    ax.axhspan(0, e.weights / GIB, color="#d9d9d9", alpha=0.6, lw=0, label=f"weights ({e.weights / GIB:.2f} GiB)")
    ax.plot(xs, [h.total / GIB for h in hybrid], color="#1f77b4", lw=2.4,
            label="hybrid (this model): weights + KV + Mamba state + activations")
    counterfactual = fit.all_attention(c)
    cf = [fit.all_attention_total(c, h, counterfactual) for h in hybrid]
    if cf[0] is not None:
        n_layers = c.count("attention") + c.count("mamba")
        ax.plot(xs, [v / GIB for v in cf], color="#d62728", lw=2.0, ls="--",
                label=f"all-attention counterfactual ({n_layers} attention layers, KV in each)")
    gpu_label = {"profile": f"{r.gpu.name} profile budget", "size": f"{r.gpu.name} budget"}.get(
        r.gpu.source, f"{r.gpu.name} (free, NVML)")
    ax.axhline(budget, color="black", lw=1.6, label=f"{gpu_label}: {budget:.2f} GiB")
    mark = "#2ca02c" if r.fits else "#ff7f0e"
    ax.axvline(e.context, color=mark, lw=1.2, ls=":")
    ax.plot([e.context], [e.total / GIB], "o", color=mark, ms=8, zorder=5,
            label=f"chosen: {e.context:,} tokens, batch {e.batch} -> {e.total / GIB:.2f} GiB ({r.verdict})")
    if r.max_context:
        ax.plot([r.max_context], [budget], "v", color="black", ms=7, zorder=5,
                label=f"largest context that fits: {r.max_context:,}")
    if r.all_attention_max_context:
        ax.plot([r.all_attention_max_context], [budget], "v", color="#d62728", ms=7, zorder=5,
                label=f"all-attention would fit: {r.all_attention_max_context:,}")

    ax.set_xscale("log", base=2)
    ticks = [2**k for k in range(10, 25) if xs[0] <= 2**k <= xs[-1]]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([_tick_label(t) for t in ticks])
    ax.set_xlim(xs[0], xs[-1])
    ymax = max(budget * 1.35, e.total / GIB * 1.15)
    ax.set_ylim(0, ymax)
    ax.set_xlabel(f"context length (tokens per sequence; batch {e.batch})")
    ax.set_ylabel("GPU memory (GiB)")
    ax.set_title(f"{r.model.name}: memory vs context ({e.dtype} weights, SSM state {e.ssm_dtype}, "
                 f"prefill chunk {r.prefill_chunk:,})", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.95)
    return _save(fig, plt, path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plots need matplotlib (pip install 'matplotlib>=3.7')") from None
    return plt


def checked_png(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise PlotError(f"--plot {path}: give a .png file name")
    if not path.parent.is_dir():
        raise PlotError(f"--plot {path}: folder {path.parent} does not exist")
    return path


def _save(fig, plt, path: Path) -> Path:
    """Lay out, write to a temporary name and rename (a reader never sees half a PNG); close the figure."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise PlotError(f"--plot {path}: cannot write ({err.strerror or err})") from None
    finally:
        plt.close(fig)
    return path


def plot_budget_sweep(result: EvalResult, path: str | Path) -> Path:
    """``nano eval --plot``: held-out accuracy vs thinking budget (the report's curve), with the unbudgeted
    reasoning-on and reasoning-off accuracies as reference lines."""
    path = checked_png(path)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    sweep, acc = result.sweep, result.accuracy
    if sweep:
        ax.plot([s.budget for s in sweep], [100 * s.accuracy for s in sweep], "o-", color="#1f77b4", lw=2,
                label="reasoning on, thinking budget")
        ax.set_xscale("log", base=2)
        ax.set_xticks([s.budget for s in sweep], [str(s.budget) for s in sweep])
        ax.minorticks_off()
    styles = {"think": ("#1f77b4", "reasoning on, no budget"), "no_think": ("#d62728", "reasoning off")}
    for mode, (color, label) in styles.items():
        if mode in acc:
            ax.axhline(100 * acc[mode].accuracy, color=color, ls="--", lw=1.2,
                       label=f"{label} ({100 * acc[mode].accuracy:.0f}%)")
    else:  # no sweep: the reference lines only, over no budget axis
        ax.set_xticks([])
    ax.set_xlabel("thinking budget (tokens)")
    ax.set_ylabel(f"held-out accuracy (%, {result.options.problems} problems)")
    ax.set_ylim(0, 100)
    model = Path(result.options.model)
    ax.set_title(f"nano eval: {model.parent.name + '/' if model.name == 'final' else ''}{model.name}: accuracy vs "
                 f"thinking budget (difficulty {result.options.difficulty})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, plt, path)


def plot_loss(metrics: list[dict], path: str | Path, title: str = "training loss") -> Path:
    """Training loss per step (raw and smoothed), held-out loss where evaluated, and the LR on a second axis."""
    plt = _pyplot()
    path = Path(path)
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=120)
    steps, losses = [m["step"] for m in train], [m["loss"] for m in train]
    ax.plot(steps, losses, color="#1f77b4", lw=0.8, alpha=0.35, label="train loss (per step)")
    smooth: list[float] = []
    if len(losses) >= 5:
        k = max(len(losses) // 25, 2)
        window = [[x for x in losses[max(0, i - k + 1):i + 1] if math.isfinite(x)] for i in range(len(losses))]
        smooth = [sum(w) / len(w) if w else math.nan for w in window]
        ax.plot(steps, smooth, color="#1f77b4", lw=2.0, label=f"train loss ({k}-step mean)")
    held = [m["eval_loss"] for m in evals]
    if evals:
        ax.plot([m["step"] for m in evals], held, "o-", color="#d62728", lw=1.5, label="held-out loss")
    ax.set_ylim(*loss_range(losses, smooth + held))
    first, last = min(steps + [m["step"] for m in evals]), max(steps + [m["step"] for m in evals])
    ax.set_xlim(first, max(last, first + 1))
    _whole_ticks(ax.xaxis)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"{title}: steps {first:,}-{last:,}", fontsize=10)
    ax.grid(alpha=0.3)
    if train and "lr" in train[0]:
        ax2 = ax.twinx()
        lrs = [m["lr"] for m in train]
        ax2.plot(steps, lrs, color="#7f7f7f", lw=1.0, ls="--", label="learning rate")
        ax2.set_ylim(0, max(lrs) * 1.05 if lrs and max(lrs) > 0 else 1)
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax2.set_ylabel("learning rate", color="#7f7f7f")
        ax2.tick_params(axis="y", colors="#7f7f7f")
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=8)
    else:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_bench(r: BenchResult, path: str | Path) -> Path:
    """``nano bench --plot``: output tokens/s per (prompt, output) pair, hybrid vs pure Transformer, with
    the ratio on top (left), and ms per decode step as the context grows (right)."""
    path = checked_png(path)
    plt = _pyplot()
    h, t = r.hybrid, r.transformer
    labels = [f"{p.prompt:,}:{p.output:,}" for p in r.pairs]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11.5, 4.8), dpi=120)
    width = 0.38 if t else 0.6
    xs = list(range(len(r.pairs)))
    hy = [p.hybrid.output_tokens_per_s for p in r.pairs]
    ax.bar([x - width / 2 if t else x for x in xs], hy, width, color="#1f77b4",
           label=f"hybrid {h.name} ({h.params / 1e6:.1f}M, {h.layers['attention']} attention layers)")
    if t:
        tr = [p.transformer.output_tokens_per_s for p in r.pairs]
        ax.bar([x + width / 2 for x in xs], tr, width, color="#d62728",
               label=f"pure Transformer twin ({t.params / 1e6:.1f}M, {t.layers['attention']} attention layers)")
        for x, p, a, b in zip(xs, r.pairs, hy, tr):
            ax.annotate(f"{p.ratio:.2f}x", (x, max(a, b)), xytext=(0, 4), textcoords="offset points",
                        ha="center", fontsize=9, fontweight="bold")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels)
    ax.set_xlabel("prompt : output tokens")
    ax.set_ylabel(f"output tokens / s (batch {r.batch}, prefill included)")
    ax.set_ylim(0, max(hy + ([p.transformer.output_tokens_per_s for p in r.pairs] if t else [])) * 1.18)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left", fontsize=7.5, framealpha=0.95)
    ax.set_title("generation throughput (medians)", fontsize=10)

    shades = plt.get_cmap("viridis")
    for i, p in enumerate(r.pairs):
        tone = 0.15 + 0.7 * i / max(1, len(r.pairs) - 1)
        ctx, ms = zip(*p.hybrid.ms_per_token) if p.hybrid.ms_per_token else ((), ())
        ax2.plot(ctx, ms, "o-", color="#1f77b4", alpha=0.45 + 0.55 * tone, ms=3.5, lw=1.6,
                 label="hybrid" if i == 0 else None)
        if p.transformer is not None and p.transformer.ms_per_token:
            ctx, ms = zip(*p.transformer.ms_per_token)
            ax2.plot(ctx, ms, "s--", color="#d62728", alpha=0.45 + 0.55 * tone, ms=3.5, lw=1.6,
                     label="pure Transformer" if i == 0 else None)
        ax2.axvline(p.prompt, color=shades(tone), lw=0.8, ls=":")
    _whole_ticks(ax2.xaxis, _token_label)
    ax2.set_xlabel("context (tokens in the cache; dotted: where each run's decode starts)")
    ax2.set_ylabel("ms per decode step")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    ax2.legend(loc="upper left", fontsize=8)
    ax2.set_title("time per output token as the context grows", fontsize=10)
    fig.suptitle(f"nano bench: {h.name} vs a pure-attention model of the same width and size "
                 f"({r.device}, {r.dtype}, {r.threads} thread(s))", fontsize=10.5)
    return _save(fig, plt, path)
