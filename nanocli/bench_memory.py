"""``nano bench --max-batch``: the largest batch of each model that a memory budget fits, and what it really used.

The budget is what a model's batch may use beyond the weights (both models' weights stay resident): its cache
(KV + Mamba state, ``memory.cache_bytes``) plus the activation peak of its prefill at the run's prefill chunk,
from nano's memory model (``fit.estimate``; on a CPU with the CPU scan's buffers, ``path="cpu"``):

* **CUDA**: ``--memory GiB``, else ``GPU_MEMORY_SHARE`` of the GPU memory free once both models are loaded;
* **CPU**: ``--memory GiB``, else the host's available memory (``host_memory.read_host_memory``) less what
  loading and running both models needs (weights + load transient + ``host_memory.RUNTIME_MARGIN``, the
  need ``host_memory.plan_cpu_load`` checks). A ``--memory`` above that is an error: the machine would swap,
  or the kernel end the run.

Each model then runs at the largest batch ``fit.max_batch`` finds (each its own, at most ``MAX_AUTO_BATCH``);
a budget too small for one sequence is a one-line ``BenchError``. On a CPU each run's peak RSS rise (the
process's high-water mark reset through ``/proc/self/clear_refs`` just before its cache is allocated, then
read after, the C allocator's free memory handed back first) says what the batch really used, the allocator's
own slack included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nanocli_model import fit
from nanocli_model.config import NanoConfig

from .host_memory import GIB, HostPlan

MAX_AUTO_BATCH = 256  # --max-batch never goes above this (vLLM's default max_num_seqs)
GPU_MEMORY_SHARE = 0.85  # --max-batch on CUDA plans with this share of the free GPU memory by default
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _error(message: str) -> Exception:
    from .bench import BenchError  # bench imports this module

    return BenchError(message)


@dataclass(frozen=True)
class Budget:
    """Bytes each model's batch may use beyond the weights, and where the figure comes from."""

    bytes: int
    source: str

    def describe(self) -> str:
        return f"{self.bytes / GIB:.2f} GiB ({self.source})"


def cpu_budget(memory_gib: float | None, host: HostPlan) -> Budget:
    """``--memory`` (checked against what the host can give), else the host's available memory less the need of
    both models (``host``: ``plan_cpu_load``'s answer for the hybrid with its twin)."""
    room = None
    if host.memory is not None and host.need is not None:
        room = host.memory.available - host.need.total
        why = (f"{host.memory.available / GIB:.2f} GiB available ({host.memory.source}) less "
               f"{host.need.total / GIB:.2f} GiB to load and run the models")
    if memory_gib is None:
        if room is None:
            raise _error("--max-batch on CPU: this machine's available memory cannot be read; give --memory GiB")
        if room <= 0:
            raise _error(f"--max-batch: no memory left for a batch: {why}")
        return Budget(room, why)
    wanted = round(memory_gib * GIB)
    if room is not None and wanted > room:
        raise _error(f"--memory {memory_gib:g}: more than this machine can give a batch, {room / GIB:.2f} GiB "
                     f"({why})")
    return Budget(wanted, "--memory")


def gpu_budget(memory_gib: float | None, free: int) -> Budget:
    if memory_gib is not None:
        return Budget(round(memory_gib * GIB), "--memory")
    return Budget(int(free * GPU_MEMORY_SHARE), f"{GPU_MEMORY_SHARE:.0%} of the free GPU memory, "
                                                f"{free / GIB:.2f} GiB")


def batch_need(config: NanoConfig, dtype: str, prompt: int, context: int, batch: int, chunk: int,
               path: str) -> fit.Estimate:
    """``fit.estimate`` of ``batch`` sequences of ``context`` tokens, the prompt prefilled ``chunk`` at a time:
    ``.total - .weights`` is what the batch needs beyond the weights."""
    return fit.estimate(config, context=context, batch=batch, dtype=dtype, prefill_chunk=min(prompt, chunk),
                        path=path)


def largest_batch(config: NanoConfig, dtype: str, prompt: int, context: int, budget: Budget, chunk: int,
                  path: str, role: str) -> tuple[int, int | None]:
    """(the batch to run, the largest the budget fits or None without a limit) for one model and pair; a
    ``BenchError`` when not even one sequence fits."""
    weights = fit.weights_bytes(config, dtype)
    n = fit.max_batch(config, budget.bytes + weights, context=context, dtype=dtype,
                      prefill_chunk=min(prompt, chunk), path=path)
    if n == 0:
        e = batch_need(config, dtype, prompt, context, 1, chunk, path)
        raise _error(f"--max-batch: not even one sequence of {context:,} tokens of the {role} fits in "
                     f"{budget.describe()}: it needs {(e.total - e.weights) / 2**20:,.1f} MiB (cache "
                     f"{e.cache / 2**20:,.1f} + prefill activations {e.activations.total / 2**20:,.1f}); give more "
                     "--memory, shorter --lengths or a smaller --prefill-chunk")
    return min(n or MAX_AUTO_BATCH, MAX_AUTO_BATCH), n


# ------------------------------------------------------------------------------- what a run really used
def _status_bytes(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB$", _STATUS.read_text(encoding="ascii"), re.M)
    except (OSError, UnicodeDecodeError):
        return None
    return int(m.group(1)) * 1024 if m else None


def _trim() -> None:
    """Hand the C allocator's free memory back to the OS (glibc's ``malloc_trim``), so that the RSS a run starts
    from holds no freed blocks of the previous run for this one to reuse unseen."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak_rss() -> int | None:
    """Reset this process's peak RSS to its RSS now and return that; None where Linux's ``clear_refs`` is not
    there (another OS, or not writable)."""
    if not _CLEAR_REFS.exists():
        return None
    _trim()
    try:
        _CLEAR_REFS.write_text("5", encoding="ascii")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def peak_rss_rise(start: int | None) -> int | None:
    """How far the peak RSS rose above ``start`` (``reset_peak_rss``'s answer) since the reset."""
    peak = None if start is None else _status_bytes("VmHWM")
    return None if peak is None else max(0, peak - start)
