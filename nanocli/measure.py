"""``nano fit-check --measure``: run the estimate's scenario on the local CUDA GPU and measure it.

Builds the model with random weights directly on the GPU in the target dtype (meta device -> dtype ->
``to_empty`` on CUDA -> ``init_weights``, so no full-precision copy ever exists), allocates the
``HybridCache`` for (batch, context), prefills context - 1 random tokens in ``prefill_chunk`` pieces
through the cache, then decodes one token (the cache ends holding exactly ``context`` positions).
Reports ``torch.cuda.max_memory_allocated`` and NVML's used memory beside the estimate.
torch is imported only here, only when ``--measure`` is given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from nanocli_model.config import NanoConfig
from nanocli_model.errors import NanoError

from . import resolve


class MeasureError(NanoError):
    """``--measure`` cannot run here (no CUDA GPU, or a dtype nano cannot run)."""


class MeasureOutOfMemory(NanoError):
    """The measured run ran out of GPU memory: the model does not fit this GPU in practice."""

    exit_code = 1


@dataclass(frozen=True)
class Measurement:
    device: str
    kernels: str  # "mamba-ssm+causal-conv1d", "mamba-ssm" (conv in PyTorch) or "reference" (pure PyTorch)
    kernels_detail: str  # kernels.KernelStatus.describe(): which runs, and why the others do not
    weights: int  # bytes allocated by the model's parameters
    cache: int  # bytes allocated by the HybridCache
    peak_allocated: int  # torch.cuda.max_memory_allocated over build + prefill + decode
    peak_reserved: int  # torch.cuda.max_memory_reserved (what the caching allocator held)
    nvml_used: int | None  # NVML's used memory after the run (includes the CUDA context); None without NVML
    seconds: float  # prefill + decode wall time




def prefill_then_decode(model, cache, context: int, chunk: int, batch: int, device) -> None:
    """Prefill context - 1 random tokens in ``chunk`` pieces, then decode one: the cache ends full."""
    import torch

    vocab = model.config.vocab_size
    last = torch.randint(0, vocab, (batch, 1), device=device)
    with torch.inference_mode():
        for start in range(0, context - 1, chunk):
            ids = torch.randint(0, vocab, (batch, min(chunk, context - 1 - start)), device=device)
            model(ids, cache, logits_to_keep=1)
            last = ids[:, -1:]
        model(last, cache, logits_to_keep=1)


def build_on_device(config: NanoConfig, dtype, device):
    """Random-weight model built straight in ``dtype`` on ``device`` (meta -> to_empty -> init)."""
    import torch

    from nanocli_model.model import NanoForCausalLM

    with torch.device("meta"):
        model = NanoForCausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty materialises each module's parameter separately
        model.lm_head.weight = model.backbone.embeddings.weight
    return model.init_weights().eval()


def require_cuda() -> None:
    """Fail fast, in one line, where there is no CUDA GPU to measure on."""
    import torch

    if not torch.cuda.is_available():
        raise MeasureError("--measure needs a CUDA GPU")


def run(config: NanoConfig, *, context: int, batch: int, dtype: str, ssm_dtype: str, prefill_chunk: int,
        device_index: int = 0) -> Measurement:
    """Measure the scenario on CUDA device ``device_index``."""
    import torch

    require_cuda()
    if dtype not in resolve.TORCH_DTYPES:
        raise MeasureError(f"--measure runs bf16, fp16 or fp32 weights; nano has no {dtype} inference path yet")
    from nanocli_model import kernels
    from nanocli_model.cache import HybridCache

    if device_index >= torch.cuda.device_count():
        raise MeasureError(f"--device-index {device_index}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    dev = torch.device("cuda", device_index)
    torch.cuda.set_device(dev)
    tdtype, sdtype = resolve.torch_dtype(dtype), resolve.torch_dtype(ssm_dtype)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    try:
        model = build_on_device(config, tdtype, dev)
        weights = torch.cuda.memory_allocated(dev) - base
        cache = HybridCache.allocate(config, batch, context, dtype=tdtype, device=dev, ssm_dtype=sdtype)
        cache_bytes = torch.cuda.memory_allocated(dev) - base - weights
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        prefill_then_decode(model, cache, context, prefill_chunk, batch, dev)
        torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError:
        peak = torch.cuda.max_memory_allocated(dev)
        total = torch.cuda.get_device_properties(dev).total_memory
        raise MeasureOutOfMemory(f"--measure: out of GPU memory (peak {peak / 2**30:.2f} GiB allocated of "
                                 f"{total / 2**30:.2f} GiB) before the cache held {context:,} positions") from None
    used = None
    try:
        from .nvml import NvmlUnavailable, query_device

        used = query_device(device_index).used
    except (NvmlUnavailable, NanoError):
        pass
    ran = kernels.status(dev)
    return Measurement(device=torch.cuda.get_device_name(dev), kernels=ran.label, kernels_detail=ran.describe(),
                       weights=weights, cache=cache_bytes, peak_allocated=torch.cuda.max_memory_allocated(dev),
                       peak_reserved=torch.cuda.max_memory_reserved(dev), nvml_used=used, seconds=seconds)
