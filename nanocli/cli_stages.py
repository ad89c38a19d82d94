"""``nano eval``, ``nano distill``, ``nano bench`` and ``nano prune``: the measuring and compressing commands,
registered on ``cli.app`` by ``cli`` (``COMMANDS``). Thin typer commands, as in ``cli``."""

from __future__ import annotations

from typing import Annotated

import typer


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


COMMANDS = {"distill": distill_command}
