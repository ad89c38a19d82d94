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

import functools

import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype: float32, or float64 for float64 inputs (no call at all when already there)."""
    return t if t.dtype == torch.float32 or t.dtype == torch.float64 else t.float()


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it is already there (a no-op ``.to`` still costs a dispatch)."""
    return t if t.dtype == dtype else t.to(dtype)


def discretize_dt(dt_raw: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    """``dt = clamp(softplus(dt_raw + dt_bias), *dt_limit)`` in float32; the same on every path."""
    dt = F.softplus(_acc(dt_raw) + _acc(dt_bias))
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(min=lo, max=hi)
    return dt


@functools.lru_cache(maxsize=8)
def _upper_mask_cpu(Q: int) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor, usable with autograd even if first built in inference
        return torch.ones(Q, Q, dtype=torch.bool).triu(1)


def _upper_mask(Q: int, device: torch.device) -> torch.Tensor:
    """(Q, Q) boolean mask of the strictly upper triangle (j > i: the future)."""
    mask = _upper_mask_cpu(Q)
    return mask if device.type == "cpu" else mask.to(device)


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

    # Chunked, group-major layouts. Every operand is made contiguous once, so the matmuls and the
    # broadcasts below run on dense memory (strided broadcasts are many times slower on CPU).
    xdt = (x32 * dt32[..., None]).view(b, nc, Q, G, R, P).permute(0, 1, 3, 4, 2, 5).contiguous()  # (b,c,G,R,Q,P)
    Bc = B.to(x32.dtype).view(b, nc, Q, G, N).permute(0, 1, 3, 2, 4).contiguous()  # (b, c, G, Q, N)
    Cc = C.to(x32.dtype).view(b, nc, Q, G, N).permute(0, 1, 3, 2, 4).contiguous()  # (b, c, G, Q, N)
    dA = (dt32 * A.to(x32.dtype)).view(b, nc, Q, G, R).permute(0, 1, 3, 4, 2).contiguous()  # (b, c, G, R, Q)
    dA_cs = dA.cumsum(dim=-1)  # (b, c, G, R, Q)

    # 1. Intra-chunk (diagonal blocks): y = (C B^T o L) (x dt) with the decay matrix
    #    L[i, j] = exp(dA_cs[i] - dA_cs[j]) for j <= i, else 0 (as mamba-ssm's kernels compute it).
    #    (In float32 the difference of two cumulative sums loses ~|dA_cs| * 1e-7 in the exponent; with
    #    realistic dt and A this is far below the model's tolerance, and float64 inputs stay exact.)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C))
    CB = Cc @ Bc.transpose(-1, -2)  # (b, c, G, Q, Q), shared by the R heads of a group
    M = (dA_cs[..., :, None] - dA_cs[..., None, :]).masked_fill_(_upper_mask(Q, x.device), float("-inf"))
    M = M.exp() * CB[:, :, :, None] if grad else M.exp_().mul_(CB[:, :, :, None])  # (b, c, G, R, Q, Q)
    y_diag = M @ xdt  # (b, c, G, R, Q, P)

    # 2. Each chunk's own contribution to the state at its end: sum_l exp(dA_cs[-1] - dA_cs[l]) x_l dt_l B_l^T,
    #    one (R*P, Q) @ (Q, N) matmul per (batch, chunk, group).
    decay_to_end = (dA_cs[..., -1:] - dA_cs).exp()  # (b, c, G, R, Q)
    xdt_dec = (xdt * decay_to_end[..., None]).transpose(-1, -2).reshape(b, nc, G, R * P, Q)  # (b,c,G,RP,Q)
    chunk_states = (xdt_dec @ Bc).view(b, nc, G, R, P, N)  # (b, c, G, R, P, N)

    # 3. Inter-chunk recurrence over chunk boundaries (sequential in c; c is T/Q, small).
    state = (initial_state.to(x32.dtype).view(b, G, R, P, N) if initial_state is not None
             else x32.new_zeros(b, G, R, P, N))
    chunk_decay = dA_cs[..., -1].exp()  # (b, c, G, R)
    if grad:
        start_states = []  # the state entering each chunk
        for c in range(nc):
            start_states.append(state)
            state = state * chunk_decay[:, c, :, :, None, None] + chunk_states[:, c]
        start_states = torch.stack(start_states, dim=1)  # (b, c, G, R, P, N)
    else:  # the same recurrence, written in place into one buffer
        start_states = torch.empty_like(chunk_states)  # (b, c, G, R, P, N)
        start_states[:, 0] = state
        for c in range(nc - 1):
            torch.addcmul(chunk_states[:, c], start_states[:, c], chunk_decay[:, c, :, :, None, None],
                          out=start_states[:, c + 1])
        state = torch.addcmul(chunk_states[:, -1], start_states[:, -1], chunk_decay[:, -1, :, :, None, None])

    # 4. Output from the entering state: y_off[l] = exp(dA_cs[l]) * C_l h_start, as one
    #    (Q, N) @ (N, R*P) matmul per (batch, chunk, group).
    y_off = (Cc @ start_states.view(b, nc, G, R * P, N).transpose(-1, -2)).view(b, nc, G, Q, R, P)
    decay_in = dA_cs.exp().transpose(-1, -2)[..., None]  # (b, c, G, Q, R, 1)
    if grad:
        y = y_off * decay_in + y_diag.transpose(3, 4)  # (b, c, G, Q, R, P)
        y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, nc * Q, H, P)[:, :T]  # (b, T, H, P)
        return (y if D is None else y + D.to(y.dtype)[:, None] * _acc(x)), state.reshape(b, H, P, N)
    # Inference: accumulate straight into the (b, T, H, P) output layout, no intermediate copies.
    y_off.mul_(decay_in).add_(y_diag.transpose(3, 4))  # (b, c, G, Q, R, P)
    y = torch.empty(b, nc, Q, G, R, P, dtype=x32.dtype, device=x.device)
    y.copy_(y_off.permute(0, 1, 3, 2, 4, 5))
    y = y.view(b, nc * Q, H, P)[:, :T]  # (b, T, H, P)
    if D is not None:
        y.addcmul_(x, D.to(y.dtype)[:, None].expand(H, P).contiguous())
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
    Returns y (b, H, P) float32 (float64 for float64 inputs).

    Head h reads group h // R (R = H/G heads per group), so the heads are viewed as (G, R) and B, C
    broadcast per group: no per-head copies of B and C. The state is updated in place when it is
    already in the accumulation dtype (the usual float32 cache), else in a float32 copy written back.
    """
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G  # heads per group
    x32, dt32 = _acc(x), _acc(dt)
    acc = x32.dtype
    h = state if state.dtype == acc and state.is_contiguous() else state.to(acc).contiguous()  # (b, H, P, N)
    hg = h.view(b, G, R, P, N)
    hg.mul_(torch.exp(dt32 * _acc(A)).view(b, G, R, 1, 1))  # decay exp(dt A) per head
    xdt = (x32 * dt32[..., None]).view(b, G, R, P, 1)  # (b, G, R, P, 1)
    hg.addcmul_(xdt, _acc(B).view(b, G, 1, 1, N))  # + dt x B^T, B shared by the group's R heads
    if h is not state:
        state.copy_(h)
    # y = h C per group, C as the left operand: (1, N) @ (N, R*P) reads the state row by row (a fast GEMV;
    # the (R*P, N) @ (N, 1) form is several times slower on CPU).
    Cg = _acc(C).reshape(b * G, 1, N)  # (b*G, 1, N); a copy only when C is a strided slice of a batch
    y = torch.bmm(Cg, h.view(b * G, R * P, N).transpose(1, 2)).view(b, H, P)  # (b, H, P)
    if D is not None:
        y.addcmul_(x32, _acc(D)[:, None])  # + D x
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


def causal_conv1d_step(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor
) -> torch.Tensor:
    """One decode step of ``causal_conv1d``: x (b, C) the new input; weight (C, K); conv_state (b, C, K-1)
    updated in place to the last K-1 inputs. Returns silu(bias + sum_k weight[:, k] * window[:, k]) (b, C),
    the window being the K-1 stored inputs followed by x.

    The window is one small time-major (b, K, C) buffer: the state's K-1 columns and the new input, so the
    tap sum reduces over an outer dimension (vectorised along channels; a sum over an inner dimension of
    size K is several times slower on CPU), and the state shifts by one copy out of it.
    """
    window = torch.cat([_as(conv_state, x.dtype).transpose(1, 2), x[:, None]], dim=1)  # (b, K, C)
    conv_state.copy_(window[:, 1:].transpose(1, 2))  # the last K-1 inputs
    out = torch.linalg.vecdot(window, _as(weight, x.dtype).t(), dim=1)  # (b, C)
    if bias is not None:
        out.add_(_as(bias, x.dtype))
    return F.silu(out, inplace=not torch.is_grad_enabled())


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor | None = None
) -> torch.Tensor:
    """Depthwise causal conv + SiLU along time, channels last.

    x (b, T, C); weight (C, K); bias (C,); conv_state (b, C, K-1): the inputs before x (zeros at the
    start of a sequence), updated in place to the last K-1 inputs. Returns (b, T, C):
    out[t] = silu(bias + sum_k weight[:, k] * x[t - (K-1) + k]).
    """
    b, T, C = x.shape
    K = weight.shape[-1]
    if conv_state is not None and T == 1:
        return causal_conv1d_step(x.view(b, C), weight, bias, conv_state).view(b, 1, C)
    taps = weight.t().to(x.dtype).contiguous()  # (K, C): each tap a contiguous row (strided taps are ~8x slower)
    if conv_state is not None:
        x = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], dim=1)  # (b, K-1+T, C)
        conv_state.copy_(x[:, -(K - 1):].transpose(1, 2))
        past = K - 1
    else:
        past = 0
    # Shifted multiply-adds over contiguous channels (faster on CPU than a grouped conv plus transposes).
    out = x[:, past:] * taps[K - 1] if bias is None else torch.addcmul(bias.to(x.dtype), x[:, past:], taps[K - 1])
    for s in range(1, K):  # tap K-1-s reads the input s steps back
        lo = max(s - past, 0)  # outputs before lo would read zeros (before the sequence start)
        if lo < T:
            out[:, lo:].addcmul_(x[:, past + lo - s: past + T - s], taps[K - 1 - s])
    return F.silu(out, inplace=not torch.is_grad_enabled())  # (b, T, C)
