"""``nano generate``: prompts -> chat template -> batched generation with reasoning control.

Steps, top to bottom: load (model + tokenizer) -> build prompt ids (chat template with /think or
/no_think, or --raw) -> generate (sampling, thinking budget, stop strings, streaming) -> split each
output into thinking and answer. Rendering lives in ``ui.py``; this module returns results and calls
the ``on_text`` hook it is given for streaming.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nanocli_model.errors import NanoError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Model card: with a budget, end the thinking at the first newline after it, else at budget + 500.
DEFAULT_GRACE = 500
DEFAULT_MAX_NEW_TOKENS = 1024


class GenerateError(NanoError):
    """Bad input to ``nano generate``."""


@dataclass
class GenerateOptions:
    """Everything ``nano generate`` can be told (defaults < flags)."""

    model: str  # a NemotronH directory: config.json, safetensors, tokenizer.json, tokenizer_config.json
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (stored dtype on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    system: str | None = None  # system message
    raw: bool = False  # send the prompt untemplated
    think: bool | None = None  # True: /think, False: /no_think, None: as the messages say (default on)
    thinking_budget: int | None = None  # end the thinking after this many tokens
    thinking_grace: int = DEFAULT_GRACE  # ...at the next newline within this many tokens, else at once
    temperature: float = 0.6  # model card: 0.6 / top-p 0.95 with reasoning; 0 = greedy
    top_k: int = 0
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int | None = None  # None: up to DEFAULT_MAX_NEW_TOKENS, capped by the context left
    stop: list[str] = field(default_factory=list)  # stop strings (the output ends before them)
    ignore_eos: bool = False
    prefill_chunk: int = 2048
    max_context: int | None = None  # default: the model's max_position_embeddings
    truncate_left: bool = False  # cut an over-long prompt from the left instead of failing
    compile: bool = False  # torch.compile the decode step (nanocli_model.decode.CompiledDecode)


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


@dataclass
class GenerateResult:
    outputs: list[Output]
    stats: object  # nanocli_model.generation.GenerationResult (timings, peak memory)
    device: str
    dtype: str
    decode: str = "eager"  # eager | compiled | eager (compile failed: why)
    kernels: str = "reference"  # kernels.KernelStatus.label: mamba-ssm+causal-conv1d | mamba-ssm | reference
    kernels_detail: str = ""  # kernels.KernelStatus.describe(): which runs, and why the others do not

    def to_json(self) -> dict:
        s = self.stats
        return {
            "outputs": [o.__dict__ for o in self.outputs],
            "prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
            "prefill_seconds": s.prefill_seconds, "decode_seconds": s.decode_seconds,
            "prefill_tokens_per_s": s.prefill_tokens_per_s, "decode_tokens_per_s": s.decode_tokens_per_s,
            "peak_memory_bytes": s.peak_memory_bytes, "peak_memory_source": s.peak_memory_source,
            "seed": s.seed, "device": self.device, "dtype": self.dtype, "decode": self.decode,
            "compile_seconds": s.compile_seconds, "kernels": self.kernels, "kernels_detail": self.kernels_detail,
        }


# ---------------------------------------------------------------------------------------- loading
@dataclass
class Loaded:
    model: object
    tokenizer: object
    device: str
    dtype: str
    decode_step: object = None  # a nanocli_model.decode.CompiledDecode with --compile, else None (the model)
    kernels: object = None  # nanocli_model.kernels.KernelStatus on the model's device

    @property
    def decode(self) -> str:
        if self.decode_step is None:
            return "eager"
        reason = self.decode_step.fallback_reason
        return "compiled" if reason is None else f"eager (compile failed: {reason})"


def load(options: GenerateOptions) -> Loaded:
    """The model (weights on the chosen device/dtype) and its tokenizer, with one-line errors."""
    import torch

    from nanocli_model import load_pretrained
    from nanocli_model.tokenizer import Tokenizer

    path = Path(options.model)
    if not path.is_dir():
        raise GenerateError(f"{path}: not a model directory (config.json, safetensors, tokenizer.json)")
    if options.device not in ("auto", "cpu", "cuda"):
        raise GenerateError(f"--device must be auto, cpu or cuda, got {options.device!r}")
    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda: no CUDA GPU is visible; use --device cpu")
    dtype = options.dtype
    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise GenerateError(f"--dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    if dtype == "auto":  # bf16 matmuls are slow on most CPUs; the stored dtype on GPUs
        dtype = None if device == "cuda" else "fp32"
    tokenizer = Tokenizer.from_dir(path)
    try:
        model = load_pretrained(path, dtype=dtype, device=device)
    except torch.OutOfMemoryError:
        raise GenerateError(f"CUDA out of memory loading the weights of {path} ({options.dtype} on {device}): "
                            f"use a smaller --dtype (bf16) or a larger GPU; `nano fit-check --model {path} "
                            "--gpu auto` predicts it") from None
    step = None
    if options.compile:
        from nanocli_model.decode import CompiledDecode

        step = CompiledDecode(model)
    from nanocli_model import kernels

    return Loaded(model, tokenizer, device, str(model.dtype).replace("torch.", ""), step,
                  kernels.status(model.device))


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
    stripped = text.rstrip(" ")
    in_thinking = not options.raw and stripped.endswith((THINK_OPEN, THINK_OPEN + "\n"))
    return ids, in_thinking


def _newline_ids(tokenizer) -> set[int]:
    """Ids whose text holds a newline; a scan of the vocabulary, done once per tokenizer (chat turns reuse it)."""
    cached = getattr(tokenizer, "_nano_newline_ids", None)
    if cached is None:
        cached = {i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i])}
        tokenizer._nano_newline_ids = cached
    return cached


DEFAULT_THINK_CLOSE = "</think>\n\n"


def think_close_text(tokenizer) -> str:
    """What the thinking budget forces to end a thinking span: the text between the thinking and the answer
    in this model's own chat template (what SFT trained it to see), without its leading newlines (the span
    ends after a newline the model wrote). ``"</think>\n\n"`` when the template does not show it."""
    cached = getattr(tokenizer, "_nano_think_close", None)
    if cached is not None:
        return cached
    close = DEFAULT_THINK_CLOSE
    if tokenizer.chat_template is not None:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"},
                 {"role": "assistant", "content": f"{THINK_OPEN}\nTHOUGHTS\n{THINK_CLOSE}\nANSWER"}],
                add_generation_prompt=False)
        except NanoError:
            text = ""
        i = text.rfind("THOUGHTS")
        j = text.find("ANSWER", i) if i >= 0 else -1
        if j > 0 and THINK_CLOSE in text[i:j]:
            close = text[i + len("THOUGHTS"):j].lstrip("\n")
    tokenizer._nano_think_close = close
    return close


def split_thinking(text: str, in_thinking: bool) -> tuple[str, str]:
    """(thinking, answer) of a generated text that starts inside the thinking span or not."""
    if not in_thinking:
        return "", text
    thinking, sep, answer = text.partition(THINK_CLOSE)
    return (thinking, answer) if sep else (text, "")


# ---------------------------------------------------------------------------------------- generation
OnText = Callable[[int, str, bool], None]  # (row, new text, inside thinking)


def run(options: GenerateOptions, prompts: list[str | list[dict]], loaded: Loaded | None = None,
        on_text: OnText | None = None) -> GenerateResult:
    """Generate a completion for every prompt (batched), streaming text through ``on_text``."""
    from nanocli_model.generation import SamplingParams, ThinkingBudget, generate
    from nanocli_model.tokenizer import StreamDecoder

    def sampling(max_new: int) -> SamplingParams:  # validates every value (one-line GenerationError)
        return SamplingParams(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                              min_p=options.min_p, repetition_penalty=options.repetition_penalty,
                              seed=options.seed, max_new_tokens=max_new, ignore_eos=options.ignore_eos,
                              eos_ids=set() if options.ignore_eos else set(loaded.tokenizer.eos_ids))

    if options.max_context is not None and options.max_context < 1:
        raise GenerateError(f"--max-context must be at least 1 token, got {options.max_context}")
    if options.thinking_grace < 0:
        raise GenerateError(f"--thinking-grace must be >= 0 tokens, got {options.thinking_grace}")
    if options.seed is not None and not -2**63 <= options.seed < 2**64:  # torch.Generator's range
        raise GenerateError(f"--seed must be an integer in -2^63..2^64-1, got {options.seed}")
    loaded = loaded or load(options)
    tok, model = loaded.tokenizer, loaded.model
    sampling(options.max_new_tokens or 1)
    if not prompts:
        raise GenerateError("no prompt given: pass it as an argument, with --file, on stdin or with --input")
    built = [prompt_ids(tok, p, options) for p in prompts]
    ids = [b[0] for b in built]
    limit = options.max_context or model.config.max_position_embeddings
    max_new = options.max_new_tokens
    if max_new is None:  # the default: as much as the context leaves, up to DEFAULT_MAX_NEW_TOKENS
        max_new = max(1, min(DEFAULT_MAX_NEW_TOKENS, limit - max(len(r) for r in ids)))
    for i, row in enumerate(ids):
        if len(row) + max_new > limit:
            if not options.truncate_left or max_new >= limit:
                raise GenerateError(f"prompt {i + 1} has {len(row)} tokens; with {max_new} new tokens that "
                                    f"exceeds the context limit {limit} (use --truncate left, a shorter prompt, "
                                    "fewer --max-new-tokens or a larger --max-context)")
            ids[i] = row[len(row) + max_new - limit:]
    params = sampling(max_new)
    thinking = None
    if options.thinking_budget is not None:
        if tok.think_end_id is None:
            raise GenerateError("--thinking-budget: this tokenizer has no </think> token")
        thinking = ThinkingBudget(options.thinking_budget, tok.encode("\n" + think_close_text(tok)),
                                  _newline_ids(tok), options.thinking_grace, in_thinking=[b[1] for b in built],
                                  close_ids={tok.think_end_id})
    streams = [StreamDecoder(tok, skip_special_tokens=True, context_ids=row[-5:]) for row in ids]
    texts = [""] * len(ids)
    inside = [b[1] for b in built]
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
        thinking_text, answer = split_thinking(texts[i], built[i][1])
        reason = "stop" if stopped[i] else completion.finish_reason
        outputs.append(Output(ids[i], completion.token_ids, texts[i], thinking_text.strip("\n"), answer.strip(),
                              reason, completion.thinking_tokens, completion.budget_forced))
    ran = loaded.kernels
    return GenerateResult(outputs, stats, loaded.device, loaded.dtype, loaded.decode,
                          ran.label if ran else "reference", ran.describe() if ran else "")


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


def read_jsonl(path: Path) -> list[str | list[dict]]:
    """``--input``: one ``{"prompt": str}`` or ``{"messages": [...]}`` per line."""
    prompts: list[str | list[dict]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GenerateError(f"{path}: cannot be read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerateError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise GenerateError(f"{path}:{n}: JSON nested too deeply; fix or remove the line") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            prompts.append(row["messages"])
        else:
            raise GenerateError(f'{path}:{n}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
    if not prompts:
        raise GenerateError(f"{path}: no prompts in the file")
    return prompts


def write_jsonl(path: Path, result: GenerateResult) -> None:
    """``--output``: one result object per prompt, written to a temporary file and renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for o in result.outputs:
            f.write(json.dumps({"text": o.text, "thinking": o.thinking, "answer": o.answer,
                                "finish_reason": o.finish_reason, "prompt_tokens": len(o.prompt_ids),
                                "generated_tokens": len(o.generated_ids)}) + "\n")
    tmp.replace(path)
