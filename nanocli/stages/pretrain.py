"""``nano pretrain``: train a NemotronH model from scratch (or continue one) on text.

Steps, top to bottom:
  1. ``resolve``   settings (defaults < recipe < flags) -> model config, data blend, step plan, schedule;
                   everything ``--dry-run`` prints, without touching torch or the data.
  2. ``prepare``   the output directory (fresh, or resume from its newest checkpoint), the tokenizer
                   (the checkpoint's, ``--tokenizer``, or a byte-level BPE trained on the data for small
                   profiles), the data (tokenized once into memory-mapped shards), the model (fresh
                   init, ``--model`` weights, or the checkpoint), FP8 modules, DDP/FSDP, AdamW.
  3. ``train``     the shared loop (``nanocli/train/loop.py``) with checkpoints every ``--save-every`` steps.
  4. ``finish``    final checkpoint in ``OUT/final``, ``metrics.jsonl``, ``loss.png``, a summary.

Rendering lives in ``ui.py``; this module reports through the ``Hooks`` it is given.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanocli_model.errors import ConfigError, NanoError

from ..train import ON_NAN, PARALLEL, PRECISIONS

STAGE = "pretrain"
TOKENIZER_DIR = "tokenizer"
MAX_TRAINED_VOCAB = 65536  # larger vocabularies come with their tokenizer (--tokenizer), not trained here
# Settings that fix the trajectory of a run: a resume must use the same ones to continue exactly.
TRAJECTORY = ("data", "seq_len", "global_batch", "seed", "precision", "schedule", "lr", "min_lr", "warmup",
              "decay", "decay_shape", "weight_decay", "betas", "eps", "grad_clip", "fp8_scaling", "fp8_keep",
              "heldout_fraction")


class PretrainError(NanoError):
    """Bad input to ``nano pretrain``."""


@dataclass
class PretrainOptions:
    """Everything ``nano pretrain`` can be told (defaults < recipe < flags)."""

    profile: str | None = None  # a model profile (profiles/models/) to train from scratch
    model: str | None = None  # or a NemotronH directory to continue training (long-context phase, more data)
    data: Any = None  # a data spec string, or {sources: {name: spec}, phases: [{blend: {...}, fraction}]}
    out: str | None = None  # the run directory: checkpoints, metrics.jsonl, loss.png
    tokenizer: str | None = None  # a directory with tokenizer.json (default: the model's, or trained)
    tokenizer_vocab: int | None = None  # BPE size when nano trains the tokenizer (default: the model's vocab)
    steps: int | None = None  # optimizer steps (or give --tokens)
    tokens: int | None = None  # training tokens; steps = ceil(tokens / (global_batch * seq_len))
    seq_len: int = 256  # tokens per sequence
    max_position_embeddings: int | None = None  # raise the model's declared context limit (long-context phase)
    global_batch: int = 16  # sequences per optimizer step, over all processes
    micro_batch: int | None = None  # sequences per forward per process (default: global_batch / processes)
    precision: str = "bf16"  # fp32 | bf16 (autocast, fp32 master weights) | fp8 (FP8 GEMMs + bf16)
    fp8_scaling: str = "blockwise"  # blockwise (128x128 weights, 1x128 activations) | tensorwise
    fp8_keep: int = 2  # first and last N layers stay in bf16 under --precision fp8
    fp8_backend: str = "auto"  # auto | scaled_mm (real FP8 GEMMs) | emulate (quantize-dequantize)
    schedule: str = "wsd"  # wsd | cosine | constant
    lr: float = 3e-4  # peak learning rate
    min_lr: float | None = None  # end of the decay (default lr / 100, as the report's 4.5e-4 -> 4.5e-6)
    warmup: float = 0.01  # warmup: a fraction of the steps (< 1) or a step count
    decay: float = 0.2  # WSD decay: a fraction of the steps (< 1) or a step count
    decay_shape: str = "linear"  # linear | cosine | 1-sqrt
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_last: int = 2  # checkpoint-* directories kept
    eval_every: int = 0  # held-out loss every N steps (0: only at the end)
    eval_batches: int = 4  # held-out batches (of global_batch sequences) per evaluation
    heldout_fraction: float = 0.005  # share of each source's windows kept out of training for evaluation
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # ddp | fsdp (under torchrun)
    on_nan: str = "stop"  # stop | skip
    resume: str | None = None  # auto (newest checkpoint in --out) | a checkpoint directory
    cache_dir: str | None = None  # token shards (default $NANO_CACHE or ~/.cache/nano)
    dry_run: bool = False
    peak_tflops: float | None = None  # device peak for MFU (default: from the GPU profile on CUDA)


@dataclass
class Resolved:
    """The plan of a run: what ``--dry-run`` prints."""

    options: PretrainOptions
    config: Any  # NanoConfig
    model_source: str  # "profile tiny" / "weights DIR"
    sources: dict  # name -> SourceSpec
    phases: list  # [Phase]
    steps: int
    schedule: Any  # Schedule
    world: int
    micro_batch: int
    accumulation: int

    @property
    def tokens_per_step(self) -> int:
        return self.options.global_batch * self.options.seq_len

    def describe(self) -> dict:
        o = self.options
        return {
            "model": self.model_source, "parameters": _param_count(self.config),
            "data": {n: {"source": s.source or n, "kind": s.kind, "files": len(s.paths)}
                     for n, s in self.sources.items()},
            "phases": [{"blend": p.weights, "fraction": p.fraction,
                        "steps": list(r)} for p, r in zip(self.phases, _phase_ranges(self.phases, self.steps))],
            "steps": self.steps, "tokens_per_step": self.tokens_per_step, "tokens": self.steps * self.tokens_per_step,
            "seq_len": o.seq_len, "global_batch": o.global_batch, "micro_batch": self.micro_batch,
            "accumulation": self.accumulation, "processes": self.world, "precision": o.precision,
            "schedule": {"kind": self.schedule.kind, "lr": self.schedule.lr, "min_lr": self.schedule.min_lr,
                         **{k: list(v) for k, v in self.schedule.phases().items()}},
            "out": o.out,
        }


@dataclass
class Hooks:
    """How the stage reports; the CLI wires these to ``ui.py``. All optional."""

    status: Callable[[str], None] = lambda msg: None
    progress: Callable[[str, int, int], None] | None = None  # tokenization progress
    start: Callable[[int, int, dict], None] = lambda start, total, info: None  # training begins
    step: Callable[[dict], None] = lambda metrics: None


@dataclass
class PretrainResult:
    resolved: Resolved
    dry_run: bool = False
    out: Path | None = None
    final: Path | None = None  # the last checkpoint written
    start_step: int = 0
    steps_done: int = 0
    tokens: int = 0
    seconds: float = 0.0
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    eval: dict = field(default_factory=dict)
    interrupted: bool = False
    already_done: bool = False
    peak_memory_bytes: int = 0
    mfu: float | None = None
    fp8: dict | None = None
    plot: Path | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# ------------------------------------------------------------------------------------------ 1. resolve
def make_options(recipe: str | None, flags: dict[str, Any]) -> PretrainOptions:
    """Defaults < recipe < flags (``flags`` holds only what was given on the command line)."""
    from ..train.recipe import make_options as merge

    return merge(PretrainOptions, STAGE, recipe, flags)


def resolve(o: PretrainOptions, world: int | None = None) -> Resolved:
    from ..data import parse_data_spec
    from ..train.schedule import Schedule

    if (o.profile is None) == (o.model is None):
        raise PretrainError("give exactly one of --profile NAME (train from scratch) or --model DIR (continue)")
    if o.out is None and not o.dry_run:
        raise PretrainError("--out DIR is required: where checkpoints, metrics and plots go")
    _check_choices(o)
    config, source = _model_config(o)
    if o.max_position_embeddings is not None:
        if o.max_position_embeddings < 1:
            raise PretrainError(f"--max-position-embeddings must be positive, got {o.max_position_embeddings}")
        config = config.replace(max_position_embeddings=o.max_position_embeddings)
    for name in ("seq_len", "global_batch", "eval_batches", "keep_last"):
        if getattr(o, name) < 1:
            raise PretrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(o, name)}")
    if o.seq_len > config.max_position_embeddings:
        raise PretrainError(f"--seq-len {o.seq_len} exceeds the model's max_position_embeddings "
                            f"({config.max_position_embeddings}); lower it or pass --max-position-embeddings")
    if not 0 <= o.heldout_fraction < 0.5:
        raise PretrainError(f"--heldout-fraction must be in [0, 0.5), got {o.heldout_fraction}")
    _check_numbers(o)
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    micro = o.micro_batch if o.micro_batch is not None else max(o.global_batch // world, 1)
    if o.global_batch % (world * micro):
        raise PretrainError(f"--global-batch {o.global_batch} is not a multiple of processes ({world}) x "
                            f"--micro-batch ({micro}); adjust one of them")
    steps = _steps(o)
    if o.data is None:
        raise PretrainError("--data is required: a file, glob, directory or synthetic:reasoning "
                            "(or give it in a --recipe)")
    sources, phases = _data_plan(o.data, parse_data_spec)
    schedule = Schedule(kind=o.schedule, lr=o.lr, min_lr=o.lr / 100 if o.min_lr is None else o.min_lr,
                        warmup=o.warmup, decay=o.decay, decay_shape=o.decay_shape, total=steps)
    return Resolved(o, config, source, sources, phases, steps, schedule, world, micro,
                    o.global_batch // (world * micro))


def _check_choices(o: PretrainOptions) -> None:
    for name, allowed in (("precision", PRECISIONS), ("on_nan", ON_NAN), ("parallel", PARALLEL),
                          ("device", ("auto", "cpu", "cuda"))):
        if getattr(o, name) not in allowed:
            raise PretrainError(f"--{name.replace('_', '-')} {getattr(o, name)!r} is unknown; "
                                f"use one of {', '.join(allowed)}")


def _check_numbers(o: PretrainOptions) -> None:
    """Counts that may be 0 but not negative, rates that must be finite (NaN fails every comparison)."""
    for name in ("save_every", "eval_every"):
        if getattr(o, name) < 0:
            raise PretrainError(f"--{name.replace('_', '-')} must be >= 0 (0: off), got {getattr(o, name)}")
    if o.micro_batch is not None and o.micro_batch < 1:  # 0 too: it does not mean "the default"
        raise PretrainError(f"--micro-batch must be at least 1, got {o.micro_batch}")
    for name in ("grad_clip", "weight_decay", "warmup", "decay"):
        value = getattr(o, name)
        if not (math.isfinite(value) and value >= 0):
            raise PretrainError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise PretrainError(f"--lr must be a finite number > 0, got {o.lr}")
    if o.min_lr is not None and not (math.isfinite(o.min_lr) and 0 <= o.min_lr <= o.lr):
        raise PretrainError(f"--min-lr must be finite, >= 0 and at most --lr, got {o.min_lr}")


def _model_config(o: PretrainOptions):
    from nanocli_model import NanoConfig

    from ..profiles import load_model_profile

    if o.profile is not None:
        return load_model_profile(o.profile).config, f"profile {o.profile}"
    path = Path(o.model)
    if not (path / "config.json").is_file():
        raise PretrainError(f"{path}: not a model directory (no config.json); pass a NemotronH checkpoint "
                            "or use --profile to start from scratch")
    return NanoConfig.from_json_file(path / "config.json"), f"weights {path}"


def _steps(o: PretrainOptions) -> int:
    if (o.steps is None) == (o.tokens is None):
        raise PretrainError("give exactly one of --steps N or --tokens N")
    if o.steps is not None:
        if o.steps < 1:
            raise PretrainError(f"--steps must be at least 1, got {o.steps}")
        return o.steps
    if o.tokens < 1:
        raise PretrainError(f"--tokens must be at least 1, got {o.tokens}")
    return math.ceil(o.tokens / (o.global_batch * o.seq_len))


def _data_plan(data: Any, parse_data_spec) -> tuple[dict, list]:
    """A spec string -> one phase with its weights; a mapping -> named sources and curriculum phases."""
    from ..data import Phase, SourceSpec

    if isinstance(data, str):
        specs = parse_data_spec(data)
        sources = {s.name: s for s in specs}
        total = sum(s.weight for s in specs)
        return sources, [Phase(weights={s.name: s.weight / total for s in specs}, fraction=1.0)]
    if not isinstance(data, dict) or not isinstance(data.get("sources"), dict):
        raise ConfigError("data: give a spec string or a mapping with 'sources' (name: spec) and optional "
                          "'phases' ([{blend: {name: weight}, fraction: f}])")
    unknown = set(data) - {"sources", "phases"}
    if unknown:
        raise ConfigError(f"data: unknown key {sorted(unknown)[0]!r}; use 'sources' and 'phases'")
    sources = {}
    for name, spec in data["sources"].items():
        if isinstance(spec, str):
            parsed = parse_data_spec(spec)
            if len(parsed) != 1:
                raise ConfigError(f"data.sources.{name}: one source per name, got {len(parsed)}")
            sources[name] = dataclasses.replace(parsed[0], name=name)
        elif isinstance(spec, dict):
            sources[name] = SourceSpec.from_mapping(name, spec)
        else:
            raise ConfigError(f"data.sources.{name}: a spec string or a mapping, got {spec!r}")
    raw_phases = data.get("phases") or [{"blend": {n: 1.0 for n in sources}, "fraction": 1.0}]
    phases = []
    for i, p in enumerate(raw_phases):
        if not isinstance(p, dict) or not isinstance(p.get("blend"), dict):
            raise ConfigError(f"data.phases[{i}]: expected {{blend: {{source: weight}}, fraction: f}}")
        blend = p["blend"]
        missing = [n for n in blend if n not in sources]
        if missing:
            raise ConfigError(f"data.phases[{i}]: blend names unknown source {missing[0]!r}; "
                              f"sources: {', '.join(sources)}")
        total = sum(float(w) for w in blend.values())
        if total <= 0:
            raise ConfigError(f"data.phases[{i}]: blend weights must sum to more than 0")
        phases.append(Phase(weights={n: float(w) / total for n, w in blend.items()},
                            fraction=float(p.get("fraction", 1.0))))
    if abs(sum(p.fraction for p in phases) - 1.0) > 1e-6:
        raise ConfigError(f"data.phases: fractions sum to {sum(p.fraction for p in phases):g}, they must sum to 1")
    return sources, phases


def _phase_ranges(phases: list, steps: int) -> list[tuple[int, int]]:
    from ..data import phase_bounds

    b = phase_bounds(phases, steps)
    return list(zip(b[:-1], b[1:]))


def _param_count(config) -> int:
    from nanocli_model import memory

    return memory.param_count(config).total


# ------------------------------------------------------------------------------------------ 2. prepare
def run(o: PretrainOptions, hooks: Hooks | None = None) -> PretrainResult:
    """Resolve, prepare, train, finish; returns what happened (``dry_run``: only the plan)."""
    hooks = hooks or Hooks()
    r = resolve(o)
    if o.dry_run:
        return PretrainResult(resolved=r, dry_run=True)
    import torch

    from ..train.distributed import setup

    with setup(o.device) as dist:
        try:
            return _train(r, dist, hooks)
        except torch.OutOfMemoryError as e:
            raise out_of_memory(r, e) from None


def _train(r: Resolved, dist, hooks: Hooks) -> PretrainResult:
    import torch

    from ..train import checkpoints as ckpt
    from ..train import fp8 as fp8_mod
    from ..train import session
    from ..train.distributed import wrap
    from ..train.loop import LoopConfig, StopFlag, run_loop
    from ..train.optim import OptimConfig, build_optimizer

    o = r.options
    out = Path(o.out)
    dist.lock_dir(out, "nano pretrain", hooks.status)  # OUT/.nano.lock: one run at a time writes here
    resume_from = dist.broadcast_object(session.resume_point(out, o.resume, PretrainError) if dist.main else None)
    state = ckpt.load_trainer_state(resume_from) if resume_from is not None else None
    if state is not None:
        session.check_resumable(resume_from, r.config, _hparams(r), (*TRAJECTORY, "steps"), PretrainError)
    start = int(state["step"]) if state is not None else 0
    result = PretrainResult(resolved=r, out=out, start_step=start)
    if start >= r.steps:
        result.already_done, result.final, result.steps_done = True, resume_from, start
        return result
    tokenizer, tok_dir = _tokenizer(r, out, dist, hooks)
    plan = _batch_plan(r, tokenizer, dist, hooks)
    torch.manual_seed(o.seed)
    model = _model(r, resume_from, dist)
    if o.precision == "fp8":
        recipe = fp8_mod.FP8Recipe(scaling=o.fp8_scaling, backend=o.fp8_backend, keep_high_precision=o.fp8_keep)
        result.fp8 = fp8_mod.convert_to_fp8(model, recipe)
    wrapped = wrap(model, dist, o.parallel)
    optim_cfg = OptimConfig(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip)
    optimizer = build_optimizer(wrapped, optim_cfg, r.schedule.lr_at(start))
    if state is not None:
        session.load_optimizer(wrapped, optimizer, state["optimizer"], PretrainError)
        session.restore_rng(state, dist)
    elif o.model is not None and (Path(o.model) / ckpt.TRAINER_STATE).is_file():
        hooks.status(f"continuing from {o.model}: weights and optimizer moments, a new schedule from step 0")
        session.load_optimizer(wrapped, optimizer, ckpt.load_trainer_state(Path(o.model))["optimizer"],
                               PretrainError)
    save = session.Checkpointer(out, model, wrapped, optimizer, dist, _hparams(r), session.side_files(tok_dir),
                                o.keep_last, hooks.status,
                                extra=lambda step: {"data": {"step": step, "seq_len": o.seq_len,
                                                             "global_batch": o.global_batch}})
    record = session.Recorder(out, dist, start if state is not None else None, hooks.step)

    def batch_fn(step: int) -> list[dict]:
        rows = plan.batch(step, dist.rank, dist.world).to(dist.device)  # (B_local, T + 1)
        return [{"input_ids": rows[i:i + r.micro_batch]} for i in range(0, rows.shape[0], r.micro_batch)]

    def loss_fn(m, batch):
        from nanocli_model.losses import causal_lm_loss

        ids = batch["input_ids"]
        loss, n = causal_lm_loss(m, ids[:, :-1], ids[:, 1:])
        return loss, n, {}

    def eval_fn() -> dict:
        from nanocli_model.losses import causal_lm_loss

        total, count = torch.zeros((), dtype=torch.float64), 0
        for rows in plan.eval_batches(o.eval_batches, r.micro_batch):
            rows = rows.to(dist.device)
            loss, n = causal_lm_loss(wrapped, rows[:, :-1], rows[:, 1:])
            total += loss.double().cpu()
            count += int(n)
        if count == 0:
            return {}
        value = total.item() / count
        return {"eval_loss": value, "eval_ppl": math.exp(min(value, 50.0))}

    loop_cfg = LoopConfig(schedule=r.schedule, optim=optim_cfg, precision=o.precision, save_every=o.save_every,
                          eval_every=o.eval_every, on_nan=o.on_nan, flops_per_token=_train_flops_per_token(r),
                          peak_flops=session.peak_flops(o.peak_tflops, dist))
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    hooks.start(start, r.steps, {"device": str(dist.device), "processes": dist.world})
    with StopFlag() as stop:
        loop = run_loop(wrapped, optimizer, loop_cfg, dist, start_step=start, batch_fn=batch_fn,
                        loss_fn=loss_fn, count_fn=lambda b: b["input_ids"][:, 1:].numel(), save_fn=save,
                        eval_fn=eval_fn if o.heldout_fraction > 0 else None, on_step=record, stop=stop,
                        where_fn=lambda step: data_position(plan, step), status=hooks.status)
    result.steps_done, result.tokens, result.seconds = loop.step, loop.tokens, loop.seconds
    result.first_loss = record.first_loss
    result.last_loss, result.eval, result.interrupted = loop.last_loss, loop.eval, loop.interrupted
    result.final = loop.checkpoint
    result.peak_memory_bytes = session.peak_memory(dist.device)
    if loop_cfg.peak_flops and loop.seconds:
        result.mfu = loop.tokens * loop_cfg.flops_per_token / loop.seconds / (loop_cfg.peak_flops * dist.world)
    result.plot = record.plot(out, f"nano pretrain: {out.name}")
    return result


def data_position(plan, step: int) -> str:
    """Where in the batch plan step ``step`` (0-based) reads: phase, global rows, first (source, window)s."""
    ids = plan.global_batch_ids(step)
    head = ", ".join(f"{name} window {w}" for name, w in ids[:3])
    return (f"batch plan step {step} (phase {plan.phase_at(step)}, sequences {step * plan.global_batch}-"
            f"{(step + 1) * plan.global_batch - 1} of the run): {head}{', ...' if len(ids) > 3 else ''}")


def out_of_memory(r: Resolved, e: BaseException) -> PretrainError:
    """A CUDA out-of-memory error as the settings to change and the fit-check of one forward."""
    o = r.options
    step = getattr(e, "nano_step", None)
    at = f"at step {step}" if step is not None else "outside a training step (loading, evaluation)"
    model = o.profile if o.profile is not None else o.model
    return PretrainError(f"CUDA out of memory {at} ({r.micro_batch} sequences x {o.seq_len} tokens per forward, "
                         f"--precision {o.precision}): lower --micro-batch (the global batch stays, by gradient "
                         f"accumulation) or --seq-len, or shard with --parallel fsdp; `nano fit-check --model {model} "
                         f"--context {o.seq_len} --batch {r.micro_batch} --prefill-chunk {o.seq_len} --gpu auto` "
                         "shows that forward's weights and activations (training adds ~16 bytes per parameter for "
                         "gradients and AdamW state)")


def _hparams(r: Resolved) -> dict:
    d = dataclasses.asdict(r.options)
    d.update(steps=r.steps, resume=None, dry_run=False, micro_batch=r.micro_batch)
    d["betas"] = list(d["betas"])
    return d


def _tokenizer(r: Resolved, out: Path, dist, hooks: Hooks):
    """The tokenizer and the directory its files come from (copied into every checkpoint)."""
    from nanocli_model.tokenizer import Tokenizer

    o = r.options
    if o.tokenizer is not None:
        tok_dir = Path(o.tokenizer)
    elif o.model is not None and (Path(o.model) / "tokenizer.json").is_file():
        tok_dir = Path(o.model)
    else:
        tok_dir = out / TOKENIZER_DIR
        if dist.main and not (tok_dir / "tokenizer.json").is_file():
            _train_tokenizer(r, tok_dir, hooks)
        dist.barrier()
    tokenizer = Tokenizer.from_dir(tok_dir)
    if tokenizer.vocab_size > r.config.vocab_size:
        raise PretrainError(f"{tok_dir}: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size "
                            f"is {r.config.vocab_size}; use a matching tokenizer or a larger vocab_size")
    return tokenizer, tok_dir


def _train_tokenizer(r: Resolved, tok_dir: Path, hooks: Hooks) -> None:
    from ..data import sample_texts_for_tokenizer, train_bpe_tokenizer

    vocab = r.options.tokenizer_vocab or r.config.vocab_size
    if vocab > MAX_TRAINED_VOCAB:
        raise PretrainError(f"the model's vocabulary ({vocab}) is too large to train a tokenizer here; pass "
                            "--tokenizer DIR with the released tokenizer.json")
    if vocab > r.config.vocab_size:
        raise PretrainError(f"--tokenizer-vocab {vocab} exceeds the model's vocab_size {r.config.vocab_size}")
    hooks.status(f"training a byte-level BPE tokenizer ({vocab} tokens) on the data -> {tok_dir}")
    texts = sample_texts_for_tokenizer(list(r.sources.values()), max_chars=4_000_000)
    for stale in tok_dir.parent.glob(f".{tok_dir.name}.tmp-*"):  # a killed earlier attempt (we hold the run lock)
        shutil.rmtree(stale, ignore_errors=True)
    # written beside and renamed into place: a kill never leaves a tokenizer.json without its config files
    tmp = Path(tempfile.mkdtemp(prefix=f".{tok_dir.name}.tmp-", dir=tok_dir.parent))
    try:
        train_bpe_tokenizer(texts, tmp, vocab)
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        os.rename(tmp, tok_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _batch_plan(r: Resolved, tokenizer, dist, hooks: Hooks):
    from ..data import BatchPlan, prepare_source

    o = r.options
    cache = Path(o.cache_dir or os.environ.get("NANO_CACHE") or Path.home() / ".cache" / "nano")
    tokens = {}
    for rank_turn in (True, False):  # rank 0 tokenizes first; the others then find the shards cached
        if dist.main == rank_turn:
            for name, spec in r.sources.items():
                hooks.status(f"data: {name}")
                # vocab_size: a pre-tokenized shard with ids outside the model's vocabulary is a DataError
                tokens[name] = prepare_source(spec, tokenizer, cache, progress=hooks.progress if dist.main else None,
                                              vocab_size=r.config.vocab_size)
        dist.barrier()
    return BatchPlan(tokens, r.phases, seq_len=o.seq_len, global_batch=o.global_batch, total_steps=r.steps,
                     seed=o.seed, heldout_fraction=o.heldout_fraction)


def _model(r: Resolved, resume_from: Path | None, dist):
    import torch

    from nanocli_model import build_model, load_pretrained

    source = resume_from if resume_from is not None else (Path(r.options.model) if r.options.model else None)
    if source is None:
        model = build_model(r.config, dtype=torch.float32, seed=r.options.seed)
    else:
        from ..train.session import own_memory

        model = own_memory(load_pretrained(source, dtype="fp32"))
    return model.to(dist.device).train()


def _train_flops_per_token(r: Resolved) -> float:
    from nanocli_model import memory

    return 3.0 * memory.forward_flops(r.config, r.options.seq_len) / r.options.seq_len


