"""``nano eval``: held-out accuracy on the built-in reasoning tasks, a thinking-budget sweep, perplexity.

Steps, top to bottom:
  1. ``EvalOptions`` the options, checked by ``settings.validate`` (one-line errors before any weights load).
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

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from nanocli_model.errors import NanoError

from .. import settings
from ..reasoning_accuracy import Accuracy
from ..report import SILENT, Reporter
from ..settings import flag
from .generate import Checkpoint

MODES = ("think", "no_think")


class EvalError(NanoError):
    """Bad input to ``nano eval``."""


# ------------------------------------------------------------------------------------------ 1. options
@dataclass
class Problems(settings.Group):
    """The held-out reasoning problems and how they are asked."""

    panel = "Accuracy"

    problems: int = flag(100, aliases=("-n",))
    """Held-out synthetic problems per mode and budget (0: accuracy off)."""
    mode: Literal["both", "think", "no_think"] = "both"
    """Reasoning on (think), off (no_think) or both."""
    prompt_format: Literal["chat", "text"] = "chat"
    """chat (the model's template) or text (the pretraining format, for a base model)."""
    budgets: tuple[int, ...] = ()
    """Thinking budgets to sweep, e.g. 8,16,32,64."""
    tasks: str | None = None
    """Synthetic tasks, comma-separated (default: all)."""
    difficulty: str = "1-3"
    """A level 1..5 or a range lo-hi."""
    max_new_tokens: int = 256
    """Per answer."""
    samples: int = 1
    """Completions per problem (1: greedy; more: sampled at --temperature, scored as the mean exact-answer
    reward)."""
    temperature: float = 0.0
    """Sampling temperature with --samples."""
    batch: int = 32
    """Problems generated together (perplexity: windows per forward)."""
    seed: int = 1234
    """Which held-out problems."""

    def check(self) -> None:
        settings.at_least(self, 0, "problems")
        settings.at_least(self, 1, "max_new_tokens", "batch", "samples")
        settings.finite(self, "temperature", minimum=0)
        if self.samples > 1 and not self.temperature > 0:
            raise settings.OptionError(f"--samples {self.samples} needs --temperature > 0 (greedy answers are all "
                                       "the same)")
        if any(b < 1 for b in self.budgets):
            raise settings.OptionError(f"--budgets {','.join(map(str, self.budgets))}: every budget must be a "
                                       "positive token count")
        budgets = self.budget_list
        if budgets and self.prompt_format == "text":
            raise settings.OptionError("--budgets applies to chat answers with reasoning on, not --prompt-format "
                                       "text")
        if budgets and "think" not in self.modes and self.problems:
            raise settings.OptionError("--budgets sweeps reasoning-on answers; drop --mode no_think or the budgets")
        self.problem_set()

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.mode == "both" else (self.mode,)

    @property
    def budget_list(self) -> tuple[int, ...]:
        """The budgets in increasing order, without repeats."""
        return tuple(sorted(set(self.budgets)))

    def problem_set(self) -> tuple[Any, tuple[int, int]]:
        """The synthetic (tasks, difficulty) of ``--tasks`` and ``--difficulty``."""
        from ..data import synthetic

        parsed = {}
        for key, value in (("difficulty", self.difficulty), ("tasks", self.tasks)):
            try:
                parsed[key] = synthetic.parse_synthetic_options(f"{key}={value}" if value else "")[key]
            except NanoError as e:  # "synthetic:reasoning: difficulty must be ..." -> "--difficulty 7: must be ..."
                why = str(e).replace("synthetic:reasoning: ", "").removeprefix(f"{key} ").split(", got ")[0]
                raise settings.OptionError(f"--{key} {value}: {why}") from None
        return parsed["tasks"], parsed["difficulty"]


@dataclass
class PerplexityText(settings.Group):
    panel = "Perplexity"

    data: str | None = None
    """Held-out text for perplexity (a --data spec; synthetic: uses its held-out split)."""
    seq_len: int = 512
    """Perplexity window in tokens."""
    ppl_tokens: int = 65_536
    """Tokens scored for perplexity at most."""
    cache_dir: str | None = None
    """Token shard cache for --data (default $NANO_CACHE, else $XDG_CACHE_HOME/nano, else ~/.cache/nano)."""

    def check(self) -> None:
        settings.at_least(self, 1, "seq_len")
        settings.at_least(self, 0, "ppl_tokens")


@dataclass
class EvalOptions(PerplexityText, Problems, Checkpoint):
    """Everything ``nano eval`` can be told."""

    def check(self) -> None:
        if self.problems == 0 and self.data is None:
            raise settings.OptionError("nothing to evaluate: --problems 0 and no --data for perplexity")


def parse_budgets(text: str) -> tuple[int, ...]:
    """The command line's ``--budgets 16,32,64`` -> (16, 32, 64) (a recipe gives a list)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values and text.strip():
        raise EvalError(f"--budgets {text!r}: give token counts separated by commas, e.g. 16,32,64")
    return values


# ------------------------------------------------------------------------------------------ results
@dataclass
class Perplexity:
    """Mean next-token loss over held-out windows."""

    loss: float
    ppl: float
    tokens: int
    windows: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalResult:
    options: EvalOptions
    params: int = 0
    accuracy: dict[str, Accuracy] = field(default_factory=dict)  # by mode: think, no_think (or text)
    sweep: list[Accuracy] = field(default_factory=list)  # reasoning on, one per budget
    perplexity: Perplexity | None = None
    seconds: float = 0.0
    device: str = "cpu"
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)  # e.g. why --dtype auto chose bf16 on this CPU

    def to_json(self) -> dict[str, Any]:
        o = self.options
        return {"model": o.model, "params": self.params, "device": self.device, "dtype": self.dtype,
                "problems": {"n": o.problems, "tasks": o.tasks or "all", "difficulty": o.difficulty, "seed": o.seed,
                             "samples": o.samples, "temperature": o.temperature},
                "accuracy": {mode: a.to_json() for mode, a in self.accuracy.items()},
                "budget_sweep": [a.to_json() for a in self.sweep],
                "perplexity": {} if self.perplexity is None else self.perplexity.to_json(),
                "seconds": round(self.seconds, 2), "notes": self.notes}


# ------------------------------------------------------------------------------------------ 2-5. run
def run(o: EvalOptions, reporter: Reporter | None = None, loaded=None) -> EvalResult:
    """Evaluate ``o.model`` (or an already ``loaded`` ``generate.Loaded``)."""
    reporter = reporter or SILENT
    settings.validate(o, EvalError)
    if loaded is None:  # before any work: a model directory with weights, or a run directory's model
        from ..resolve import model_target

        model_target(o.model, kinds=("checkpoint", "run"))
    t0 = time.perf_counter()
    if loaded is None:
        from .generate import GenerateError, load

        reporter.status(f"loading {o.model}")
        try:
            loaded = load(o)
        except GenerateError as e:
            raise EvalError(str(e)) from None
    import torch

    try:
        return _evaluate(o, loaded, reporter, t0)
    except torch.OutOfMemoryError:
        raise EvalError(f"CUDA out of memory evaluating {o.model}: lower --batch ({o.batch} problems at once), "
                        f"--max-new-tokens ({o.max_new_tokens}) or --seq-len ({o.seq_len}); `nano fit-check --model "
                        f"{o.model} --batch {o.batch} --context {o.max_new_tokens + 512} --gpu auto` estimates a "
                        "batch of answers") from None


def _evaluate(o: EvalOptions, loaded, reporter: Reporter, t0: float) -> EvalResult:
    from nanocli_model.quant import parameter_count  # imports torch: not at registration

    model, tokenizer = loaded.model, loaded.tokenizer
    result = EvalResult(options=o, params=parameter_count(model), device=loaded.device,
                        dtype=loaded.dtype, notes=list(loaded.notes))
    if o.problems:
        if tokenizer.chat_template is None and o.prompt_format == "chat":
            raise EvalError(f"{o.model}: the tokenizer has no chat template; accuracy asks through it "
                            "(use --prompt-format text for a base model, or --problems 0 for perplexity only)")
        result.accuracy, result.sweep = _accuracy(model, tokenizer, o, reporter)
    if o.data is not None:
        reporter.status(f"perplexity on {o.data}")
        result.perplexity = perplexity(model, tokenizer, o)
    result.seconds = time.perf_counter() - t0
    return result


def _accuracy(model, tokenizer, o: EvalOptions, reporter: Reporter) -> tuple[dict[str, Accuracy], list[Accuracy]]:
    from ..reasoning_accuracy import reasoning_accuracy

    tasks, difficulty = o.problem_set()
    kw = dict(n=o.problems, seed=o.seed, max_new_tokens=o.max_new_tokens, batch=o.batch, tasks=tasks,
              difficulty=difficulty, samples=o.samples, temperature=o.temperature)
    if o.prompt_format == "text":
        reporter.status(f"{o.problems} held-out problems in the pretraining format")
        return {"text": reasoning_accuracy(model, tokenizer, prompt_format="text", **kw)}, []
    accuracy = {}
    for mode in o.modes:
        reporter.status(f"{o.problems} held-out problems, reasoning {'on' if mode == 'think' else 'off'}")
        accuracy[mode] = reasoning_accuracy(model, tokenizer, think=mode == "think", **kw)
    sweep = []
    for budget in o.budget_list:
        reporter.status(f"{o.problems} held-out problems, thinking budget {budget}")
        sweep.append(reasoning_accuracy(model, tokenizer, think=True, budget=budget, **kw))
    return accuracy, sweep


def heldout_spec(spec: str) -> str:
    """A ``synthetic:`` spec without a split gets ``split=heldout`` (perplexity on problems never trained on)."""
    if spec.startswith("synthetic:") and "split=" not in spec:
        return spec + ("&" if "?" in spec else "?") + "split=heldout"
    return spec


def perplexity(model, tokenizer, o: EvalOptions) -> Perplexity:
    """Mean next-token loss over consecutive ``seq_len``-token windows of the held-out text."""

    import torch

    from nanocli_model.losses import causal_lm_loss

    from ..data import DataError, parse_data_spec, prepare_source

    try:
        specs = parse_data_spec(heldout_spec(o.data))
    except DataError as e:
        raise EvalError(str(e)) from None
    from .. import resolve

    cache = resolve.cache_dir(o.cache_dir)
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
    return Perplexity(loss=loss, ppl=math.exp(min(loss, 50.0)), tokens=count, windows=windows)
