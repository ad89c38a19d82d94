"""``nano align``: SFT with reasoning on/off and thinking-budget traces, DPO, GRPO; ``nano align merge``.

Steps, top to bottom:
  1. ``plan``     settings (defaults < recipe < flags, checked once), the policy's config, tokenizer and chat
                  template, the examples read and prepared by the method (``align_methods.py``; SFT:
                  assistant-only labels, think mix, budget cuts, packing; DPO: chosen/rejected pairs; GRPO:
                  prompts, rewards) and the step plan: everything ``--dry-run`` prints.
  2. the run      ``train/run.py``'s skeleton (lock, resume, loop, checkpoints) with what alignment adds: the
                  policy (``--model``, fp32 master weights), held-out accuracy of the built-in reasoning tasks
                  before and after (``--eval-problems``, into ``OUT/eval.json``), the method's references
                  (DPO, GRPO with a KL) and loss (token-mean CE; sigmoid DPO; clipped GRPO surrogate).

GRPO and ``mu`` (TRL's ``num_iterations``, the paper's mu): ``--steps`` counts *optimizer* steps, as in
TRL, and a batch of rollouts serves ``mu`` of them. Step ``s`` (0-based) trains on rollout batch
``k = s // mu``: at ``s = k * mu`` the prompts of batch ``k`` are sampled with the policy as it is then
(seeded by ``k``), scored, their group-normalised advantages taken and, when ``mu > 1``, the policy's
per-token log-probabilities computed once without gradient (``logp_old``, under the run's precision);
each of the ``mu`` steps recomputes the current log-probabilities and takes the clipped surrogate of
``ratio = exp(logp - logp_old)``, so ``clip_eps`` bounds how far the later passes move each token.
With ``mu = 1`` (the default) ``logp_old`` is the same forward's log-probabilities detached: the ratio
is 1 and the clip never acts (the plain policy gradient, one forward per step). ``--epochs`` counts
passes over the prompts: ``ceil(epochs * prompts / global_batch) * mu`` steps; when ``--steps`` is not a
multiple of ``mu`` the last batch gets fewer passes. A checkpoint written inside a batch's ``mu`` steps
carries that batch (every process's rollouts, advantages, ``logp_old`` and reference log-probabilities):
it cannot be regenerated from the checkpoint's weights, which have moved since the rollout, so the resume
trains on the stored batch and is exact (it needs the same number of processes).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from nanocli_model.errors import NanoError

from .. import settings
from ..report import Reporter
from ..settings import OptionError, at_least, finite, flag, within
from ..train import run as skeleton
from ..train.options import Epochs, Training
from ..train.run import Job, Plan, TrainResult, schedule
from .align_methods import AlignError, PairAccuracy

if TYPE_CHECKING:
    from ..reasoning_accuracy import Accuracy

STAGE = "align"
UNITS = {"sft": "tokens", "dpo": "pairs", "grpo": "sequences"}  # what a step counts, per method


@dataclass
class Policy(settings.Group):
    panel = "Method and data"

    method: Literal["sft", "dpo", "grpo"] = "sft"
    """sft, dpo or grpo."""
    model: str | None = flag(None, aliases=("-m",))
    """The checkpoint to align (with its tokenizer and chat template), or a run directory."""
    data: str | None = None
    """A .jsonl (TRL formats: messages, prompt/completion, prompt/chosen/rejected, prompt) or
    synthetic:reasoning?...."""
    too_long: Literal["truncate", "drop"] = "truncate"
    """Examples longer than --seq-len: truncate or drop."""
    on_error: Literal["stop", "skip"] = "stop"
    """Malformed JSONL lines: stop or skip."""
    heldout_fraction: float = 0.05
    """DPO: share of the pairs kept for held-out preference accuracy."""
    eval_problems: int = 64
    """Held-out synthetic problems scored before and after (0: off)."""

    def check(self) -> None:
        if self.model is None:
            raise OptionError("--model DIR is required: the checkpoint to align (with its tokenizer)")
        if self.data is None:
            raise OptionError("--data is required: a .jsonl (TRL format) or synthetic:reasoning")
        within(self, "heldout_fraction", 0, 1, hi_open=True)
        at_least(self, 0, "eval_problems")


@dataclass
class SFT(settings.Group):
    panel = "SFT"

    think_mix: float = 0.9
    """SFT: share of examples with reasoning on (the report removed it from ~10%)."""
    budget_fraction: float = 0.1
    """SFT: share of reasoning-on examples cut at a random thinking budget."""
    pack: bool = True
    """SFT: pack short examples into rows of --seq-len."""

    def check(self) -> None:
        within(self, "think_mix", 0, 1)
        within(self, "budget_fraction", 0, 1)


@dataclass
class DPO(settings.Group):
    panel = "DPO"

    beta: float = 0.1
    """DPO beta."""
    label_smoothing: float = 0.0
    """DPO label smoothing (0: the plain sigmoid loss)."""

    def check(self) -> None:
        finite(self, "beta", positive=True)
        within(self, "label_smoothing", 0, 0.5, hi_open=True)


@dataclass
class GRPO(settings.Group):
    panel = "GRPO"

    group_size: int = 4
    """GRPO completions per prompt."""
    max_new_tokens: int = 160
    """GRPO rollout length."""
    temperature: float = 1.0
    """GRPO sampling temperature."""
    top_p: float = 1.0
    """GRPO nucleus sampling (1: off)."""
    thinking_budget: int | None = None
    """GRPO: thinking budget during rollouts."""
    rewards: str = "exact,format:0.2"
    """GRPO rewards: built-ins (exact, format) or module:function, with :weight."""
    kl_beta: float = 0.0
    """GRPO KL weight (0: no reference model is kept)."""
    clip_eps: float = 0.2
    """GRPO ratio clip range [1 - eps, 1 + eps]; acts from a batch's second pass (--mu > 1)."""
    mu: int = 1
    """GRPO optimizer steps on each batch of rollouts (TRL's num_iterations); old log-probs fixed at rollout."""

    def check(self) -> None:
        at_least(self, 1, "group_size", "max_new_tokens")
        at_least(self, 0, "thinking_budget")
        finite(self, "temperature", "kl_beta", minimum=0)
        finite(self, "clip_eps", "top_p", positive=True)
        within(self, "top_p", 0, 1)
        if isinstance(self.mu, bool) or not isinstance(self.mu, int) or self.mu < 1:
            raise OptionError(f"--mu must be an integer of at least 1 (optimizer steps per batch of rollouts), "
                              f"got {self.mu!r}")


@dataclass
class AlignOptions(Training, Epochs, GRPO, DPO, SFT, Policy):
    """Everything ``nano align`` can be told (defaults < recipe < flags)."""

    min_lr_divisor: ClassVar[int] = 10
    seq_len: int = 512
    """Longest example in tokens (SFT rows, DPO prompt + completion, GRPO prompts)."""
    global_batch: int = 16
    """Examples per optimizer step (SFT rows, DPO pairs, GRPO prompts), over all processes."""
    micro_batch: int | None = None
    """Examples per forward per process (SFT, DPO; default: the whole batch)."""
    schedule: Literal["wsd", "cosine", "constant"] = "cosine"
    lr: float = 1e-4
    warmup: float = 0.03
    weight_decay: float = 0.0

    def check(self) -> None:
        if self.method == "grpo" and self.group_size < 2:
            raise OptionError("--group-size must be at least 2 for GRPO (advantages compare completions of a "
                              "prompt)")
        if self.mu != 1 and self.method != "grpo":
            raise OptionError(f"--mu {self.mu} applies to --method grpo only (optimizer steps per batch of rollouts)")


@dataclass
class AlignPlan(Plan):
    """The plan of a run: what ``--dry-run`` prints."""

    TRAJECTORY: ClassVar[tuple[str, ...]] = (*Plan.TRAJECTORY, "method", "think_mix", "budget_fraction", "beta",
                                             "group_size", "rewards", "mu")

    options: AlignOptions
    model_dir: Path
    data_stats: dict  # lines, records, used, dropped, think on/off, tokens ... (ReadStats)
    method: Any  # the prepared examples, pairs or prompts (align_methods.SFT / DPO / GRPO)
    tokenizer: Any

    @property
    def examples(self) -> int:
        return self.method.size

    @property
    def rollout_batches(self) -> int | None:
        """GRPO: batches of rollouts the steps sample (a batch serves --mu steps)."""
        return math.ceil(self.steps / self.options.mu) if self.options.method == "grpo" else None

    @property
    def unit(self) -> str:
        return UNITS[self.options.method]


@dataclass
class AlignResult(TrainResult):
    plan: AlignPlan
    before: dict[str, Accuracy] = field(default_factory=dict)  # held-out accuracy of the input model, per mode
    after: dict[str, Accuracy] = field(default_factory=dict)  # ... of the aligned model (think, no_think)
    pairs_before: PairAccuracy | None = None  # DPO: its held-out pairs, input model
    pairs_after: PairAccuracy | None = None  # ... aligned model


# ------------------------------------------------------------------------------------------ 1. plan
def plan(o: AlignOptions) -> AlignPlan:
    """The checks before any work, the data read and prepared by the method, and the step plan."""
    from nanocli_model.tokenizer import Tokenizer

    from ..data.chat import ReadStats, read_jsonl_records
    from ..resolve import model_target
    from .align_methods import METHODS

    settings.validate(o, AlignError)
    try:
        target = model_target(o.model, "--model", kinds=("checkpoint", "run"))
    except NanoError as e:
        if o.resume is None:
            raise
        raise AlignError(f"{e}; a resume needs the run's input model (its tokenizer and, for DPO and GRPO with a KL "
                         "term, the reference): give --model where that model is now") from None
    limit = target.config.max_position_embeddings
    if o.seq_len > limit:
        raise AlignError(f"--seq-len {o.seq_len} exceeds the model's context limit (max_position_embeddings "
                         f"{limit}); use --seq-len {limit} or less")
    tokenizer = Tokenizer.from_dir(target.directory)
    if tokenizer.chat_template is None:
        raise AlignError(f"{o.model}: the tokenizer has no chat template; alignment trains on chat-formatted data")
    stats = ReadStats()
    records = read_jsonl_records(_data_spec(o), on_error=o.on_error, stats=stats, kind=o.method)
    method = METHODS[o.method](o, tokenizer, records, stats)
    passes = o.mu if o.method == "grpo" else 1  # optimizer steps per batch (GRPO: per batch of rollouts)
    per_epoch = math.ceil(method.size / o.global_batch)
    steps = o.steps if o.steps is not None else max(1, math.ceil(o.epochs * per_epoch)) * passes
    return AlignPlan(options=o, config=target.config, steps=steps, schedule=schedule(o, steps),
                     model_dir=target.directory, data_stats=stats.as_dict(), method=method, tokenizer=tokenizer)


def _data_spec(o: AlignOptions) -> str:
    """Synthetic specs get the method's format unless they name one."""
    if o.data.startswith("synthetic:") and "format=" not in o.data:
        return o.data + ("&" if "?" in o.data else "?") + f"format={o.method}"
    return o.data


def run(o: AlignOptions, reporter: Reporter | None = None, planned: AlignPlan | None = None) -> AlignResult:
    """Plan (unless ``planned``), then train (``--dry-run``: only the plan); returns what happened."""
    return skeleton.run(planned or plan(o), AlignResult, _Align, reporter)


# ------------------------------------------------------------------------------------------ 2. the run
class _Align:
    """What alignment gives the skeleton (``train/run.py``)."""

    error = AlignError

    def __init__(self, plan: AlignPlan, result: AlignResult):
        self.plan, self.result = plan, result
        self.name = f"{STAGE} ({plan.options.method})"

    def host_need(self, dist, shards: int) -> list:
        """The policy in training and, for DPO and GRPO with a KL term, its frozen fp32 copy (the reference)."""
        from .. import host_memory as hm

        p, o = self.plan, self.plan.options
        if dist.device.type != "cpu":
            return []
        parts = [(f"the policy's {hm.TRAINED}", hm.trained(p.model_dir, p.config, shards))]
        if o.method == "dpo" or (o.method == "grpo" and o.kl_beta > 0):
            parts.append(("the reference's fp32 weights", hm.loaded(p.model_dir, "fp32")))
        return parts

    def data(self, dist, reporter: Reporter) -> None:
        self.plan.method.bind(dist)  # the examples were read and prepared by the plan

    def job(self, dist, reporter: Reporter, resume_from: Path | None, fresh: bool) -> Job:
        from nanocli_model import load_pretrained

        from ..train.session import own_memory, side_files

        p, o, result, method = self.plan, self.plan.options, self.result, self.plan.method
        model = own_memory(load_pretrained(resume_from or p.model_dir, dtype="fp32"))
        reference = _Reference(p.model_dir, model, resume_from, dist, reporter) if method.reference else None
        model = model.to(dist.device).train()
        if reference is not None:  # before the input model's evaluation, which may move its weights' layout
            method.prepare(reference.model(model))
        if fresh and dist.main and o.eval_problems:
            reporter.status(f"held-out accuracy of the input model on {o.eval_problems} problems")
            result.before = _accuracy(model, p.tokenizer, o)
        if fresh:
            result.pairs_before = method.heldout(model)

        def finish() -> None:
            if result.interrupted or not dist.main:
                return
            if o.eval_problems:
                reporter.status(f"held-out accuracy of the aligned model on {o.eval_problems} problems")
                result.after = _accuracy(model, p.tokenizer, o)
            result.pairs_after = method.heldout(model)
            _write_eval(Path(o.out), result)

        def state(step: int) -> dict:
            return {**(method.state(step) if method.state else {}), **(reference.state() if reference else {})}

        def restore(saved: dict, step: int) -> None:
            if reference is not None:
                reference.check(saved)
            if method.restore is not None:
                method.restore(saved, step)

        return Job(model=model, batches=method.batches, loss=method.loss, count=method.count,
                   side_files=side_files(p.model_dir), state=state, restore=restore, finish=finish)

    def out_of_memory(self, e: BaseException) -> AlignError:
        o = self.plan.options
        step = getattr(e, "nano_step", None)
        at = f"at step {step}" if step else "outside a training step (loading, evaluation)"
        fix = ("--group-size, --max-new-tokens or --global-batch" if o.method == "grpo"
               else "--micro-batch or --seq-len")
        return AlignError(f"CUDA out of memory {at} (--method {o.method}, --seq-len {o.seq_len}): lower {fix}; "
                          f"`nano fit-check --model {o.model} --context {o.seq_len} --gpu auto` shows the model's "
                          "share (training adds ~16 bytes per parameter for gradients and AdamW state)")


class _Reference:
    """DPO's and GRPO-KL's frozen reference: the run's *input* model (``--model``, which a resume reads from the
    run's saved settings), never the checkpoint a resume starts from (that is the policy, moved since).

    A fresh run copies the model it has just loaded; a resume loads the input model again. Every checkpoint
    records the sha256 of the reference's weights (``checkpoints.weights_digest``), and a resume checks the
    model it loaded against it before any step: an input model changed or replaced since the start is a
    one-line error, not a silently different run. (One that is gone fails earlier, at ``--model``.)"""

    def __init__(self, directory: Path, loaded, resume_from: Path | None, dist, reporter: Reporter):
        from nanocli_model import load_pretrained

        from ..train.checkpoints import weights_digest
        from ..train.session import own_memory

        self.directory, self.resume_from, self.reporter = directory, resume_from, reporter
        self.cpu = loaded if resume_from is None else own_memory(load_pretrained(directory, dtype="fp32"))
        self.digest = dist.broadcast_object(weights_digest(self.cpu) if dist.main else None)
        self.device = dist.device

    def model(self, policy):
        """The frozen reference on the run's device (``policy``: the loaded model, already there)."""
        import copy

        ref = copy.deepcopy(policy) if self.resume_from is None else self.cpu.to(self.device)
        self.cpu = None
        return ref.eval().requires_grad_(False)

    def state(self) -> dict:
        return {"reference": {"model": str(self.directory), "sha256": self.digest}}

    def check(self, saved: dict) -> None:
        """The reference of a resume against the digest its checkpoint recorded (``saved``: its training state)."""
        was = saved.get("reference")
        if not isinstance(was, dict) or not isinstance(was.get("sha256"), str):
            self.reporter.status(f"{self.resume_from} records no digest of the reference (written before nano kept "
                                 f"one): the reference is {self.directory}, unchecked; it must be the model the "
                                 "run started from")
            return
        if was["sha256"] != self.digest:
            raise AlignError(f"--model {self.directory}: its weights (sha256 {self.digest[:12]}) are not the "
                             f"reference this run started from ({was.get('model')}, sha256 {was['sha256'][:12]}, "
                             f"recorded in {self.resume_from}); resume with --model the run's input model as it "
                             f"was, or start a new run from the checkpoint with --model {self.resume_from}")


def _accuracy(model, tokenizer, o: AlignOptions) -> dict[str, Accuracy]:
    """Held-out accuracy, reasoning on and off; the policy keeps its training layout (``keep_training_layout``:
    the generation's decode layout is undone after it, so the steps after the input model's evaluation run on
    the layout a resumed run, which does not evaluate first, has)."""
    from nanocli_model.decode import keep_training_layout

    from ..reasoning_accuracy import reasoning_accuracy

    kw = dict(n=o.eval_problems, max_new_tokens=max(o.max_new_tokens, 160), **_eval_problem_set(o.data))
    with keep_training_layout(model):
        return {"think": reasoning_accuracy(model, tokenizer, think=True, **kw),
                "no_think": reasoning_accuracy(model, tokenizer, think=False, **kw)}


def _eval_problem_set(data: str) -> dict:
    """The held-out problems to score: the tasks and difficulty of a ``synthetic:`` training spec (so the
    score measures what was trained), the generator's defaults for other data."""
    from ..data import synthetic

    if not data.startswith("synthetic:") or "?" not in data:
        return {}
    query = "&".join(kv for kv in data.split("?", 1)[1].split("&") if kv.split("=")[0] in ("tasks", "difficulty"))
    opts = synthetic.parse_synthetic_options(query) if query else {}
    return {k: opts[k] for k in ("tasks", "difficulty") if k in query}


def _write_eval(out: Path, r: AlignResult) -> None:
    import json

    pairs = {"before": r.pairs_before, "after": r.pairs_after}
    data = {"before": {m: a.to_json() for m, a in r.before.items()},
            "after": {m: a.to_json() for m, a in r.after.items()},
            "preference": {k: dataclasses.asdict(v) for k, v in pairs.items() if v is not None},
            "data": r.plan.data_stats}
    tmp = out / ".eval.json.tmp"
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, out / "eval.json")


# ------------------------------------------------------------------------------------------ merge
def merge(paths: list[str], weights: list[float] | None, out: str) -> Path:
    """``nano align merge``: the weighted average of same-architecture checkpoints (the report merged)."""
    from ..train.merge import merge_checkpoints

    if len(paths) < 2:
        raise AlignError("merge needs at least two checkpoints")
    return merge_checkpoints([Path(p) for p in paths], weights, Path(out))
