"""``nano align``: SFT with reasoning on/off and thinking-budget traces, DPO, GRPO; ``nano align merge``.

Steps, top to bottom:
  1. ``resolve``  settings (defaults < recipe < flags), the method's data reader and the step plan.
  2. ``prepare``  run directory (fresh or resumed), the policy (``--model``, fp32 master weights), its
                  tokenizer and chat template, the examples (SFT: assistant-only labels, think mix, budget
                  cuts, packing; DPO: chosen/rejected pairs and a frozen reference; GRPO: prompts, rewards).
  3. ``train``    the shared loop: each step's loss is the method's (token-mean CE; sigmoid DPO; clipped
                  GRPO surrogate over a group rollout).
  4. ``finish``   ``OUT/final`` (HF NemotronH + tokenizer), metrics.jsonl, loss.png, held-out accuracy of
                  the built-in reasoning tasks before and after (``--eval-problems``), DPO pair accuracy.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanocli_model.errors import NanoError

from ..train import ON_NAN, PARALLEL, PRECISIONS

STAGE = "align"
METHODS = ("sft", "dpo", "grpo")
TRAJECTORY = ("method", "data", "seq_len", "global_batch", "seed", "precision", "schedule", "lr", "min_lr",
              "warmup", "decay", "think_mix", "budget_fraction", "beta", "group_size", "rewards", "mu", "steps")


class AlignError(NanoError):
    """Bad input to ``nano align``."""


@dataclass
class AlignOptions:
    """Everything ``nano align`` can be told (defaults < recipe < flags)."""

    method: str = "sft"  # sft | dpo | grpo
    model: str | None = None  # the policy to align: a NemotronH directory with its tokenizer
    data: str | None = None  # .jsonl file/glob/dir (TRL formats) or synthetic:reasoning?... (format per method)
    out: str | None = None  # the run directory
    steps: int | None = None  # optimizer steps (or --epochs); GRPO: a rollout batch every --mu steps
    epochs: float | None = None  # passes over the examples (SFT, DPO) / prompts (GRPO)
    seq_len: int = 512  # longest example (SFT rows, DPO prompt + completion)
    global_batch: int = 16  # examples (SFT rows, DPO pairs, GRPO prompts) per step, all processes
    micro_batch: int | None = None  # per forward per process (SFT, DPO)
    precision: str = "bf16"
    schedule: str = "cosine"
    lr: float = 1e-4
    min_lr: float | None = None  # default lr / 10
    warmup: float = 0.03
    decay: float = 0.2
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # SFT
    think_mix: float = 0.9  # share of examples with reasoning on (the report removed it from ~10%)
    budget_fraction: float = 0.1  # share of reasoning-on examples cut at a random thinking budget
    too_long: str = "truncate"  # truncate | drop
    pack: bool = True
    on_error: str = "stop"  # malformed JSONL lines: stop | skip
    # DPO
    beta: float = 0.1
    label_smoothing: float = 0.0
    # GRPO
    group_size: int = 4  # completions per prompt
    max_new_tokens: int = 160
    temperature: float = 1.0
    top_p: float = 1.0
    clip_eps: float = 0.2  # ratio clip range [1 - eps, 1 + eps]; acts only from a batch's second pass (mu > 1)
    mu: int = 1  # optimizer steps on each batch of rollouts (TRL's num_iterations); old log-probs fixed at rollout
    kl_beta: float = 0.0  # KL to the reference (0: no reference model is kept)
    rewards: str = "exact,format:0.2"  # built-ins or module:function, with :weight
    thinking_budget: int | None = None  # during rollouts
    # run
    heldout_fraction: float = 0.05  # DPO: share of pairs kept for held-out preference accuracy
    eval_problems: int = 64  # held-out synthetic problems scored before and after (0: off)
    save_every: int = 0
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"
    parallel: str = "ddp"
    on_nan: str = "stop"
    resume: str | None = None
    dry_run: bool = False


@dataclass
class Hooks:
    status: Callable[[str], None] = lambda msg: None
    start: Callable[[int, int, dict], None] = lambda start, total, info: None
    step: Callable[[dict], None] = lambda metrics: None


@dataclass
class AlignResult:
    options: AlignOptions
    steps: int = 0
    start_step: int = 0
    steps_done: int = 0
    examples: int = 0
    data_stats: dict = field(default_factory=dict)
    seconds: float = 0.0
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    before: dict = field(default_factory=dict)  # held-out accuracy of the input model {think/no_think: ...}
    after: dict = field(default_factory=dict)
    preference: dict = field(default_factory=dict)  # DPO held-out pair accuracy before/after
    final: Path | None = None
    plot: Path | None = None
    interrupted: bool = False
    already_done: bool = False
    dry_run: bool = False
    plan: dict = field(default_factory=dict)


def make_options(recipe: str | None, flags: dict[str, Any]) -> AlignOptions:
    """Defaults < recipe < flags (``flags`` holds only what was given on the command line)."""
    from ..train.recipe import make_options as merge

    return merge(AlignOptions, STAGE, recipe, flags)


# ------------------------------------------------------------------------------------------ 1. resolve
def check(o: AlignOptions) -> None:
    for name, allowed in (("method", METHODS), ("precision", PRECISIONS), ("on_nan", ON_NAN),
                          ("parallel", PARALLEL), ("device", ("auto", "cpu", "cuda")),
                          ("too_long", ("truncate", "drop")), ("on_error", ("stop", "skip"))):
        if getattr(o, name) not in allowed:
            raise AlignError(f"--{name.replace('_', '-')} {getattr(o, name)!r} is unknown; use one of "
                             f"{', '.join(allowed)}")
    if o.model is None:
        raise AlignError("--model DIR is required: the checkpoint to align (with its tokenizer)")
    if not (Path(o.model) / "config.json").is_file():
        raise AlignError(f"{o.model}: not a model directory (no config.json); pass a NemotronH checkpoint")
    if o.data is None:
        raise AlignError("--data is required: a .jsonl (TRL format) or synthetic:reasoning")
    if o.out is None and not o.dry_run:
        raise AlignError("--out DIR is required")
    if (o.steps is None) == (o.epochs is None):
        raise AlignError("give exactly one of --steps N or --epochs E")
    for name in ("seq_len", "global_batch", "group_size", "max_new_tokens", "keep_last"):
        if getattr(o, name) < 1:
            raise AlignError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(o, name)}")
    if o.method == "grpo" and o.group_size < 2:
        raise AlignError("--group-size must be at least 2 for GRPO (advantages compare completions of a prompt)")
    if o.eval_problems < 0:
        raise AlignError(f"--eval-problems must be >= 0, got {o.eval_problems}")
    if isinstance(o.mu, bool) or not isinstance(o.mu, int) or o.mu < 1:
        raise AlignError(f"--mu must be an integer of at least 1 (optimizer steps per batch of rollouts), got {o.mu!r}")
    if o.mu != 1 and o.method != "grpo":
        raise AlignError(f"--mu {o.mu} applies to --method grpo only (optimizer steps per batch of rollouts)")
    if o.method == "grpo" and not o.clip_eps > 0:
        raise AlignError(f"--clip-eps must be > 0, got {o.clip_eps!r}")
    if o.method == "grpo" and not o.kl_beta >= 0:
        raise AlignError(f"--kl-beta must be >= 0, got {o.kl_beta!r}")


def _data_spec(o: AlignOptions) -> str:
    """Synthetic specs get the method's format unless they name one."""
    if o.data.startswith("synthetic:") and "format=" not in o.data:
        return o.data + ("&" if "?" in o.data else "?") + f"format={o.method}"
    return o.data


# ------------------------------------------------------------------------------------------ 2-4. run
def run(o: AlignOptions, hooks: Hooks | None = None) -> AlignResult:
    hooks = hooks or Hooks()
    check(o)
    from ..train.distributed import setup

    with setup(o.device) as dist:
        return _run(o, dist, hooks)


def _run(o: AlignOptions, dist, hooks: Hooks) -> AlignResult:
    import torch

    from nanocli_model import NanoConfig, load_pretrained
    from nanocli_model.tokenizer import Tokenizer

    from ..data.chat import ReadStats, read_jsonl_records
    from ..train import checkpoints as ckpt
    from ..train import session
    from ..train.distributed import wrap
    from ..train.loop import LoopConfig, StopFlag, run_loop
    from ..train.optim import OptimConfig, build_optimizer
    from ..train.schedule import Schedule

    result = AlignResult(options=o)
    config = NanoConfig.from_json_file(Path(o.model) / "config.json")
    if o.seq_len > config.max_position_embeddings:
        raise AlignError(f"--seq-len {o.seq_len} exceeds the model's context limit (max_position_embeddings "
                         f"{config.max_position_embeddings}); use --seq-len {config.max_position_embeddings} or less")
    tokenizer = Tokenizer.from_dir(o.model)
    if tokenizer.chat_template is None:
        raise AlignError(f"{o.model}: the tokenizer has no chat template; alignment trains on chat-formatted data")
    stats = ReadStats()
    records = read_jsonl_records(_data_spec(o), on_error=o.on_error, stats=stats, kind=o.method)
    method = _METHODS[o.method](o, tokenizer, records, stats, dist)
    result.examples, result.data_stats = method.size, stats.as_dict()
    per_epoch = math.ceil(method.size / o.global_batch)
    passes = o.mu if o.method == "grpo" else 1  # optimizer steps per batch (GRPO: per batch of rollouts)
    steps = o.steps if o.steps is not None else max(1, math.ceil(o.epochs * per_epoch)) * passes
    result.steps = steps
    schedule = Schedule(kind=o.schedule, lr=o.lr, min_lr=o.lr / 10 if o.min_lr is None else o.min_lr,
                        warmup=o.warmup, decay=o.decay if o.schedule == "wsd" else 0.0, total=steps)
    hparams = {**dataclasses.asdict(o), "steps": steps, "resume": None, "dry_run": False}
    result.plan = {"method": o.method, "examples": method.size, "steps": steps, "global_batch": o.global_batch,
                   "data": result.data_stats, "schedule": schedule.phases(), "lr": o.lr}
    if o.method == "grpo":
        result.plan.update(mu=o.mu, rollout_batches=math.ceil(steps / o.mu))
    if o.dry_run:
        result.dry_run = True
        return result
    out = Path(o.out)
    # creates OUT; OUT/.nano.lock held until the run ends (taken before the already-done check, as pretrain's,
    # so a run killed after its final checkpoint leaves no stale lock behind a rerun that has nothing to do)
    dist.lock_dir(out, "nano align", hooks.status)
    resume_from = dist.broadcast_object(session.resume_point(out, o.resume, AlignError) if dist.main else None)
    state = ckpt.load_trainer_state(resume_from) if resume_from is not None else None
    if state is not None:
        session.check_resumable(resume_from, config, hparams, TRAJECTORY, AlignError)
    start = result.start_step = int(state["step"]) if state is not None else 0
    if start >= steps:
        result.already_done, result.final, result.steps_done = True, resume_from, start
        return result
    dist.barrier()
    torch.manual_seed(o.seed)
    model = session.own_memory(load_pretrained(resume_from or o.model, dtype="fp32")).to(dist.device).train()
    if state is None and dist.main and o.eval_problems:
        hooks.status(f"held-out accuracy of the input model on {o.eval_problems} problems")
        result.before = _accuracy(model, tokenizer, o)
    method.prepare(model, dist)
    if state is None:
        result.preference["before"] = method.heldout(model)
    wrapped = wrap(model, dist, o.parallel)
    optim_cfg = OptimConfig(weight_decay=o.weight_decay, grad_clip=o.grad_clip)
    optimizer = build_optimizer(wrapped, optim_cfg, schedule.lr_at(start))
    if state is not None:
        session.load_optimizer(wrapped, optimizer, state["optimizer"], AlignError)
        session.restore_rng(state, dist)
        method.restore(state, start, model)
    save = session.Checkpointer(out, model, wrapped, optimizer, dist, hparams, session.side_files(Path(o.model)),
                                o.keep_last, hooks.status, extra=method.state)
    record = session.Recorder(out, dist, start if state is not None else None, hooks.step)
    loop_cfg = LoopConfig(schedule=schedule, optim=optim_cfg, precision=o.precision, save_every=o.save_every,
                          on_nan=o.on_nan, unit={"sft": "tokens", "dpo": "pairs", "grpo": "sequences"}[o.method])
    hooks.start(start, steps, {"device": str(dist.device), "processes": dist.world, "method": o.method})
    with StopFlag() as stop:
        loop = run_loop(wrapped, optimizer, loop_cfg, dist, start_step=start,
                        batch_fn=lambda step: method.batches(step, wrapped), loss_fn=method.loss,
                        count_fn=method.count, save_fn=save, on_step=record, stop=stop)
    result.steps_done, result.seconds, result.interrupted = loop.step, loop.seconds, loop.interrupted
    result.first_loss, result.last_loss, result.final = record.first_loss, loop.last_loss, loop.checkpoint
    if not loop.interrupted and dist.main:
        if o.eval_problems:
            hooks.status(f"held-out accuracy of the aligned model on {o.eval_problems} problems")
            result.after = _accuracy(model, tokenizer, o)
        pref = method.heldout(model)
        if pref:
            result.preference["after"] = pref
        _write_eval(out, result)
    result.plot = record.plot(out, f"nano align ({o.method}): {out.name}")
    return result


def _pad_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its first EOS."""
    if tokenizer.pad_id is not None:
        return tokenizer.pad_id
    if not tokenizer.eos_ids:
        raise AlignError("the tokenizer has neither a pad token nor an EOS token; set pad_token or eos_token in "
                         "tokenizer_config.json")
    return tokenizer.eos_ids[0]


def _accuracy(model, tokenizer, o: AlignOptions) -> dict:
    from ..reasoning_accuracy import reasoning_accuracy

    kw = dict(n=o.eval_problems, max_new_tokens=max(o.max_new_tokens, 160), **_eval_problem_set(o.data))
    return {"think": reasoning_accuracy(model, tokenizer, think=True, **kw).to_json(),
            "no_think": reasoning_accuracy(model, tokenizer, think=False, **kw).to_json()}


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

    data = {"before": r.before, "after": r.after, "preference": r.preference, "data": r.data_stats}
    tmp = out / ".eval.json.tmp"
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, out / "eval.json")


# ------------------------------------------------------------------------------------------ methods
class _SFT:
    """Token-mean cross-entropy on assistant tokens of packed chat rows."""

    def __init__(self, o: AlignOptions, tokenizer, records, stats, dist):
        from ..data.chat import SFTConfig, prepare_sft

        cfg = SFTConfig(seq_len=o.seq_len, think_mix=o.think_mix, budget_fraction=o.budget_fraction,
                        too_long=o.too_long, pack=o.pack, seed=o.seed)
        self.o, self.dist = o, dist
        self.examples = prepare_sft(records, tokenizer, cfg, stats)
        self.pad = _pad_id(tokenizer)
        self.size = len(self.examples)

    def prepare(self, model, dist) -> None:
        pass

    def heldout(self, model) -> dict:
        return {}

    def state(self, step: int) -> dict:
        return {}

    def restore(self, state: dict, step: int, model) -> None:
        pass

    def batches(self, step: int, wrapped) -> list[dict]:
        from ..data.chat import sft_batches

        ids, labels = sft_batches(self.examples, self.o.global_batch, step, seed=self.o.seed, rank=self.dist.rank,
                                  world=self.dist.world, pad_id=self.pad)
        m = self.o.micro_batch or ids.shape[0]
        dev = self.dist.device
        return [{"input_ids": ids[i:i + m].to(dev), "labels": labels[i:i + m].to(dev)} for i in range(0, ids.shape[0], m)]

    @staticmethod
    def count(batch: dict) -> int:
        return int((batch["labels"] != -100).sum())

    @staticmethod
    def loss(model, batch):
        from nanocli_model.losses import causal_lm_loss

        loss, n = causal_lm_loss(model, batch["input_ids"], batch["labels"])
        return loss, n, {}


class _DPO:
    """Sigmoid DPO against a frozen copy of the input model; held-out pair accuracy before and after."""

    def __init__(self, o: AlignOptions, tokenizer, records, stats, dist):
        from ..data.chat import build_preference_examples

        pairs = build_preference_examples(records, tokenizer, o.seq_len, too_long=o.too_long, stats=stats)
        n_eval = int(len(pairs) * o.heldout_fraction)
        self.eval_pairs, self.pairs = pairs[:n_eval], pairs[n_eval:]
        if not self.pairs:
            raise AlignError("no preference pairs left to train on; add data or lower --heldout-fraction")
        self.o, self.dist = o, dist
        self.pad = _pad_id(tokenizer)
        self.size = len(self.pairs)
        self.ref = None

    def prepare(self, model, dist) -> None:
        import copy

        self.ref = copy.deepcopy(model).eval().requires_grad_(False)

    def state(self, step: int) -> dict:
        return {}

    def restore(self, state: dict, step: int, model) -> None:
        pass

    def _batch(self, pairs, idx):
        from ..data.chat import preference_batch

        b = preference_batch(pairs, idx, pad_id=self.pad)
        return {k: v.to(self.dist.device) for k, v in b.items()}

    def heldout(self, model) -> dict:
        import torch

        from ..train.preference import dpo_loss, pair_logprobs, reference_logprobs

        if not self.eval_pairs:
            return {}
        with torch.no_grad():
            b = self._batch(self.eval_pairs, list(range(len(self.eval_pairs))))
            was = model.training
            model.eval()
            pc, pr = pair_logprobs(model, b, chunk=8)
            model.train(was)
            rc, rr = reference_logprobs(self.ref, b)
            _, m = dpo_loss(pc, pr, rc, rr, self.o.beta)
        return {"pairs": len(self.eval_pairs), "accuracy_vs_reference": m["accuracy"],
                "chosen_over_rejected": float((pc > pr).float().mean()), "margin": m["margins"]}

    def batches(self, step: int, wrapped) -> list[dict]:
        from ..data.chat import batch_indices

        idx = batch_indices(self.size, self.o.global_batch, step, seed=self.o.seed, rank=self.dist.rank,
                            world=self.dist.world)
        m = self.o.micro_batch or len(idx)
        return [self._batch(self.pairs, idx[i:i + m]) for i in range(0, len(idx), m)]

    @staticmethod
    def count(batch: dict) -> int:
        return int(batch["chosen_input_ids"].shape[0])

    def loss(self, model, batch):
        from ..train.preference import dpo_loss, pair_logprobs, reference_logprobs

        pc, pr = pair_logprobs(model, batch)
        rc, rr = reference_logprobs(self.ref, batch)
        loss, m = dpo_loss(pc, pr, rc, rr, self.o.beta, self.o.label_smoothing)
        return loss.sum(), loss.shape[0], {k: float(v) for k, v in m.items()}


class _GRPO:
    """Group rollouts with nano's cached generator, group-normalised advantages, clipped surrogate; each batch
    of rollouts serves ``mu`` optimizer steps against log-probabilities fixed at rollout (module docstring)."""

    def __init__(self, o: AlignOptions, tokenizer, records, stats, dist):
        from ..data.chat import build_prompts
        from ..train.rewards import resolve_rewards

        self.prompts = build_prompts(records, tokenizer, max_prompt_len=o.seq_len, stats=stats)
        if not self.prompts:
            raise AlignError("no GRPO prompts left; check the data and --seq-len")
        self.rewards = resolve_rewards(o.rewards)
        self.o, self.dist, self.tokenizer = o, dist, tokenizer
        self.pad = _pad_id(tokenizer)
        self.size = len(self.prompts)
        self.ref = None
        self.current: tuple[int, dict] | None = None  # (rollout batch index, this process's batch) for its mu steps

    def prepare(self, model, dist) -> None:
        import copy

        if self.o.kl_beta > 0:
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)

    def heldout(self, model) -> dict:
        return {}

    def batches(self, step: int, wrapped) -> list[dict]:
        k = step // self.o.mu
        if self.current is None or self.current[0] != k:
            self.current = (k, self._rollout_batch(k, wrapped))
        return [self.current[1]]

    def _rollout_batch(self, index: int, wrapped) -> dict:
        """Rollout batch ``index`` (its prompts chosen as step ``index``'s were before ``mu``): sampled, scored,
        group advantages, the fixed log-probabilities (``logp_old`` when mu > 1, ``logp_ref`` with a KL)."""
        import torch

        from nanocli_model.generation import SamplingParams

        from ..data.chat import batch_indices
        from ..train.distributed import unwrap
        from ..train.grpo import completion_batch, completion_logprobs, group_advantages, rollout
        from ..train.loop import autocast

        idx = batch_indices(self.size, self.o.global_batch, index, seed=self.o.seed, rank=self.dist.rank,
                            world=self.dist.world)
        chosen = [self.prompts[i] for i in idx]
        policy = unwrap(wrapped)
        params = SamplingParams(temperature=self.o.temperature, top_p=self.o.top_p, max_new_tokens=self.o.max_new_tokens)
        seed = self.o.seed * 1_000_003 + index * 101 + self.dist.rank
        r = rollout(policy, self.tokenizer, [p.prompt_ids for p in chosen], self.o.group_size, params, seed=seed,
                    thinking_budget=self.o.thinking_budget)
        rewards = r.score(self.rewards, [p.extra for p in chosen])
        adv = group_advantages(rewards, self.o.group_size)
        b = {k: v.to(self.dist.device) for k, v in completion_batch(r, self.pad).items()}
        b["advantages"] = adv.to(self.dist.device)
        with torch.no_grad():
            if self.o.mu > 1:  # the policy that sampled, fixed for the batch's mu steps (as the loss computes them)
                with autocast(self.o.precision, self.dist.device):
                    b["logp_old"] = completion_logprobs(policy, b)
            if self.ref is not None:
                b["logp_ref"] = completion_logprobs(self.ref, b)
        b["stats"] = {"reward": float(rewards.mean()), **{f"reward_{k}": v for k, v in r.reward_means.items()},
                      "completion_tokens": float(b["completion_lengths"].float().mean())}
        return b

    def state(self, step: int) -> dict:
        """The batch in use when a checkpoint falls inside its ``mu`` steps (every process's; a collective)."""
        if step % self.o.mu == 0 or self.current is None:
            return {}  # a boundary: the next step samples a new batch from the saved weights
        k, b = self.current
        mine = {key: v.detach().cpu() if hasattr(v, "detach") else v for key, v in b.items()}
        return {"grpo_rollout": {"index": k, "per_rank": self.dist.all_gather_object(mine)}}

    def restore(self, state: dict, step: int, model) -> None:
        """Resume as the run stood after ``step`` steps: the policy's weights in the layout the rollouts left
        them in and, inside a batch's ``mu`` steps, the batch the checkpoint carries (module docstring)."""
        # The run's first rollout moved the Linear weights into the generator's eager-decode layout (CPU: tall
        # ones column-major) and training kept them there; the same layout here gives the training GEMMs and the
        # gradient norm the same rounding, so the resume stays bit-identical (a resume at a batch boundary
        # would only get it at its first rollout's first decode step, after that rollout's prefill).
        if step > 0 and not getattr(model, "_decode_layout_done", True):
            model._use_decode_layout()
        if step % self.o.mu == 0:
            return
        saved = state.get("grpo_rollout")
        k = step // self.o.mu
        if not isinstance(saved, dict) or saved.get("index") != k:
            raise AlignError(f"the checkpoint of step {step} falls inside rollout batch {k + 1} (--mu {self.o.mu}) "
                             "but does not carry that batch; resume from a checkpoint at a multiple of --mu")
        per_rank = saved["per_rank"]
        if len(per_rank) != self.dist.world:
            raise AlignError(f"the checkpoint of step {step} falls inside a batch of rollouts sampled by "
                             f"{len(per_rank)} processes; resume it with {len(per_rank)} processes (or from a "
                             f"checkpoint at a multiple of --mu {self.o.mu})")
        dev = self.dist.device
        self.current = (k, {key: v.to(dev) if hasattr(v, "to") else v for key, v in per_rank[self.dist.rank].items()})

    @staticmethod
    def count(batch: dict) -> int:
        return int(batch["input_ids"].shape[0])

    def loss(self, model, batch):
        from ..train.grpo import completion_logprobs, grpo_loss

        logp = completion_logprobs(model, batch)
        old = batch.get("logp_old")  # mu > 1: fixed at rollout; mu = 1: this forward's, detached (ratio 1)
        loss, m = grpo_loss(logp, logp.detach() if old is None else old, batch["advantages"], batch["mask"],
                            clip_eps=self.o.clip_eps, kl_beta=self.o.kl_beta, logp_ref=batch.get("logp_ref"))
        n = batch["input_ids"].shape[0]
        return loss * n, n, {**{k: float(v) for k, v in m.items()}, **batch["stats"]}


_METHODS = {"sft": _SFT, "dpo": _DPO, "grpo": _GRPO}


# ------------------------------------------------------------------------------------------ merge
def merge(paths: list[str], weights: list[float] | None, out: str) -> Path:
    """``nano align merge``: the weighted average of same-architecture checkpoints (the report merged)."""
    from ..train.merge import merge_checkpoints

    if len(paths) < 2:
        raise AlignError("merge needs at least two checkpoints")
    return merge_checkpoints([Path(p) for p in paths], weights, Path(out))
