"""Terminal rendering of the measuring and compressing commands: ``nano eval``, ``nano demo`` (the pipeline),
``nano bench`` and ``nano prune``. Takes results, prints them; computes nothing. The shared
pieces (console, units, the training progress bar) are ``ui``'s; ``ui`` re-exports everything here."""

from __future__ import annotations

from rich import box
from rich.table import Table

from .summary import KINDS
from .ui import TrainProgress, console, gib, human_bytes, human_count


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


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def show_bench(r, plot_path: str | None = None) -> None:
    """``nano bench``: the models compared, throughput per (prompt, output) pair with the hybrid /
    Transformer ratio, cache bytes (memory.py's prediction and the allocated cache), and the time per
    output token as the context grows."""
    out = console()
    h, t = r.hybrid, r.transformer
    out.print(f"[bold]nano bench[/bold]: {h.name} ({h.source}) | {r.device} {r.dtype}, {r.threads} thread(s), "
              f"batch {r.batch} | {r.repeats} run(s) per model, interleaved, medians | kernels {r.kernels}"
              + (" | compiled decode" if r.decode == "compiled" else ""))
    if r.device != "cpu" and r.kernels_detail:  # on a GPU: which kernels ran, and why any other did not
        out.print(r.kernels_detail, style="dim", markup=False, highlight=False)
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
PruneProgress = TrainProgress


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
