"""Model summaries for ``nano profiles`` / ``nano info``: resolve a target, compute the numbers.

Pure arithmetic on ``NanoConfig`` via ``nanocli_model.memory`` (no torch); ``ui.py`` renders it.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanocli_model import memory
from nanocli_model.config import ATTENTION, MAMBA, MLP, NanoConfig

CONTEXT_128K = 131072
KINDS = ((MAMBA, "Mamba-2", "M"), (MLP, "MLP", "-"), (ATTENTION, "attention", "*"))


@dataclass(frozen=True)
class ModelSummary:
    """A model's parameter and memory figures at ``context`` tokens, batch 1, bf16."""

    name: str
    description: str
    config: NanoConfig
    params: memory.ParamCount
    weight_bytes: int  # bf16
    kv_bytes: int  # bf16 K and V of every attention layer at ``context`` tokens
    state_bytes: int  # Mamba conv state (bf16) + SSM state (mamba_ssm_cache_dtype)
    context: int = CONTEXT_128K

    @property
    def layer_counts(self) -> dict[str, int]:
        """Layers per kind (``mamba`` / ``mlp`` / ``attention``)."""
        return {kind: self.config.count(kind) for kind, _, _ in KINDS}


def summarize(name: str, config: NanoConfig, description: str = "", context: int = CONTEXT_128K) -> ModelSummary:
    """Parameter counts plus bf16 weight, KV-cache and Mamba-state bytes at batch 1."""
    cache = memory.cache_bytes(config, batch=1, max_len=context, dtype="bf16")
    return ModelSummary(name=name, description=description, config=config, params=memory.param_count(config),
                        weight_bytes=memory.weight_bytes(config, "bf16"), kv_bytes=cache.kv,
                        state_bytes=cache.conv + cache.ssm, context=context)


def resolve_model(target: str) -> ModelSummary:
    """The summary of a model target (``resolve.model_target``: profile, model directory, config.json, run)."""
    from .resolve import model_target

    t = model_target(target, flag="nano info")
    return summarize(t.name, t.config, t.description)
