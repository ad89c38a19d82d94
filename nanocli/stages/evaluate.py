"""``nano eval``: held-out accuracy on the built-in reasoning tasks, a thinking-budget sweep, perplexity.

Steps, top to bottom:
  1. ``check``       the options (one-line errors before any weights load).
  2. ``load``        the model and tokenizer (as ``nano generate`` loads them: device, dtype).
  3. ``accuracy``    greedy answers to ``--problems`` held-out problems (``synthetic.generate(split="heldout")``,
                     keys never seen in training), asked through the model's chat template with reasoning on
                     (``/think``) and off (``/no_think``); scored on the text after the last ``</think>``.
  4. ``sweep``       the same problems with reasoning on under each ``--budgets`` thinking budget (the report's
                     accuracy-vs-budget curve; ``nano generate``'s budget rule: close at the next newline).
  5. ``perplexity``  mean next-token loss on held-out text (``--data``; a ``synthetic:`` spec defaults to its
                     held-out split), over consecutive windows of ``--seq-len`` tokens, up to ``--ppl-tokens``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nanocli_model.errors import NanoError

MODES = ("think", "no_think")


class EvalError(NanoError):
    """Bad input to ``nano eval``."""


@dataclass
class EvalOptions:
    """Everything ``nano eval`` can be told."""

    model: str  # a NemotronH directory with its tokenizer (and chat template, for accuracy)
    problems: int = 100  # held-out problems per mode and per budget (0: no accuracy)
    tasks: str | None = None  # comma-separated synthetic tasks (default: all)
    difficulty: str = "1-3"  # a level or a range lo-hi (1..5)
    modes: tuple[str, ...] = MODES  # think and/or no_think
    prompt_format: str = "chat"  # chat (the model's template) | text (pretraining format, for base models)
    budgets: tuple[int, ...] = ()  # thinking budgets to sweep (reasoning on)
    data: str | None = None  # held-out text for perplexity (a --data spec)
    seq_len: int = 512  # perplexity window
    ppl_tokens: int = 65_536  # tokens scored for perplexity at most
    max_new_tokens: int = 256  # per answer
    samples: int = 1  # completions per problem: 1 greedy; more sampled at --temperature (mean reward, pass@1)
    temperature: float = 0.0  # with --samples > 1
    batch: int = 32  # problems generated together
    seed: int = 1234  # which held-out problems
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: str | None = None  # token shards for --data (default $NANO_CACHE or ~/.cache/nano)


@dataclass
class EvalResult:
    options: EvalOptions
    params: int = 0
    accuracy: dict = field(default_factory=dict)  # mode -> Accuracy.as_dict()
    sweep: list = field(default_factory=list)  # [Accuracy.as_dict()] with think=True, one per budget
    perplexity: dict = field(default_factory=dict)  # {loss, ppl, tokens, windows}
    seconds: float = 0.0
    device: str = "cpu"
    dtype: str = "float32"

    def as_dict(self) -> dict:
        o = self.options
        return {"model": o.model, "params": self.params, "device": self.device, "dtype": self.dtype,
                "problems": {"n": o.problems, "tasks": o.tasks or "all", "difficulty": o.difficulty, "seed": o.seed,
                             "samples": o.samples, "temperature": o.temperature},
                "accuracy": self.accuracy, "budget_sweep": self.sweep, "perplexity": self.perplexity,
                "seconds": round(self.seconds, 2)}


@dataclass
class Hooks:
    status: Callable[[str], None] = lambda msg: None


def parse_budgets(text: str | None) -> tuple[int, ...]:
    """``"16,32,64"`` -> (16, 32, 64): positive, increasing order, no repeats."""
    if not text:
        return ()
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"--budgets {text!r}: give token counts separated by commas, e.g. 16,32,64") from None
    if not values or min(values) < 1:
        raise EvalError(f"--budgets {text!r}: every budget must be a positive token count")
    return tuple(sorted(set(values)))


def parse_modes(text: str) -> tuple[str, ...]:
    """``both`` | ``think`` | ``no_think`` (``no-think`` too)."""
    value = text.replace("-", "_")
    if value == "both":
        return MODES
    if value in MODES:
        return (value,)
    raise EvalError(f"--mode {text!r} is unknown; use both, think or no_think")


# ------------------------------------------------------------------------------------------ 1. check
def check(o: EvalOptions) -> tuple:
    """Validate; returns the synthetic (tasks, difficulty) for the problems."""
    from ..data import synthetic

    path = Path(o.model)
    if not (path / "config.json").is_file():
        raise EvalError(f"{path}: not a model directory (no config.json); pass a NemotronH checkpoint")
    for name in ("problems", "ppl_tokens"):
        if getattr(o, name) < 0:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(o, name)}")
    for name in ("seq_len", "max_new_tokens", "batch"):
        if getattr(o, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(o, name)}")
    if o.samples > 1 and not o.temperature > 0:
        raise EvalError(f"--samples {o.samples} needs --temperature > 0 (greedy answers are all the same)")
    if o.samples < 1 or o.temperature < 0:
        raise EvalError("--samples must be at least 1 and --temperature >= 0")
    if o.prompt_format not in ("chat", "text"):
        raise EvalError(f"--prompt-format {o.prompt_format!r} is unknown; use chat or text")
    if o.problems == 0 and o.data is None:
        raise EvalError("nothing to evaluate: --problems 0 and no --data for perplexity")
    if o.budgets and o.prompt_format == "text":
        raise EvalError("--budgets applies to chat answers with reasoning on, not --prompt-format text")
    if o.budgets and "think" not in o.modes and o.problems:
        raise EvalError("--budgets sweeps reasoning-on answers; drop --mode no_think or the budgets")
    try:
        opts = synthetic.parse_synthetic_options(f"difficulty={o.difficulty}" + (f"&tasks={o.tasks}" if o.tasks else ""))
    except NanoError as e:
        raise EvalError(str(e).replace("synthetic:reasoning: ", "")) from None
    return opts["tasks"], opts["difficulty"]


# ------------------------------------------------------------------------------------------ 2-5. run
def run(o: EvalOptions, hooks: Hooks | None = None, loaded=None) -> EvalResult:
    """Evaluate ``o.model`` (or an already ``loaded`` ``generate.Loaded``)."""
    hooks = hooks or Hooks()
    tasks, difficulty = check(o)
    t0 = time.perf_counter()
    if loaded is None:
        from .generate import GenerateError, GenerateOptions, load

        hooks.status(f"loading {o.model}")
        try:
            loaded = load(GenerateOptions(model=o.model, device=o.device, dtype=o.dtype))
        except GenerateError as e:
            raise EvalError(str(e)) from None
    import torch

    try:
        return _evaluate(o, loaded, tasks, difficulty, hooks, t0)
    except torch.OutOfMemoryError:
        raise EvalError(f"CUDA out of memory evaluating {o.model}: lower --batch ({o.batch} problems at once), "
                        f"--max-new-tokens ({o.max_new_tokens}) or --seq-len ({o.seq_len}); `nano fit-check --model "
                        f"{o.model} --batch {o.batch} --context {o.max_new_tokens + 512} --gpu auto` estimates a "
                        "batch of answers") from None


def _evaluate(o: EvalOptions, loaded, tasks, difficulty, hooks: Hooks, t0: float) -> EvalResult:
    model, tokenizer = loaded.model, loaded.tokenizer
    result = EvalResult(options=o, params=sum(p.numel() for p in model.parameters()), device=loaded.device,
                        dtype=loaded.dtype)
    if o.problems:
        if tokenizer.chat_template is None and o.prompt_format == "chat":
            raise EvalError(f"{o.model}: the tokenizer has no chat template; accuracy asks through it "
                            "(use --prompt-format text for a base model, or --problems 0 for perplexity only)")
        result.accuracy, result.sweep = _accuracy(model, tokenizer, o, tasks, difficulty, hooks)
    if o.data is not None:
        hooks.status(f"perplexity on {o.data}")
        result.perplexity = perplexity(model, tokenizer, o, hooks)
    result.seconds = time.perf_counter() - t0
    return result


def _accuracy(model, tokenizer, o: EvalOptions, tasks, difficulty, hooks: Hooks) -> tuple[dict, list]:
    from ..evals import reasoning_accuracy

    kw = dict(n=o.problems, seed=o.seed, max_new_tokens=o.max_new_tokens, batch=o.batch, tasks=tasks,
              difficulty=difficulty, samples=o.samples, temperature=o.temperature)
    accuracy = {}
    if o.prompt_format == "text":
        hooks.status(f"{o.problems} held-out problems in the pretraining format")
        return {"text": reasoning_accuracy(model, tokenizer, prompt_format="text", **kw).as_dict()}, []
    for mode in o.modes:
        hooks.status(f"{o.problems} held-out problems, reasoning {'on' if mode == 'think' else 'off'}")
        accuracy[mode] = reasoning_accuracy(model, tokenizer, think=mode == "think", **kw).as_dict()
    sweep = []
    for budget in o.budgets:
        hooks.status(f"{o.problems} held-out problems, thinking budget {budget}")
        sweep.append(reasoning_accuracy(model, tokenizer, think=True, budget=budget, **kw).as_dict())
    return accuracy, sweep


def heldout_spec(spec: str) -> str:
    """A ``synthetic:`` spec without a split gets ``split=heldout`` (perplexity on problems never trained on)."""
    if spec.startswith("synthetic:") and "split=" not in spec:
        return spec + ("&" if "?" in spec else "?") + "split=heldout"
    return spec


def perplexity(model, tokenizer, o: EvalOptions, hooks: Hooks) -> dict:
    """Mean next-token loss over consecutive ``seq_len``-token windows of the held-out text."""
    import os

    import torch

    from nanocli_model.losses import causal_lm_loss

    from ..data import DataError, parse_data_spec, prepare_source

    try:
        specs = parse_data_spec(heldout_spec(o.data))
    except DataError as e:
        raise EvalError(str(e)) from None
    cache = Path(o.cache_dir or os.environ.get("NANO_CACHE") or Path.home() / ".cache" / "nano")
    device = next(model.parameters()).device
    window = o.seq_len + 1
    total, count, windows = 0.0, 0, 0
    was_training = model.training
    model.eval()
    try:
        for spec in specs:
            source = prepare_source(spec, tokenizer, cache, vocab_size=model.config.vocab_size)
            n = min(source.n_tokens, max(o.ppl_tokens - count, 0) + 1)
            rows = (n - 1) // o.seq_len
            if rows == 0:
                continue
            data = torch.from_numpy(source.tokens[:rows * o.seq_len + 1].astype("int64"))
            for start in range(0, rows, o.batch):  # (b, seq_len + 1) windows that share their edge token
                idx = torch.arange(start, min(start + o.batch, rows))[:, None] * o.seq_len + torch.arange(window)
                batch = data[idx].to(device)
                with torch.no_grad():
                    loss, k = causal_lm_loss(model, batch[:, :-1], batch[:, 1:])
                total += float(loss)
                count += int(k)
                windows += batch.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise EvalError(f"--data {o.data}: fewer than {o.seq_len + 1} tokens of text; give more text or a "
                        "smaller --seq-len")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, "windows": windows}
