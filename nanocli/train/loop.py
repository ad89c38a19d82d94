"""The training loop shared by pretrain, align and distill: one optimizer step at a time, top to bottom.

Per step: set the scheduled LR -> count this step's label tokens on every rank -> forward/backward each
micro-batch (bf16 autocast, or fp32; FP8 GEMMs come from modules ``fp8.py`` swapped in beforehand) with
the loss scaled so the gradient is that of the *global-batch mean* whatever the number of processes and
micro-batches -> clip -> NaN/Inf guard -> AdamW -> metrics -> maybe evaluate / checkpoint / stop.

The stage gives the loop functions (``batch_fn``, ``loss_fn``, ``eval_fn``, ``save_fn``) and hooks;
the loop knows nothing of data formats or of the terminal. A stop request (SIGINT / SIGTERM, see
``StopFlag``) is agreed on by all ranks, ends the step in progress, writes a checkpoint and returns with
the signal's number (the command then exits 128 + it: 130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nanocli_model.errors import NanoError

from .distributed import Dist, no_sync
from .optim import OptimConfig, clip_gradients, set_lr
from .schedule import Schedule

log = logging.getLogger("nanocli")


class NonFiniteError(NanoError):
    """A NaN/Inf loss or gradient with ``--on-nan stop``."""


@dataclass
class LoopConfig:
    schedule: Schedule
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: str = "bf16"  # fp32 | bf16 | fp8 (fp8: FP8 GEMMs + bf16 autocast elsewhere)
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: only at the end (when an eval_fn is given)
    on_nan: str = "stop"  # stop | skip (the step's update is dropped)
    flops_per_token: float = 0.0  # training FLOPs per token (3 x forward) for MFU; 0 = unknown
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0 = unknown
    unit: str = "tokens"  # what count_fn counts (tokens; DPO pairs; GRPO sequences): names the rate metric


@dataclass
class LoopResult:
    step: int  # steps completed
    tokens: int  # label tokens trained on in this invocation
    seconds: float
    last_loss: float
    interrupted: bool = False
    signal: int | None = None  # the stop signal's number (SIGINT 2, SIGTERM 15) when interrupted
    skipped_steps: list[int] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    checkpoint: Path | None = None


class Stopped(KeyboardInterrupt):
    """A second stop signal: the run stops at once (``signum``: the signal, for the exit code 128 + it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum


class StopFlag:
    """Set by SIGINT / SIGTERM; the loop finishes the current step, saves and returns.

    ``signum`` is the (first) signal's number. A second signal while the first is being honoured stops at
    once (:class:`Stopped`, a KeyboardInterrupt): the last complete checkpoint is intact, as after any kill."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested:
            self.__exit__()
            raise Stopped(signum)
        self.requested, self.signum = True, signum

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread): no handler
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def autocast(precision: str, device: torch.device):
    """bf16 autocast for bf16 and fp8 runs (the FP8 modules handle their own GEMMs); none for fp32."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def run_loop(wrapped: nn.Module, optimizer: torch.optim.Optimizer, config: LoopConfig, dist: Dist, *,
             start_step: int, batch_fn: Callable[[int], list[dict]],
             loss_fn: Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor, dict]],
             count_fn: Callable[[dict], int], save_fn: Callable[[int, bool], Path | None],
             eval_fn: Callable[[], dict] | None = None, on_step: Callable[[dict], None] | None = None,
             stop: StopFlag | None = None, where_fn: Callable[[int], str] | None = None,
             status: Callable[[str], None] | None = None) -> LoopResult:
    """Train from ``start_step`` to ``config.schedule.total``; returns what happened.

    ``batch_fn(step)`` gives this rank's micro-batches for the step; ``loss_fn(model, batch)`` returns
    (sum of token losses, token count, extra metrics); ``count_fn(batch)`` counts label tokens without
    a forward; ``save_fn(step, final)`` writes a checkpoint (rank 0; a no-op elsewhere) after ``step`` steps.
    ``where_fn(step)`` names the data a step reads (for the report of a non-finite step); ``status`` gets
    a line for every skipped step. A CUDA out-of-memory error leaves with ``.nano_step`` set on it.
    """
    total = config.schedule.total
    result = LoopResult(step=start_step, tokens=0, seconds=0.0, last_loss=float("nan"))
    t_start = time.perf_counter()
    wrapped.train()
    step = start_step
    while step < total:
        t0 = time.perf_counter()
        lr = config.schedule.lr_at(step)
        set_lr(optimizer, lr)
        try:
            micro = batch_fn(step)
            n_global = dist.all_reduce_sum(torch.tensor(float(sum(count_fn(b) for b in micro)))).item()
            if n_global == 0:
                raise NanoError(f"step {step + 1}: the batch has no label tokens to learn from; check the data")
            loss_value, extras = _forward_backward(wrapped, micro, loss_fn, config, dist, n_global)
        except torch.OutOfMemoryError as e:
            e.nano_step = step + 1
            raise
        grad_norm = clip_gradients(wrapped, config.optim.grad_clip)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not finite:
            _non_finite(wrapped, config, dist, step, total, loss_value, grad_norm, where_fn, status)
            result.skipped_steps.append(step + 1)
        step += 1
        dt = time.perf_counter() - t0
        result.step, result.last_loss = step, loss_value
        result.tokens += int(n_global)
        metrics = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                   config.unit: int(n_global), f"{config.unit}_per_s": n_global / dt, "step_time": dt,
                   **{k: v / len(micro) for k, v in extras.items()}}
        if config.flops_per_token and config.peak_flops:
            metrics["mfu"] = n_global * config.flops_per_token / dt / (config.peak_flops * dist.world)
        if not finite:
            metrics["skipped"] = True
            if where_fn is not None:
                metrics["data"] = where_fn(step - 1)
        stopping = _agree_signal(dist, stop.signum if stop is not None and stop.requested else 0)
        if eval_fn is not None and step < total and config.eval_every and step % config.eval_every == 0:
            metrics.update(_evaluate(wrapped, eval_fn, config, dist))
        if on_step is not None:
            on_step(metrics)
        if stopping:
            result.interrupted, result.signal = True, stopping
            result.checkpoint = save_fn(step, False)
            break
        if step < total and config.save_every and step % config.save_every == 0:
            result.checkpoint = save_fn(step, False)
    if not result.interrupted:
        if eval_fn is not None:
            result.eval = _evaluate(wrapped, eval_fn, config, dist)
            if on_step is not None and result.eval:
                on_step({"step": step, **result.eval})
        result.checkpoint = save_fn(step, True)
    result.seconds = time.perf_counter() - t_start
    return result


def _forward_backward(wrapped: nn.Module, micro: list[dict], loss_fn, config: LoopConfig, dist: Dist,
                      n_global: float) -> tuple[float, dict]:
    """Gradients of the global-batch mean loss, accumulated over the micro-batches; (mean loss, extras)."""
    scale = dist.world / n_global  # DDP averages over ranks: world / n_global makes it the global mean
    loss_sum = torch.zeros((), dtype=torch.float64)
    extras: dict = {}
    for i, batch in enumerate(micro):
        with no_sync(wrapped, i == len(micro) - 1), autocast(config.precision, dist.device):
            loss, _, extra = loss_fn(wrapped, batch)
        (loss * scale).backward()
        loss_sum += loss.detach().double().cpu()
        for k, v in extra.items():
            extras[k] = extras.get(k, 0.0) + float(v)
    return dist.all_reduce_sum(loss_sum).item() / n_global, extras


def _non_finite(wrapped: nn.Module, config: LoopConfig, dist: Dist, step: int, total: int, loss: float,
                grad_norm: float, where_fn: Callable[[int], str] | None, status: Callable[[str], None] | None) -> None:
    """Report a step whose loss or gradient is NaN/Inf (its update is already dropped): stop, or skip it.

    Skipping cannot help when the weights themselves are no longer finite: that stops either way."""
    what = "loss" if not math.isfinite(loss) else "gradient"
    data = f"; data: {where_fn(step) if where_fn is not None else f'batch {step} of the run (0-based)'}"
    where = f"step {step + 1} of {total} (loss {loss}, grad norm {grad_norm}{data})"
    bad = next((n for n, p in wrapped.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if _agree(dist, bad is not None):  # FSDP: a shard on any rank
        name = bad or "(on another rank)"
        raise NonFiniteError(f"non-finite {what} at {where}: the weight {name} itself holds NaN/Inf, skipping cannot "
                             "recover; resume from an earlier checkpoint or check the input model")
    if config.on_nan == "stop":
        raise NonFiniteError(f"non-finite {what} at {where}; lower the LR, check that data, or pass --on-nan "
                             "skip; the last checkpoint is intact")
    log.warning("skipped %s", where)
    if status is not None:
        status(f"skipped {where}: non-finite {what}, no update (--on-nan skip)")


def _agree(dist: Dist, flag: bool) -> bool:
    """True on every rank when any rank got a stop signal (so all ranks stop after the same step)."""
    if not dist.initialized:
        return flag
    return dist.all_reduce_sum(torch.tensor(float(flag))).item() > 0


def _agree_signal(dist: Dist, signum: int) -> int:
    """The stop signal (SIGINT / SIGTERM, 0: none) every rank agrees on: SIGTERM if any rank got it, else
    SIGINT if any did, so all ranks stop after the same step and exit with the same code."""
    if not dist.initialized:
        return signum
    got = dist.all_reduce_sum(torch.tensor([float(signum == signal.SIGINT), float(signum == signal.SIGTERM)]))
    return int(signal.SIGTERM) if got[1] > 0 else int(signal.SIGINT) if got[0] > 0 else 0


@torch.no_grad()
def _evaluate(wrapped: nn.Module, eval_fn: Callable[[], dict], config: LoopConfig, dist: Dist) -> dict:
    wrapped.eval()
    try:
        with autocast(config.precision, dist.device):
            return eval_fn()
    finally:
        wrapped.train()


class MetricsLog:
    """``metrics.jsonl``: one JSON object per step (and per evaluation), appended by rank 0.

    On resume, lines of steps after the resume point are dropped first, so the file reads as one run.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            keep = [ln for ln in self.path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and _step_of(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, metrics: dict) -> None:
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
        except OSError as e:
            from .checkpoints import write_failure

            reason = write_failure(e, self.path.parent) or str(e)
            raise NanoError(f"cannot append to {self.path}: {reason}; the last checkpoint is intact") from None

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a damaged line is dropped
