"""``nano generate``: text from a NemotronH model, one prompt, a batch file, or a chat.

The command: ``GenerateOptions`` (the stage's) plus what only the command line asks for (where the prompts
come from and go to, ``--json``, ``--hide-thinking``, ``--interactive``, ``--stats``); the call into the
stages (``stages/generate.py``'s ``run`` for a prompt, ``stages/generate_batch.py`` for ``--input``, a
``stages/chat.py`` session for ``-i``, whose terminal loop is ``commands/chat.py``); the rendering (the
streamed text, the thinking dimmed, the result records, and the figures line on stderr).

Where the results go: a prompt streams to stdout; ``--input`` prints one JSON record a line (JSONL) on
stdout, or writes them to ``--output``; ``--json`` prints instead one JSON object for the whole run (its
``outputs`` being the records with the token ids), with ``--output`` written as well when given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from .. import settings, ui
from ..settings import flag
from ..stages.generate import GenerateOptions
from .flags import command
from .output import JsonOutput, print_json

if TYPE_CHECKING:
    from ..stages.generate import GenerateResult


EXAMPLES = ['nano generate -m runs/demo/grpo/final "What is 17 + 25?"',
            'nano generate -m runs/demo/grpo/final --no-think --greedy --json "Sort 3 1 2."',
            "nano generate -m runs/demo/grpo/final --input prompts.jsonl --output answers.jsonl"]


@dataclass
class GenerateInput(settings.Group):
    panel = "Prompt"

    prompt: str | None = flag(None, argument=True)
    """The prompt (or use --file, stdin, --input)."""
    file: str | None = None
    """Read the prompt from this file."""
    input_file: str | None = flag(None, name="input")
    """Batch: a .jsonl, a line {"prompt": "..."} or {"messages": [...]} with an optional "id" and its own think,
    system, temperature, top_p, top_k, min_p, max_new_tokens, seed, stop, thinking_budget (lines with equal
    settings run as one batch; other fields are refused). Prints one JSON result a line unless --output."""
    output_file: str | None = flag(None, name="output")
    """Write the results here, one JSON object a line: id, prompt or messages, text, thinking, answer,
    finish_reason, token counts."""
    save_quantized: str | None = None
    """With --dtype int8: save the int8 model (safetensors, int8 weights + scales, tokenizer) to this directory,
    which loads as int8 without quantizing again; a prompt is then optional."""


@dataclass
class GenerateOutput(JsonOutput):
    json: bool = False
    """Print one JSON object for the whole run (outputs with their token ids, timings, seed), --input too, on one
    line."""
    hide_thinking: bool = False
    """Do not show the thinking span (streamed text and chat)."""
    interactive: bool = flag(False, aliases=("-i",))
    """Multi-turn chat with line editing and history: /help lists the commands, a \"\"\" line starts a
    multi-line message."""
    stats: bool = False
    """Chat: print the figures line after every answer (/stats toggles it). A prompt or --input always prints it
    on stderr."""


def register(app: typer.Typer) -> None:
    command(app, "generate", generate, GenerateOptions, GenerateInput, GenerateOutput, examples=EXAMPLES)


def generate(given: dict, inputs: dict, output: dict) -> None:
    """Generate text with a NemotronH model: chat template, reasoning on/off, thinking budget, streaming.

    Applies the checkpoint's chat template (or --raw), streams the thinking span dimmed and the answer plainly, and prints prompt/generated tokens, prefill and decode tokens/s and peak memory on stderr.

    --input FILE.jsonl runs a batch file and prints one JSON result a line (JSONL), or writes them to --output; --json prints one JSON object for the whole run instead. -i chats (/help lists its commands).
    """
    from ..stages import generate as gen
    from ..stages import generate_batch as batch

    options, source, out = GenerateOptions(**given), GenerateInput(**inputs), GenerateOutput(**output)
    settings.validate(options, gen.GenerateError)
    settings.validate(out, gen.GenerateError)
    if out.interactive:
        chat_mode(options, source, out)
        return
    output_path = None if source.output_file is None else Path(source.output_file)
    if output_path is not None:
        batch.check_output(output_path)
    if source.input_file is not None:
        if source.prompt is not None or source.file is not None:
            raise gen.GenerateError("--input reads the prompts from its file: drop the prompt argument / --file")
        run_file(options, Path(source.input_file), output_path, out.wants_json, out.json_indent)
        return
    loaded = None
    if source.save_quantized is not None:
        if options.dtype != "int8":
            raise gen.GenerateError("--save-quantized writes an int8 model: add --dtype int8")
        loaded = gen.load(options, options.compile, ui.Progress())
        saved = gen.save_quantized(loaded, options.model, Path(source.save_quantized))
        ui.console(stderr=True).print(f"saved the int8 model to {saved}", markup=False, highlight=False,
                                      soft_wrap=True)  # a path stays whole on one line, however long
        if source.prompt is None and source.file is None:
            return
    text = gen.read_prompt(source.prompt, None if source.file is None else Path(source.file))
    if text is None or not text.strip():
        raise gen.GenerateError("the prompt is empty: pass it as an argument, with --file, on stdin or --input")
    loaded = loaded or gen.load(options, options.compile, ui.Progress())
    stream = None if out.wants_json else TextStream(out.hide_thinking)
    result = gen.run(options, [text], loaded, on_text=None if stream is None else stream.write)
    if stream is not None:
        stream.close()
    if output_path is not None:
        row = batch.BatchRow("prompt", 0, text, {})
        batch.write_jsonl(output_path, batch.records([row], result))
    if out.wants_json:
        print_json(result.to_json(), out.json_indent)
    show_generation_stats(result)


def run_file(options: GenerateOptions, path: Path, output_path: Path | None, as_json: bool,
             indent: int | None = None) -> None:
    """``--input``: every line checked before the model loads; the records to stdout (JSONL) or --output."""
    from ..stages import generate as gen
    from ..stages import generate_batch as batch

    rows = batch.read_batch(path, options)
    result = batch.run_batch(options, rows, gen.load(options, options.compile, ui.Progress()))
    records = batch.records(rows, result)
    if output_path is not None:
        batch.write_jsonl(output_path, records)
    if as_json:
        print_json(batch.batch_json(rows, result), indent)
    elif output_path is None:
        for r in records:
            typer.echo(json.dumps(r, ensure_ascii=False))
    show_generation_stats(result)
    if output_path is not None:
        Console(stderr=True, highlight=False).print(f"wrote {len(records)} results to {output_path}", markup=False,
                                                    soft_wrap=True)  # the path whole, however long


def chat_mode(options: GenerateOptions, source: GenerateInput, out: GenerateOutput) -> None:
    from ..stages import generate as gen
    from ..stages.chat import ChatSession
    from ..stages.generate import GenerateError
    from .chat import chat

    extra = [name for name, on in (("a prompt", source.prompt is not None), ("--file", source.file is not None),
                                   ("--input", source.input_file is not None),
                                   ("--output", source.output_file is not None), ("--json", out.wants_json)) if on]
    if extra:
        raise GenerateError(f"--interactive reads its prompts from the terminal: drop {', '.join(extra)} "
                            "(/save FILE writes the conversation)")
    chat(ChatSession(options, gen.load(options, options.compile, ui.Progress()), show_stats=out.stats),
         hide_thinking=out.hide_thinking)


# ------------------------------------------------------------------------------------------ rendering
class TextStream:
    """Streams generated text as it arrives: the thinking span dimmed, the answer plain.

    Text goes out with markup off, so ``<think>`` and ``</think>`` show as they are.
    """

    def __init__(self, hide_thinking: bool = False):
        self.out = ui.console()
        self.hide_thinking = hide_thinking
        self.started = False

    def write(self, row: int, text: str, thinking: bool) -> None:
        if thinking and self.hide_thinking:
            return
        if thinking and not self.started:
            self.out.print("<think>", style="dim", end="", markup=False)
        self.started = True
        self.out.print(text, style="dim" if thinking else None, end="", markup=False, soft_wrap=True)
        self.out.file.flush()

    def close(self) -> None:
        self.out.print()


COMPILE_SOURCE = {"cache": "loaded from the cache in", "built": "compiled and cached in"}


def show_generation_stats(result: GenerateResult) -> None:
    """The figures line on stderr: tokens, prefill and decode tokens/s, peak memory, device, kernels."""
    s = result.stats
    err = Console(stderr=True, highlight=False)
    err.print(f"prompt {s.prompt_tokens} tokens, generated {s.generated_tokens} tokens | "
              f"prefill {s.prefill_tokens_per_s:,.1f} tok/s, decode {s.decode_tokens_per_s:,.1f} tok/s | "
              f"peak memory {ui.human_bytes(s.peak_memory_bytes)} ({s.peak_memory_source}) | "
              f"{result.device} {result.dtype} | kernels {result.kernels}"
              + (f" | compiled decode ({COMPILE_SOURCE.get(result.compile_source, 'compile')} {s.compile_seconds:.1f} s)"
                 if result.decode == "compiled" else "")
              + (f" | {result.batches} batches (lines grouped by their settings)" if result.batches > 1 else ""),
              style="dim", markup=False)
    if result.device != "cpu" and result.kernels != "mamba-ssm+causal-conv1d":  # a GPU without every kernel
        err.print(f"note: {result.kernels_detail}", markup=False, highlight=False)
    if result.decode.startswith("eager ("):  # a compiled step (asked for, or the default) fell back
        err.print(f"note: the compiled decode step did not run: decode ran {result.decode}", markup=False)
    for note in result.notes:  # e.g. --dtype auto chose bf16 to fit this machine's memory
        err.print(f"note: {note}", markup=False, highlight=False)

