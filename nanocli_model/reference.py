"""Pure-PyTorch Mamba-2 math: the SSD scan (chunked and step-by-step) and the causal conv.

Readable reference for CPU and for tests; ``kernels.py`` swaps in the mamba-ssm / causal-conv1d
CUDA kernels where they exist. Notation as in the Mamba-2 paper (Dao & Gu, 2024):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t x_t^T      (per head: state h is (P, N))
    y_t = h_t C_t + D * x_t

b batch, T sequence, H heads, P head_dim, G groups (head h reads group h // (H/G)), N state size,
Q chunk length, c chunk index. Scan arithmetic runs in float32 (float64 when given float64, so
tests can compare against an exact computation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype: float32, or float64 for float64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def discretize_dt(dt_raw: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    """``dt = clamp(softplus(dt_raw + dt_bias), *dt_limit)`` in float32; the same on every path."""
    dt = F.softplus(_acc(dt_raw) + _acc(dt_bias))
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def _segsum_exp(a: torch.Tensor) -> torch.Tensor:
    """exp of the segment sums: out[..., i, j] = exp(sum_{j < k <= i} a[..., k]) for j <= i, else 0.

    Computed as a masked cumulative sum (not a difference of cumsums) so no large values cancel.
    a: (..., Q) -> (..., Q, Q)
    """
    Q = a.shape[-1]
    strict = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1)
    x = a[..., None, :].expand(*a.shape[:-1], Q, Q).transpose(-1, -2)  # x[..., i, j] = a[..., i]
    x = x.masked_fill(~strict, 0.0).cumsum(dim=-2)  # sum over k in (j, i]
    return x.masked_fill(~strict.logical_or(torch.eye(Q, dtype=torch.bool, device=a.device)), float("-inf")).exp()


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan by the paper's block decomposition.

    x (b, T, H, P); dt (b, T, H) already discretized; A (H,) negative; B, C (b, T, G, N);
    D (H,); initial_state (b, H, P, N) or None. Returns y (b, T, H, P) float32 and the final state
    (b, H, P, N) float32. T need not be a multiple of ``chunk_size``: the tail is zero-padded with
    dt = 0, which leaves the state untouched.
    """
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G  # heads per group
    Q = min(chunk_size, T)
    pad = (-T) % Q
    x32, dt32 = _acc(x), _acc(dt)
    if pad:
        x32 = F.pad(x32, (0, 0, 0, 0, 0, pad))
        dt32 = F.pad(dt32, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nc = (T + pad) // Q

    # Chunked, group-major layouts.
    xdt = (x32 * dt32[..., None]).view(b, nc, Q, G, R, P).permute(0, 1, 3, 4, 2, 5)  # (b, c, G, R, Q, P)
    Bc = B.to(x32.dtype).view(b, nc, Q, G, N).permute(0, 1, 3, 2, 4)  # (b, c, G, Q, N)
    Cc = C.to(x32.dtype).view(b, nc, Q, G, N).permute(0, 1, 3, 2, 4)  # (b, c, G, Q, N)
    dA = (dt32 * A.to(x32.dtype)).view(b, nc, Q, G, R).permute(0, 1, 3, 4, 2)  # (b, c, G, R, Q)
    dA_cs = dA.cumsum(dim=-1)  # (b, c, G, R, Q)

    # 1. Intra-chunk (diagonal blocks): y = (C B^T o L) (x dt), L[i, j] = exp(sum dA over (j, i]).
    CB = Cc @ Bc.transpose(-1, -2)  # (b, c, G, Q, Q), shared by the R heads of a group
    L = _segsum_exp(dA)  # (b, c, G, R, Q, Q)
    y = (CB[:, :, :, None] * L) @ xdt  # (b, c, G, R, Q, P)

    # 2. Each chunk's own contribution to the state at its end: sum_l exp(dA_cs[-1] - dA_cs[l]) x_l dt_l B_l^T.
    decay_to_end = (dA_cs[..., -1:] - dA_cs).exp()  # (b, c, G, R, Q)
    chunk_states = (xdt * decay_to_end[..., None]).transpose(-1, -2) @ Bc[:, :, :, None]  # (b, c, G, R, P, N)

    # 3. Inter-chunk recurrence over chunk boundaries (sequential in c; c is T/Q, small).
    state = (initial_state.to(x32.dtype).view(b, G, R, P, N) if initial_state is not None
             else x32.new_zeros(b, G, R, P, N))
    chunk_decay = dA_cs[..., -1].exp()  # (b, c, G, R)
    starts = []
    for c in range(nc):
        starts.append(state)
        state = state * chunk_decay[:, c, :, :, None, None] + chunk_states[:, c]
    start_states = torch.stack(starts, dim=1)  # (b, c, G, R, P, N): the state entering each chunk

    # 4. Output from the entering state: y += exp(dA_cs[l]) * C_l h_start.
    y_off = (Cc[:, :, :, None] @ start_states.transpose(-1, -2)) * dA_cs.exp()[..., None]  # (b, c, G, R, Q, P)
    y = (y + y_off).permute(0, 1, 4, 2, 3, 5).reshape(b, nc * Q, H, P)[:, :T]  # (b, T, H, P)
    if D is not None:
        y = y + D.to(x32.dtype)[:, None] * _acc(x)
    return y, state.reshape(b, H, P, N)


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token of the recurrence, updating ``state`` in place.

    state (b, H, P, N) any float dtype; x (b, H, P); dt (b, H) discretized; A (H,); B, C (b, G, N).
    Returns y (b, H, P) float32.
    """
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    x32, dt32 = _acc(x), _acc(dt)
    Bh = B.to(x32.dtype).repeat_interleave(R, dim=1)  # (b, H, N)
    Ch = C.to(x32.dtype).repeat_interleave(R, dim=1)  # (b, H, N)
    decay = (dt32 * A.to(x32.dtype)).exp()  # (b, H)
    new = state.to(x32.dtype) * decay[..., None, None] + (x32 * dt32[..., None])[..., None] * Bh[:, :, None, :]
    state.copy_(new)
    y = (new @ Ch[..., None]).squeeze(-1)  # (b, H, P)
    if D is not None:
        y = y + D.to(x32.dtype)[:, None] * x32
    return y


def ssd_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one token at a time (the definition; slow). Same shapes as ``ssd_chunked``."""
    b, T, H, P = x.shape
    N = B.shape[-1]
    state = (_acc(initial_state).clone() if initial_state is not None
             else x.new_zeros(b, H, P, N, dtype=torch.promote_types(x.dtype, torch.float32)))
    ys = [ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(T)]
    return torch.stack(ys, dim=1), state


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor | None = None
) -> torch.Tensor:
    """Depthwise causal conv + SiLU over the channels of x.

    x (b, C, T); weight (C, K); bias (C,); conv_state (b, C, K-1): the inputs before x (zeros at
    the start of a sequence), updated in place to the last K-1 inputs. Returns (b, C, T).
    """
    K = weight.shape[-1]
    if conv_state is None:
        xp = F.pad(x, (K - 1, 0))
    else:
        xp = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (b, C, K-1+T)
        conv_state.copy_(xp[:, :, -(K - 1):])
    out = F.conv1d(xp, weight[:, None, :].to(x.dtype), None if bias is None else bias.to(x.dtype),
                   groups=x.shape[1])
    return F.silu(out)
