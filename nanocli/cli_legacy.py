"""The commands not yet on the declarative option layer (transitional: each moves to ``commands/<name>.py``).

Moved here unchanged from ``cli.py``; ``commands/__init__.py`` registers them.
"""

from __future__ import annotations

from typing import Annotated

import typer


def pretrain_command(
    profile: Annotated[str | None, typer.Option("--profile", help="Model profile to train from scratch "
                                                "(nano profiles).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="A NemotronH directory to continue training "
                                              "(e.g. a long-context phase).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Data spec: files, globs, directories, shards or "
                                             "synthetic:reasoning; SOURCE@WEIGHT;SOURCE@WEIGHT blends.")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Run directory (checkpoints, metrics, plot).")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Settings YAML (profiles/recipes/ name or "
                                               "path); flags override it.")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Directory with tokenizer.json "
                                                  "(default: the model's, or trained on the data).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", help="Training tokens (instead of --steps).")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence.")] = None,
    global_batch: Annotated[int | None, typer.Option("--global-batch", help="Sequences per step, all "
                                                     "processes.")] = None,
    micro_batch: Annotated[int | None, typer.Option("--micro-batch", help="Sequences per forward per "
                                                    "process (gradient accumulation).")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32, bf16 (default) or fp8.")] = None,
    fp8_scaling: Annotated[str | None, typer.Option("--fp8-scaling", help="blockwise (report) or "
                                                    "tensorwise (Nemotron-H).")] = None,
    fp8_backend: Annotated[str | None, typer.Option("--fp8-backend", help="auto, scaled_mm or emulate.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    min_lr: Annotated[float | None, typer.Option("--min-lr", help="LR at the end of the decay.")] = None,
    schedule: Annotated[str | None, typer.Option("--schedule", help="wsd (default), cosine or constant.")] = None,
    warmup: Annotated[float | None, typer.Option("--warmup", help="Warmup: fraction (<1) or steps.")] = None,
    decay: Annotated[float | None, typer.Option("--decay", help="WSD decay: fraction (<1) or steps.")] = None,
    decay_shape: Annotated[str | None, typer.Option("--decay-shape", help="linear, cosine or 1-sqrt.")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help="AdamW weight decay.")] = None,
    grad_clip: Annotated[float | None, typer.Option("--grad-clip", help="Max gradient norm (0: off).")] = None,
    fp8_keep: Annotated[int | None, typer.Option("--fp8-keep", help="First/last N layers kept in bf16 "
                                                 "under fp8.")] = None,
    max_position_embeddings: Annotated[int | None, typer.Option("--max-position-embeddings", help="Raise the "
                                                                "model's context limit.")] = None,
    tokenizer_vocab: Annotated[int | None, typer.Option("--tokenizer-vocab", help="BPE size when the "
                                                        "tokenizer is trained here.")] = None,
    heldout_fraction: Annotated[float | None, typer.Option("--heldout-fraction", help="Share of the data "
                                                           "kept for the held-out loss.")] = None,
    eval_batches: Annotated[int | None, typer.Option("--eval-batches", help="Held-out batches per "
                                                     "evaluation.")] = None,
    peak_tflops: Annotated[float | None, typer.Option("--peak-tflops", help="Device peak for MFU "
                                                      "(default: the GPU profile's).")] = None,
    save_every: Annotated[int | None, typer.Option("--save-every", help="Checkpoint every N steps.")] = None,
    keep_last: Annotated[int | None, typer.Option("--keep-last", help="checkpoint-* dirs to keep.")] = None,
    eval_every: Annotated[int | None, typer.Option("--eval-every", help="Held-out loss every N steps.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed (init and data order).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")] = None,
    parallel: Annotated[str | None, typer.Option("--parallel", help="ddp or fsdp (under torchrun).")] = None,
    on_nan: Annotated[str | None, typer.Option("--on-nan", help="stop (default) or skip the step.")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="auto (newest checkpoint in --out) or a "
                                               "checkpoint directory.")] = None,
    cache_dir: Annotated[str | None, typer.Option("--cache-dir", help="Token shard cache (default "
                                                  "$NANO_CACHE or ~/.cache/nano).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved plan and exit.")] = False,
) -> None:
    """Pretrain a NemotronH model: WSD schedule, bf16 or FP8, exact resume, torchrun data parallel.

    Checkpoints (HF NemotronH format + training state) go to OUT/checkpoint-N and OUT/final; metrics to
    OUT/metrics.jsonl and the loss curve to OUT/loss.png. Ctrl-C or SIGTERM writes a checkpoint and exits 0.
    """
    from . import ui
    from .stages import pretrain as pt

    flags = dict(profile=profile, model=model, data=data, out=out, tokenizer=tokenizer, steps=steps, tokens=tokens,
                 seq_len=seq_len, global_batch=global_batch, micro_batch=micro_batch, precision=precision,
                 fp8_scaling=fp8_scaling, fp8_backend=fp8_backend, lr=lr, min_lr=min_lr, schedule=schedule,
                 warmup=warmup, decay=decay, save_every=save_every, keep_last=keep_last, eval_every=eval_every,
                 seed=seed, device=device, parallel=parallel, on_nan=on_nan, resume=resume, cache_dir=cache_dir,
                 decay_shape=decay_shape, weight_decay=weight_decay, grad_clip=grad_clip, fp8_keep=fp8_keep,
                 max_position_embeddings=max_position_embeddings, tokenizer_vocab=tokenizer_vocab,
                 heldout_fraction=heldout_fraction, eval_batches=eval_batches, peak_tflops=peak_tflops,
                 dry_run=dry_run or None)
    options = pt.make_options(recipe, flags)
    if options.dry_run:
        ui.show_pretrain_plan(pt.resolve(options).describe())
        return
    import os

    quiet = int(os.environ.get("RANK", "0")) != 0
    with ui.TrainProgress(quiet=quiet) as bar:
        hooks = pt.Hooks(status=bar.status, progress=bar.tokenize, start=bar.start, step=bar.step)
        result = pt.run(options, hooks)
    if not quiet:
        ui.show_pretrain_result(result)


align_app = typer.Typer(help="Align a model: SFT with reasoning on/off and budget traces, DPO, GRPO; merge.",
                        invoke_without_command=True, no_args_is_help=False)


@align_app.callback()
def align_command(
    ctx: typer.Context,
    method: Annotated[str | None, typer.Option("--method", help="sft (default), dpo or grpo.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="The checkpoint to align (with its "
                                              "tokenizer and chat template).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="A .jsonl (TRL formats: messages, prompt/"
                                             "completion, prompt/chosen/rejected, prompt) or "
                                             "synthetic:reasoning?....")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Run directory.")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Settings YAML; flags override it.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Passes over the data (instead of --steps).")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Longest example in tokens.")] = None,
    global_batch: Annotated[int | None, typer.Option("--global-batch", help="Examples / pairs / prompts per "
                                                     "step.")] = None,
    micro_batch: Annotated[int | None, typer.Option("--micro-batch", help="Per forward per process.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32, bf16 (default) or fp8.")] = None,
    think_mix: Annotated[float | None, typer.Option("--think-mix", help="SFT: share with reasoning on.")] = None,
    budget_fraction: Annotated[float | None, typer.Option("--budget-fraction", help="SFT: share of reasoning-on "
                                                          "examples cut at a thinking budget.")] = None,
    too_long: Annotated[str | None, typer.Option("--too-long", help="truncate (default) or drop.")] = None,
    on_error: Annotated[str | None, typer.Option("--on-error", help="Malformed JSONL lines: stop or skip.")] = None,
    beta: Annotated[float | None, typer.Option("--beta", help="DPO beta.")] = None,
    group_size: Annotated[int | None, typer.Option("--group-size", help="GRPO completions per prompt.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="GRPO rollout length.")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="GRPO sampling temperature.")] = None,
    kl_beta: Annotated[float | None, typer.Option("--kl-beta", help="GRPO KL weight (0: no reference).")] = None,
    rewards: Annotated[str | None, typer.Option("--rewards", help="GRPO rewards: built-ins (exact, format) or "
                                                "module:function, with :weight.")] = None,
    eval_problems: Annotated[int | None, typer.Option("--eval-problems", help="Held-out synthetic problems "
                                                      "scored before and after (0: off).")] = None,
    save_every: Annotated[int | None, typer.Option("--save-every", help="Checkpoint every N steps.")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="auto or a checkpoint directory.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Read the data, print the plan, exit.")] = False,
) -> None:
    """Align a model: SFT (assistant-only loss, /think and /no_think mix, thinking-budget cuts), DPO, GRPO.

    `nano align merge A B --weights 0.5,0.5 --out DIR` averages checkpoints. Output as `nano pretrain`:
    OUT/checkpoint-N, OUT/final, metrics.jsonl, loss.png, plus eval.json (held-out accuracy before/after).
    """
    if ctx.invoked_subcommand is not None:
        return
    import os

    from . import ui
    from .stages import align as al

    flags = dict(method=method, model=model, data=data, out=out, steps=steps, epochs=epochs, seq_len=seq_len,
                 global_batch=global_batch, micro_batch=micro_batch, lr=lr, precision=precision, think_mix=think_mix,
                 budget_fraction=budget_fraction, too_long=too_long, on_error=on_error, beta=beta,
                 group_size=group_size, max_new_tokens=max_new_tokens, temperature=temperature, kl_beta=kl_beta,
                 rewards=rewards, eval_problems=eval_problems, save_every=save_every, seed=seed, device=device,
                 resume=resume, dry_run=dry_run or None)
    options = al.make_options(recipe, flags)
    quiet = int(os.environ.get("RANK", "0")) != 0
    with ui.TrainProgress(quiet=quiet) as bar:
        result = al.run(options, al.Hooks(status=bar.status, start=bar.start, step=bar.step))
    if not quiet:
        ui.show_align_result(result)


@align_app.command("merge")
def align_merge_command(
    checkpoints: Annotated[list[str], typer.Argument(help="Two or more checkpoint directories.")],
    out: Annotated[str, typer.Option("--out", help="Where the merged checkpoint goes (must not exist).")],
    weights: Annotated[str | None, typer.Option("--weights", help="Comma-separated, summing to 1 "
                                                "(default: equal).")] = None,
) -> None:
    """Write the weighted average of same-architecture checkpoints, (1-a)*w1 + a*w2 as the report merged."""
    from .stages import align as al

    try:
        w = None if weights is None else [float(x) for x in weights.split(",")]
    except ValueError:
        raise al.AlignError(f"--weights {weights!r}: give numbers separated by commas, e.g. 0.5,0.5") from None
    path = al.merge(checkpoints, w, out)
    typer.echo(f"merged {len(checkpoints)} checkpoints -> {path}")




from .cli_stages import COMMANDS as _STAGE_COMMANDS  # noqa: E402  (eval, distill, bench, prune)

COMMANDS = {"pretrain": pretrain_command, **_STAGE_COMMANDS}
