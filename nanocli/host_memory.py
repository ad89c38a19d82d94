"""Host memory before a model loads on the CPU: will its weights fit, and in which dtype?

A 9B checkpoint in fp32 is 35.6 GB; on a 24 GB machine loading it ends in swap or the OOM killer, minutes
in. ``plan_cpu_load`` answers first, from the safetensors headers (exact parameter counts, read without the
data: ``nanocli_model.headers``) and the same arithmetic as ``nano fit-check`` (``fit.tensor_weights_bytes``),
against the memory this process can have (``read_host_memory``):

    need = weights in the load dtype + load transient + RUNTIME_MARGIN

* **weights**: every tensor's parameters x the dtype's bytes (exact);
* **transient**: beyond the weights, one tensor at a time, the larger of two moments. ``checkpoint.load_pretrained``
  reads and casts one tensor at a time and checks each for NaN/Inf: one tensor as stored (when it is cast to
  another dtype) plus one byte per element for the finite check (the 9B's embedding in fp32: 1.17 GB stored
  bf16 + 0.59 GB). The first cached decode step copies each Linear weight into its decode layout
  (``decode.relayout_linear_weights``), freeing the old copy after: one tensor in the load dtype (the 9B's
  lm_head: 2.35 GB in fp32). The largest tensor sets both;
* **RUNTIME_MARGIN** (1 GiB): the process itself (Python, torch's libraries and allocator, the tokenizer: a
  2-token generation with the tiny profile peaks at 0.40 GiB RSS here) and the cache and activations of a
  short prompt. A long prompt's prefill needs more (``nano fit-check`` gives the activation and cache terms).

Measured on this 2-core, 24 GB machine (a 9B-v2-shaped checkpoint whose data is a sparse file of zeros,
``nano generate --max-new-tokens 2``, auto: bf16): need 18.65 GiB; peak anonymous memory 15.91 GiB. The
process's RSS peaked at 22.17 GiB because it also counts the memory-mapped checkpoint pages (a bf16 load of
bf16 weights keeps them mapped until the decode layout copies them), page cache the kernel can drop.

``--dtype auto`` on CPU takes the widest dtype that fits: fp32 (fastest on most CPUs), else bf16, and says
why; an explicit dtype that does not fit, or nothing fitting, is one ``HostMemoryError`` line, before any
weight is read. Where the memory cannot be read (not Linux), nothing is checked and auto means fp32.

**The other stages** (``check_cpu``), on the CPU only (a GPU run has ``nano fit-check``), before any weight
or optimizer state is read: every model the stage holds in this process, summed, with the largest load
transient and one RUNTIME_MARGIN, times the processes on this host (torchrun's ``LOCAL_WORLD_SIZE``: each
holds its own replica):

* ``nano pretrain`` / ``align`` / ``distill``: the trained model at ``TRAIN_BYTES_PER_PARAM`` = 16 bytes a
  parameter (``training``): fp32 master weights, their gradients and AdamW's two fp32 moments (exp_avg,
  exp_avg_sq), the ~16 bytes the CUDA out-of-memory messages of pretrain and align name; under
  ``--parallel fsdp`` the 16 are sharded over the processes, but each process first loads the whole fp32
  model (4 bytes a parameter). ``align`` adds the frozen fp32 reference of DPO (and of GRPO with a KL
  term): a copy of the policy's weights; ``distill`` adds the teacher when it runs on the CPU, as loaded in
  ``--teacher-dtype``. Activations of the training forward/backward, and a resume's optimizer state while it
  is read from ``trainer_state.pt``, are not counted: the check is a floor, refusing a run that cannot fit,
  not a promise that one fits;
* ``nano prune``: the parent, loaded in fp32 as in ``load_need`` (the pruned copy and the candidates' short
  distillation, smaller than the parent, are not counted).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nanocli_model import fit
from nanocli_model.config import MAMBA, MLP, NanoConfig
from nanocli_model.errors import NanoError
from nanocli_model.headers import CheckpointTensors, read_checkpoint_tensors

GIB = 2**30
RUNTIME_MARGIN = 1 * GIB
TRAIN_BYTES_PER_PARAM = 16  # fp32 weights 4 + gradients 4 + AdamW's exp_avg 4 and exp_avg_sq 4
UNLIMITED = 2**60  # a cgroup limit at or above this is "no limit" (v1 writes 2^63 rounded to the page)
AUTO_ORDER = ("fp32", "bf16")  # --dtype auto on CPU: the first that fits
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class HostMemoryError(NanoError):
    """The weights do not fit this machine's available memory in the asked dtype."""


@dataclass(frozen=True)
class HostMemory:
    """What this process can still allocate: ``available`` bytes, and where the figure comes from."""

    available: int
    source: str  # "MemAvailable", or the cgroup limit that is tighter


@dataclass(frozen=True)
class LoadNeed:
    """Host bytes to load a checkpoint in ``dtype`` and run it (see the module's docstring)."""

    dtype: str
    weights: int
    transient: int
    runtime: int = RUNTIME_MARGIN

    @property
    def total(self) -> int:
        return self.weights + self.transient + self.runtime

    def __add__(self, other: LoadNeed) -> LoadNeed:
        """Two models in one process (``nano bench``'s hybrid and its twin): both weights, one margin."""
        return LoadNeed(self.dtype, self.weights + other.weights, max(self.transient, other.transient),
                        max(self.runtime, other.runtime))


@dataclass(frozen=True)
class HostPlan:
    """The dtype to load in, and what was checked (``need`` / ``memory`` None: nothing could be)."""

    dtype: str
    need: LoadNeed | None = None
    memory: HostMemory | None = None
    note: str | None = None  # --dtype auto chose something narrower than fp32: why


# ---------------------------------------------------------------------------- reading the machine
def _number(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2: no limit) -> None


def _stat_field(path: Path, name: str) -> int:
    try:
        m = re.search(rf"^{name} (\d+)$", path.read_text(encoding="ascii"), re.M)
    except (OSError, UnicodeDecodeError):
        return 0
    return int(m.group(1)) if m else 0


def mem_available(meminfo: Path) -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (the kernel's estimate of what can be allocated without
    swapping); None where there is no such file or line."""
    try:
        m = re.search(r"^MemAvailable:\s+(\d+) kB$", meminfo.read_text(encoding="ascii"), re.M)
    except (OSError, UnicodeDecodeError):
        return None
    return int(m.group(1)) * 1024 if m else None


def cgroup_room(root: Path) -> tuple[int, int] | None:
    """(limit, room) of this process's memory cgroup, or None without a limit. v2: ``memory.max`` minus
    ``memory.current``; v1: ``memory/memory.limit_in_bytes`` minus ``usage_in_bytes``; the inactive page cache
    (``inactive_file``), which the kernel reclaims first, counts as room."""
    for limit_file, usage_file, stat_file, field in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
             "total_inactive_file")):
        limit = _number(root / limit_file)
        if limit is None or limit >= UNLIMITED:
            continue
        used = _number(root / usage_file) or 0
        used -= min(used, _stat_field(root / stat_file, field))
        return limit, max(0, limit - used)
    return None


def read_host_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> HostMemory | None:
    """The memory this process can have: ``MemAvailable``, or a tighter cgroup limit's room; None where
    neither can be read."""
    available = mem_available(meminfo)
    limited = cgroup_room(cgroup)
    if limited is not None and (available is None or limited[1] < available):
        limit, room = limited
        return HostMemory(room, f"cgroup limit {limit / GIB:.2f} GiB")
    return None if available is None else HostMemory(available, "MemAvailable")


# ---------------------------------------------------------------------------- the check
def load_need(tensors: CheckpointTensors, dtype: str) -> LoadNeed:
    """Bytes to load ``tensors`` (a checkpoint's headers) in ``dtype`` and run the model on the CPU. ``int8``
    (``--dtype int8``) from a float checkpoint: see ``int8_load_need``; a directory saved quantized (int8
    tensors in its headers) loads as stored."""
    if dtype == "int8":
        if not any(t.dtype == "I8" for t in tensors.tensors):
            return int8_load_need(tensors)
        stored = sum(t.nbytes for t in tensors.tensors)
        return LoadNeed("int8", stored, max((t.nbytes for t in tensors.tensors), default=0))
    weights = fit.tensor_weights_bytes(((t.name, t.numel) for t in tensors.tensors), dtype)
    target = fit.weight_dtype(dtype)
    size = _BYTES[target]
    transient = max((max(t.numel + (t.nbytes if fit.stored_dtype_name(t.dtype) != target else 0),  # load + check
                         t.numel * size)  # the decode-layout copy
                     for t in tensors.tensors), default=0)
    return LoadNeed(target, weights, transient)


def _int8_group(name: str) -> str | None:
    """The quantization step a float tensor belongs to: ``layer N`` for a projection weight, ``lm_head``, or
    None (stays float32)."""
    if name == "lm_head.weight":
        return "lm_head"
    m = re.match(r"(?:backbone|model)\.layers\.(\d+)\.", name)
    return f"layer {m.group(1)}" if m and name.endswith(fit.MATMUL_SUFFIXES) else None


def int8_load_need(tensors: CheckpointTensors) -> LoadNeed:
    """``--dtype int8`` from a float checkpoint (``checkpoint.load_pretrained``, ``quant.quantize_int8``): the
    float tensors other than the projections load in fp32 as usual; the projections (and lm_head) are read one
    layer at a time, run the calibration pass in fp32 and are freed once quantized. So the weights are the int8
    model's (1 byte a weight, a 4-byte scale per row and a 4-byte divisor per column, the rest fp32), and the
    transient is the largest layer's projections in fp32 (or the fp32 lm_head) plus one of its tensors as stored
    while it is cast: for the 9B-v2, 14.21 GiB against bf16's 18.65 and fp32's 36.30."""
    weights, groups = 0, {}
    for t in tensors.tensors:
        group = _int8_group(t.name)
        if group is None:
            weights += 4 * t.numel
            continue
        rows, cols = t.shape
        weights += t.numel + 4 * rows + 4 * cols
        fp32, largest = groups.get(group, (0, 0))
        groups[group] = (fp32 + 4 * t.numel, max(largest, t.nbytes if t.dtype != "F32" else 0))
    floats = max((t.numel + (t.nbytes if t.dtype != "F32" else 0) for t in tensors.tensors
                  if _int8_group(t.name) is None), default=0)  # a float tensor's load + finite check
    return LoadNeed("int8", weights, max([floats, *(a + b for a, b in groups.values())]))


def built_need(config: NanoConfig, dtype: str) -> LoadNeed:
    """Bytes to build ``config`` with random weights straight in ``dtype``: no load; the decode-layout copy of
    the largest Linear weight (the lm_head, or the largest projection) is the transient."""
    d = fit.weight_dtype(dtype)
    c = config
    largest = max(c.vocab_size * c.hidden_size, c.hidden_size * c.mamba_in_proj_dim if c.count(MAMBA) else 0,
                  c.hidden_size * c.intermediate_size if c.count(MLP) else 0)
    return LoadNeed(d, fit.weights_bytes(config, dtype), largest * _BYTES[d])


def checkpoint_need(tensors: CheckpointTensors | None) -> Callable[[str], LoadNeed] | None:
    """``load_need`` for these headers, as ``plan_cpu_load`` takes it; None without headers."""
    return None if tensors is None else functools.partial(load_need, tensors)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _explain(need: LoadNeed) -> str:
    return (f"{_gib(need.total)} of host memory ({_gib(need.weights)} of weights + "
            f"{_gib(need.transient + need.runtime)} to load and run them)")


def plan_cpu_load(name: str, need: Callable[[str], LoadNeed] | None, dtype: str,
                  read: Callable[[], HostMemory | None] | None = None) -> HostPlan:
    """The dtype to load ``name`` in on the CPU (``dtype``: auto, fp32, bf16 or fp16), ``need(dtype)`` checked
    against the host's available memory; a one-line ``HostMemoryError`` when it does not fit. ``read``: the
    memory reader (default ``read_host_memory``, looked up when called, so a test can replace it)."""
    wanted = "fp32" if dtype == "auto" else dtype
    memory = (read or read_host_memory)() if need is not None else None
    if memory is None:  # no headers (load_pretrained will say why) or no meminfo: nothing to check against
        return HostPlan(wanted)
    have = f"this machine has {_gib(memory.available)} available ({memory.source})"
    needs = {d: need(d) for d in (AUTO_ORDER if dtype == "auto" else (dtype, "bf16"))}
    fits = [d for d in needs if needs[d].total <= memory.available]
    if dtype == "auto":
        if not fits:
            raise HostMemoryError(f"{name} needs {_explain(needs['bf16'])} even in bf16 (fp32: "
                                  f"{_gib(needs['fp32'].total)}); {have}: free some memory, or run it on a GPU "
                                  f"(--device cuda; `nano fit-check --model {name} --gpu auto` predicts the fit)")
        chosen = fits[0]
        note = None if chosen == "fp32" else (
            f"--dtype auto: bf16, since fp32 needs {_gib(needs['fp32'].total)} of host memory and {have}")
        return HostPlan(chosen, needs[chosen], memory, note)
    need = needs[dtype]
    if need.total <= memory.available:
        return HostPlan(dtype, need, memory)
    smaller = needs["bf16"]
    if _BYTES.get(dtype, 4) > 2 and smaller.total <= memory.available:
        hint = f"use --dtype bf16 ({_gib(smaller.total)})"
    elif _BYTES.get(dtype, 4) > 2:
        hint = (f"even --dtype bf16 needs {_gib(smaller.total)}: free some memory, or run it on a GPU "
                "(--device cuda)")
    else:
        hint = "no smaller dtype loads on the CPU: free some memory, or run it on a GPU (--device cuda)"
    raise HostMemoryError(f"{name} in {dtype} needs {_explain(need)}; {have}: {hint}")


# ---------------------------------------------------------------------------- the training stages and prune
def training(load: LoadNeed, shards: int = 1) -> LoadNeed:
    """Training a model whose fp32 load need is ``load`` (``load_need(tensors, "fp32")``, or ``built_need``):
    ``TRAIN_BYTES_PER_PARAM`` a parameter instead of the fp32 weights' 4; ``shards`` > 1 (FSDP): that much per
    process, but never less than the whole fp32 model each process loads before it is sharded."""
    if load.dtype != "fp32":
        raise ValueError(f"training() takes the fp32 load need, not {load.dtype}'s")
    states = load.weights * TRAIN_BYTES_PER_PARAM // 4
    return LoadNeed("fp32", max(load.weights, states // max(1, shards)), load.transient, load.runtime)


TRAINED = "fp32 weights, gradients and AdamW moments"  # what ``training`` counts, as check_cpu's parts say it


def loaded(directory: Path, dtype: str) -> LoadNeed:
    """``load_need`` of the checkpoint in ``directory`` (its headers: exact)."""
    tensors = read_checkpoint_tensors(directory)
    if tensors is None:  # resolve.model_target refuses a directory without weights before this
        raise HostMemoryError(f"{directory}: no safetensors weights")
    return load_need(tensors, dtype)


def trained(directory: Path | None, config: NanoConfig, shards: int = 1) -> LoadNeed:
    """``training`` of the model loaded from ``directory``, or built from ``config`` (``directory`` None)."""
    return training(loaded(directory, "fp32") if directory is not None else built_need(config, "fp32"), shards)


def check_cpu(what: str, parts: list[tuple[str, LoadNeed]], processes: int = 1,
              read: Callable[[], HostMemory | None] | None = None) -> LoadNeed | None:
    """Do the models a stage holds on the CPU fit this host? ``parts``: (what this model's bytes are, e.g.
    "the policy's fp32 weights, gradients and AdamW moments", its need); summed (one transient, the largest;
    one margin) and times ``processes``. A one-line ``HostMemoryError`` when they do not fit; the total need
    otherwise, or None when there is nothing to check (no parts, or the memory cannot be read)."""
    memory = (read or read_host_memory)() if parts else None
    if memory is None:
        return None
    total = functools.reduce(lambda a, b: a + b, (need for _, need in parts))
    n = max(1, processes)
    if n * total.total <= memory.available:
        return total
    terms = " + ".join(f"{label} {_gib(need.weights)}" for label, need in parts)
    each = f", in each of {n} processes" if n > 1 else ""
    raise HostMemoryError(f"{what} needs {_gib(n * total.total)} of host memory ({terms} + "
                          f"{_gib(total.transient + total.runtime)} to load and run them{each}); this machine has "
                          f"{_gib(memory.available)} available ({memory.source}): free some memory, or run it on "
                          "a GPU (--device cuda)")
