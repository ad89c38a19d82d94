"""Compiled decode steps: ``torch.compile`` of the one-token forward, for the decode loop.

A decode step on a CPU streams every weight once and does ~30 small element-wise operations per layer in
between. Eager PyTorch pays a dispatch per operation (a third of a step on the ``small`` profile) and MKL's
GEMV reads the model's tall and square matrices well below the machine's streaming rate. Compiled, the
element-wise work between two projections becomes one C++ loop, and every projection is written as a
row-wise dot product (``layers.project``) that inductor lowers to one vectorised loop over the weight rows.
Inductor would inline the RMSNorm that makes a projection's input into the GEMV loop (recomputing it for
every weight row); the compile options make it store such vectors instead. Measured on the 2-core CPU of
docs/BENCHMARKS.md: 1.7-2.1x eager decode.

Only single-token steps are compiled (prefill stays eager: its GEMMs already run at full speed, and every
prompt length would be another compile). The first step compiles for its cache position, the second once
more with the position symbolic; later steps reuse it. Compiling takes seconds to tens of seconds (inductor
caches the result on disk, so a second run of the same model is faster), so it pays for long generations
and benchmarks, not for one short answer: ``nano generate --compile`` opts in.

On CPU inductor needs a C++ compiler; without one (or on any other compile failure) the first call falls
back to the eager model and says why in ``fallback_reason``.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import time
import types

import torch
from torch import nn

from .cache import HybridCache


class CompiledDecode:
    """``step(input_ids (b, 1), cache) -> logits (b, 1, V)``: the model's own forward, compiled.

    Puts every Linear weight back in row-major order (the compiled GEMV streams rows; the eager decode
    path stores tall weights column-major, see ``NanoForCausalLM._use_decode_layout``) and keeps it so.
    Guards on the model's modules are skipped: the model must not be changed while this object is in use.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.fallback_reason: str | None = None
        self.calls = 0
        self.compile_seconds = 0.0  # wall time of the calls that compiled (the first two, or a new batch size)
        from torch._dynamo.utils import counters

        self._frames = counters["frames"]  # dynamo counts every frame it compiles here
        relayout_linear_weights(model, column_major_tall=False)
        model._decode_layout_done = True  # stays row-major: no column-major switch inside the compiled step
        options = {}
        skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        if skip is not None:  # the per-parameter guards cost ~0.15 ms a step; the weights never change here
            options["guard_filter_fn"] = skip
        if model.lm_head.weight.device.type == "cpu":
            from torch._inductor import config as inductor_config

            if hasattr(inductor_config, "realize_cpu_opcount_threshold"):
                # Store, do not recompute, any input vector that takes more than 4 ops to make (an RMSNorm,
                # the gated norm): inductor would otherwise inline it into the GEMV loop that reads it once
                # per weight row (a square root and a division per 16 weights). Measured +7-15% tokens/s.
                options["realize_cpu_opcount_threshold"] = 4
        # Dynamo keeps compiled code on the code object it traced. Without module guards, code compiled for one
        # model would be taken by another of other shapes (``NanoForCausalLM.forward`` is shared), so each
        # instance traces its own copy of ``_step``: its own cache, only ever called with its own model.
        self._compiled = torch.compile(_own_copy(_step), options=options or None)

    @property
    def compiled(self) -> bool:
        return self.fallback_reason is None

    def __call__(self, input_ids: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        if input_ids.shape[1] != 1 or self.fallback_reason is not None:
            return self.model(input_ids, cache)
        before, frames, t = cache.seq_len, self._frames["total"], time.perf_counter()
        try:
            logits = self._compiled(self.model, input_ids, cache)
        except Exception as e:  # compile failures surface here, before the step has changed the cache
            if cache.seq_len != before:
                raise
            self.fallback_reason = compile_failure_line(e)
            return self.model(input_ids, cache)
        if self._frames["total"] != frames:  # this call compiled
            self.compile_seconds += time.perf_counter() - t
        self.calls += 1
        return logits


def _step(model, input_ids, cache):
    return model(input_ids, cache)


_copies = itertools.count()


def _own_copy(fn):
    """``fn`` with a code object of its own (so dynamo gives it a cache of its own)."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_copies)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


HUGE_PAGE = 2 << 20


def relayout_linear_weights(model: nn.Module, column_major_tall: bool) -> None:
    """Copy every float CPU ``nn.Linear`` weight, in module order, into one arena backed by 2 MiB huge pages.

    A decode step streams every weight once per token. On 4 KiB pages the hardware prefetcher stops at each
    page boundary and every page costs a TLB miss; on huge pages the same decode runs 6-17% faster here
    (docs/BENCHMARKS.md). Linux hands out huge pages to memory that asks for them (``madvise``, the default
    ``transparent_hugepage`` mode); elsewhere the arena is ordinary memory and nothing changes. Same values,
    shapes and parameter objects; each weight is row-major, or column-major (``w.t().contiguous().t()``)
    when ``column_major_tall`` and it is a tall (out > in) float32 one: MKL's GEMV reads those faster.
    The old storage is freed weight by weight, so the copy never holds a second model.
    """
    weights = _linear_weights(model)
    if not weights:
        return
    sizes = [-(-w.numel() * w.element_size() // 64) * 64 for w in weights]  # 64-byte aligned slots
    arena = huge_page_arena(sum(sizes))
    offset = 0
    with torch.no_grad(), torch.inference_mode(False):  # the new storage stays usable for training
        for w, size in zip(weights, sizes):
            flat = arena[offset:offset + w.numel() * w.element_size()].view(w.dtype)
            if column_major_tall and _tall(w):
                new = flat.view(w.shape[1], w.shape[0]).t()  # (out, in) with strides (1, out)
            else:
                new = flat.view(w.shape)
            new.copy_(w.detach())
            w.data = new
            offset += size


def set_tall_layout(model: nn.Module, column_major: bool) -> None:
    """Every tall float32 CPU ``nn.Linear`` weight column-major (``column_major``) or row-major, each in the
    memory it already has (the huge-page arena stays): the values copied out, the weight viewed with the other
    strides over the same elements, the values written back. One weight's copy at a time, none for a weight
    already in that layout; same values, shapes and parameter objects."""
    with torch.no_grad(), torch.inference_mode(False):  # the storage stays usable for training
        for w in _linear_weights(model):
            if not _tall(w):
                continue
            rows, cols = w.shape
            strides = (1, rows) if column_major else (cols, 1)
            if w.stride() == strides:
                continue
            if w.stride() not in ((1, rows), (cols, 1)):  # not one dense block of its elements: leave it
                continue
            values = w.detach().clone(memory_format=torch.contiguous_format)
            view = w.data.as_strided(w.shape, strides)  # the same elements (same storage offset), other order
            view.copy_(values)
            w.data = view


@contextlib.contextmanager
def keep_training_layout(model: nn.Module):
    """Generation with a model that trains afterwards: inside, the first cached single-token step moves the
    weights into the eager-decode layout as always (``NanoForCausalLM._use_decode_layout``: tall float32 CPU
    weights column-major, fast GEMVs); on exit they are back in the training layout, row-major
    (``set_tall_layout``, in place), and the next cached step moves them again.

    Training always runs on the row-major layout, whether or not the run generated before a step (the held-out
    evaluation of ``nano align``, GRPO's rollouts): a resumed run, freshly loaded, trains on the same layout as
    the uninterrupted run did at that step, so its GEMMs round the same and the resume is bit-identical.
    """
    try:
        yield model
    finally:
        if getattr(model, "_decode_layout_done", False):
            set_tall_layout(model, column_major=False)
            model._decode_layout_done = False


def _linear_weights(model: nn.Module) -> list[nn.Parameter]:
    """The float CPU ``nn.Linear`` weights, in module order, each once (tied ones too)."""
    weights, seen = [], set()
    for module in model.modules():
        w = getattr(module, "weight", None)
        if (isinstance(module, nn.Linear) and type(w.data) is torch.Tensor  # not a DTensor shard (FSDP)
                and w.device.type == "cpu" and w.dtype.is_floating_point and id(w) not in seen):
            seen.add(id(w))
            weights.append(w)
    return weights


def _tall(w: torch.Tensor) -> bool:
    """A weight the eager-decode layout stores column-major: float32, more rows (out) than columns (in)."""
    return w.dtype == torch.float32 and w.dim() == 2 and w.shape[0] > w.shape[1]


def huge_page_arena(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` starting on a 2 MiB boundary, asking the kernel for huge pages."""
    length = -(-(nbytes + HUGE_PAGE) // HUGE_PAGE) * HUGE_PAGE  # room to align the start
    try:
        buf = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, OSError, ValueError):  # no anonymous mmap here: plain memory
        return torch.empty(nbytes, dtype=torch.uint8)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            buf.madvise(advice)
        except OSError:  # transparent huge pages disabled: ordinary pages
            pass
    whole = torch.frombuffer(buf, dtype=torch.uint8)  # keeps the mapping alive as long as any view of it
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes]


def compile_failure_line(e: Exception) -> str:
    """A compile failure as one line ending in "; running eager" (the no-C++-compiler case said plainly)."""
    text = str(e).strip().splitlines()
    first = next((line for line in text if line.strip()), type(e).__name__)
    if "compiler" in str(e).lower() and ("not found" in str(e).lower() or "no such file" in str(e).lower()):
        return "torch.compile needs a C++ compiler on CPU (g++ or clang); running eager"
    return f"{type(e).__name__}: {first[:200]}; running eager"
