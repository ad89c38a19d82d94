"""``nano distill``: logit distillation from a frozen teacher into a (pruned) student of the same tokenizer.

The report (REFERENCE.md §6) recovered the pruned 9B's accuracy by distilling from the aligned 12B with
forward KL over the full vocabulary, temperature 1 and no cross-entropy term, on pretraining data mixed
with reasoning data. Those are the defaults here; reverse KL, top-k KD, a temperature and a CE mix
(``--kd-ratio``) are options. The loss itself lives in ``nanocli/train/kd.py``.

Steps, top to bottom:
  1. ``resolve``  settings (defaults < recipe < flags) -> both configs, the checks before any work (the
                  teacher and student share vocab_size and tokenizer.json), data blend, steps, schedule;
                  everything ``--dry-run`` prints, without touching torch or the data.
  2. ``prepare``  the run directory (fresh, or resumed from its newest checkpoint), the data (pretrain's
                  shards and batch plan), the student (fp32 master weights, DDP/FSDP, AdamW), the teacher
                  (frozen, eval mode, ``--teacher-dtype`` on ``--teacher-device``), the optional on-disk
                  cache of its top-k logits, and the student's held-out CE and KL before training.
  3. ``train``    the shared loop; each step's loss is ``kd_loss`` (KD and CE logged separately).
  4. ``finish``   ``OUT/final`` (HF NemotronH + tokenizer), metrics.jsonl, loss.png, held-out CE and KL
                  to the teacher after training.

Programmatic use: ``run(DistillOptions(teacher=..., student=..., data=..., out=..., steps=...))``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanocli_model.errors import NanoError

from ..train import ON_NAN, PARALLEL, PRECISIONS

STAGE = "distill"
TEACHER_DTYPES = ("auto", "fp32", "bf16", "fp16")
# Settings that fix the trajectory of a run: a resume must use the same ones to continue exactly.
TRAJECTORY = ("teacher", "data", "seq_len", "global_batch", "seed", "precision", "schedule", "lr", "min_lr",
              "warmup", "decay", "decay_shape", "weight_decay", "betas", "eps", "grad_clip", "heldout_fraction",
              "temperature", "kd_kind", "top_k", "kd_ratio", "teacher_dtype", "steps")


class DistillError(NanoError):
    """Bad input to ``nano distill``."""


@dataclass
class DistillOptions:
    """Everything ``nano distill`` can be told (defaults < recipe < flags)."""

    teacher: str | None = None  # the teacher: a NemotronH directory (frozen; the report: the aligned 12B)
    student: str | None = None  # the student: a NemotronH directory with the same tokenizer (e.g. pruned)
    data: Any = None  # a data spec string, or {sources: {name: spec}, phases: [...]} as for pretrain
    out: str | None = None  # the run directory: checkpoints, metrics.jsonl, loss.png
    steps: int | None = None  # optimizer steps (or give --tokens)
    tokens: int | None = None  # training tokens; steps = ceil(tokens / (global_batch * seq_len))
    seq_len: int = 256  # tokens per sequence
    global_batch: int = 16  # sequences per optimizer step, over all processes
    micro_batch: int | None = None  # sequences per forward per process (default: global_batch / processes)
    precision: str = "bf16"  # the student: fp32 | bf16 (autocast, fp32 master weights) | fp8
    temperature: float = 1.0  # softmax temperature of both models in the KD term (scaled by T^2)
    kd_kind: str = "forward"  # forward KL(teacher || student) | reverse KL(student || teacher)
    top_k: int | None = None  # KD over the teacher's top-k tokens only, renormalised (forward only)
    kd_ratio: float = 1.0  # weight of KD vs cross-entropy: 1 = KD only (the report), 0 = plain CE
    kd_chunk: int = 256  # token rows per chunk of the fused lm_head + loss
    teacher_dtype: str = "auto"  # auto (fp32 under --precision fp32, else bf16) | fp32 | bf16 | fp16
    teacher_device: str = "auto"  # auto (the student's) | cpu | cuda
    teacher_cache: str | None = None  # a directory caching the teacher's top-k logits per window (needs --top-k)
    schedule: str = "cosine"  # cosine (Minitron's distillation) | wsd | constant
    lr: float = 1e-4  # peak learning rate
    min_lr: float | None = None  # end of the decay (default lr / 10)
    warmup: float = 0.01  # a fraction of the steps (< 1) or a step count
    decay: float = 0.2  # WSD decay: a fraction of the steps (< 1) or a step count
    decay_shape: str = "linear"  # linear | cosine | 1-sqrt
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_last: int = 2  # checkpoint-* directories kept
    eval_every: int = 0  # held-out CE and KL every N steps (0: before and at the end)
    eval_batches: int = 4  # held-out batches (of micro_batch sequences) per evaluation
    heldout_fraction: float = 0.005  # share of each source's windows kept out of training for evaluation
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (the student)
    parallel: str = "ddp"  # ddp | fsdp (under torchrun; the teacher is replicated per process)
    on_nan: str = "stop"  # stop | skip
    resume: str | None = None  # auto (newest checkpoint in --out) | a checkpoint directory
    cache_dir: str | None = None  # token shards (default $NANO_CACHE or ~/.cache/nano)
    dry_run: bool = False
    peak_tflops: float | None = None  # device peak for MFU (default: from the GPU profile on CUDA)


@dataclass
class Resolved:
    """The plan of a run: what ``--dry-run`` prints."""

    options: DistillOptions
    teacher_config: Any  # NanoConfig
    config: Any  # the student's NanoConfig
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

    @property
    def teacher_dtype(self) -> str:
        o = self.options
        return o.teacher_dtype if o.teacher_dtype != "auto" else ("fp32" if o.precision == "fp32" else "bf16")

    def describe(self) -> dict:
        o = self.options
        from nanocli_model import memory

        loss = f"{o.kd_kind} KL at T={o.temperature:g}" + (f", teacher top-{o.top_k}" if o.top_k else ", full vocabulary")
        if o.kd_ratio < 1:
            loss += f"; {o.kd_ratio:g} x KD + {1 - o.kd_ratio:g} x CE"
        return {
            "teacher": o.teacher, "teacher_parameters": memory.param_count(self.teacher_config).total,
            "teacher_dtype": self.teacher_dtype, "student": o.student,
            "student_parameters": memory.param_count(self.config).total, "vocab_size": self.config.vocab_size,
            "loss": loss, "teacher_cache": o.teacher_cache,
            "data": {n: {"source": s.source or n, "kind": s.kind, "files": len(s.paths)}
                     for n, s in self.sources.items()},
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
class DistillResult:
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
    last_kd: float = float("nan")  # per-token KD of the last step
    last_ce: float = float("nan")  # per-token CE of the last step
    before: dict = field(default_factory=dict)  # held-out {eval_loss, eval_ppl, eval_kl} of the input student
    eval: dict = field(default_factory=dict)  # the same after training
    teacher_cache: dict = field(default_factory=dict)  # {"hits": windows read, "misses": windows computed}
    interrupted: bool = False
    already_done: bool = False
    peak_memory_bytes: int = 0
    mfu: float | None = None
    plot: Path | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# ------------------------------------------------------------------------------------------ 1. resolve
def make_options(recipe: str | None, flags: dict[str, Any]) -> DistillOptions:
    """Defaults < recipe < flags (``flags`` holds only what was given on the command line)."""
    from ..train.recipe import make_options as merge

    return merge(DistillOptions, STAGE, recipe, flags)


def resolve(o: DistillOptions, world: int | None = None) -> Resolved:
    from ..data import parse_data_spec
    from ..train.kd import check_kd_args
    from ..train.schedule import Schedule
    from .pretrain import _data_plan

    _check_choices(o)
    if o.out is None and not o.dry_run:
        raise DistillError("--out DIR is required: where checkpoints, metrics and plots go")
    teacher_config = _model_config(o.teacher, "teacher")
    config = _model_config(o.student, "student")
    check_same_tokenizer(Path(o.teacher), Path(o.student), teacher_config, config)
    check_kd_args(o.temperature, o.kd_kind, o.top_k, o.kd_ratio, o.kd_chunk)
    if o.top_k is not None and o.top_k > config.vocab_size:
        raise DistillError(f"--top-k {o.top_k} exceeds the vocabulary ({config.vocab_size} tokens)")
    if o.teacher_cache is not None and o.top_k is None:
        raise DistillError("--teacher-cache stores the teacher's top-k logits; give --top-k K with it")
    for name in ("seq_len", "global_batch", "eval_batches", "keep_last"):
        if getattr(o, name) < 1:
            raise DistillError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(o, name)}")
    limit = min(config.max_position_embeddings, teacher_config.max_position_embeddings)
    if o.seq_len > limit:
        raise DistillError(f"--seq-len {o.seq_len} exceeds max_position_embeddings of the teacher or student "
                           f"({limit}); lower it")
    if not 0 <= o.heldout_fraction < 0.5:
        raise DistillError(f"--heldout-fraction must be in [0, 0.5), got {o.heldout_fraction}")
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    micro = o.micro_batch or max(o.global_batch // world, 1)
    if o.global_batch % (world * micro):
        raise DistillError(f"--global-batch {o.global_batch} is not a multiple of processes ({world}) x "
                           f"--micro-batch ({micro}); adjust one of them")
    steps = _steps(o)
    if o.data is None:
        raise DistillError("--data is required: a file, glob, directory, shards or synthetic:reasoning, or a "
                           "blend (the report mixed pretraining and reasoning data)")
    sources, phases = _data_plan(o.data, parse_data_spec)
    schedule = Schedule(kind=o.schedule, lr=o.lr, min_lr=o.lr / 10 if o.min_lr is None else o.min_lr,
                        warmup=o.warmup, decay=o.decay if o.schedule == "wsd" else 0.0,
                        decay_shape=o.decay_shape, total=steps)
    return Resolved(o, teacher_config, config, sources, phases, steps, schedule, world, micro,
                    o.global_batch // (world * micro))


def _check_choices(o: DistillOptions) -> None:
    for name, allowed in (("precision", PRECISIONS), ("on_nan", ON_NAN), ("parallel", PARALLEL),
                          ("device", ("auto", "cpu", "cuda")), ("teacher_dtype", TEACHER_DTYPES),
                          ("teacher_device", ("auto", "cpu", "cuda"))):
        if getattr(o, name) not in allowed:
            raise DistillError(f"--{name.replace('_', '-')} {getattr(o, name)!r} is unknown; "
                               f"use one of {', '.join(allowed)}")


def _model_config(path: str | None, role: str):
    from nanocli_model import NanoConfig

    if path is None:
        raise DistillError(f"--{role} DIR is required: a NemotronH checkpoint directory")
    p = Path(path)
    if not (p / "config.json").is_file():
        raise DistillError(f"--{role} {p}: not a model directory (no config.json); pass a NemotronH checkpoint")
    return NanoConfig.from_json_file(p / "config.json")


def check_same_tokenizer(teacher: Path, student: Path, teacher_config, student_config) -> None:
    """Distillation compares distributions token by token: same vocab_size and the same tokenizer.json."""
    if teacher_config.vocab_size != student_config.vocab_size:
        raise DistillError(f"the teacher's vocab_size ({teacher_config.vocab_size}) differs from the student's "
                           f"({student_config.vocab_size}); distill into a student built from the teacher")
    texts = []
    for role, d in (("teacher", teacher), ("student", student)):
        f = d / "tokenizer.json"
        if not f.is_file():
            raise DistillError(f"--{role} {d}: no tokenizer.json; copy the tokenizer files of the model it came from")
        texts.append(f.read_bytes())
    if texts[0] != texts[1]:
        try:
            same = json.loads(texts[0]) == json.loads(texts[1])  # the same tokenizer, written differently
        except (ValueError, UnicodeDecodeError):
            same = False
        if not same:
            raise DistillError(f"the tokenizers differ ({teacher / 'tokenizer.json'} vs {student / 'tokenizer.json'}); "
                               "teacher and student must share one tokenizer")


def _steps(o: DistillOptions) -> int:
    if (o.steps is None) == (o.tokens is None):
        raise DistillError("give exactly one of --steps N or --tokens N")
    n = o.steps if o.steps is not None else o.tokens
    if n < 1:
        raise DistillError(f"--{'steps' if o.steps is not None else 'tokens'} must be at least 1, got {n}")
    return o.steps if o.steps is not None else math.ceil(o.tokens / (o.global_batch * o.seq_len))


# ------------------------------------------------------------------------------------------ 2. prepare
def run(o: DistillOptions, hooks: Hooks | None = None) -> DistillResult:
    """Resolve, prepare, train, finish; returns what happened (``dry_run``: only the plan)."""
    hooks = hooks or Hooks()
    r = resolve(o)
    if o.dry_run:
        return DistillResult(resolved=r, dry_run=True)
    import torch

    from ..train.distributed import setup

    with setup(o.device) as dist:
        try:
            return _train(r, dist, hooks)
        except torch.OutOfMemoryError as e:
            step = getattr(e, "nano_step", None)
            raise DistillError(f"CUDA out of memory {f'at step {step}' if step else 'outside a training step (loading, evaluation)'} "
                               f"({r.micro_batch} sequences x {o.seq_len} tokens per forward, teacher "
                               f"{r.teacher_dtype}): lower --micro-batch or --seq-len or --kd-chunk, put the teacher "
                               "on another device (--teacher-device cpu) or cache its top-k (--top-k K "
                               f"--teacher-cache DIR); `nano fit-check --model {o.teacher} --context {o.seq_len} "
                               f"--batch {r.micro_batch} --gpu auto` shows the teacher's share") from None


def _train(r: Resolved, dist, hooks: Hooks) -> DistillResult:
    import torch

    from nanocli_model.tokenizer import Tokenizer

    from ..train import checkpoints as ckpt
    from ..train import fp8 as fp8_mod
    from ..train import session
    from ..train.distributed import wrap
    from ..train.loop import LoopConfig, StopFlag, autocast, run_loop
    from ..train.optim import OptimConfig, build_optimizer
    from .pretrain import data_position

    o = r.options
    out = Path(o.out)
    if o.teacher_device == "cuda" and not torch.cuda.is_available():  # before any work or any file
        raise DistillError("--teacher-device cuda: no CUDA device is visible; use cpu or auto")
    dist.lock_dir(out, "nano distill", hooks.status)  # OUT/.nano.lock: one run at a time writes here
    resume_from = dist.broadcast_object(session.resume_point(out, o.resume, DistillError) if dist.main else None)
    state = ckpt.load_trainer_state(resume_from) if resume_from is not None else None
    if state is not None:
        session.check_resumable(resume_from, r.config, _hparams(r), TRAJECTORY, DistillError)
    start = int(state["step"]) if state is not None else 0
    result = DistillResult(resolved=r, out=out, start_step=start)
    if start >= r.steps:
        result.already_done, result.final, result.steps_done = True, resume_from, start
        return result
    plan = _batch_plan(r, Tokenizer.from_dir(o.student), dist, hooks)
    torch.manual_seed(o.seed)
    teacher = _teacher(r, dist, hooks)
    student = session.own_memory(_load(resume_from or Path(o.student), "fp32")).to(dist.device).train()
    cache = TopKCache(Path(o.teacher_cache), _cache_fingerprint(r), o.top_k, o.kd_chunk) if o.teacher_cache else None
    eval_fn = _Evaluator(r, plan, teacher, dist) if o.heldout_fraction > 0 else None
    if state is None and eval_fn is not None:
        hooks.status("held-out CE and KL to the teacher of the input student")
        with torch.no_grad(), autocast(o.precision, dist.device):
            result.before = eval_fn(student.eval())
        student.train()
    if o.precision == "fp8":
        fp8_mod.convert_to_fp8(student, fp8_mod.FP8Recipe(backend="auto"))
    wrapped = wrap(student, dist, o.parallel)
    optim_cfg = OptimConfig(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip)
    optimizer = build_optimizer(wrapped, optim_cfg, r.schedule.lr_at(start))
    if state is not None:
        session.load_optimizer(wrapped, optimizer, state["optimizer"], DistillError)
        session.restore_rng(state, dist)
    save = session.Checkpointer(out, student, wrapped, optimizer, dist, _hparams(r),
                                session.side_files(Path(o.student)), o.keep_last, hooks.status,
                                extra=lambda step: {"data": {"step": step, "seq_len": o.seq_len,
                                                             "global_batch": o.global_batch}})
    record = session.Recorder(out, dist, start if state is not None else None, hooks.step)
    parts = {"kd": 0.0, "ce": 0.0}
    per_rank = o.global_batch // dist.world

    def batch_fn(step: int) -> list[dict]:
        rows = plan.batch(step, dist.rank, dist.world).to(dist.device)  # (B_local, T + 1)
        keys = None
        if cache is not None:
            ids = plan.global_batch_ids(step)[dist.rank * per_rank:(dist.rank + 1) * per_rank]
            keys = [(plan.sources[name].key, window) for name, window in ids]
        return [{"input_ids": rows[i:i + r.micro_batch], "keys": keys and keys[i:i + r.micro_batch]}
                for i in range(0, rows.shape[0], r.micro_batch)]

    def loss_fn(m, batch):
        from ..train.kd import kd_loss

        ids = batch["input_ids"]
        source = cache.get(teacher, ids[:, :-1], batch["keys"]) if cache is not None else teacher
        loss, n, p = kd_loss(m, source, ids[:, :-1], ids[:, 1:], temperature=o.temperature, kind=o.kd_kind,
                             top_k=o.top_k, kd_ratio=o.kd_ratio, chunk=o.kd_chunk)
        parts["kd"] += p["kd"]
        parts["ce"] += p["ce"]
        return loss, n, {}

    def on_step(m: dict) -> None:
        if "loss" in m:  # every rank gets here at the same steps: KD and CE as global per-token means
            total = dist.all_reduce_sum(torch.tensor([parts["kd"], parts["ce"]], dtype=torch.float64))
            m["kd"], m["ce"] = total[0].item() / m["tokens"], total[1].item() / m["tokens"]
            parts["kd"] = parts["ce"] = 0.0
            result.last_kd, result.last_ce = m["kd"], m["ce"]
        record(m)

    loop_cfg = LoopConfig(schedule=r.schedule, optim=optim_cfg, precision=o.precision, save_every=o.save_every,
                          eval_every=o.eval_every, on_nan=o.on_nan, flops_per_token=_flops_per_token(r),
                          peak_flops=session.peak_flops(o.peak_tflops, dist))
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    hooks.start(start, r.steps, {"device": str(dist.device), "processes": dist.world})
    with StopFlag() as stop:
        loop = run_loop(wrapped, optimizer, loop_cfg, dist, start_step=start, batch_fn=batch_fn, loss_fn=loss_fn,
                        count_fn=lambda b: b["input_ids"][:, 1:].numel(), save_fn=save,
                        eval_fn=(lambda: eval_fn(wrapped)) if eval_fn is not None else None, on_step=on_step,
                        stop=stop, where_fn=lambda step: data_position(plan, step), status=hooks.status)
    result.steps_done, result.tokens, result.seconds = loop.step, loop.tokens, loop.seconds
    result.first_loss, result.last_loss, result.eval = record.first_loss, loop.last_loss, loop.eval
    result.interrupted, result.final = loop.interrupted, loop.checkpoint
    result.peak_memory_bytes = session.peak_memory(dist.device)
    if loop_cfg.peak_flops and loop.seconds:
        result.mfu = loop.tokens * loop_cfg.flops_per_token / loop.seconds / (loop_cfg.peak_flops * dist.world)
    if cache is not None:
        result.teacher_cache = {"hits": cache.hits, "misses": cache.misses, "path": str(cache.dir)}
    result.plot = record.plot(out, f"nano distill: {out.name}")
    return result


def _hparams(r: Resolved) -> dict:
    d = dataclasses.asdict(r.options)
    d.update(steps=r.steps, resume=None, dry_run=False, micro_batch=r.micro_batch, teacher_dtype=r.teacher_dtype)
    d["betas"] = list(d["betas"])
    return d


def _load(path: Path, dtype: str):
    from nanocli_model import load_pretrained

    return load_pretrained(path, dtype=dtype)


def _teacher(r: Resolved, dist, hooks: Hooks):
    """The frozen teacher: eval mode, no gradients, its own dtype and device (one replica per process)."""
    import torch

    o = r.options
    device = dist.device
    if o.teacher_device == "cpu":
        device = torch.device("cpu")
    elif o.teacher_device == "cuda":
        if not torch.cuda.is_available():
            raise DistillError("--teacher-device cuda: no CUDA device is visible; use cpu or auto")
        device = torch.device("cuda", dist.local_rank)
    hooks.status(f"teacher {o.teacher} ({r.teacher_dtype} on {device}, frozen)")
    return _load(Path(o.teacher), r.teacher_dtype).to(device).eval().requires_grad_(False)


def _batch_plan(r: Resolved, tokenizer, dist, hooks: Hooks):
    """Pretrain's data path: each source tokenized once into cached shards, then the stateless batch plan."""
    from ..data import BatchPlan, prepare_source

    o = r.options
    if tokenizer.vocab_size > r.config.vocab_size:
        raise DistillError(f"{o.student}: the tokenizer has {tokenizer.vocab_size} tokens, the models' vocab_size "
                           f"is {r.config.vocab_size}")
    cache = Path(o.cache_dir or os.environ.get("NANO_CACHE") or Path.home() / ".cache" / "nano")
    tokens = {}
    for rank_turn in (True, False):  # rank 0 tokenizes first; the others then find the shards cached
        if dist.main == rank_turn:
            for name, spec in r.sources.items():
                hooks.status(f"data: {name}")
                tokens[name] = prepare_source(spec, tokenizer, cache, progress=hooks.progress if dist.main else None,
                                              vocab_size=r.config.vocab_size)
        dist.barrier()
    return BatchPlan(tokens, r.phases, seq_len=o.seq_len, global_batch=o.global_batch, total_steps=r.steps,
                     seed=o.seed, heldout_fraction=o.heldout_fraction)


class _Evaluator:
    """Held-out CE of the student (``eval_loss``) and its forward KL to the teacher at T = 1 over the full
    vocabulary (``eval_kl``), per token; the same windows every time. Called under no_grad."""

    def __init__(self, r: Resolved, plan, teacher, dist):
        self.r, self.plan, self.teacher, self.dist = r, plan, teacher, dist

    def __call__(self, model) -> dict:
        from ..train.kd import kd_loss

        kd = ce = 0.0
        count = 0
        for rows in self.plan.eval_batches(self.r.options.eval_batches, self.r.micro_batch):
            rows = rows.to(self.dist.device)
            _, n, p = kd_loss(model, self.teacher, rows[:, :-1], rows[:, 1:], chunk=self.r.options.kd_chunk)
            kd, ce, count = kd + p["kd"], ce + p["ce"], count + int(n)
        if count == 0:
            return {}
        return {"eval_loss": ce / count, "eval_ppl": math.exp(min(ce / count, 50.0)), "eval_kl": kd / count}


def _flops_per_token(r: Resolved) -> float:
    from nanocli_model import memory

    T = r.options.seq_len
    return (3.0 * memory.forward_flops(r.config, T) + memory.forward_flops(r.teacher_config, T)) / T


# ------------------------------------------------------------------------------------------ teacher cache
def _cache_fingerprint(r: Resolved) -> str:
    """What the cached logits depend on: the teacher (config, weight files' names/sizes/times), its dtype,
    k and the window length. A changed teacher gets a new directory instead of stale logits."""
    o = r.options
    t = Path(o.teacher)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in t.glob("*.safetensors"))
    payload = {"config": (t / "config.json").read_text(encoding="utf-8"), "files": files,
               "dtype": r.teacher_dtype, "top_k": o.top_k, "seq_len": o.seq_len}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class TopKCache:
    """The teacher's top-k logits per data window on disk, reused whenever the window comes round again
    (later epochs, later runs): ``DIR/<fingerprint>/<source key>/<window>.safetensors`` holding ``values``
    (T, k) float32 and ``indices`` (T, k) int32. Written atomically (temporary file + rename); safetensors,
    never pickle."""

    def __init__(self, root: Path, fingerprint: str, k: int, chunk: int):
        self.dir, self.k, self.chunk = root / fingerprint, k, chunk
        self.hits = self.misses = 0

    def _path(self, key: tuple[str, int]) -> Path:
        return self.dir / key[0][:32] / f"{int(key[1]):09d}.safetensors"

    def get(self, teacher, input_ids, keys: list[tuple[str, int]]):
        """TeacherTopK (B, T, k) for the rows ``input_ids`` (B, T) whose windows are ``keys``."""
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file, save_file

        from ..train.kd import TeacherTopK, teacher_topk

        paths = [self._path(k) for k in keys]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        fresh = {}
        if missing:
            top = teacher_topk(teacher, input_ids[missing], self.k, self.chunk)  # (m, T, k)
            for j, i in enumerate(missing):
                fresh[i] = (top.values[j], top.indices[j])
                paths[i].parent.mkdir(parents=True, exist_ok=True)
                tmp = paths[i].with_name(f".{paths[i].name}.{os.getpid()}.tmp")
                save_file({"values": top.values[j].contiguous(), "indices": top.indices[j].int().contiguous()},
                          str(tmp))
                os.replace(tmp, paths[i])
        vals, idx = [], []
        for i, p in enumerate(paths):
            if i in fresh:
                v, x = fresh[i]
            else:
                try:
                    t = load_file(str(p))
                except (SafetensorError, OSError) as e:
                    raise DistillError(f"{p}: unreadable teacher cache file ({e}); delete it to recompute") from None
                v, x = t["values"], t["indices"]
                if v.shape != (input_ids.shape[1], self.k):
                    raise DistillError(f"{p}: cached logits of shape {tuple(v.shape)}, expected "
                                       f"{(input_ids.shape[1], self.k)}; delete the cache directory")
            vals.append(v)
            idx.append(x.long())
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        return TeacherTopK(torch.stack(vals), torch.stack(idx))  # (B, T, k)
