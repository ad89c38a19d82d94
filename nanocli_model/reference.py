"""The Mamba-2 math, written to be read: the SSD scan (step by step and chunked) and the causal conv.

This is the definition the rest of nano is held to: tests/test_reference.py holds it to the float64
recurrence and to gradcheck, tests/test_cpu_fastpath.py holds the optimised CPU code to it. The model does
not run it (except ``discretize_dt``, which every path shares): ``kernels.py`` dispatches to mamba-ssm /
causal-conv1d on CUDA and to ``cpu_fastpath.py`` elsewhere. Notation as in the Mamba-2 paper (Dao & Gu,
2024), per head, with the state h a (P, N) matrix:

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T
    y_t = h_t C_t + D x_t

b batch, T sequence, H heads, P head_dim, G groups (head h reads group h // (H/G)), N state size,
Q chunk length, c chunk index, l and s positions within a chunk. Arithmetic in float32 (float64 when
given float64, so tests can compare against an exact computation). Plain torch ops throughout: autograd
differentiates every function here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the accumulation dtype: float64 stays float64, anything else becomes float32."""
    return t if t.dtype == torch.float32 or t.dtype == torch.float64 else t.float()


def discretize_dt(dt_raw: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    """``dt = clamp(softplus(dt_raw + dt_bias), *dt_limit)`` in float32; the same on every path."""
    dt = F.softplus(_acc(dt_raw) + _acc(dt_bias))
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def _update(h, x, dt, A, B, C, D):
    """One step of the recurrence, out of place: h (b, H, P, N), x (b, H, P), dt (b, H), A (H,),
    B and C (b, G, N), D (H,) or None, all in one dtype. Returns (y (b, H, P), the next h)."""
    heads_per_group = x.shape[1] // B.shape[1]
    B = B.repeat_interleave(heads_per_group, dim=1)  # (b, H, N): each head its group's B
    C = C.repeat_interleave(heads_per_group, dim=1)  # (b, H, N)
    decay = torch.exp(dt * A)  # (b, H)
    h = decay[:, :, None, None] * h + torch.einsum("bhp,bhn->bhpn", dt[:, :, None] * x, B)  # (b, H, P, N)
    y = torch.einsum("bhpn,bhn->bhp", h, C)  # (b, H, P): h C
    if D is not None:
        y = y + D[:, None] * x
    return y, h


def ssd_step(state, x, dt, A, B, C, D=None) -> torch.Tensor:
    """One token of the recurrence; ``state`` (b, H, P, N), of any float dtype, is updated in place.

    x (b, H, P); dt (b, H) discretized; A (H,); B, C (b, G, N); D (H,) or None.
    Returns y (b, H, P) float32 (float64 for float64 inputs).
    """
    x = _acc(x)
    dt, A, B, C = (t.to(x.dtype) for t in (dt, A, B, C))
    y, h = _update(state.to(x.dtype), x, dt, A, B, C, None if D is None else D.to(x.dtype))
    state.copy_(h)
    return y


def ssd_sequential(x, dt, A, B, C, D=None, initial_state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one token at a time: the definition (slow). Shapes as ``ssd_chunked``."""
    b, T, H, P = x.shape
    x = _acc(x)
    dt, A, B, C = (t.to(x.dtype) for t in (dt, A, B, C))
    D = None if D is None else D.to(x.dtype)
    h = (x.new_zeros(b, H, P, B.shape[-1]) if initial_state is None
         else initial_state.to(x.dtype))  # (b, H, P, N)
    ys = []
    for t in range(T):
        y, h = _update(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return torch.stack(ys, dim=1), h  # (b, T, H, P), (b, H, P, N)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Segment sums along the last axis of ``a`` (..., Q): out[..., l, s] = a[s+1] + ... + a[l] for s <= l
    (0 on the diagonal) and -inf for s > l. So exp(out)[l, s] is the decay from step s to step l, and 0
    from the future. Summed directly, not as a difference of cumulative sums (which would cancel)."""
    Q = a.shape[-1]
    after = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1)  # (Q, Q): [k, s] true where k > s
    terms = a[..., :, None].expand(*a.shape, Q).masked_fill(~after, 0.0)  # (..., Q, Q): [k, s] = a[k] if k > s
    sums = terms.cumsum(dim=-2)  # (..., Q, Q): [l, s] = sum of a[k] over s < k <= l
    causal = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril()  # (Q, Q): s <= l
    return sums.masked_fill(~causal, float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, initial_state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan by the paper's block decomposition (equal to ``ssd_sequential`` for any ``chunk_size``).

    x (b, T, H, P); dt (b, T, H) already discretized; A (H,) negative; B, C (b, T, G, N); D (H,) or None;
    initial_state (b, H, P, N) or None. Returns y (b, T, H, P) and the final state (b, H, P, N), float32
    (float64 for float64 inputs). T need not be a multiple of ``chunk_size``: the tail is zero-padded with
    dt = 0 (decay exp(0) = 1 and no input), which leaves the state untouched.
    """
    b, T, H, P = x.shape
    G, N = B.shape[-2:]
    Q = chunk_size
    x = _acc(x)
    dt, A, B, C = (t.to(x.dtype) for t in (dt, A, B, C))
    pad = (-T) % Q
    c = (T + pad) // Q  # number of chunks
    xp = F.pad(x, (0, 0, 0, 0, 0, pad)).reshape(b, c, Q, H, P)  # (b, c, Q, H, P): chunk c is steps cQ..cQ+Q-1
    dt = F.pad(dt, (0, 0, 0, pad)).reshape(b, c, Q, H)  # (b, c, Q, H)
    R = H // G  # heads per group
    B = F.pad(B, (0, 0, 0, 0, 0, pad)).repeat_interleave(R, dim=2).reshape(b, c, Q, H, N)  # (b, c, Q, H, N)
    C = F.pad(C, (0, 0, 0, 0, 0, pad)).repeat_interleave(R, dim=2).reshape(b, c, Q, H, N)  # head h: group h // R
    xdt = xp * dt[..., None]  # (b, c, Q, H, P): the input dt_s x_s
    a = (dt * A).permute(0, 3, 1, 2)  # (b, H, c, Q): the log-decay dt A of each step
    L = torch.exp(segsum(a))  # (b, H, c, Q, Q): L[l, s] = exp(a[s+1] + ... + a[l]), 0 for s > l

    # 1. Diagonal blocks (inputs within the same chunk): y_l = sum_{s <= l} (C_l . B_s) L[l, s] dt_s x_s.
    CB = torch.einsum("bclhn,bcshn->bhcls", C, B)  # (b, H, c, Q, Q): C_l . B_s
    y_diag = torch.einsum("bhcls,bcshp->bclhp", CB * L, xdt)  # (b, c, Q, H, P)

    # 2. Chunk states: what each chunk alone leaves in the state at its end,
    #    S_c = sum_s L[Q-1, s] dt_s x_s B_s^T (the decay from s to the chunk's last step).
    S = torch.einsum("bhcs,bcshp,bcshn->bchpn", L[..., -1, :], xdt, B)  # (b, c, H, P, N)

    # 3. State passing, chunk by chunk: h entering chunk c+1 = exp(a summed over chunk c) h entering c + S_c.
    chunk_decay = torch.exp(a.sum(-1))  # (b, H, c)
    h = x.new_zeros(b, H, P, N) if initial_state is None else initial_state.to(x.dtype)  # (b, H, P, N)
    entering = []
    for k in range(c):
        entering.append(h)
        h = chunk_decay[:, :, k, None, None] * h + S[:, k]  # (b, H, P, N)
    h_in = torch.stack(entering, dim=1)  # (b, c, H, P, N); h is now the final state

    # 4. Off-diagonal blocks (inputs from earlier chunks, through the entering state):
    #    y_l += exp(a[0] + ... + a[l]) h_in C_l.
    decay_in = torch.exp(a.cumsum(-1))  # (b, H, c, Q): the decay from the chunk's start through step l
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, h_in, decay_in)  # (b, c, Q, H, P)

    y = (y_diag + y_off).reshape(b, c * Q, H, P)[:, :T]  # (b, T, H, P), the padding dropped
    if D is not None:
        y = y + D.to(x.dtype)[:, None] * x
    return y, h


def causal_conv1d(x, weight, bias=None, conv_state=None) -> torch.Tensor:
    """Depthwise causal conv + SiLU along time, channels last.

    x (b, T, C); weight (C, K); bias (C,) or None; conv_state (b, C, K-1) or None: the K-1 inputs before x
    (zeros at the start of a sequence), updated in place to the last K-1 inputs. The cache's conv state is
    a channel-last view of a (b, K-1, C) buffer, so it is written with ``copy_``, never replaced. Returns
    (b, T, C) in x's dtype, summed in float32 (float64 for float64):
        out[t] = silu(bias + sum_k weight[:, k] x[t - (K-1) + k])
    """
    b, T, C = x.shape
    K = weight.shape[1]
    xa = _acc(x)
    past = (xa.new_zeros(b, K - 1, C) if conv_state is None
            else conv_state.transpose(1, 2).to(xa.dtype))  # (b, K-1, C): the inputs before x
    window = torch.cat([past, xa], dim=1)  # (b, K-1+T, C): window[j] = x[j - (K-1)]
    w = weight.to(xa.dtype)  # (C, K)
    out = sum(w[:, k] * window[:, k:k + T] for k in range(K))  # (b, T, C): tap k reads K-1-k steps back
    if bias is not None:
        out = out + bias.to(xa.dtype)
    if conv_state is not None:
        conv_state.copy_(window[:, T:].transpose(1, 2))  # (b, C, K-1): the last K-1 inputs
    return F.silu(out).to(x.dtype)


def causal_conv1d_step(x, weight, bias, conv_state) -> torch.Tensor:
    """One decode step of ``causal_conv1d``: x (b, C) the new input; weight (C, K); bias (C,) or None;
    conv_state (b, C, K-1) updated in place to the last K-1 inputs. Returns (b, C) in x's dtype."""
    xa = _acc(x)
    window = torch.cat([conv_state.to(xa.dtype), xa[:, :, None]], dim=2)  # (b, C, K): the K-1 stored inputs, x
    conv_state.copy_(window[:, :, 1:])  # (b, C, K-1)
    out = (window * weight.to(xa.dtype)).sum(-1)  # (b, C)
    if bias is not None:
        out = out + bias.to(xa.dtype)
    return F.silu(out).to(x.dtype)
