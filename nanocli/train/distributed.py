"""Data-parallel set-up with PyTorch's own engine: torchrun env -> process group -> DDP or FSDP2.

``torchrun --nproc-per-node N -m nanocli pretrain ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; ``setup``
reads them, picks gloo on CPU and nccl on CUDA, and returns a ``Dist`` that the loop asks for its rank
(which slice of the global batch to read), whether it writes files (rank 0 only), and collectives.
A single process without torchrun gets ``Dist(rank=0, world=1)`` and no process group at all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

from nanocli_model.errors import ConfigError

from . import PARALLEL


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False
    locks: list = field(default_factory=list, repr=False, compare=False)  # run locks held until close()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.initialized:
            tdist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.initialized:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (decisions such as 'resume from X' must be the same everywhere)."""
        if not self.initialized:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.initialized:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def lock_dir(self, out: Path, what: str, status: Callable[[str], None] | None = None) -> None:
        """Create ``out`` and take its run lock (``OUT/.nano.lock``, see ``lock.py``) on rank 0, held until
        ``close()``; another live run there is a ``LockedError`` on every rank, naming its pid."""
        from .lock import LockedError, hold

        message = None
        if self.main:
            try:
                self.locks.append(hold(out, what, status))
            except LockedError as e:
                if not self.initialized:
                    raise
                message = str(e)
        message = self.broadcast_object(message)
        if message is not None:
            raise LockedError(message)

    def __enter__(self) -> Dist:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        while self.locks:
            self.locks.pop().release()
        if self.initialized and tdist.is_initialized():
            tdist.destroy_process_group()
            self.initialized = False


def setup(device: str = "auto") -> Dist:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    from ..resolve import visible_device

    if visible_device(device) == "cuda":  # auto: a visible GPU; cuda without one, or an unknown name: one line
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world == 1:
        return Dist(device=dev)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev, initialized=True)


def wrap(model: nn.Module, dist: Dist, parallel: str = "ddp") -> nn.Module:
    """DDP (a full replica per process) or FSDP2 ``fully_shard`` per block (for models that do not fit one device).

    Returns the module to call for the forward; parameters stay those of ``model`` (DDP) or become
    DTensor shards of them (FSDP2), so the optimizer is built after wrapping.
    """
    if parallel not in PARALLEL:
        raise ConfigError(f"--parallel {parallel!r} is unknown; use one of {', '.join(PARALLEL)}")
    if not dist.initialized:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in model.backbone.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def no_sync(wrapped: nn.Module, last_micro_step: bool):
    """Skip the DDP gradient all-reduce on all but the last micro-step of an accumulation."""
    if last_micro_step or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def unwrap(wrapped: nn.Module) -> nn.Module:
    return getattr(wrapped, "module", wrapped)
