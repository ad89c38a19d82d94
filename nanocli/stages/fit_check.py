"""``nano fit-check``: will this model, at this context and batch, fit this GPU? Answered before loading anything.

Steps (``run``):

1. resolve the model: a checkpoint directory (``config.json``, plus the safetensors *headers* when
   present: exact parameter bytes and stored dtypes), a ``config.json`` file, or a model profile (default: the
   released ``nemotron-nano-9b-v2``, the report's model);
2. estimate every term in bytes (``nanocli_model.fit``): weights, KV cache, conv state, SSM state and
   the activation peak of a chunked prefill;
3. find the limit (``fit_gpu.py``): a GPU profile (memory, framework share, reserved), a memory size, or the
   local GPU through NVML (judged against its *free* memory, minus the same 5% framework share);
4. the verdict, and the exact inverse solves: largest context, largest batch, largest prefill chunk (with
   ``--batch`` > 1, also the largest context at smaller prefill chunks when they fit more); plus the
   all-attention counterfactual (every Mamba layer an attention layer holding KV).

No torch, no weights: the whole path is file headers and arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nanocli_model import fit
from nanocli_model.config import ATTENTION, MAMBA, MLP, NanoConfig
from nanocli_model.errors import CheckpointError, ConfigError
from nanocli_model.headers import CheckpointTensors, read_checkpoint_tensors
from nanocli_model.memory import param_count

from .. import nvml, settings
from ..resolve import model_target
from ..settings import flag
from .fit_gpu import FitCheckError, GpuLimit, resolve_gpu

GIB = 2**30
DEFAULT_MODEL = "nemotron-nano-9b-v2"  # the released model the report fits on one A10G at 128k
DEFAULT_CONTEXT = 131072
SMALLEST_HINT_CHUNK = 256  # --batch > 1: the largest context is also solved at halved chunks down to this
# config.json fields that set the memory; without them NanoConfig would fall back to the 9B's values.
REQUIRED_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "all": (("vocab_size",), ("hidden_size",)),
    MAMBA: (("mamba_num_heads",), ("mamba_head_dim",), ("ssm_state_size", "mamba_d_state"),
            ("n_groups", "mamba_n_groups")),
    ATTENTION: (("num_attention_heads",), ("num_key_value_heads",)),
    MLP: (("intermediate_size",),),
}


@dataclass
class FitCheckOptions(settings.Group):
    """What ``nano fit-check`` is asked."""

    model: str = flag(DEFAULT_MODEL, aliases=("-m",))
    """A checkpoint directory (config.json; safetensors headers when present), a config.json, or a model profile
    name; by default the released nemotron-nano-9b-v2 (the report's model)."""
    gpu: str = "auto"
    """A GPU profile (a10g, l4, t4, rtx-4090, h100, ...; any case), a memory size (24GiB, 24GB; G alone is GiB), or
    'auto': the local GPU's free memory through NVML."""
    device_index: int = 0
    """Which local GPU --gpu auto reads."""
    reserve: float | None = None
    """GiB kept for other models on the GPU, replacing the profile's reservation (a10g keeps 1.3 GiB for a vision
    encoder: --reserve 0 frees it); default: the profile's, 0 for a size or auto."""
    context: int | str = DEFAULT_CONTEXT
    """Tokens per sequence (prompt + output), e.g. 131072 or 128k."""
    batch: int = 1
    """Sequences served at once."""
    dtype: str | None = None
    """Weights: bf16, fp16, fp8, fp32 or int8 (default: the checkpoint's stored dtype, else the config's torch_dtype,
    else bf16)."""
    ssm_cache_dtype: str | None = None
    """Mamba SSM state: fp32 or bf16 (default: the config's mamba_ssm_cache_dtype, fp32 for the released models)."""
    prefill_chunk: int | str = fit.DEFAULT_PREFILL_CHUNK
    """Tokens per prefill forward (capped at the context); sets the activation peak."""
    attention: Literal["flash", "eager"] = "flash"
    """flash: a fused kernel, no score matrix; eager: the (chunk x context) scores are materialised."""

    def check(self) -> None:
        settings.at_least(self, 1, "batch")
        settings.finite(self, "reserve", minimum=0)
        settings.at_least(self, 0, "device_index")
        for name in ("context", "prefill_chunk"):
            parse_tokens(getattr(self, name), "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class ModelSource:
    """The model being checked and where its numbers come from."""

    name: str
    kind: str  # "profile" | "config" | "checkpoint"
    config: NanoConfig
    path: Path | None = None
    tensors: CheckpointTensors | None = None  # safetensors headers, when the directory has weights


@dataclass(frozen=True)
class FitCheckResult:
    model: ModelSource
    estimate: fit.Estimate
    gpu: GpuLimit
    prefill_chunk: int  # as asked (the estimate's activations hold the capped value)
    max_context: int | None  # None: memory sets no limit
    max_batch: int | None
    max_prefill_chunk: int
    all_attention: int | None  # bytes the all-attention counterfactual needs (None: no attention layers)
    all_attention_max_context: int | None
    # --batch > 1: (smaller prefill chunk, largest context there) for the halvings that fit more than max_context
    smaller_chunks: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """The model's bytes (weights + caches + activations) within the budget (what the GPU leaves for it)."""
        return self.estimate.total <= self.gpu.budget

    @property
    def verdict(self) -> str:
        return "FITS" if self.fits else "DOES NOT FIT"

    @property
    def headroom(self) -> int:
        """Budget minus what the model needs (negative: the shortfall)."""
        return self.gpu.budget - self.estimate.total

    @property
    def headroom_pct(self) -> float:
        return 100.0 * self.headroom / self.gpu.budget if self.gpu.budget > 0 else float("-inf")

    @property
    def exit_code(self) -> int:
        return 0 if self.fits else 1

    def to_json(self) -> dict[str, Any]:
        """Everything in bytes, for CI pipelines (``--json``)."""
        e, g, a = self.estimate, self.gpu, self.estimate.activations
        t = self.model.tensors
        return {
            "model": self.model.name, "model_source": self.model.kind,
            "weights_source": "safetensors headers" if t else "config",
            "context": e.context, "batch": e.batch, "dtype": e.dtype, "ssm_cache_dtype": e.ssm_dtype,
            "prefill_chunk": self.prefill_chunk, "attention": e.attention,
            "terms": {"weights": e.weights, "kv_cache": e.kv, "conv_state": e.conv, "ssm_state": e.ssm,
                      "activations": a.total, "framework_overhead": g.framework, "reserved": g.reserved},
            "activations": {"chunk": a.chunk, "hidden_states": a.hidden, "peak_layer": a.peak_kind,
                            "layers": a.layers},
            # like for like: fits == needed_bytes <= budget_bytes == needed_on_gpu_bytes <= gpu.available_bytes
            "model_bytes": e.total, "needed_bytes": e.total, "budget_bytes": g.budget,
            "needed_on_gpu_bytes": e.total + g.framework + g.reserved,
            "headroom_bytes": self.headroom, "headroom_pct": round(self.headroom_pct, 2),
            "verdict": self.verdict, "fits": self.fits,
            "max_context": self.max_context, "max_batch": self.max_batch,
            "max_prefill_chunk": self.max_prefill_chunk,
            "max_context_smaller_prefill_chunk": [{"prefill_chunk": c, "max_context": n}
                                                  for c, n in self.smaller_chunks],
            "all_attention": {"bytes": self.all_attention, "max_context": self.all_attention_max_context,
                              "saving_bytes": None if self.all_attention is None else self.all_attention - e.total},
            "gpu": {"source": g.source, "name": g.name, "total_bytes": g.total, "available_bytes": g.available,
                    "framework_share": g.framework_share, "framework_bytes": g.framework,
                    "reserved_bytes": g.reserved, "reserved_for": g.reserved_for, "reserve_given": g.reserve_given,
                    "profile_reserved_bytes": g.profile_reserved, "bf16": g.bf16,
                    "vendor_memory_gb": g.vendor_memory_gb, "device_index": g.device_index,
                    "nvml_api": g.nvml_api},
            "checkpoint": None if t is None else {
                "files": len(t.files), "params": t.params, "stored_bytes": t.stored_bytes, "stored_dtypes": t.dtypes,
                "mtp_tensors_not_counted": len(t.mtp), "mtp_params_not_counted": sum(x.numel for x in t.mtp)},
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------- step 1: the model
def _check_required(raw: dict[str, Any], config: NanoConfig, source: Path) -> None:
    groups = list(REQUIRED_FIELDS["all"])
    for kind in (MAMBA, ATTENTION, MLP):
        if config.count(kind):
            groups += REQUIRED_FIELDS[kind]
    missing = [names[0] for names in groups if not any(n in raw for n in names)]
    if missing:
        raise ConfigError(f"{source}: missing {', '.join(missing)}; fit-check needs every field that sets "
                          "the memory (a NemotronH config.json from transformers or NVIDIA has them)")


def resolve_model(target: str) -> ModelSource:
    """A model target (``resolve.model_target``) with, for a model directory, its safetensors headers."""
    t = model_target(target)
    if t.kind == "profile":
        return ModelSource(name=t.name, kind="profile", config=t.config, path=t.path)
    directory = t.directory  # None for a bare config.json
    config_file = t.path if directory is None else directory / "config.json"
    _check_required(json.loads(config_file.read_text(encoding="utf-8")), t.config, config_file)
    tensors = read_checkpoint_tensors(directory) if directory is not None else None
    if tensors is not None:
        tensors = _check_tensors(tensors, t.config, directory)
    return ModelSource(name=t.name, kind="checkpoint" if tensors else "config", config=t.config,
                       path=directory or t.path, tensors=tensors)


def _check_tensors(tensors: CheckpointTensors, config: NanoConfig, path: Path) -> CheckpointTensors:
    """The headers must hold the config's parameters, as ``load_pretrained`` will insist."""
    if config.tie_word_embeddings:  # one copy in memory; a stored lm_head is the same tensor
        tensors = dataclasses.replace(tensors, tensors=[t for t in tensors.tensors if t.name != "lm_head.weight"])
    if any(t.name.endswith(".weight_scale") for t in tensors.tensors):  # a saved int8 model: its scales and
        tensors = dataclasses.replace(tensors, tensors=[t for t in tensors.tensors  # divisors are no parameters
                                                        if not t.name.endswith((".weight_scale", ".smooth"))])
    expected = param_count(config).total
    if tensors.params != expected:
        raise CheckpointError(f"{path}: the safetensors headers hold {tensors.params:,} parameters but "
                              f"config.json implies {expected:,}; the weights do not match config.json")
    return tensors


def default_dtype(source: ModelSource) -> str:
    """The checkpoint's stored dtype (of the embeddings, as load_pretrained keeps it), else torch_dtype, else bf16;
    int8 for a directory saved by ``nano generate --dtype int8 --save-quantized``."""
    if isinstance(source.config.extra.get("quantization_config"), dict):
        return "int8"
    if source.tensors:
        for t in source.tensors.tensors:
            if t.name.endswith("embeddings.weight"):
                name = fit.stored_dtype_name(t.dtype)
                if name in fit.WEIGHT_DTYPES:
                    return name
    torch_dtype = source.config.torch_dtype
    try:
        return fit.weight_dtype(torch_dtype) if torch_dtype else "bf16"
    except ConfigError:
        return "bf16"


# ---------------------------------------------------------------------------- run
_TOKENS = re.compile(r"(\d+)([kKmM]?)")


def parse_tokens(text: str | int, flag: str) -> int:
    """``131072``, ``131_072``, ``128k`` (x1024) or ``1m`` (x1048576) -> a positive int."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _TOKENS.fullmatch(str(text).strip().replace("_", "").replace(",", ""))
        if not m:
            raise FitCheckError(f"{flag}: expected a positive number of tokens such as 131072 or 128k, got {text!r}")
        value = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]
    if value <= 0:
        raise FitCheckError(f"{flag}: must be at least 1, got {text!r}")
    return value


def _dtypes(o: FitCheckOptions) -> tuple[str | None, str | None]:
    """The weight and SSM dtypes in canonical spelling (any spelling is accepted), or None: the default."""
    try:
        dtype = None if o.dtype is None else fit.weight_dtype(o.dtype)
        ssm = None if o.ssm_cache_dtype is None else fit.ssm_dtype(o.ssm_cache_dtype)
    except ConfigError as e:
        flag = "--dtype" if "SSM" not in str(e) else "--ssm-cache-dtype"
        raise FitCheckError(f"{flag}: {e}") from None
    return dtype, ssm


def run(o: FitCheckOptions, nvml_query: Callable[[int], nvml.DeviceMemory] | None = None) -> FitCheckResult:
    """Resolve, estimate, judge, solve. Raises NanoError (exit 2) for anything that cannot be answered."""
    settings.validate(o, FitCheckError)
    dtype, ssm = _dtypes(o)
    context, chunk = parse_tokens(o.context, "--context"), parse_tokens(o.prefill_chunk, "--prefill-chunk")
    source = resolve_model(o.model)
    gpu = resolve_gpu(o.gpu, o.device_index, nvml_query, reserve_gib=o.reserve)
    c = source.config
    dtype = dtype or default_dtype(source)
    weights = (fit.tensor_weights_bytes(((t.name, t.numel) for t in source.tensors.tensors), dtype)
               if source.tensors and dtype != "int8" else fit.weights_bytes(c, dtype))  # int8: scales per row
    kw = dict(dtype=dtype, ssm_cache_dtype=ssm, attention=o.attention, weights=weights)
    e = fit.estimate(c, context=context, batch=o.batch, prefill_chunk=chunk, **kw)
    budget = gpu.budget
    max_context = fit.max_context(c, budget, batch=o.batch, prefill_chunk=chunk, **kw)
    result = FitCheckResult(
        model=source, estimate=e, gpu=gpu, prefill_chunk=chunk, max_context=max_context,
        max_batch=fit.max_batch(c, budget, context=context, prefill_chunk=chunk, **kw),
        max_prefill_chunk=fit.max_prefill_chunk(c, budget, context=context, batch=o.batch, **kw),
        all_attention=fit.all_attention_total(c, e),
        all_attention_max_context=fit.max_context_all_attention(c, budget, batch=o.batch, prefill_chunk=chunk, **kw),
        smaller_chunks=smaller_chunks(c, budget, o.batch, chunk, max_context, kw),
    )
    result.notes.extend(_notes(result))
    return result


def smaller_chunks(c: NanoConfig, budget: int, batch: int, chunk: int, max_context: int | None,
                   kw: dict[str, Any]) -> list[tuple[int, int]]:
    """With ``batch`` > 1, where the prefill's activations grow with the batch: the largest context at the
    prefill chunk halved, and halved again down to 256 tokens, for each halving that fits more than
    ``max_context`` (nothing when memory sets no context limit)."""
    out: list[tuple[int, int]] = []
    if batch <= 1 or max_context is None:
        return out
    best, smaller = max_context, chunk // 2
    while smaller >= SMALLEST_HINT_CHUNK:
        n = fit.max_context(c, budget, batch=batch, prefill_chunk=smaller, **kw)
        if n is not None and n > best:
            out.append((smaller, n))
            best = n
        smaller //= 2
    return out


def _notes(r: FitCheckResult) -> list[str]:
    c, e, notes = r.model.config, r.estimate, []
    if e.context > c.max_position_embeddings:
        notes.append(f"context {e.context:,} is beyond the model's max_position_embeddings "
                     f"({c.max_position_embeddings:,})")
    if r.max_context and r.max_context > c.max_position_embeddings:
        notes.append(f"the largest context that fits in memory ({r.max_context:,}) is beyond the model's "
                     f"max_position_embeddings ({c.max_position_embeddings:,})")
    if r.model.tensors and r.model.tensors.mtp:
        n = sum(t.numel for t in r.model.tensors.mtp)
        notes.append(f"{len(r.model.tensors.mtp)} mtp.* tensors ({n:,} parameters) are not counted: "
                     "nano does not load multi-token-prediction heads")
    if r.gpu.bf16 is False and e.dtype == "bf16":
        notes.append(f"{r.gpu.name} has no bf16 arithmetic (its profile says bf16: false): serve the model in fp16, "
                     "--dtype fp16 (the same bytes)")
    if e.dtype == "fp8":
        notes.append("fp8: projection weights 1 byte each, embeddings / lm_head / norms / conv / SSM "
                     "parameters 2 bytes (bf16); activations, KV and conv state bf16; scales not counted")
    if e.dtype == "int8":
        notes.append("int8 (CPU): projection and lm_head weights 1 byte each plus a 4-byte scale per output channel "
                     "and a 4-byte smoothing divisor per input channel; embeddings / norms / conv / SSM "
                     "parameters, activations, KV and conv state fp32")
    return notes
