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


def prune_command(
    model: Annotated[str | None, typer.Option("--model", "-m", help="A NemotronH checkpoint directory (or a model "
                                              "profile, with --dry-run).")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Where the pruned checkpoint goes.")] = None,
    target: Annotated[str | None, typer.Option("--target", help="YAML export config (ModelOpt names: hidden_size, "
                                               "ffn_hidden_size, ...); flags override it.")] = None,
    hidden_size: Annotated[int | None, typer.Option("--hidden-size", help="Embedding channels kept.")] = None,
    ffn_hidden_size: Annotated[int | None, typer.Option("--ffn-hidden-size", help="MLP neurons kept.")] = None,
    num_attention_heads: Annotated[int | None, typer.Option("--num-attention-heads", help="Query heads kept.")] = None,
    num_query_groups: Annotated[int | None, typer.Option("--num-query-groups", help="KV groups kept.")] = None,
    mamba_num_heads: Annotated[int | None, typer.Option("--mamba-num-heads", help="Mamba heads kept (a multiple "
                                                        "of n_groups).")] = None,
    mamba_head_dim: Annotated[int | None, typer.Option("--mamba-head-dim", help="Mamba head dim kept.")] = None,
    num_layers: Annotated[int | None, typer.Option("--num-layers", help="Layers kept.")] = None,
    keep_attention: Annotated[int | None, typer.Option("--keep-attention", help="Attention layers kept (the 9B "
                                                       "kept 4).")] = None,
    target_memory: Annotated[float | None, typer.Option("--target-memory", help="Budget in GiB: weights + KV + "
                                                        "Mamba state + activations (fit-check's model).")] = None,
    target_params: Annotated[float | None, typer.Option("--target-params", help="Budget in parameters.")] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU profile whose usable memory is the budget "
                                            "(a10g: 19.66 GiB).")] = None,
    context: Annotated[str | None, typer.Option("--context", help="Tokens the budget is judged at (131072, "
                                                "128k).")] = None,
    batch: Annotated[int | None, typer.Option("--batch", help="Sequences served at once.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Weight dtype of the budget (bf16).")] = None,
    calib_data: Annotated[str | None, typer.Option("--calib-data", help="Calibration data spec (default "
                                                   "synthetic:reasoning).")] = None,
    calib_samples: Annotated[int | None, typer.Option("--calib-samples", help="Calibration sequences "
                                                      "(default 256).")] = None,
    calib_seq_len: Annotated[int | None, typer.Option("--calib-seq-len", help="Tokens per calibration "
                                                      "sequence.")] = None,
    scores: Annotated[str | None, typer.Option("--scores", help="Importance scores file (safetensors): reused "
                                               "when it exists, written otherwise.")] = None,
    depth_metric: Annotated[str | None, typer.Option("--depth-metric", help="mse (greedy, the report's) or "
                                                     "cosine (1 - cos, one pass).")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Candidates given the short distillation.")] = None,
    proxy_candidates: Annotated[int | None, typer.Option("--proxy-candidates", help="Largest fitting candidates "
                                                         "scored by the proxy.")] = None,
    candidate_steps: Annotated[int | None, typer.Option("--candidate-steps", help="Distillation steps per top-k "
                                                        "candidate.")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Settings YAML; flags override it.")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")] = None,
    cache_dir: Annotated[str | None, typer.Option("--cache-dir", help="Token shard cache.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the target or the search space and exit "
                                          "(no weights needed).")] = False,
) -> None:
    """Prune a model Minitron-style (depth, hidden size, MLP width, group-aware Mamba heads, GQA heads).

    Importance from activations on calibration data (one pass, cached with --scores); depth by the
    report's greedy logit-MSE rule. Give the target widths (ModelOpt names) or a budget: --target-memory
    GiB or --gpu PROFILE at --context/--batch (fit-check's memory model), or --target-params. With a budget
    the fitting shapes are searched, the largest scored by KL to the parent, the --top-k briefly distilled,
    the best written to OUT with pruning.json.
    """
    from . import ui
    from .stages import prune as pr
    from .stages.fit_check import parse_tokens

    flags = dict(model=model, out=out, target=target, hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size,
                 num_attention_heads=num_attention_heads, num_query_groups=num_query_groups,
                 mamba_num_heads=mamba_num_heads, mamba_head_dim=mamba_head_dim, num_layers=num_layers,
                 keep_attention=keep_attention, target_memory=target_memory, target_params=target_params, gpu=gpu,
                 context=None if context is None else parse_tokens(context, "--context"), batch=batch, dtype=dtype,
                 calib_data=calib_data, calib_samples=calib_samples, calib_seq_len=calib_seq_len, scores=scores,
                 depth_metric=depth_metric, top_k=top_k, proxy_candidates=proxy_candidates,
                 candidate_steps=candidate_steps, seed=seed, device=device, cache_dir=cache_dir,
                 dry_run=dry_run or None)
    options = pr.make_options(recipe, flags)
    if options.dry_run:
        ui.show_prune_plan(pr.run(options))
        return
    with ui.PruneProgress() as bar:
        result = pr.run(options, pr.PruneHooks(status=bar.status, progress=bar.update))
    ui.show_prune_result(result)


COMMANDS = {"eval": eval_command, "bench": bench_command, "prune": prune_command}
