"""THE one place that chooses between the mamba-ssm / causal-conv1d CUDA kernels and ``reference.py``.

Layers call only the three functions here. The CUDA packages are imported lazily and guarded, so
``import nanocli_model`` works on any CPU box. Force the reference with ``NANO_KERNELS=reference``
in the environment or ``with kernels.use("reference"):`` (tests do).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

from . import reference

_forced: str | None = None

# The SSD block decomposition is exact for any block length; ``chunk_size`` in the config is the
# CUDA kernels' tile. On CPU the reference picks its own block: every block computes a full (Q, Q)
# decay matrix of which half is masked (cost grows with Q), while the state-passing matmuls have
# inner dimension Q (too small a Q starves them). Measured on this CPU (docs/BENCHMARKS.md): Q = 32
# is fastest for state size <= 64, Q = 64 for state size 128 (the released models).
def cpu_ssd_block(state_size: int) -> int:
    return 32 if state_size <= 64 else 64


@contextlib.contextmanager
def use(backend: str) -> Iterator[None]:
    """Temporarily force ``"reference"`` or ``"auto"`` (kernels where available)."""
    global _forced
    if backend not in ("reference", "auto"):
        raise ValueError(f"kernel backend must be 'reference' or 'auto', got {backend!r}")
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


@functools.lru_cache(maxsize=1)
def _cuda_ops() -> dict | None:
    """The CUDA kernels, or None when mamba-ssm / causal-conv1d are not importable."""
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # ImportError, or a broken CUDA build that fails at import
        return None
    return {"scan": mamba_chunk_scan_combined, "step": selective_state_update,
            "conv": causal_conv1d_fn, "conv_update": causal_conv1d_update}


def backend_for(t: torch.Tensor) -> str:
    """``"cuda"`` when the kernels can run on this tensor, else ``"reference"``."""
    choice = _forced or os.environ.get("NANO_KERNELS", "auto")
    if choice == "reference" or not t.is_cuda or _cuda_ops() is None:
        return "reference"
    return "cuda"


def ssd_scan(x, dt_raw, dt_bias, A, B, C, D, chunk_size, dt_limit, initial_state=None):
    """Prefill / training scan. x (b,T,H,P); dt_raw (b,T,H) before softplus; A, D, dt_bias (H,);
    B, C (b,T,G,N); initial_state (b,H,P,N) or None. Returns y (b,T,H,P) float32, final state float32."""
    if backend_for(x) == "cuda":
        y, final = _cuda_ops()["scan"](
            x, dt_raw, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_state,
            dt_softplus=True, dt_limit=tuple(dt_limit), return_final_states=True)
        return y.float(), final.float()
    dt = reference.discretize_dt(dt_raw, dt_bias, dt_limit)
    block = min(chunk_size, cpu_ssd_block(B.shape[-1])) if x.device.type == "cpu" else chunk_size
    return reference.ssd_chunked(x, dt, A, B, C, block, D=D, initial_state=initial_state)


def ssd_step(state, x, dt_raw, dt_bias, A, B, C, D, dt_limit):
    """Decode one token; updates ``state`` (b,H,P,N) in place. x (b,H,P); dt_raw (b,H); B, C (b,G,N).
    Returns y (b,H,P) float32."""
    dt = reference.discretize_dt(dt_raw, dt_bias, dt_limit)  # (b, H) float32, clamp included
    if backend_for(x) == "cuda":
        P, N = x.shape[-1], state.shape[-1]
        # The kernel takes per-(head, channel) parameters; tie them across head_dim as mamba-ssm does.
        y = _cuda_ops()["step"](
            state, x, dt[..., None].expand(-1, -1, P).to(x.dtype), A[:, None, None].expand(-1, P, N), B, C,
            D=D[:, None].expand(-1, P), dt_softplus=False)
        return y.float()
    return reference.ssd_step(state, x, dt, A, B, C, D)


def causal_conv(x, weight, bias, conv_state=None):
    """Depthwise causal conv + SiLU. x (b,T,C) channels last; weight (C,K); conv_state (b,C,K-1) updated
    in place. Returns (b,T,C)."""
    if backend_for(x) == "cuda":
        ops, K = _cuda_ops(), weight.shape[-1]
        xt = x.transpose(1, 2).contiguous()  # (b, C, T): the layout every causal-conv1d version takes
        if conv_state is not None and x.shape[1] == 1:
            return ops["conv_update"](xt, conv_state, weight, bias, activation="silu").transpose(1, 2)
        if conv_state is None or not conv_state.any():
            out = ops["conv"](xt, weight, bias, activation="silu").transpose(1, 2)
            if conv_state is not None:  # the last K-1 inputs (zero-padded when T < K-1)
                conv_state.copy_(torch.nn.functional.pad(xt, (K - 1, 0))[:, :, -(K - 1):])
            return out
    return reference.causal_conv1d(x, weight, bias, conv_state)
