"""Pure arithmetic about a NemotronH model: parameters, weight bytes, cache bytes, FLOPs.

No torch here (``nano fit-check`` answers before torch is even imported). Every formula mirrors
what ``model.py`` builds and what ``cache.py`` allocates; tests check them against the meta-device
model and real caches, byte for byte, for every shipped profile.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ATTENTION, MAMBA, MLP, NanoConfig
from .errors import ConfigError

# Every spelling nano accepts -> its short name; the one table behind dtype names everywhere.
DTYPE_ALIASES = {
    "float64": "fp64", "fp64": "fp64",
    "float32": "fp32", "fp32": "fp32",
    "bfloat16": "bf16", "bf16": "bf16",
    "float16": "fp16", "fp16": "fp16",
    "float8_e4m3fn": "fp8", "fp8": "fp8", "float8_e5m2": "fp8",
    "int8": "int8",
}
SHORT_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
DTYPE_BYTES = {name: SHORT_BYTES[short] for name, short in DTYPE_ALIASES.items()}


def canonical_dtype(name, allowed: tuple[str, ...] | None = None, what: str = "dtype") -> str:
    """``torch.bfloat16`` / ``bfloat16`` / ``bf16`` -> ``bf16``; ConfigError for unknown or disallowed names."""
    short = DTYPE_ALIASES.get(str(name).lower().replace("torch.", ""))
    choices = allowed or tuple(SHORT_BYTES)
    if short is None or short not in choices:
        raise ConfigError(f"unknown {what} {name!r}; use one of {', '.join(choices)}")
    return short


def dtype_bytes(name: str) -> int:
    """Bytes per element for a dtype name such as ``bf16`` or ``float32``."""
    return SHORT_BYTES[canonical_dtype(name)]


# ---------------------------------------------------------------------------- parameters
def mamba_layer_params(c: NanoConfig) -> int:
    """in_proj + conv1d (+bias) + dt_bias, A_log, D + gated norm + out_proj + the block's pre-norm."""
    h, H, inner, conv = c.hidden_size, c.mamba_num_heads, c.mamba_intermediate_size, c.mamba_conv_dim
    n = h * c.mamba_in_proj_dim + (c.mamba_in_proj_dim if c.use_bias else 0)
    n += conv * c.conv_kernel + (conv if c.use_conv_bias else 0)
    n += 3 * H + inner
    n += inner * h + (h if c.use_bias else 0)
    return n + h


def attention_layer_params(c: NanoConfig) -> int:
    """q, k, v, o projections (+biases) + the block's pre-norm."""
    h, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    n = h * (q + 2 * kv) + q * h
    if c.attention_bias:
        n += q + 2 * kv + h
    return n + h


def mlp_layer_params(c: NanoConfig) -> int:
    """up_proj + down_proj (+biases) + the block's pre-norm."""
    h, f = c.hidden_size, c.intermediate_size
    return 2 * h * f + ((f + h) if c.mlp_bias else 0) + h


LAYER_PARAMS = {MAMBA: mamba_layer_params, ATTENTION: attention_layer_params, MLP: mlp_layer_params}


@dataclass(frozen=True)
class ParamCount:
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    final_norm: int
    per_kind: dict[str, int]  # total over all layers of each kind
    per_layer: list[int]

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.final_norm + sum(self.per_layer)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.lm_head


def param_count(c: NanoConfig) -> ParamCount:
    per_layer = [LAYER_PARAMS[k](c) for k in c.layer_types]
    per_kind = {k: sum(n for n, kk in zip(per_layer, c.layer_types) if kk == k) for k in LAYER_PARAMS}
    emb = c.vocab_size * c.hidden_size
    return ParamCount(embedding=emb, lm_head=0 if c.tie_word_embeddings else emb, final_norm=c.hidden_size,
                      per_kind=per_kind, per_layer=per_layer)


def weight_bytes(c: NanoConfig, dtype: str = "bf16") -> int:
    return param_count(c).total * dtype_bytes(dtype)


# ---------------------------------------------------------------------------- caches
def kv_cache_bytes(c: NanoConfig, batch: int, max_len: int, dtype: str = "bf16") -> int:
    """K and V for every attention layer: 2 * B * kv_heads * max_len * head_dim per layer."""
    per_layer = 2 * batch * c.num_key_value_heads * max_len * c.head_dim
    return c.count(ATTENTION) * per_layer * dtype_bytes(dtype)


def conv_state_bytes(c: NanoConfig, batch: int, dtype: str = "bf16") -> int:
    """The last conv_kernel - 1 inputs of x|B|C for every Mamba layer (model dtype)."""
    return c.count(MAMBA) * batch * c.mamba_conv_dim * (c.conv_kernel - 1) * dtype_bytes(dtype)


def ssm_state_bytes(c: NanoConfig, batch: int, dtype: str | None = None) -> int:
    """The (heads, head_dim, state) SSM state of every Mamba layer, in ``mamba_ssm_cache_dtype``."""
    per_layer = batch * c.mamba_num_heads * c.mamba_head_dim * c.ssm_state_size
    return c.count(MAMBA) * per_layer * dtype_bytes(dtype or c.mamba_ssm_cache_dtype)


@dataclass(frozen=True)
class CacheBytes:
    kv: int
    conv: int
    ssm: int

    @property
    def total(self) -> int:
        return self.kv + self.conv + self.ssm


def cache_bytes(c: NanoConfig, batch: int, max_len: int, dtype: str = "bf16",
                ssm_dtype: str | None = None) -> CacheBytes:
    """What ``HybridCache.allocate(config, batch, max_len, dtype)`` holds."""
    return CacheBytes(kv=kv_cache_bytes(c, batch, max_len, dtype), conv=conv_state_bytes(c, batch, dtype),
                      ssm=ssm_state_bytes(c, batch, ssm_dtype))


# ---------------------------------------------------------------------------- compute
def forward_flops(c: NanoConfig, seq_len: int, batch: int = 1) -> int:
    """FLOPs (2 per multiply-add) of one full forward over ``seq_len`` tokens, logits included.

    Counts the useful work, independent of how it is computed: every projection weight once per
    token (in/out, q/k/v/o, up/down, lm_head); causal attention's QK^T and PV over the lower
    triangle; and the SSD recurrence's state update and read-out (4 * H * P * N per token).
    Elementwise work (norms, conv, activations) is left out.
    """
    T, h = seq_len * batch, c.hidden_size
    matmul_weights = {  # weights used once per token each
        MAMBA: h * c.mamba_in_proj_dim + c.mamba_intermediate_size * h,
        ATTENTION: h * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        + c.num_attention_heads * c.head_dim * h,
        MLP: 2 * h * c.intermediate_size,
    }
    flops = 2 * T * (sum(matmul_weights[k] for k in c.layer_types) + h * c.vocab_size)
    pairs = batch * seq_len * (seq_len + 1) // 2  # causal (query, key) pairs
    flops += c.count(ATTENTION) * 2 * 2 * c.num_attention_heads * c.head_dim * pairs
    flops += c.count(MAMBA) * 4 * T * c.mamba_num_heads * c.mamba_head_dim * c.ssm_state_size
    return flops
