"""The Mamba-2 ops as nano runs them without the CUDA kernels: pure PyTorch, hand-optimised for CPU.

``kernels.py`` dispatches here on CPU tensors (and on a GPU without mamba-ssm / causal-conv1d, or under
``NANO_KERNELS=reference``). The math is ``reference.py``'s (same notation, same shapes and dtypes; the
tests hold every function here to it, forward and backward: tests/test_cpu_fastpath.py); the code is
arranged for speed instead of reading:

* ``ssd_chunked``: the block decomposition on chunk-major, group-major contiguous layouts, written in
  place at inference; under autograd one ``autograd.Function`` with the backward written out
  (``_ssd_chunked_backward``) instead of autograd's graph of ~60 nodes.
* ``ssd_step``: one decode token with B and C broadcast per group, the state updated in place.
* ``causal_conv1d`` / ``causal_conv1d_step``: shifted multiply-adds over contiguous channels; under
  autograd one ``autograd.Function`` with the backward written out.

b batch, T sequence, H heads, P head_dim, G groups (head h reads group h // (H/G)), N state size,
Q chunk length, c chunk index. Scan arithmetic runs in float32 (float64 when given float64).
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
    """The SSD scan by the paper's block decomposition (``reference.ssd_chunked``, arranged for speed).

    x (b, T, H, P); dt (b, T, H) already discretized; A (H,) negative; B, C (b, T, G, N);
    D (H,); initial_state (b, H, P, N) or None. Returns y (b, T, H, P) float32 and the final state
    (b, H, P, N) float32. T need not be a multiple of ``chunk_size``: the tail is zero-padded with
    dt = 0, which leaves the state untouched.

    Under autograd the scan is one ``autograd.Function`` whose backward is written out below
    (``_ssd_chunked_backward``): the same block decomposition run in reverse, about twice the forward's
    work, instead of autograd's graph of ~60 nodes and their saved intermediates.
    """
    operands = (x, dt, A, B, C, D, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands):
        return _SSDChunked.apply(x, dt, A, B, C, chunk_size, D, initial_state)
    y, state, _ = _ssd_chunked_forward(x, dt, A, B, C, chunk_size, D, initial_state, keep=False)
    return y, state


def _chunked_layouts(x, dt, A, B, C, Q):
    """Zero-pad T to a multiple of Q and lay the operands out chunk-major, group-major, each contiguous once
    (so the matmuls and broadcasts that follow run on dense memory; strided broadcasts are many times
    slower on CPU, and one chunk's operands are one contiguous slice). Returns xdt (c, b, G, R, Q, P) = x * dt;
    Bc, Cc (c, b, G, Q, N); dA_cs (c, b, G, R, Q), the cumulative sum of dt * A within each chunk."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G  # heads per group
    pad = (-T) % Q
    x32, dt32 = _acc(x), _acc(dt)
    if pad:
        x32 = F.pad(x32, (0, 0, 0, 0, 0, pad))
        dt32 = F.pad(dt32, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nc = (T + pad) // Q
    dt_c = dt32.view(b, nc, Q, G, R).permute(1, 0, 3, 4, 2)  # (c, b, G, R, Q) view
    xdt = torch.empty(nc, b, G, R, Q, P, dtype=x32.dtype, device=x.device)
    torch.mul(x32.view(b, nc, Q, G, R, P).permute(1, 0, 3, 4, 2, 5), dt_c[..., None], out=xdt)  # one pass
    Bc = _as(B, x32.dtype).view(b, nc, Q, G, N).permute(1, 0, 3, 2, 4).contiguous()  # (c, b, G, Q, N)
    Cc = _as(C, x32.dtype).view(b, nc, Q, G, N).permute(1, 0, 3, 2, 4).contiguous()  # (c, b, G, Q, N)
    dA_cs = (dt_c * _as(A, x32.dtype).view(G, R, 1)).cumsum(dim=-1)  # (c, b, G, R, Q)
    return xdt, Bc, Cc, dA_cs


def _ssd_chunked_forward(x, dt, A, B, C, chunk_size, D, initial_state, keep: bool):
    """The scan; with ``keep`` it also returns what the backward needs (and writes nothing in place that
    the backward reads), else it works in place. Returns (y, final_state, saved or None)."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G  # heads per group
    Q = min(chunk_size, T)
    xdt, Bc, Cc, dA_cs = _chunked_layouts(x, dt, A, B, C, Q)
    nc, acc = xdt.shape[0], xdt.dtype

    # 1. Intra-chunk (diagonal blocks): y = (C B^T o L) (x dt) with the decay matrix
    #    L[i, j] = exp(dA_cs[i] - dA_cs[j]) for j <= i, else 0 (as mamba-ssm's kernels compute it).
    #    (In float32 the difference of two cumulative sums loses ~|dA_cs| * 1e-7 in the exponent; with
    #    realistic dt and A this is far below the model's tolerance, and float64 inputs stay exact.)
    #    The future (j > i) is set to 0 before the exp and masked after it: exp(-inf) runs several times slower
    #    than exp of a finite value in torch's CPU kernel (measured 6.7x on the Zen 5).
    CB = Cc @ Bc.transpose(-1, -2)  # (c, b, G, Q, Q), shared by the R heads of a group
    upper = _upper_mask(Q, x.device)
    L = (dA_cs[..., :, None] - dA_cs[..., None, :]).masked_fill_(upper, 0.0).exp_()  # 1 above the diagonal
    if keep:  # the backward reads L as the causal mask too
        M = L.masked_fill_(upper, 0.0) * CB[:, :, :, None]
    else:  # (the group's CB, R times smaller, carries the mask)
        M = L.mul_(CB.masked_fill_(upper, 0.0)[:, :, :, None])  # (c, b, G, R, Q, Q)
    y_diag = M @ xdt  # (c, b, G, R, Q, P)

    # 2-3. The state entering each chunk, chunk by chunk: h_{c+1} = exp(dA_cs[c, -1]) h_c + S_c with the chunk's
    #    own contribution S_c = sum_l exp(dA_cs[-1] - dA_cs[l]) x_l dt_l B_l^T: every chunk's S_c in one batched
    #    (R*P, Q) @ (Q, N) matmul, written where the states go, then one multiply-add per chunk in place.
    decay_to_end = (dA_cs[..., -1:] - dA_cs).exp()  # (c, b, G, R, Q)
    xdt_dec = torch.empty(nc, b, G, R, P, Q, dtype=acc, device=x.device)
    torch.mul(xdt.transpose(-1, -2), decay_to_end[..., None, :], out=xdt_dec)  # (c, b, G, R, P, Q)
    chunk_decay = dA_cs[..., -1, None, None].exp()  # (c, b, G, R, 1, 1)
    states = torch.empty(nc + 1, b, G, R, P, N, dtype=acc, device=x.device)  # entering chunk c; [nc]: the last
    if initial_state is not None:
        states[0] = initial_state.reshape(b, G, R, P, N)
    else:
        states[0] = 0.0
    torch.bmm(xdt_dec.view(nc * b * G, R * P, Q), Bc.view(nc * b * G, Q, N), out=states[1:].view(nc * b * G, R * P, N))
    for c in range(nc):
        states[c + 1].addcmul_(states[c], chunk_decay[c])  # h_{c+1} = S_c + exp(dA_cs[c, -1]) h_c
    start_states, state = states[:nc], states[nc].clone()  # (a clone: the final state keeps no chunk states alive)

    # 4. Output from the entering state: y_off[l] = exp(dA_cs[l]) * C_l h_start, as one
    #    (Q, N) @ (N, R*P) matmul per (chunk, batch, group); accumulated straight into the (b, T, H, P) layout.
    Z = Cc @ start_states.view(nc, b, G, R * P, N).transpose(-1, -2)  # (c, b, G, Q, R*P)
    decay_in = dA_cs.exp().transpose(-1, -2)[..., None]  # (c, b, G, Q, R, 1)
    y = torch.empty(b, nc, Q, G, R, P, dtype=acc, device=x.device)
    torch.addcmul(y_diag.transpose(3, 4), Z.view(nc, b, G, Q, R, P), decay_in,
                  out=y.permute(1, 0, 3, 2, 4, 5))  # y_diag + y_off, one pass into the output layout
    y = y.view(b, nc * Q, H, P)[:, :T]  # (b, T, H, P)
    if D is not None:
        y.addcmul_(x, _as(D, acc)[:, None].expand(H, P).contiguous())  # + D x
    saved = (xdt, xdt_dec, Bc, Cc, dA_cs, L, M, start_states) if keep else None
    return y, state.reshape(b, H, P, N), saved


class _SSDChunked(torch.autograd.Function):
    """``ssd_chunked`` with a hand-written backward (see ``_ssd_chunked_backward``)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, initial_state):
        with torch.autocast(x.device.type, enabled=False):  # float32 scan, as the backward (no autocast) is
            y, state, saved = _ssd_chunked_forward(x, dt, A, B, C, chunk_size, D, initial_state, keep=True)
        ctx.chunk_size, ctx.has_init = min(chunk_size, x.shape[1]), initial_state is not None
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (x, dt, A, B, C, D, initial_state))
        ctx.save_for_backward(x, dt, A, D, y, state, *saved)
        return y, state

    @staticmethod
    def backward(ctx, dy, dstate):
        x, dt, A, D, y, state, *saved = ctx.saved_tensors
        grads = _ssd_chunked_backward(x, dt, A, D, y, state, saved, ctx.chunk_size, dy, dstate, ctx.has_init)
        grads = [None if g is None else _as(g, dtype) for g, dtype in zip(grads, ctx.dtypes)]
        dx, ddt, dA, dB, dC, dD, dinit = grads
        return dx, ddt, dA, dB, dC, None, dD, dinit


def _ssd_chunked_backward(x, dt, A, D, y, state, saved, Q, dy, dstate, has_init):
    """Gradients of the block decomposition, each forward step in reverse (same layouts as the forward).

    With a = dA_cs (per chunk and head), E = exp(a), y = y_diag + y_off + D x, y_off = E o (C h_start^T):
      4.  dZ = dy o E; dC += dZ h_start; dh_start = dZ^T C
      3.  h_{c+1} = h_c exp(a_c[-1]) + S_c, walked backwards: dS_c = dh_{c+1},
          dh_c = dh_start_c + exp(a_c[-1]) dh_{c+1}
      2.  S = Xe^T B with Xe = xdt o exp(a[-1] - a): dXe = B dS^T, dB += Xe dS
      1.  y_diag = M xdt, M = L o CB: dxdt += M^T dy, dCB = sum_heads (dy xdt^T) o L
    The decays need little bookkeeping: every term of y_t (and of the final state) carries exp(A_t - A_s) with
    A the cumulative sum of dt A over the whole sequence, t its output and s its input position, so
    dL/dA_t = sum_p dy_t (y_t - D x_t) - sum_p dxdt_t xdt_t, and d(dt A)_t = sum_{i >= t} dL/dA_i: the part
    within t's chunk, plus <dS[c], state after chunk c> for all later positions (their terms telescope).
    """
    xdt, xdt_dec, Bc, Cc, dA_cs, L, M, start_states = saved  # chunk-major: (c, b, G, ...)
    b, T, H, P = x.shape
    nc, G, R = xdt.shape[0], xdt.shape[2], xdt.shape[3]
    N, RP = Bc.shape[-1], R * P
    acc = xdt.dtype
    dy = _as(dy, acc)
    dyc = dy if nc * Q == T else F.pad(dy, (0, 0, 0, 0, 0, nc * Q - T))
    dyc = dyc.reshape(b, nc, Q, G, R, P)
    dy_r = dyc.permute(1, 0, 3, 4, 2, 5).contiguous()  # (c, b, G, R, Q, P): the diagonal blocks' layout

    # 4. Read-out from the entering states.
    E = dA_cs.exp()  # (c, b, G, R, Q)
    dZ = torch.empty(nc, b, G, Q, R, P, dtype=acc, device=x.device)
    torch.mul(dyc.permute(1, 0, 3, 2, 4, 5), E.transpose(-1, -2)[..., None], out=dZ)
    dZ = dZ.view(nc, b, G, Q, RP)
    dC = dZ @ start_states.view(nc, b, G, RP, N)  # (c, b, G, Q, N)

    # 3. The recurrence over chunks, backwards: dS[c] = d(state after chunk c)
    #    = exp(dA_cs[c+1, -1]) dS[c+1] + dZ[c+1]^T C[c+1] (the read-out of chunk c+1 from that state).
    #    Also <dS[c], state after chunk c> per head, the decays' gradient across that boundary (see below).
    decay = E[..., -1, None, None]  # (c, b, G, R, 1, 1)
    dS = torch.empty_like(start_states)  # (c, b, G, R, P, N)
    across = dA_cs.new_zeros(nc, b, G, R)  # (c, b, G, R)
    if dstate is not None:
        dS[-1] = _as(dstate, acc).view(b, G, R, P, N)
        across[-1] = torch.linalg.vecdot(dS[-1].view(b, G, R, P * N), state.view(b, G, R, P * N))
    else:
        dS[-1] = 0.0
    for c in range(nc - 1, -1 if has_init else 0, -1):
        g = dS[c - 1] if c else torch.empty_like(dS[0])
        torch.mul(dS[c], decay[c], out=g)
        g.view(b * G, RP, N).baddbmm_(dZ[c].view(b * G, Q, RP).transpose(1, 2), Cc[c].view(b * G, Q, N))
        if c:
            across[c - 1] = torch.linalg.vecdot(g.view(b, G, R, P * N), start_states[c].view(b, G, R, P * N))
    dinit = g.reshape(b, H, P, N) if has_init else None

    # 2 and 1. Chunk states and diagonal blocks: d xdt = (B dS^T) o exp(a[-1] - a) + M^T dy, summed in one pass
    #    straight into the (b, T, H, P) layout.
    e = (dA_cs[..., -1:] - dA_cs).exp().transpose(-1, -2)[..., None]  # (c, b, G, Q, R, 1)
    dXe = (Bc @ dS.view(nc, b, G, RP, N).transpose(-1, -2)).view(nc, b, G, Q, R, P)
    dX = torch.empty(b, nc, Q, G, R, P, dtype=acc, device=x.device)
    torch.addcmul((M.transpose(-1, -2) @ dy_r).transpose(3, 4), dXe, e, out=dX.permute(1, 0, 3, 2, 4, 5))
    dB = xdt_dec.view(nc, b, G, RP, Q).transpose(-1, -2) @ dS.view(nc, b, G, RP, N)  # (c, b, G, Q, N)
    dCB = ((dy_r @ xdt.transpose(-1, -2)).mul_(L)).sum(3)  # (c, b, G, Q, Q)
    dC.add_(dCB @ Bc)
    dB.add_(dCB.transpose(-1, -2) @ Cc)

    # Back to (b, T, ...) layouts; xdt = x dt; the decays through A_t (see above).
    dX = dX.view(b, nc * Q, H, P)[:, :T]  # (b, T, H, P)
    dB = dB.permute(1, 0, 3, 2, 4).reshape(b, nc * Q, G, N)[:, :T]  # (b, T, G, N)
    dC = dC.permute(1, 0, 3, 2, 4).reshape(b, nc * Q, G, N)[:, :T]  # (b, T, G, N)
    x32, dt32, A32 = _acc(x), _acc(dt), _as(A, acc)
    dx = dX * dt32[..., None]
    u = torch.linalg.vecdot(dX, x32)  # (b, T, H): sum_p dxdt x
    da = torch.linalg.vecdot(dy, y).sub_(u * dt32)  # dL/dA_t, with y - D x below
    dD = None
    if D is not None:
        dx.addcmul_(dy, _as(D, acc)[:, None])
        dyx = torch.linalg.vecdot(dy, x32)  # (b, T, H)
        da.sub_(dyx * _as(D, acc))
        dD = dyx.sum((0, 1))  # (H,)
    # d(dt A)_t = sum_{i >= t} dL/dA_i: within the chunk, plus everything after it, which telescopes to
    # <dS, state> across the chunk's end (summing per-position terms over the whole sequence instead would
    # cancel large terms in float32).
    if nc * Q != T:
        da = F.pad(da, (0, 0, 0, nc * Q - T))
    ddA = da.view(b, nc, Q, H).flip(2).cumsum(2).flip(2)  # (b, c, Q, H)
    ddA = ddA.add_(across.permute(1, 0, 2, 3).reshape(b, nc, 1, H)).view(b, nc * Q, H)[:, :T]  # (b, T, H)
    ddt = u.addcmul_(ddA, A32)  # (b, T, H)
    dA = torch.linalg.vecdot(ddA.reshape(-1, H), dt32.reshape(-1, H), dim=0)  # (H,)
    return dx, ddt, dA, dB, dC, dD, dinit


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token of the recurrence (``reference.ssd_step``), updating ``state`` in place.

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
    Under autograd (no state) it is one ``autograd.Function`` with the backward written out.
    """
    b, T, C = x.shape
    K = weight.shape[-1]
    if conv_state is not None and T == 1:
        return causal_conv1d_step(x.view(b, C), weight, bias, conv_state).view(b, 1, C)
    if (conv_state is None and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return _CausalConv1d.apply(x, weight, bias)
    taps = weight.t().to(x.dtype).contiguous()  # (K, C): each tap a contiguous row (strided taps are ~8x slower)
    if conv_state is not None:
        x = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], dim=1)  # (b, K-1+T, C)
        conv_state.copy_(x[:, -(K - 1):].transpose(1, 2))
        past = K - 1
    else:
        past = 0
    out = _conv_taps(x, taps, bias, past)
    return F.silu(out, inplace=not torch.is_grad_enabled())  # (b, T, C)


def _conv_taps(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, past: int) -> torch.Tensor:
    """bias + sum_k taps[k] * x[t - (K-1) + k] for the last T = len(x) - past steps of x (b, past+T, C): shifted
    multiply-adds over contiguous channels (faster on CPU than a grouped conv plus transposes)."""
    K, T = taps.shape[0], x.shape[1] - past
    out = x[:, past:] * taps[K - 1] if bias is None else torch.addcmul(_as(bias, x.dtype), x[:, past:], taps[K - 1])
    for s in range(1, K):  # tap K-1-s reads the input s steps back
        lo = max(s - past, 0)  # outputs before lo would read zeros (before the sequence start)
        if lo < T:
            out[:, lo:].addcmul_(x[:, past + lo - s: past + T - s], taps[K - 1 - s])
    return out  # (b, T, C)


class _CausalConv1d(torch.autograd.Function):
    """``causal_conv1d`` from the start of a sequence, with its backward written out: with g = d pre-activation,
    dx[t] = sum_s taps[K-1-s] * g[t+s], dtaps[K-1-s] = sum_(b,t) g[t] * x[t-s], dbias = sum_(b,t) g."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        taps = weight.t().to(x.dtype).contiguous()  # (K, C)
        pre = _conv_taps(x, taps, bias, 0)  # (b, T, C) before the SiLU
        ctx.save_for_backward(x, taps, pre)
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, None if bias is None else bias.dtype
        return F.silu(pre)

    @staticmethod
    def backward(ctx, dout):
        x, taps, pre = ctx.saved_tensors
        K, T = taps.shape[0], x.shape[1]
        g = torch.ops.aten.silu_backward(_as(dout, pre.dtype), pre)  # (b, T, C) d pre-activation
        dx = g * taps[K - 1]
        dtaps = torch.zeros_like(taps)  # (K, C)
        for s in range(K):
            if s < T:
                if s:
                    dx[:, :T - s].addcmul_(g[:, s:], taps[K - 1 - s])
                dtaps[K - 1 - s] = (g[:, s:] * x[:, :T - s]).sum((0, 1))
        dbias = None if ctx.bias_dtype is None else g.sum((0, 1)).to(ctx.bias_dtype)
        return dx, dtaps.t().to(ctx.weight_dtype), dbias
