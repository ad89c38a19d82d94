"""One training run, written once: ``nano pretrain``, ``nano distill`` and ``nano align`` supply what differs.

:func:`train` runs a stage, top to bottom:

    memory    on the CPU, do the models fit the host's memory (``Stage.host_need``, ``host_memory.check_cpu``)?
    lock      OUT/.nano.lock: one run at a time writes into OUT
    resume    the resume point (fresh, ``--resume auto``, a checkpoint) held to the architecture and the
              settings that fix the trajectory (``Plan.TRAJECTORY``; the length may grow: ``resume.py``); a run
              already at its last step returns
    data      ``Stage.data``: what the batches read (tokenizer, token shards, batch plan)
    model     seeded, then ``Stage.job``: the model (fp32 master weights, train mode; the stage measures the
              input model and builds references here) and how to train it (a :class:`Job`); FP8 modules,
              DDP/FSDP, AdamW; on resume the optimizer, RNG and the stage's own state restored
    loop      ``loop.run_loop`` with the job's batches, loss and evaluation; checkpoints (``session``) carry
              the job's extra state
    finish    ``Job.finish`` (evaluations of the trained model), peak memory, MFU, ``loss.png``

What a stage supplies is small: a :class:`Plan` (made before any work; what ``--dry-run`` prints), the
:class:`Stage` methods ``host_need``, ``data``, ``job`` and ``out_of_memory``, and the callables of its
:class:`Job`. The result is the stage's :class:`TrainResult` (the common fields filled here, the stage's own by
its job).
No torch at import: stages import this module for its dataclasses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from nanocli_model.errors import NanoError

from ..report import SILENT, Reporter
from .options import Training

if TYPE_CHECKING:
    from nanocli_model import NanoConfig

    from .schedule import Schedule


@dataclass
class Plan:
    """The resolved run, before any work: what ``--dry-run`` prints and the skeleton reads."""

    # the settings a resume must share with the checkpoint's run (a stage's plan adds its own); the run's length
    # is not one of them: a resume may extend the run (train/resume.py: the schedule is re-derived)
    TRAJECTORY: ClassVar[tuple[str, ...]] = (
        "data", "seq_len", "global_batch", "seed", "precision", "fp8_scaling", "fp8_keep", "schedule", "lr",
        "min_lr", "warmup", "decay", "decay_shape", "weight_decay", "betas", "eps", "grad_clip")

    options: Training
    config: NanoConfig  # the trained model's architecture (a resume must have the same)
    steps: int
    schedule: Schedule

    @property
    def unit(self) -> str:
        """What a step counts: tokens (align: pairs for DPO, sequences for GRPO)."""
        return "tokens"

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per counted unit, for MFU (0: not measured)."""
        return 0.0

    @property
    def peak_tflops(self) -> float | None:
        return None

    @property
    def eval_every(self) -> int:
        return 0

    def hparams(self) -> dict:
        """The settings saved with every checkpoint (``hyperparameters.yaml``) and compared on resume."""
        return {**dataclasses.asdict(self.options), "steps": self.steps, "resume": None, "dry_run": False}


@dataclass
class TrainResult:
    """What a training run did; a stage's result adds its own fields."""

    plan: Plan
    dry_run: bool = False
    out: Path | None = None
    final: Path | None = None  # the last checkpoint written (or, already done, the one found)
    start_step: int = 0
    steps_done: int = 0
    tokens: int = 0  # what the steps counted (Plan.unit) in this invocation
    seconds: float = 0.0
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    eval: dict = field(default_factory=dict)  # held-out metrics at the end
    data: dict = field(default_factory=dict)  # token streams: per source, its tokens and the epochs the run reads
    interrupted: bool = False
    signal: int | None = None  # interrupted: the stop signal's number (SIGINT 2, SIGTERM 15)
    already_done: bool = False
    peak_memory_bytes: int = 0
    mfu: float | None = None
    fp8: Any = None  # fp8.FP8Conversion: which Linears run in FP8 and the GEMM form (--precision fp8)
    plot: Path | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class Job:
    """What a stage trains and how: built by ``Stage.job`` once the run directory is locked."""

    model: Any  # nn.Module: fp32 master weights on the run's device, train mode (unwrapped)
    batches: Callable[[int, Any], list[dict]]  # (step, wrapped model) -> this process's micro-batches
    loss: Callable[[Any, dict], tuple]  # (model, batch) -> (summed loss, count, extra metrics)
    count: Callable[[dict], int]  # what a batch counts (Plan.unit), without a forward
    side_files: list[Path]  # tokenizer files every checkpoint carries
    evaluate: Callable[[Any], dict] | None = None  # held-out metrics of the (wrapped) model, under no_grad
    where: Callable[[int], str] | None = None  # the data a step reads, for the report of a non-finite step
    state: Callable[[int], dict] | None = None  # extra training state a checkpoint of step N carries
    restore: Callable[[dict, int], None] | None = None  # that state read back when resuming at a step
    metrics: Callable[[dict], None] | None = None  # adds to a step's metrics before they are recorded
    finish: Callable[[], None] | None = None  # after the loop: evaluations of the trained model
    optimizer_from: Path | None = None  # a fresh run's AdamW moments come from this checkpoint


class Stage(Protocol):
    """What a training stage supplies (one small class per stage)."""

    name: str  # "pretrain": the run lock's owner and the loss plot's title ("nano pretrain")
    error: type[NanoError]
    plan: Plan

    def data(self, dist, reporter: Reporter) -> None:
        """Prepare what the batches read (after the lock; before the model)."""

    def job(self, dist, reporter: Reporter, resume_from: Path | None, fresh: bool) -> Job:
        """Load the model (from ``resume_from`` when resuming) and say how to train it."""

    def out_of_memory(self, e: BaseException) -> NanoError:
        """A CUDA out-of-memory error as the settings to change (``e.nano_step``: the step, if in one)."""

    def host_need(self, dist, shards: int) -> list[tuple[str, Any]]:
        """The models this process holds on the CPU, as ``host_memory.check_cpu``'s parts ([] when none is):
        the trained one as ``host_memory.trained(..., shards)`` (``shards``: FSDP's processes, else 1)."""


def schedule(o: Training, steps: int) -> Schedule:
    """The run's LR schedule over ``steps`` optimizer steps."""
    from .schedule import Schedule

    return Schedule(kind=o.schedule, lr=o.lr, min_lr=o.final_lr, warmup=o.warmup, decay=o.decay,
                    decay_shape=o.decay_shape, total=steps)


def run(plan: Plan, result: type[TrainResult], stage: Callable[[Any, Any], Stage],
        reporter: Reporter | None = None) -> TrainResult:
    """A stage's run from its plan: ``result(plan)`` filled by :func:`train` of ``stage(plan, result)``; with
    ``--dry-run`` only ``result(plan, dry_run=True)``."""
    if plan.options.dry_run:
        return result(plan, dry_run=True)
    out = result(plan)
    return train(stage(plan, out), out, reporter)


def train(stage: Stage, result: TrainResult, reporter: Reporter | None = None) -> TrainResult:
    """Run ``stage`` (see the module docstring) into ``result``; ``result`` is returned."""
    import torch

    from .distributed import setup

    with setup(stage.plan.options.device) as dist:
        _check_host_memory(stage, dist)
        try:
            return _train(stage, result, dist, reporter or SILENT)
        except torch.OutOfMemoryError as e:
            raise stage.out_of_memory(e) from None


def _check_host_memory(stage: Stage, dist) -> None:
    """Before the lock, the data, the optimizer state and any weight: do the models each process on this host
    holds on the CPU fit its memory (``host_memory.check_cpu``)? A GPU run is fit-check's."""
    import os

    from .. import host_memory

    shards = dist.world if stage.plan.options.parallel == "fsdp" and dist.initialized else 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))
    host_memory.check_cpu(f"nano {stage.name}", stage.host_need(dist, shards), processes)


def _train(stage: Stage, result: TrainResult, dist, reporter: Reporter) -> TrainResult:
    import torch

    from . import checkpoints as ckpt
    from . import session

    plan, o = stage.plan, stage.plan.options
    out = result.out = Path(o.out)
    dist.lock_dir(out, f"nano {stage.name}", reporter.status)
    resume_from = dist.broadcast_object(session.resume_point(out, o.resume, stage.error) if dist.main else None)
    state = ckpt.load_trainer_state(resume_from) if resume_from is not None else None
    if state is not None:
        session.check_resumable(resume_from, plan.config, plan.hparams(), plan.TRAJECTORY, stage.error)
    start = result.start_step = int(state["step"]) if state is not None else 0
    if start > plan.steps:
        raise stage.error(f"{resume_from} is at step {start}, beyond this run's {plan.steps} steps: a run can be "
                          f"extended, not cut back; give more than {start} steps")
    if start == plan.steps:
        result.already_done, result.final, result.steps_done = True, resume_from, start
        return result
    stage.data(dist, reporter)
    dist.barrier()
    torch.manual_seed(o.seed)
    job = stage.job(dist, reporter, resume_from, fresh=state is None)
    wrapped, optimizer, optim = _optimizer(stage, job, state, start, dist, reporter, result)
    save = session.Checkpointer(out, job.model, wrapped, optimizer, dist, plan.hparams(), job.side_files,
                                o.keep_last, reporter.status, extra=job.state)
    record = session.Recorder(out, dist, start if state is not None else None, reporter.step)
    peak = session.peak_flops(plan.peak_tflops, dist)
    loop = _loop(plan, job, wrapped, optimizer, optim, peak, dist, reporter, record, save, start)
    result.steps_done, result.tokens, result.seconds = loop.step, loop.tokens, loop.seconds
    result.first_loss, result.last_loss, result.eval = record.first_loss, loop.last_loss, loop.eval
    result.interrupted, result.signal, result.final = loop.interrupted, loop.signal, loop.checkpoint
    result.peak_memory_bytes = session.peak_memory(dist.device)
    if peak and plan.flops_per_token and loop.seconds:
        result.mfu = loop.tokens * plan.flops_per_token / loop.seconds / (peak * dist.world)
    if job.finish is not None:
        job.finish()
    result.plot = record.plot(out, f"nano {stage.name}: {out.name}")
    return result


def _optimizer(stage: Stage, job: Job, state: dict | None, start: int, dist, reporter: Reporter,
               result: TrainResult):
    """FP8 modules, the DDP/FSDP wrapper and AdamW; on resume the optimizer, RNG and the job's state."""
    from . import checkpoints as ckpt
    from . import fp8, session
    from .distributed import wrap
    from .optim import OptimConfig, build_optimizer

    o = stage.plan.options
    if o.precision == "fp8":
        result.fp8 = fp8.convert_to_fp8(job.model, fp8.FP8Recipe(scaling=o.fp8_scaling, backend=o.fp8_backend,
                                                                 keep_high_precision=o.fp8_keep))
    wrapped = wrap(job.model, dist, o.parallel)
    optim = OptimConfig(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip)
    optimizer = build_optimizer(wrapped, optim, stage.plan.schedule.lr_at(start))
    if state is not None:
        session.load_optimizer(wrapped, optimizer, state["optimizer"], stage.error)
        session.restore_rng(state, dist)
        if job.restore is not None:
            job.restore(state, start)
    elif job.optimizer_from is not None:
        reporter.status(f"continuing from {job.optimizer_from}: weights and optimizer moments, a new schedule "
                        "from step 0")
        moments = ckpt.load_trainer_state(job.optimizer_from)["optimizer"]
        session.load_optimizer(wrapped, optimizer, moments, stage.error)
    return wrapped, optimizer, optim


def _loop(plan: Plan, job: Job, wrapped, optimizer, optim, peak: float, dist, reporter: Reporter, record, save,
          start: int):
    import torch

    from .loop import LoopConfig, StopFlag, run_loop

    o = plan.options
    config = LoopConfig(schedule=plan.schedule, optim=optim, precision=o.precision, save_every=o.save_every,
                        eval_every=plan.eval_every, on_nan=o.on_nan, flops_per_token=plan.flops_per_token,
                        peak_flops=peak, unit=plan.unit)

    def on_step(metrics: dict) -> None:
        if job.metrics is not None:
            job.metrics(metrics)
        record(metrics)

    evaluate = job.evaluate
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reporter.start(start, plan.steps, {"device": str(dist.device), "processes": dist.world})
    with StopFlag() as stop:
        return run_loop(wrapped, optimizer, config, dist, start_step=start,
                        batch_fn=lambda step: job.batches(step, wrapped), loss_fn=job.loss, count_fn=job.count,
                        save_fn=save, eval_fn=None if evaluate is None else (lambda: evaluate(wrapped)),
                        on_step=on_step, stop=stop, where_fn=job.where, status=reporter.status)
