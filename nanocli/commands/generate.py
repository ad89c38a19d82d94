"""``nano generate``: text from a NemotronH model, one prompt, a batch file, or a chat.

The command: ``GenerateOptions`` (the stage's) plus what only the command line asks for (where the prompts
come from and go to, ``--json``, ``--hide-thinking``, ``--interactive``); the call into
``stages/generate.py`` (``run``, or a ``ChatSession`` fed the lines typed); the rendering (the streamed text,
the thinking dimmed, and the figures line on stderr).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from .. import settings, ui
from ..settings import flag
from ..stages.generate import GenerateOptions
from .flags import command

if TYPE_CHECKING:
    from ..stages.generate import ChatSession, GenerateResult


@dataclass
class GenerateInput(settings.Group):
    panel = "Prompt"

    prompt: str | None = flag(None, argument=True)
    """The prompt (or use --file, stdin, --input)."""
    file: str | None = None
    """Read the prompt from this file."""
    input_file: str | None = flag(None, name="input")
    """Batch mode: a .jsonl of {"prompt"} or {"messages"} lines."""
    output_file: str | None = flag(None, name="output")
    """Batch mode: write results here (.jsonl)."""


@dataclass
class GenerateOutput(settings.Group):
    panel = "Output"

    json: bool = False
    """Print one JSON object (ids, text, thinking, answer, timings)."""
    hide_thinking: bool = False
    """Do not show the thinking span."""
    interactive: bool = flag(False, aliases=("-i",))
    """Multi-turn chat: /think, /no_think, /budget N, /reset, /exit."""


def register(app: typer.Typer) -> None:
    command(app, "generate", generate, GenerateOptions, GenerateInput, GenerateOutput)


def generate(given: dict, inputs: dict, output: dict) -> None:
    """Generate text with a NemotronH model: chat template, reasoning on/off, thinking budget, streaming.

    Applies the checkpoint's chat template (or --raw), streams the thinking span dimmed and the answer
    plainly, and prints prompt/generated tokens, prefill and decode tokens/s and peak memory on stderr.
    """
    from ..stages import generate as gen

    options, source, out = GenerateOptions(**given), GenerateInput(**inputs), GenerateOutput(**output)
    settings.validate(options, gen.GenerateError)
    if out.interactive:
        chat(gen.ChatSession(options))
        return
    batch = source.input_file is not None
    if batch:
        prompts = gen.read_jsonl(Path(source.input_file))
    else:
        text = gen.read_prompt(source.prompt, None if source.file is None else Path(source.file))
        prompts = [] if text is None or not text.strip() else [text]
    if not prompts:
        raise gen.GenerateError("the prompt is empty: pass it as an argument, with --file, on stdin or --input")
    loaded = gen.load(options, options.compile)
    stream = None if (out.json or batch) else TextStream(out.hide_thinking)
    result = gen.run(options, prompts, loaded, on_text=None if stream is None else stream.write)
    if stream is not None:
        stream.close()
    if source.output_file is not None:
        gen.write_jsonl(Path(source.output_file), result)
    if out.json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    elif batch and source.output_file is None:
        for o in result.outputs:
            typer.echo(json.dumps({"answer": o.answer, "thinking": o.thinking}))
    show_generation_stats(result)


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


def show_generation_stats(result: GenerateResult) -> None:
    """The figures line on stderr: tokens, prefill and decode tokens/s, peak memory, device, kernels."""
    s = result.stats
    err = Console(stderr=True, highlight=False)
    err.print(f"prompt {s.prompt_tokens} tokens, generated {s.generated_tokens} tokens | "
              f"prefill {s.prefill_tokens_per_s:,.1f} tok/s, decode {s.decode_tokens_per_s:,.1f} tok/s | "
              f"peak memory {ui.human_bytes(s.peak_memory_bytes)} ({s.peak_memory_source}) | "
              f"{result.device} {result.dtype} | kernels {result.kernels}"
              + (f" | compiled decode (compile {s.compile_seconds:.1f} s)" if result.decode == "compiled" else ""),
              style="dim", markup=False)
    if result.device != "cpu" and result.kernels != "mamba-ssm+causal-conv1d":  # a GPU without every kernel
        err.print(f"note: {result.kernels_detail}", markup=False, highlight=False)
    if result.decode.startswith("eager ("):  # --compile asked for, and it fell back
        err.print(f"note: --compile: decode ran {result.decode}", markup=False)
    for note in result.notes:  # e.g. --dtype auto chose bf16 to fit this machine's memory
        err.print(f"note: {note}", markup=False, highlight=False)


def chat(session: ChatSession) -> None:
    """``--interactive``: read a line, hand it to the session, show what it did, until /exit or end of input."""
    from ..stages.generate import CHAT_HELP

    out, loaded = ui.console(), session.loaded
    out.print(f"[bold]nano chat[/] ({escape(str(session.options.model))}, {loaded.device} {loaded.dtype}) - "
              f"{CHAT_HELP}")
    for note in loaded.notes:
        out.print(f"[dim]note: {escape(note)}[/]")
    while True:
        try:
            line = out.input("[bold green]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            out.print()
            return
        stream = TextStream()
        turn = session.send(line, on_text=stream.write)
        if turn.done:
            return
        if turn.generated:
            stream.close()
        if turn.note:
            out.print(f"[dim]{escape(turn.note)}[/]")
        if turn.error:
            out.print(f"[red]{escape(turn.error)}[/]")
        if turn.result is not None:
            show_generation_stats(turn.result)
