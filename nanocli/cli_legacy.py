"""The commands not yet on the declarative option layer (transitional: each moves to ``commands/<name>.py``).

Moved here unchanged from ``cli.py``; ``commands/__init__.py`` registers them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo_command(
    recipe: Annotated[str, typer.Option("--recipe", help="The pipeline recipe (name in profiles/recipes/ or a "
                                        ".yaml path).")] = "demo",
    out: Annotated[Path | None, typer.Option("--out", help="Where the stages write (default: the recipe's, "
                                             "runs/demo).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete earlier artifacts and start over.")] = False,
    library_check: Annotated[bool, typer.Option("--library-check", help="Only check the model library on "
                                                "--profile (save/load, cached decode, cache bytes).")] = False,
    profile: Annotated[str, typer.Option("--profile", help="With --library-check: the model profile.")] = "small",
) -> None:
    """The report's pipeline in miniature (`make demo`): pretrain -> SFT -> GRPO -> prune -> distill on CPU.

    Every stage writes ordinary checkpoints under OUT/<stage>/; a rerun resumes or skips finished stages.
    Then every model is evaluated the same way (held-out accuracy, reasoning on and off), fit-check runs on
    the released Nemotron-Nano profiles, and the final model answers a question.
    """
    from . import ui

    if library_check:
        from . import demo

        report = demo.run()
        result = demo.run_model(profile, out or Path("runs/demo-model"))
        ui.show_demo(report.models, report.gpus, report.stages, result)
        demo.check(result)
        return
    from . import pipeline

    plan = pipeline.read(recipe, None if out is None else str(out))
    total = len(plan.sections)
    index = {s.name: i + 1 for i, s in enumerate(plan.sections)}
    hooks = pipeline.Hooks(stage=lambda name, kind: ui.DemoStage(index[name], total, name, kind),
                           status=lambda msg: ui.console().print(f"[dim]{msg}[/]"))
    result = pipeline.run(plan, fresh=fresh, hooks=hooks)
    ui.show_demo_result(result)


def generate_command(
    prompt: Annotated[str | None, typer.Argument(help="The prompt (or use --file, stdin, --input).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="A NemotronH directory: config.json, "
                                              "safetensors, tokenizer.json, tokenizer_config.json.")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Read the prompt from this file.")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    think: Annotated[bool | None, typer.Option("--think/--no-think", help="Reasoning on (/think) or off "
                                               "(/no_think); default: as the messages say (on).")] = None,
    thinking_budget: Annotated[int | None, typer.Option("--thinking-budget", help="End the thinking after "
                                                        "N tokens (at the next newline within the grace "
                                                        "window, else at once) and let the model answer.")] = None,
    thinking_grace: Annotated[int, typer.Option("--thinking-grace", help="Tokens to wait for a newline "
                                                "after the budget (model card: 500).")] = 500,
    hide_thinking: Annotated[bool, typer.Option("--hide-thinking", help="Do not show the thinking span.")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt untemplated.")] = False,
    greedy: Annotated[bool, typer.Option("--greedy", help="Argmax decoding (= --temperature 0).")] = False,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy. Model card: 0.6.")] = 0.6,
    top_k: Annotated[int, typer.Option("--top-k", help="0 = off.")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="1 = off. Model card: 0.95.")] = 0.95,
    min_p: Annotated[float, typer.Option("--min-p", help="0 = off.")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help="1 = off.")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed (reproducible).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Tokens to generate at most "
                                                       "(default: 1024, or what the context leaves).")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep going past EOS (benchmarks).")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (stored dtype on CUDA, fp32 on CPU), bf16, "
                                       "fp16 or fp32.")] = "auto",
    prefill_chunk: Annotated[int, typer.Option("--prefill-chunk", help="Prompt tokens per forward.")] = 2048,
    max_context: Annotated[int | None, typer.Option("--max-context", help="Prompt + output limit (default: "
                                                    "the model's max_position_embeddings).")] = None,
    truncate: Annotated[str | None, typer.Option("--truncate", help="'left': cut an over-long prompt from "
                                                 "the left instead of failing.")] = None,
    input_file: Annotated[Path | None, typer.Option("--input", help="Batch mode: a .jsonl of {\"prompt\"} or "
                                                    "{\"messages\"} lines.")] = None,
    output_file: Annotated[Path | None, typer.Option("--output", help="Batch mode: write results here "
                                                     "(.jsonl).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (ids, text, thinking, "
                                           "answer, timings).")] = False,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Multi-turn chat: /think, "
                                              "/no_think, /budget N, /reset, /exit.")] = False,
    compile_decode: Annotated[bool, typer.Option("--compile", help="torch.compile the decode step: 1.7-2.1x "
                                                 "decode tokens/s on CPU, after a compile of seconds to a "
                                                 "minute (cached on disk). Pays for long outputs.")] = False,
) -> None:
    """Generate text with a NemotronH model: chat template, reasoning on/off, thinking budget, streaming.

    Applies the checkpoint's chat template (or --raw), streams the thinking span dimmed and the answer
    plainly, and prints prompt/generated tokens, prefill and decode tokens/s and peak memory on stderr.
    """
    from .stages import generate as gen

    if model is None:
        raise gen.GenerateError("--model is required: a NemotronH checkpoint directory")
    if truncate not in (None, "left"):
        raise gen.GenerateError(f"--truncate takes 'left', got {truncate!r}")
    options = gen.GenerateOptions(
        model=model, device=device, dtype=dtype, system=system, raw=raw, think=think,
        thinking_budget=thinking_budget, thinking_grace=thinking_grace, temperature=0.0 if greedy else temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
        max_new_tokens=max_new_tokens, stop=list(stop or []), ignore_eos=ignore_eos, prefill_chunk=prefill_chunk,
        max_context=max_context, truncate_left=truncate == "left", compile=compile_decode)
    from . import ui

    if interactive:
        ui.chat(gen, options)
        return
    if input_file is not None:
        prompts = gen.read_jsonl(input_file)
    else:
        text = gen.read_prompt(prompt, file)
        prompts = [] if text is None or not text.strip() else [text]
    if not prompts:
        raise gen.GenerateError("the prompt is empty: pass it as an argument, with --file, on stdin or --input")
    loaded = gen.load(options)
    stream = None if (json_out or input_file is not None) else ui.TextStream(hide_thinking)
    result = gen.run(options, prompts, loaded, on_text=None if stream is None else stream.write)
    if stream is not None:
        stream.close()
    if output_file is not None:
        gen.write_jsonl(output_file, result)
    if json_out:
        import json

        typer.echo(json.dumps(result.to_json(), indent=2))
    elif input_file is not None and output_file is None:
        for o in result.outputs:
            typer.echo(json.dumps({"answer": o.answer, "thinking": o.thinking}))
    ui.show_generation_stats(result)


from .cli_stages import COMMANDS as _STAGE_COMMANDS  # noqa: E402  (eval, bench, prune)

COMMANDS = {"demo": demo_command,
            "generate": generate_command, **_STAGE_COMMANDS}
