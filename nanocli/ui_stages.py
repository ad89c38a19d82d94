"""Terminal rendering of ``nano distill`` (until it moves to ``commands/distill.py``). Takes results, prints them;
computes nothing. The shared pieces (console, units, the progress widget) are ``ui``'s."""

from __future__ import annotations

from rich import box
from rich.table import Table

from .ui import console, human_bytes, human_count


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


