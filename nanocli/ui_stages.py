"""Terminal rendering of the measuring and compressing commands: ``nano demo`` (the pipeline), ``nano distill``
and ``nano prune``. Takes results, prints them; computes nothing. The shared
pieces (console, units, the training progress bar) are ``ui``'s; ``ui`` re-exports everything here."""

from __future__ import annotations

from rich import box
from rich.table import Table

from .ui import TrainProgress, console, gib, human_bytes, human_count


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
