"""``nano eval``, ``nano distill``, ``nano bench`` and ``nano prune``: the measuring and compressing commands,
registered on ``cli.app`` by ``cli`` (``COMMANDS``). Thin typer commands, as in ``cli``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def eval_command(
    model: Annotated[str, typer.Option("--model", "-m", help="A NemotronH checkpoint directory.")],
    problems: Annotated[int, typer.Option("--problems", "-n", help="Held-out synthetic problems per mode and "
                                          "budget (0: accuracy off).")] = 100,
    mode: Annotated[str, typer.Option("--mode", help="both, think or no_think.")] = "both",
    prompt_format: Annotated[str, typer.Option("--prompt-format", help="chat (the model's template) or text "
                                               "(the pretraining format, for a base model).")] = "chat",
    budgets: Annotated[str | None, typer.Option("--budgets", help="Thinking budgets to sweep, e.g. "
                                                "8,16,32,64.")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="Synthetic tasks, comma-separated (default: all).")] = None,
    difficulty: Annotated[str, typer.Option("--difficulty", help="A level 1..5 or a range lo-hi.")] = "1-3",
    data: Annotated[str | None, typer.Option("--data", help="Held-out text for perplexity (a --data spec; "
                                             "synthetic: uses its held-out split).")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Perplexity window in tokens.")] = 512,
    ppl_tokens: Annotated[int, typer.Option("--ppl-tokens", help="Tokens scored for perplexity at most.")] = 65536,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Per answer.")] = 256,
    samples: Annotated[int, typer.Option("--samples", help="Completions per problem (1: greedy; more: sampled "
                                         "at --temperature, scored as the mean exact-answer reward).")] = 1,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature with --samples.")] = 0.0,
    batch: Annotated[int, typer.Option("--batch", help="Problems generated together.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Which held-out problems.")] = 1234,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, bf16, fp16 or fp32.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the JSON to this file.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Accuracy vs thinking budget, as a PNG.")] = None,
) -> None:
    """Held-out accuracy on the built-in reasoning tasks (reasoning on / off, a thinking-budget sweep), and
    perplexity on held-out text. Greedy; problems from the held-out split, never seen in training."""
    import json

    from . import ui
    from .stages import evaluate as ev

    options = ev.EvalOptions(model=model, problems=problems, tasks=tasks, difficulty=difficulty,
                             modes=ev.parse_modes(mode), prompt_format=prompt_format, budgets=ev.parse_budgets(budgets), data=data,
                             seq_len=seq_len, ppl_tokens=ppl_tokens, max_new_tokens=max_new_tokens, batch=batch,
                             samples=samples, temperature=temperature,
                             seed=seed, device=device, dtype=dtype)
    if out is not None and not out.parent.is_dir():
        raise ev.EvalError(f"--out {out}: folder {out.parent} does not exist")
    if plot is not None:
        from .plot import checked_png

        checked_png(plot)  # a bad path fails before the work, not after
    with ui.console().status("evaluating") as spinner:
        result = ev.run(options, ev.Hooks(status=lambda msg: spinner.update(msg)))
    record = result.as_dict()
    if out is not None:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(out)
    if plot is not None:
        from .plot import plot_budget_sweep

        plot_budget_sweep(record, plot)
    if json_out:
        typer.echo(json.dumps(record))
    else:
        ui.show_eval_result(result, str(plot) if plot else None)



def distill_command(
    teacher: Annotated[str | None, typer.Option("--teacher", help="The teacher: a NemotronH directory "
                                                "(frozen).")] = None,
    student: Annotated[str | None, typer.Option("--student", help="The student: a NemotronH directory with "
                                                "the same tokenizer (e.g. pruned).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Data spec as for pretrain; SOURCE@WEIGHT;... "
                                             "blends (the report mixed pretraining and reasoning data).")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Run directory (checkpoints, metrics, plot).")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Settings YAML (profiles/recipes/ name or "
                                               "path); flags override it.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", help="Training tokens (instead of --steps).")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence.")] = None,
    global_batch: Annotated[int | None, typer.Option("--global-batch", help="Sequences per step, all "
                                                     "processes.")] = None,
    micro_batch: Annotated[int | None, typer.Option("--micro-batch", help="Sequences per forward per "
                                                    "process.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="Student: fp32, bf16 (default) or "
                                                  "fp8.")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="KD temperature T (loss x T^2; "
                                                      "default 1).")] = None,
    kd_kind: Annotated[str | None, typer.Option("--kd-kind", help="forward KL(teacher||student) (default) or "
                                                "reverse.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="KD on the teacher's top-k tokens only "
                                              "(renormalised).")] = None,
    kd_ratio: Annotated[float | None, typer.Option("--kd-ratio", help="Weight of KD vs cross-entropy (1: KD "
                                                   "only, the default; 0: plain CE).")] = None,
    kd_chunk: Annotated[int | None, typer.Option("--kd-chunk", help="Token rows per chunk of the fused "
                                                 "loss.")] = None,
    teacher_dtype: Annotated[str | None, typer.Option("--teacher-dtype", help="auto, fp32, bf16 or "
                                                      "fp16.")] = None,
    teacher_device: Annotated[str | None, typer.Option("--teacher-device", help="auto (the student's), cpu "
                                                       "or cuda.")] = None,
    teacher_cache: Annotated[str | None, typer.Option("--teacher-cache", help="Directory caching the "
                                                      "teacher's top-k logits per window (with --top-k).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    min_lr: Annotated[float | None, typer.Option("--min-lr", help="LR at the end of the decay.")] = None,
    schedule: Annotated[str | None, typer.Option("--schedule", help="cosine (default), wsd or constant.")] = None,
    warmup: Annotated[float | None, typer.Option("--warmup", help="Warmup: fraction (<1) or steps.")] = None,
    decay: Annotated[float | None, typer.Option("--decay", help="WSD decay: fraction (<1) or steps.")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help="AdamW weight decay.")] = None,
    grad_clip: Annotated[float | None, typer.Option("--grad-clip", help="Max gradient norm (0: off).")] = None,
    heldout_fraction: Annotated[float | None, typer.Option("--heldout-fraction", help="Share of the data "
                                                           "kept for held-out CE and KL.")] = None,
    eval_batches: Annotated[int | None, typer.Option("--eval-batches", help="Held-out batches per "
                                                     "evaluation.")] = None,
    eval_every: Annotated[int | None, typer.Option("--eval-every", help="Held-out CE/KL every N steps.")] = None,
    save_every: Annotated[int | None, typer.Option("--save-every", help="Checkpoint every N steps.")] = None,
    keep_last: Annotated[int | None, typer.Option("--keep-last", help="checkpoint-* dirs to keep.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed (data order).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")] = None,
    parallel: Annotated[str | None, typer.Option("--parallel", help="ddp or fsdp (under torchrun).")] = None,
    on_nan: Annotated[str | None, typer.Option("--on-nan", help="stop (default) or skip the step.")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="auto (newest checkpoint in --out) or a "
                                               "checkpoint directory.")] = None,
    cache_dir: Annotated[str | None, typer.Option("--cache-dir", help="Token shard cache (default "
                                                  "$NANO_CACHE or ~/.cache/nano).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the pair, print the plan and exit.")] = False,
) -> None:
    """Distill a frozen teacher into a student: forward KL over the full vocabulary at T=1 (the report's).

    Output as `nano pretrain`: OUT/checkpoint-N, OUT/final (HF NemotronH + tokenizer), metrics.jsonl (loss,
    kd, ce per step), loss.png; held-out CE and KL to the teacher before and after. Ctrl-C writes a checkpoint.
    """
    import os

    from . import ui
    from .stages import distill as ds

    flags = dict(teacher=teacher, student=student, data=data, out=out, steps=steps, tokens=tokens, seq_len=seq_len,
                 global_batch=global_batch, micro_batch=micro_batch, precision=precision, temperature=temperature,
                 kd_kind=kd_kind, top_k=top_k, kd_ratio=kd_ratio, kd_chunk=kd_chunk, teacher_dtype=teacher_dtype,
                 teacher_device=teacher_device, teacher_cache=teacher_cache, lr=lr, min_lr=min_lr,
                 schedule=schedule, warmup=warmup, decay=decay, weight_decay=weight_decay, grad_clip=grad_clip,
                 heldout_fraction=heldout_fraction, eval_batches=eval_batches, eval_every=eval_every,
                 save_every=save_every, keep_last=keep_last, seed=seed, device=device, parallel=parallel,
                 on_nan=on_nan, resume=resume, cache_dir=cache_dir, dry_run=dry_run or None)
    options = ds.make_options(recipe, flags)
    resolved = ds.resolve(options)  # the checks before any work fail here, before the progress bar starts
    if options.dry_run:
        ui.show_distill_result(ds.DistillResult(resolved=resolved, dry_run=True))
        return
    quiet = int(os.environ.get("RANK", "0")) != 0
    with ui.TrainProgress(quiet=quiet) as bar:
        hooks = ds.Hooks(status=bar.status, progress=bar.tokenize, start=bar.start, step=bar.step)
        result = ds.run(options, hooks)
    if not quiet:
        ui.show_distill_result(result)


def bench_command(
    model: Annotated[str | None, typer.Option("--model", "-m", help="A NemotronH checkpoint directory, or a "
                                              "model profile name (random weights: speed does not depend on "
                                              "their values).")] = None,
    compare_transformer: Annotated[bool, typer.Option("--compare-transformer/--no-compare-transformer",
                                                      help="Also run a pure-attention model of the same hidden "
                                                      "size and about the same parameters; report the "
                                                      "ratio.")] = True,
    lengths: Annotated[str | None, typer.Option("--lengths", help="PROMPT:OUTPUT pairs, e.g. 512:1024,1024:2048 "
                                                "or 8k:16k (default: 512:1024,1024:2048,2048:4096 on CPU; "
                                                "1024:2048,8k:16k on CUDA).")] = None,
    batch: Annotated[str, typer.Option("--batch", help="Sequences per run, or 'max' (CUDA: the largest batch "
                                       "that fits, per model and pair, from nano's memory model).")] = "1",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or "
                                       "fp16.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads (the house figures use 1; "
                                                "default: torch's).")] = None,
    repeats: Annotated[int | None, typer.Option("--repeats", help="Timed runs per model and pair, interleaved "
                                                "(default 3; 1 with --quick).")] = None,
    prefill_chunk: Annotated[int, typer.Option("--prefill-chunk", help="Prompt tokens per forward.")] = 2048,
    seed: Annotated[int, typer.Option("--seed", help="Random weights and prompt ids.")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run: 64:128, one repeat.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write tokens/s per pair and ms per output "
                                              "token vs context to this .png.")] = None,
    compile_decode: Annotated[bool, typer.Option("--compile", help="Decode through torch.compile'd steps (as "
                                                 "nano generate --compile), compiled before the timing.")] = False,
) -> None:
    """Generation throughput of a model, and the report's hybrid-vs-Transformer comparison.

    Prefills a random prompt and decodes OUTPUT tokens (greedy, EOS ignored) through nano's cached
    generator, for every PROMPT:OUTPUT pair; with --compare-transformer (default) the same for a
    pure-attention twin built by nano (same hidden size and vocabulary, attention + MLP layers only,
    parameters within 5%). Runs alternate hybrid, twin, hybrid, twin; the table gives medians: prefill,
    decode and output tokens/s, the hybrid/Transformer ratio, cache bytes (predicted by memory.py and
    really allocated) and ms per output token as the context grows.
    """
    from . import bench

    if model is None:
        raise bench.BenchError("--model is required: a NemotronH checkpoint directory or a model profile name "
                               "(see `nano profiles`)")
    options = bench.BenchOptions(model=model, compare_transformer=compare_transformer, lengths=lengths,
                                 batch=batch, device=device, dtype=dtype, threads=threads, repeats=repeats,
                                 quick=quick, prefill_chunk=prefill_chunk, seed=seed,
                                 plot=None if plot is None else str(plot), compile=compile_decode)
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    result = bench.run(options, bench.BenchHooks(status=lambda m: err.print(m, style="dim", markup=False)))
    plot_path = None
    if plot is not None:
        from .plot import plot_bench

        plot_path = str(plot_bench(result, plot))
    if json_out:
        import json

        data = result.to_json()
        data["plot"] = plot_path
        typer.echo(json.dumps(data, indent=2))
    else:
        from . import ui

        ui.show_bench(result, plot_path)


COMMANDS = {"eval": eval_command, "distill": distill_command, "bench": bench_command}
