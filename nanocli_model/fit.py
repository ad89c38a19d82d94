"""The fit estimate behind ``nano fit-check``: the bytes a NemotronH model needs on a GPU, term by term.

Pure arithmetic on ``NanoConfig`` (no torch), built on ``memory.py``:

    weights + KV cache (attention layers) + conv state + SSM state + activation peak of a chunked prefill

and the exact inverse questions (the largest context, batch and prefill chunk that fit a byte budget).
Notation: b batch, T prefill chunk (tokens per forward), S context, h hidden, s bytes per activation
element (bf16/fp16 2, fp32 4; fp8 weights compute in bf16), I Mamba inner width, C conv channels
(I + 2GN), H/P/N Mamba heads/head_dim/state, Q the scan's chunk_size, V vocab.

The activation model mirrors what ``layers.py`` allocates on the CUDA path (mamba-ssm kernels), one
layer at a time (inference frees each layer's buffers before the next):

* every layer: the residual stream and the normed layer input, ``2 b T h s``;
* Mamba: ``in_proj`` output ``b T (2I + 2GN + H) s`` and conv output ``b T C s`` (both live to the end of
  the layer), plus the largest of: the conv's contiguous input ``b T C s``; the scan's contiguous operands
  x, B, C, dt ``b T (I + 2GN + H) s`` (``kernels.py``: 32-bit offsets) with its float32 chunk states and
  their passed-on copy ``b ceil(T/Q) H P N (4 + s)``; the float32 output ``b T I (4 + s)``; and the
  float32 gated RMSNorm, three ``b T I 4`` buffers at once;
* attention: q, the kernel output and the o_proj input copy ``3 b T heads d s`` + o_proj output. The
  default (``flash``) assumes a fused causal kernel (flash / memory-efficient) that never materialises the
  (T x S) score matrix; ``eager`` adds scores and probabilities ``2 b heads T S s``, K/V expanded to the
  query heads ``2 b heads S d s`` and the boolean mask with its additive copy ``T S (1 + s)``. Left-padded
  batches need no term of their own: their prefill runs one row at a time on the same fused kernel
  (``layers.Attention._padded_rows``) and no forward is longer than the prefill chunk
  (``HybridCache.left_pad``);
* MLP: up_proj output ``b T F s`` + down_proj output;
* the end: the last position's logits, in the model dtype and as float32, ``b V (s + 4)``.

The peak is the hidden-state term plus the largest layer working set.

``path="cpu"``: the same, except the Mamba scan, which on a CPU (``cpu_fastpath.ssd_chunked`` in blocks of
``Q' = min(Q, cpu_ssd_block(N))``, T padded to T' = a multiple of Q', n' = b T', c' = T'/Q') holds at its peak five
float32 (b, T', I) buffers (x dt, the diagonal blocks' output, x dt decayed to the chunk end, the off-diagonal
output, y), B and C chunk-major ``2 n' G N 4``, three float32 (b, T', H) cumulative decays, the per-group C B^T
and the per-head decay matrices ``b c' Q'^2 (G + H) 4``, the state entering every chunk and the final one
``b (c' + 1) H P N 4``, the discretized dt ``n H 4`` (and, when T is padded or the model dtype is not float32,
the padded / float32 copies of x, dt, B, C); the gated norm then holds y and two float32 ``n I 4`` buffers.
Measured on the ``small`` profile (fp32, 2k-token prefill, batch 1 and 4, malloc returning every freed
block): 70.5 / 278.8 MiB of peak RSS rise against 68.4 / 273 MiB here (the cuda path's figure is 44 / 176);
the pure-attention twin's 26.6 / 106.9 MiB against 26.7 / 106.6 (attention and MLP allocate alike on both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .config import ATTENTION, MAMBA, MLP, NanoConfig
from .errors import ConfigError
from .memory import (
    canonical_dtype,
    conv_state_bytes,
    dtype_bytes,
    kv_cache_bytes,
    param_count,
    ssm_state_bytes,
)

GIB = 2**30
DEFAULT_PREFILL_CHUNK = 2048
WEIGHT_DTYPES = ("bf16", "fp16", "fp8", "fp32", "int8")
SSM_DTYPES = ("fp32", "bf16", "fp16")
ATTENTION_KERNELS = ("flash", "eager")
PATHS = ("cuda", "cpu")  # whose activations: the CUDA kernels' (mamba-ssm), or the CPU scan's (cpu_fastpath)
# Projection weights: stored in 1 byte under fp8; embeddings, lm_head, norms, conv1d, A_log/D/dt_bias stay bf16.
MATMUL_SUFFIXES = ("in_proj.weight", "out_proj.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                   "o_proj.weight", "up_proj.weight", "down_proj.weight")
_ST_TO_NAME = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "float64", "F8_E4M3": "fp8"}


def weight_dtype(name: str) -> str:
    """``bf16`` / ``fp16`` / ``fp8`` / ``fp32`` / ``int8`` from any spelling; ConfigError otherwise."""
    return canonical_dtype(name, WEIGHT_DTYPES)


def ssm_dtype(name: str) -> str:
    return canonical_dtype(name, SSM_DTYPES, what="SSM cache dtype")


def stored_dtype_name(st_dtype: str) -> str | None:
    """safetensors ``BF16`` -> ``bf16``; None for dtypes nano does not compute in."""
    return _ST_TO_NAME.get(st_dtype)


def compute_dtype(dtype: str) -> str:
    """The dtype of activations, KV and conv state: the weight dtype, except bf16 for fp8 weights and fp32 for
    int8 (``nanocli_model.quant``: fp32 activations between layers and float tensors)."""
    d = weight_dtype(dtype)
    return {"fp8": "bf16", "int8": "fp32"}.get(d, d)


# ---------------------------------------------------------------------------- weights
def matmul_params(c: NanoConfig) -> int:
    """Parameters in projection weights (in/out, q/k/v/o, up/down; no biases): what fp8 stores in 1 byte."""
    h = c.hidden_size
    per_kind = {
        MAMBA: h * c.mamba_in_proj_dim + c.mamba_intermediate_size * h,
        ATTENTION: h * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        + c.num_attention_heads * c.head_dim * h,
        MLP: 2 * h * c.intermediate_size,
    }
    return sum(per_kind[k] for k in c.layer_types)


def int8_rows(c: NanoConfig) -> int:
    """Output channels of the matrices ``--dtype int8`` quantizes (one float32 scale each): the projections and
    lm_head (unless tied to the embeddings, which stay float)."""
    h = c.hidden_size
    per_kind = {MAMBA: c.mamba_in_proj_dim + h, ATTENTION: (c.num_attention_heads + 2 * c.num_key_value_heads)
                * c.head_dim + h, MLP: c.intermediate_size + h}
    return sum(per_kind[k] for k in c.layer_types) + (0 if c.tie_word_embeddings else c.vocab_size)


def int8_cols(c: NanoConfig) -> int:
    """Input channels of the same matrices (one float32 smoothing divisor each, ``quant.SMOOTH_ALPHA``)."""
    h = c.hidden_size
    per_kind = {MAMBA: h + c.mamba_intermediate_size, ATTENTION: 3 * h + c.num_attention_heads * c.head_dim,
                MLP: h + c.intermediate_size}
    return sum(per_kind[k] for k in c.layer_types) + (0 if c.tie_word_embeddings else h)


def weights_bytes(c: NanoConfig, dtype: str = "bf16") -> int:
    """Weight bytes in ``dtype``; fp8: projection weights 1 byte, every other tensor 2 (bf16); int8: projection
    and (untied) lm_head weights 1 byte plus a 4-byte scale per output channel and a 4-byte smoothing divisor
    per input channel, every other tensor 4 (fp32)."""
    d = weight_dtype(dtype)
    counts = param_count(c)
    total = counts.total
    if d == "int8":
        q = matmul_params(c) + counts.lm_head
        return q + 4 * int8_rows(c) + 4 * int8_cols(c) + 4 * (total - q)
    if d == "fp8":
        mm = matmul_params(c)
        return mm + 2 * (total - mm)
    return total * dtype_bytes(d)


def tensor_weights_bytes(tensors: Iterable[tuple[str, int]], dtype: str) -> int:
    """The same rule over (name, numel) pairs read from safetensors headers: exact for a checkpoint."""
    d = weight_dtype(dtype)
    total = 0
    for name, numel in tensors:
        if d == "fp8":
            total += numel * (1 if name.endswith(MATMUL_SUFFIXES) else 2)
        else:
            total += numel * dtype_bytes(d)
    return total


# ---------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activations:
    """Activation bytes of one prefill step of ``chunk`` tokens: the peak is ``hidden + max(layer sets)``."""

    chunk: int
    hidden: int  # residual stream + normed layer input
    layers: dict[str, dict[str, int]]  # kind -> {component: bytes}, only kinds the model has (+ "logits")

    def working_set(self, kind: str) -> int:
        return sum(self.layers[kind].values())

    @property
    def peak_kind(self) -> str:
        return max(self.layers, key=self.working_set)

    @property
    def total(self) -> int:
        return self.hidden + self.working_set(self.peak_kind)


def cpu_ssd_block(state_size: int) -> int:
    """The CPU scan's block (``kernels.cpu_ssd_block``, which imports torch; a test holds the two equal)."""
    return 32 if state_size <= 64 else 64


def _cpu_scan_bytes(c: NanoConfig, batch: int, T: int, s: int) -> int:
    """The CPU Mamba scan's peak beyond the in_proj and conv outputs (the module docstring's ``path="cpu"``)."""
    H, P, N, G, inner = c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, c.n_groups, c.mamba_intermediate_size
    Q = min(c.chunk_size, cpu_ssd_block(N), T)
    Tp = -(-T // Q) * Q
    n, npad, nc = batch * T, batch * Tp, Tp // Q
    scan = (5 * npad * inner + 2 * npad * G * N + 3 * npad * H + batch * nc * Q * Q * (G + H)
            + batch * (nc + 1) * H * P * N + n * H) * 4
    if Tp != T or s != 4:  # x, dt, B, C copied padded / in float32
        scan += npad * (inner + H) * 4 + 2 * npad * G * N * (4 if s == 4 else s + 4)
    return max(scan, npad * inner * 4 + 2 * n * inner * 4)  # or: y and the gated norm's two buffers


def activation_bytes(c: NanoConfig, batch: int, chunk: int, context: int, dtype: str = "bf16",
                     attention: str = "flash", path: str = "cuda") -> Activations:
    """The activation peak of prefilling ``context`` tokens in pieces of ``chunk`` (capped at context), on the
    CUDA kernels' path or (``path="cpu"``) the CPU's."""
    if attention not in ATTENTION_KERNELS:
        raise ConfigError(f"unknown attention kernel {attention!r}; use one of {', '.join(ATTENTION_KERNELS)}")
    if path not in PATHS:
        raise ConfigError(f"unknown activation path {path!r}; use one of {', '.join(PATHS)}")
    s = dtype_bytes(compute_dtype(dtype))
    T, S = min(chunk, context), context
    n, h = batch * T, c.hidden_size
    layers: dict[str, dict[str, int]] = {}
    if c.count(MAMBA):
        H, P, N, G, Q, inner, conv = (c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, c.n_groups,
                                      c.chunk_size, c.mamba_intermediate_size, c.mamba_conv_dim)
        nc = -(-T // Q)  # scan chunks
        states = batch * nc * H * P * N
        scan = max(states * (4 + s),  # float32 chunk states + the passed-on states (model dtype)
                   states * s + batch * nc * G * Q * Q * 4 + n * H * P * s)  # states + C^T B + output
        scan += 2 * batch * H * nc * Q * 4  # dt and its cumulative sum, float32
        scan += n * (inner + 2 * G * N + H) * s  # the contiguous x, B, C, dt the kernels are given
        layers[MAMBA] = {
            "in_proj output": n * c.mamba_in_proj_dim * s,
            "conv output": n * conv * s,
            "scan / gated-norm buffers": max(n * conv * s, scan, n * inner * (4 + s), 3 * n * inner * 4)
            if path == "cuda" else max(n * conv * s, _cpu_scan_bytes(c, batch, T, s)),
        }
    if c.count(ATTENTION):
        heads, d = c.num_attention_heads, c.head_dim
        layers[ATTENTION] = {"q, kernel output, o_proj input": 3 * n * heads * d * s, "o_proj output": n * h * s}
        if attention == "eager":
            layers[ATTENTION].update({
                "scores + probabilities": 2 * batch * heads * T * S * s,
                "K, V expanded to query heads": 2 * batch * heads * S * d * s,
                "causal mask (bool + additive)": T * S * (1 + s),
            })
    if c.count(MLP):
        layers[MLP] = {"up_proj output": n * c.intermediate_size * s, "down_proj output": n * h * s}
    layers["logits"] = {"last-position logits (model dtype + float32)": batch * c.vocab_size * (s + 4)}
    return Activations(chunk=T, hidden=2 * n * h * s, layers=layers)


# ---------------------------------------------------------------------------- the estimate
@dataclass(frozen=True)
class Estimate:
    """Every term of the memory a model needs at (context, batch), in bytes."""

    context: int
    batch: int
    dtype: str
    ssm_dtype: str
    attention: str
    weights: int
    kv: int
    conv: int
    ssm: int
    activations: Activations = field(repr=False)

    @property
    def cache(self) -> int:
        return self.kv + self.conv + self.ssm

    @property
    def total(self) -> int:
        """What the model needs: weights + caches + the activation peak (framework overhead not included)."""
        return self.weights + self.cache + self.activations.total


def estimate(c: NanoConfig, context: int, batch: int = 1, dtype: str = "bf16", ssm_cache_dtype: str | None = None,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK, attention: str = "flash",
             weights: int | None = None, path: str = "cuda") -> Estimate:
    """The memory of serving ``batch`` sequences of ``context`` tokens. ``weights`` overrides the config's
    weight bytes (exact figures from safetensors headers); ``ssm_cache_dtype`` defaults to the config's;
    ``path="cpu"``: the CPU scan's activations (``nano bench --max-batch`` on a CPU)."""
    for name, value in (("context", context), ("batch", batch), ("prefill_chunk", prefill_chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    d, cd = weight_dtype(dtype), compute_dtype(dtype)
    sd = ssm_dtype(ssm_cache_dtype or c.mamba_ssm_cache_dtype)
    return Estimate(
        context=context, batch=batch, dtype=d, ssm_dtype=sd, attention=attention,
        weights=weights_bytes(c, d) if weights is None else weights,
        kv=kv_cache_bytes(c, batch, context, cd), conv=conv_state_bytes(c, batch, cd),
        ssm=ssm_state_bytes(c, batch, sd),
        activations=activation_bytes(c, batch, prefill_chunk, context, d, attention, path))


def all_attention(c: NanoConfig) -> NanoConfig | None:
    """The counterfactual: every Mamba layer replaced by an attention layer of the model's attention shape.
    None for a model without attention layers (it has no attention shape to copy)."""
    if not c.count(ATTENTION):
        return None
    return c.replace(hybrid_override_pattern=c.hybrid_override_pattern.replace("M", "*"))


def all_attention_total(c: NanoConfig, e: Estimate, counterfactual: NanoConfig | None = None) -> int | None:
    """Bytes the all-attention counterfactual needs at ``e``'s settings: same weights and activations,
    KV in every mixer layer, no Mamba state. ``counterfactual``: ``all_attention(c)``, if already built."""
    cf = counterfactual or all_attention(c)
    if cf is None:
        return None
    return e.weights + e.activations.total + kv_cache_bytes(cf, e.batch, e.context, compute_dtype(e.dtype))


# ---------------------------------------------------------------------------- exact inverse solves
UNBOUNDED_CAP = 2**40


def largest_fitting(fits: Callable[[int], bool], cap: int = UNBOUNDED_CAP) -> int | None:
    """The largest n >= 1 with ``fits(n)`` for a predicate that is true up to some n and false after.
    0 when even 1 does not fit; None when ``cap`` still fits (no limit from memory)."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        if hi >= cap:
            return None
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_context(c: NanoConfig, budget: int, **kw) -> int | None:
    """The largest context (tokens) whose estimate fits ``budget`` bytes at the given batch."""
    return largest_fitting(lambda n: estimate(c, context=n, **kw).total <= budget)


def max_batch(c: NanoConfig, budget: int, **kw) -> int | None:
    """The largest batch whose estimate fits ``budget`` bytes at the given context."""
    return largest_fitting(lambda n: estimate(c, batch=n, **kw).total <= budget)


def max_prefill_chunk(c: NanoConfig, budget: int, context: int, **kw) -> int:
    """The largest prefill chunk (<= context) that fits; 0 when none does."""
    kw.pop("prefill_chunk", None)
    if estimate(c, context=context, prefill_chunk=context, **kw).total <= budget:
        return context
    found = largest_fitting(lambda n: estimate(c, context=context, prefill_chunk=n, **kw).total <= budget,
                            cap=context)
    return context if found is None else found


def max_context_all_attention(c: NanoConfig, budget: int, **kw) -> int | None:
    """The largest context the all-attention counterfactual fits (None: no attention shape, or no limit)."""
    cf = all_attention(c)
    if cf is None:
        return None
    return largest_fitting(lambda n: all_attention_total(c, estimate(c, context=n, **kw), cf) <= budget)
