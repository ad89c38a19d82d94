"""``nano generate``: prompts -> chat template -> batched generation with reasoning control.

Steps, top to bottom: load (model + tokenizer) -> build prompt ids (chat template with /think or
/no_think, or --raw) -> generate (sampling, thinking budget, stop strings, streaming) -> split each
output into thinking and answer. The batch file (``--input``: per-line settings, grouping, the result
records) is ``generate_batch.py``'s; the multi-turn chat (``--interactive``) is ``chat.py``'s. This module
returns results and calls the ``on_text`` hook it is given for streaming; the rendering is
``commands/generate.py``'s.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from nanocli_model.errors import NanoError

from .. import settings
from ..report import SILENT, Reporter
from ..settings import flag
from ..thinking import DEFAULT_GRACE, THINK_CLOSE, budget_controller, prompt_opens_thinking, split_thinking

if TYPE_CHECKING:
    from nanocli_model.generation import GenerationResult
    from nanocli_model.kernels import KernelStatus
    from nanocli_model.tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 1024
SEED_RANGE = (-2**63, 2**64)  # torch.Generator's


class GenerateError(NanoError):
    """Bad input to ``nano generate``."""


# ---------------------------------------------------------------------------------------- options
@dataclass
class Checkpoint(settings.Group):
    """The model to load and where (``nano eval`` loads through the same settings)."""

    panel = "Model"

    model: str | None = flag(None, aliases=("-m",))
    """A NemotronH directory: config.json, safetensors, tokenizer.json, tokenizer_config.json."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs (auto: CUDA when a GPU is visible, else the CPU)."""
    dtype: Literal["auto", "bf16", "fp16", "fp32", "int8"] = "auto"
    """auto (CUDA: as stored; CPU: fp32, or bf16 if only bf16 fits the host's memory), bf16, fp16, fp32 or int8
    (CPU: weight-only int8 decode)."""

    def check(self) -> None:
        if self.model is None:
            raise settings.OptionError("--model is required: a NemotronH checkpoint directory")


@dataclass
class Template(settings.Group):
    panel = "Prompt"

    system: str | None = None
    """System message."""
    raw: bool = False
    """Send the prompt untemplated."""


@dataclass
class Reasoning(settings.Group):
    panel = "Reasoning"

    think: bool | None = flag(None, name="think/--no-think")
    """Reasoning on (/think) or off (/no_think); default: as the messages say (on)."""
    thinking_budget: int | None = None
    """End the thinking after N tokens (at the next newline within the grace window, else at once) and let the
    model answer."""
    thinking_grace: int = DEFAULT_GRACE
    """Tokens to wait for a newline after the budget (model card: 500)."""

    def check(self) -> None:
        settings.at_least(self, 0, "thinking_budget", "thinking_grace")


@dataclass
class Sampling(settings.Group):
    panel = "Sampling"

    greedy: bool = False
    """Argmax decoding (= --temperature 0)."""
    temperature: float = 0.6
    """0 = greedy. Model card: 0.6."""
    top_k: int = 0
    """0 = off."""
    top_p: float = 0.95
    """1 = off. Model card: 0.95."""
    min_p: float = 0.0
    """0 = off."""
    repetition_penalty: float = 1.0
    """1 = off."""
    seed: int | None = None
    """Sampling seed (reproducible)."""
    max_new_tokens: int | None = None
    """Tokens to generate at most (default: 1024, or what the context leaves)."""
    stop: list[str] = flag(default_factory=list)
    """Stop string (repeatable)."""
    ignore_eos: bool = False
    """Keep going past EOS (benchmarks)."""

    def check(self) -> None:
        settings.finite(self, "temperature", minimum=0)
        settings.finite(self, "repetition_penalty", positive=True)
        settings.within(self, "min_p", 0, 1, hi_open=True)
        if not 0 < self.top_p <= 1:  # NaN fails too
            raise settings.OptionError(f"--top-p must be in (0, 1], got {self.top_p}")
        settings.at_least(self, 0, "top_k")
        settings.at_least(self, 1, "max_new_tokens")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise settings.OptionError(f"--seed must be an integer in -2^63..2^64-1, got {self.seed}")

    @property
    def sampling_temperature(self) -> float:
        return 0.0 if self.greedy else self.temperature


@dataclass
class Context(settings.Group):
    panel = "Context and speed"

    prefill_chunk: int = 2048
    """Prompt tokens per forward."""
    max_context: int | None = None
    """Prompt + output limit (default: the model's max_position_embeddings)."""
    truncate: Literal["left"] | None = None
    """'left': cut an over-long prompt from the left instead of failing."""
    compile: bool | None = flag(None, name="compile/--no-compile")
    """Compile the decode step: ~2x decode tokens/s on CPU. The first run of a model shape compiles (tens of
    seconds), later runs load it from the cache in under a second. Default: on for float32 and int8 CPU models
    of >= 32 MiB of weights."""

    def check(self) -> None:
        settings.at_least(self, 1, "prefill_chunk", "max_context")


@dataclass
class GenerateOptions(Context, Sampling, Reasoning, Template, Checkpoint):
    """Everything ``nano generate`` can be told (defaults < recipe ``generate:`` section < flags)."""


@dataclass
class Output:
    """One prompt's result, split at ``</think>``."""

    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    thinking: str
    answer: str
    finish_reason: str
    thinking_tokens: int
    budget_forced: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class GenerateResult:
    outputs: list[Output]
    stats: GenerationResult  # timings, peak memory, the seed
    device: str
    dtype: str
    decode: str = "eager"  # eager | compiled | eager (compile failed: why)
    kernels: str = "reference"  # kernels.KernelStatus.label: mamba-ssm+causal-conv1d | mamba-ssm | reference
    kernels_detail: str = ""  # kernels.KernelStatus.describe(): which runs, and why the others do not
    batches: int = 1  # generate calls (a batch file runs one per distinct per-line settings)
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. why --dtype auto chose bf16 on this CPU
    compile_source: str = ""  # AotDecode: "cache" (its library was loaded) | "built" (compiled, kept) | ""

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        return {
            "outputs": [o.to_json() for o in self.outputs],
            "prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
            "prefill_seconds": s.prefill_seconds, "decode_seconds": s.decode_seconds,
            "prefill_tokens_per_s": s.prefill_tokens_per_s, "decode_tokens_per_s": s.decode_tokens_per_s,
            "peak_memory_bytes": s.peak_memory_bytes, "peak_memory_source": s.peak_memory_source,
            "seed": s.seed, "device": self.device, "dtype": self.dtype, "decode": self.decode,
            "compile_seconds": s.compile_seconds, "compile_source": self.compile_source,
            "kernels": self.kernels, "kernels_detail": self.kernels_detail, "batches": self.batches,
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------------------- loading
@dataclass
class Loaded:
    model: Any  # a nanocli_model.NanoForCausalLM
    tokenizer: Tokenizer
    device: str
    dtype: str
    decode_step: Any = None  # an AotDecode / CompiledDecode when compiling (compile_decode), else None (the model)
    kernels: KernelStatus | None = None  # on the model's device
    notes: list[str] = dataclasses.field(default_factory=list)  # the host-memory check's choice of dtype

    @property
    def decode(self) -> str:
        if self.decode_step is None:
            return "eager"
        reason = self.decode_step.fallback_reason
        return "compiled" if reason is None else f"eager (compile failed: {reason})"

    @property
    def compile_source(self) -> str:
        """``AotDecode``: "built" when a library was compiled here, "cache" when every one was loaded."""
        step = self.decode_step
        if step is None or not hasattr(step, "built") or step.fallback_reason is not None:
            return ""
        return "built" if step.built else "cache" if step.loaded else ""


def load(checkpoint: Checkpoint, compile: bool | None = False, reporter: Reporter | None = None) -> Loaded:
    """The model (weights on the chosen device/dtype) and its tokenizer, with one-line errors; ``compile``:
    decode through a compiled step (``compile_decode``; None: where ``auto_compile`` says it pays). ``reporter``
    hears when a decode step starts compiling (tens of seconds, once per model shape)."""
    import torch

    from nanocli_model import load_pretrained
    from nanocli_model.headers import read_checkpoint_tensors
    from nanocli_model.tokenizer import Tokenizer

    from .. import host_memory, resolve

    target = resolve.model_target(checkpoint.model, kinds=("checkpoint", "run"))  # a directory with weights
    path, device = target.directory, resolve.visible_device(checkpoint.device)
    dtype, notes = (None if checkpoint.dtype == "auto" else checkpoint.dtype), []  # auto on a GPU: as stored
    if device == "cpu":  # before any weight is read: do they fit this machine's memory, and in which dtype?
        # (auto: fp32, as bf16 matmuls are slow on most CPUs, unless only bf16 fits: host_memory.py)
        need = host_memory.checkpoint_need(read_checkpoint_tensors(path))
        plan = host_memory.plan_cpu_load(checkpoint.model, need, checkpoint.dtype)
        dtype, notes = plan.dtype, [plan.note] if plan.note else []
    tokenizer = Tokenizer.from_dir(path)
    try:
        model = load_pretrained(path, dtype=dtype, device=device)
    except torch.OutOfMemoryError:
        raise GenerateError(f"CUDA out of memory loading the weights of {path} ({checkpoint.dtype} on {device}): "
                            f"use a smaller --dtype (bf16) or a larger GPU; `nano fit-check --model {path} "
                            "--gpu auto` predicts it") from None
    if compile is None:
        compile = auto_compile(model)
    step = compile_decode(model, reporter) if compile else None
    from nanocli_model import kernels
    from nanocli_model.quant import is_int8

    name = "int8" if is_int8(model) else str(model.dtype).replace("torch.", "")
    return Loaded(model, tokenizer, device, name, step, kernels.status(model.device), notes)


AUTO_COMPILE_BYTES = 32 * 2**20  # CPU models from this size of weights compile their decode step by default


def auto_compile(model) -> bool:
    """Whether ``nano generate`` compiles the decode step when not told: on CPU, for a model the ahead-of-time
    step runs (float32, or int8 with nano's GEMV library) with >= AUTO_COMPILE_BYTES of weights. Below that (the
    tiny and demo profiles) a token costs a few milliseconds eagerly and the first compile (~20 s) would not pay
    back for hours.
    Off without the C++ compiler inductor uses (``row_gemv.compiler``: there is nothing to compile with)."""
    from nanocli_model import aot_decode, row_gemv

    if aot_decode.supported(model) is not None:
        return False
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return weights >= AUTO_COMPILE_BYTES and row_gemv.compiler() is not None


def compile_decode(model, reporter: Reporter | None = None):
    """The compiled decode step for ``model``: on CPU in float32 or int8 ``AotDecode``, whose compiled library is
    kept in ``<cache dir>/decode`` for the next run of a model of this shape; else (bf16, a GPU)
    ``CompiledDecode`` (``torch.compile``, compiled again in every process)."""
    from nanocli_model import aot_decode
    from nanocli_model.decode import CompiledDecode

    from .. import resolve

    if aot_decode.supported(model) is None:
        directory = resolve.cache_dir(None) / "decode"
        say = (reporter or SILENT).status
        return aot_decode.AotDecode(model, directory, on_compile=lambda: say(
            f"compiling the decode step for this model shape (once: later runs load it from {directory})"))
    return CompiledDecode(model)


def save_quantized(loaded: Loaded, source: str, out: Path) -> Path:
    """Write the loaded int8 model (int8 weights + float32 scales, ``quantization_config`` in config.json) with
    the tokenizer files of ``source`` to ``out``, atomically; ``load_pretrained`` reads it back as it is."""
    from nanocli_model.checkpoint import save_pretrained
    from nanocli_model.quant import is_int8

    from .. import resolve

    if not is_int8(loaded.model):
        raise GenerateError("--save-quantized writes an int8 model: add --dtype int8")
    src = resolve.model_target(source, kinds=("checkpoint", "run")).directory
    if out.resolve() == Path(src).resolve():
        raise GenerateError(f"--save-quantized {out}: that is the model being read; choose another directory")
    extras = [p for p in Path(src).iterdir() if p.is_file() and p.name.startswith(("tokenizer", "special_tokens",
                                                                                  "chat_template", "generation"))]
    return save_pretrained(loaded.model, out, extra_files=extras)


# ---------------------------------------------------------------------------------------- prompts
def messages_for(prompt: str | list[dict], system: str | None) -> list[dict]:
    """A user prompt (or a ready messages list) with the optional system message in front."""
    if isinstance(prompt, list):
        messages = [dict(m) for m in prompt]
    else:
        messages = [{"role": "user", "content": prompt}]
    if system is not None and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def prompt_ids(tokenizer, prompt: str | list[dict], options: GenerateOptions) -> tuple[list[int], bool]:
    """Token ids of one prompt and whether generation starts inside the thinking span."""
    from nanocli_model.tokenizer import render_chat

    if options.raw:
        if isinstance(prompt, list):
            raise GenerateError("--raw takes a plain prompt, not a messages list")
        text = prompt
    else:
        text = render_chat(tokenizer, messages_for(prompt, options.system), think=options.think)
    ids = tokenizer.encode(text, add_special_tokens=options.raw)
    if not ids:
        raise GenerateError("the prompt is empty; give some text")
    return ids, prompt_opens_thinking(text)


# ---------------------------------------------------------------------------------------- generation
OnText = Callable[[int, str, bool], None]  # (row, new text, inside thinking)


@dataclass
class Prepared:
    """The prompts as the model gets them."""

    ids: list[list[int]]  # token ids, cut from the left with --truncate left
    opens_thinking: list[bool]  # generation starts inside the thinking span
    max_new: int  # new tokens at most (the default: what the context leaves, up to DEFAULT_MAX_NEW_TOKENS)
    limit: int  # the context limit: prompt + output


def prepare(options: GenerateOptions, prompts: list[str | list[dict]], loaded: Loaded,
            labels: list[str] | None = None) -> Prepared:
    """Every prompt rendered and tokenized, checked against the context limit; ``labels``: what an error calls
    each prompt (default ``prompt N``; a batch file gives ``FILE:LINE``)."""
    built = [prompt_ids(loaded.tokenizer, p, options) for p in prompts]
    ids = [b[0] for b in built]
    limit = options.max_context or loaded.model.config.max_position_embeddings
    max_new = options.max_new_tokens
    if max_new is None:  # the default: as much as the context leaves, up to DEFAULT_MAX_NEW_TOKENS
        max_new = max(1, min(DEFAULT_MAX_NEW_TOKENS, limit - max(len(r) for r in ids)))
    for i, row in enumerate(ids):
        if len(row) + max_new > limit:
            if options.truncate != "left" or max_new >= limit:
                label = labels[i] if labels else f"prompt {i + 1}"
                raise GenerateError(f"{label}: {len(row)} prompt tokens + {max_new} new tokens exceed the context "
                                    f"limit {limit} (use --truncate left, a shorter prompt, fewer --max-new-tokens "
                                    "or a larger --max-context)")
            ids[i] = row[len(row) + max_new - limit:]
    return Prepared(ids, [b[1] for b in built], max_new, limit)


def run(options: GenerateOptions, prompts: list[str | list[dict]], loaded: Loaded | None = None,
        on_text: OnText | None = None, labels: list[str] | None = None) -> GenerateResult:
    """Generate a completion for every prompt (batched), streaming text through ``on_text``; ``labels`` as
    :func:`prepare` takes them."""
    from nanocli_model.generation import SamplingParams, generate
    from nanocli_model.tokenizer import StreamDecoder

    settings.validate(options, GenerateError)
    if not prompts:
        raise GenerateError("no prompt given: pass it as an argument, with --file, on stdin or with --input")
    loaded = loaded or load(options, options.compile)
    tok, model = loaded.tokenizer, loaded.model
    prepared = prepare(options, prompts, loaded, labels)
    ids, opens, max_new, limit = prepared.ids, prepared.opens_thinking, prepared.max_new, prepared.limit
    params = SamplingParams(temperature=options.sampling_temperature, top_k=options.top_k, top_p=options.top_p,
                            min_p=options.min_p, repetition_penalty=options.repetition_penalty, seed=options.seed,
                            max_new_tokens=max_new, ignore_eos=options.ignore_eos,
                            eos_ids=set() if options.ignore_eos else set(tok.eos_ids))
    # Counts the thinking tokens of every row; with --thinking-budget it also ends the span.
    thinking = budget_controller(tok, options.thinking_budget, options.thinking_grace, opens)
    if thinking is None and options.thinking_budget is not None:
        raise GenerateError("--thinking-budget: this tokenizer has no single </think> token to end the thinking with")
    streams = [StreamDecoder(tok, skip_special_tokens=True, context_ids=row[-5:]) for row in ids]
    texts = [""] * len(ids)
    inside = list(opens)
    stopped = [False] * len(ids)

    def on_token(row: int, token: int, forced: bool) -> bool:
        if stopped[row]:
            return True
        piece = streams[row].put(token)
        if not piece:
            return False
        texts[row] += piece
        for s in options.stop:
            if s and s in texts[row][-(len(piece) + len(s)):]:
                cut = texts[row].index(s, max(0, len(texts[row]) - len(piece) - len(s)))
                piece = piece[: max(0, len(piece) - (len(texts[row]) - cut))]
                texts[row] = texts[row][:cut]
                stopped[row] = True
        _emit(row, piece)
        return stopped[row]

    def _emit(row: int, piece: str) -> None:
        if on_text is None or not piece:
            return
        if inside[row] and THINK_CLOSE in piece:
            before, _, after = piece.partition(THINK_CLOSE)
            on_text(row, before + THINK_CLOSE, True)
            inside[row] = False
            if after:
                on_text(row, after, False)
        else:
            on_text(row, piece, inside[row])

    import torch

    try:
        stats = generate(model, ids, params, prefill_chunk=options.prefill_chunk, thinking=thinking,
                         max_context=limit, on_token=on_token, decode_step=loaded.decode_step)
    except torch.OutOfMemoryError:
        raise out_of_memory(options, len(ids), max(len(r) for r in ids) + max_new) from None
    outputs = []
    for i, completion in enumerate(stats.completions):
        if not stopped[i]:
            texts[i] += streams[i].flush()
        thinking_text, answer = split_thinking(texts[i], opens[i])
        reason = "stop" if stopped[i] else completion.finish_reason
        outputs.append(Output(ids[i], completion.token_ids, texts[i], thinking_text.strip("\n"), answer.strip(),
                              reason, completion.thinking_tokens, completion.budget_forced))
    ran = loaded.kernels
    return GenerateResult(outputs, stats, loaded.device, loaded.dtype, loaded.decode,
                          ran.label if ran else "reference", ran.describe() if ran else "",
                          notes=list(loaded.notes) + list(getattr(loaded.decode_step, "notes", [])),
                          compile_source=loaded.compile_source)


def out_of_memory(options: GenerateOptions, batch: int, context: int) -> GenerateError:
    """CUDA ran out of memory generating: the settings that set the peak, and the fit-check that predicts it."""
    chunk = min(options.prefill_chunk, context)
    return GenerateError(
        f"CUDA out of memory generating {batch} sequence(s) of up to {context} tokens (prefill chunk {chunk}): "
        f"lower --prefill-chunk (activations), --max-new-tokens or --max-context (cache), or send fewer prompts "
        f"at once (batch); `nano fit-check --model {options.model} --context {context} --batch {batch} "
        f"--prefill-chunk {chunk} --gpu auto` predicts it")


# ---------------------------------------------------------------------------------------- inputs
def read_prompt(prompt: str | None, file: Path | None) -> str | None:
    """The prompt from the argument, ``--file`` or stdin (when it is not a terminal)."""
    if prompt is not None and file is not None:
        raise GenerateError("give the prompt either as an argument or with --file, not both")
    if file is not None:
        try:
            return file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GenerateError(f"{file}: cannot be read ({e})") from None
    if prompt is None and not sys.stdin.isatty():
        return sys.stdin.read()
    return prompt
