"""Terminal rendering of ``nano eval``, ``nano distill`` and ``nano bench``. Takes results, prints them; computes nothing. The shared pieces (console, units, the
progress widget) are ``ui``'s; ``ui`` re-exports everything here."""

from __future__ import annotations

from rich import box
from rich.table import Table

from .summary import KINDS
from .ui import console, human_bytes, human_count


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
