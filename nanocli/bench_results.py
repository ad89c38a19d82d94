"""The typed results of ``nano bench`` (``bench.run``): the models compared, every timed run, the medians per
(prompt, output) pair with the hybrid / Transformer ratios, and their one JSON form (``BenchResult.to_json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from nanocli_model.memory import CacheBytes


@dataclass
class ModelInfo:
    """One benchmarked model: its layout and the memory arithmetic behind the comparison."""

    role: str  # "hybrid" | "transformer"
    name: str
    source: str  # "checkpoint" | "profile (random weights)" | "built by nano (random weights)"
    pattern: str
    hidden_size: int
    vocab_size: int
    layers: dict[str, int]  # mamba / mlp / attention counts
    intermediate_size: int
    attention_shape: str  # "q heads / kv heads x head_dim"
    params: int
    non_embedding_params: int
    kv_bytes_per_token: int  # KV of every attention layer, one sequence, the run's dtype
    state_bytes_per_sequence: int  # Mamba conv + SSM state, one sequence (constant in the context)


@dataclass
class Run:
    """One timed generation: ``batch`` sequences of ``prompt`` tokens, ``output`` new tokens each."""

    prefill_seconds: float  # prompt forward passes + the first token
    decode_seconds: float  # every later step
    prefill_tokens: int
    output_tokens: int  # all rows
    decode_tokens: int
    step_seconds: list[float]  # one per decode step (row 0's token timestamps, differenced)

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.total_seconds

    def to_json(self) -> dict[str, float]:
        """The figures of the record (the step times are summarised in ``Measurement.ms_per_token``)."""
        return {"prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
                "prefill_tokens": self.prefill_tokens, "output_tokens": self.output_tokens,
                "output_tokens_per_s": self.output_tokens_per_s}


@dataclass
class Measurement:
    """Medians over the repeats for one model at one (prompt, output) pair."""

    role: str
    prompt: int
    output: int
    batch: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    output_tokens_per_s: float  # output tokens / (prefill + decode time): what a user waits for
    total_seconds: float
    ms_per_token: list[tuple[int, float]]  # (context, median ms per decode step) as the context grows
    cache_predicted: CacheBytes  # memory.cache_bytes at prompt + output tokens
    cache_measured: int  # bytes of the HybridCache really allocated
    peak_memory_bytes: int
    peak_memory_source: str
    runs: list[Run]  # every repeat, for the record
    memory_predicted: int = 0  # fit.estimate: cache + prefill activations of the batch (the weights aside)

    def to_json(self) -> dict[str, Any]:
        c = self.cache_predicted
        return {"role": self.role, "prompt": self.prompt, "output": self.output, "batch": self.batch,
                "prefill_tokens_per_s": self.prefill_tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s,
                "output_tokens_per_s": self.output_tokens_per_s, "total_seconds": self.total_seconds,
                "ms_per_token": [list(point) for point in self.ms_per_token],
                "cache_predicted": {"kv": c.kv, "conv": c.conv, "ssm": c.ssm, "total": c.total},
                "cache_measured": self.cache_measured, "peak_memory_bytes": self.peak_memory_bytes,
                "peak_memory_source": self.peak_memory_source, "memory_predicted": self.memory_predicted,
                "runs": [r.to_json() for r in self.runs]}


@dataclass
class PairResult:
    """The hybrid and (when compared) its twin at one (prompt, output) pair."""

    prompt: int
    output: int
    hybrid: Measurement
    transformer: Measurement | None

    def _ratio(self, key: str) -> float | None:
        if self.transformer is None or getattr(self.transformer, key) <= 0:
            return None
        return getattr(self.hybrid, key) / getattr(self.transformer, key)

    @property
    def ratio(self) -> float | None:
        """Hybrid / Transformer output tokens per second (overall, prefill included)."""
        return self._ratio("output_tokens_per_s")

    @property
    def decode_ratio(self) -> float | None:
        return self._ratio("decode_tokens_per_s")

    @property
    def prefill_ratio(self) -> float | None:
        return self._ratio("prefill_tokens_per_s")

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "output": self.output, "hybrid": self.hybrid.to_json(),
                "transformer": None if self.transformer is None else self.transformer.to_json(),
                "ratio": self.ratio, "decode_ratio": self.decode_ratio, "prefill_ratio": self.prefill_ratio}


@dataclass
class BenchResult:
    """Everything one ``nano bench`` run measured, and where."""

    models: list[ModelInfo]  # the hybrid, then the twin when compared
    pairs: list[PairResult]
    device: str
    dtype: str
    threads: int
    batch: str  # "1", "4" or "max"
    repeats: int
    kernels: str  # "mamba-ssm+causal-conv1d", "mamba-ssm" (conv in PyTorch) or "reference"
    load_before: tuple[float, float, float] | None  # os.getloadavg() at the start and the end
    load_after: tuple[float, float, float] | None
    seconds: float  # the whole benchmark, wall clock
    torch_version: str
    machine: str
    notes: list[str] = field(default_factory=list)
    decode: str = "eager"  # "compiled": the decode steps ran through CompiledDecode (--compile)
    kernels_detail: str = ""  # kernels.KernelStatus.describe(): which runs, and why the others do not
    memory_budget: int | None = None  # --max-batch: bytes each model's batch may use, the weights aside
    memory_budget_source: str | None = None  # "--memory", or how the default was reached

    @property
    def hybrid(self) -> ModelInfo:
        return self.models[0]

    @property
    def transformer(self) -> ModelInfo | None:
        return self.models[1] if len(self.models) > 1 else None

    def to_json(self) -> dict[str, Any]:
        return {"models": [asdict(m) for m in self.models], "pairs": [p.to_json() for p in self.pairs],
                "device": self.device,
                "dtype": self.dtype, "threads": self.threads, "batch": self.batch, "repeats": self.repeats,
                "kernels": self.kernels, "load_before": self.load_before, "load_after": self.load_after,
                "seconds": self.seconds, "torch_version": self.torch_version, "machine": self.machine,
                "notes": self.notes, "decode": self.decode, "kernels_detail": self.kernels_detail,
                "memory_budget": self.memory_budget, "memory_budget_source": self.memory_budget_source}
