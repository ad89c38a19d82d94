"""The NemotronH mixers: Mamba-2, GQA attention (no positional encoding), relu^2 MLP, and RMSNorm.

Parameter names and shapes are the released checkpoints' (``mixer.in_proj.weight``, ``mixer.conv1d.weight``
[conv_dim, 1, K], ``mixer.A_log``, ...), so a state dict maps one to one onto HF NemotronH files.
Shapes: b batch, T new tokens, h hidden, I Mamba inner width, H Mamba heads, P head_dim, G groups,
N state size.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from . import kernels, row_gemv
from .cache import AttentionCache, MambaCache
from .config import NanoConfig


class _RMSNormFn(torch.autograd.Function):
    """``F.rms_norm`` with its backward written out (a few passes instead of autograd's ~15 ops).

    y = xhat * w with xhat = x * r, r = 1 / sqrt(mean(x^2) + eps) per row:
    dw = sum_rows dy * xhat; dx = r * (dy w - xhat * mean(dy w * xhat)).
    Computed in float32 (float64 for float64), returned in x's dtype; keeps xhat and r for the backward.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        acc = torch.promote_types(x.dtype, torch.float32)
        x32 = x.to(acc)
        r = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        xhat = x32 * r
        ctx.save_for_backward(xhat, weight, r)
        ctx.x_dtype = x.dtype
        return (xhat * weight.to(acc)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xhat, weight, r = ctx.saved_tensors
        dy = dy.to(xhat.dtype)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        dxhat = dy * weight.to(xhat.dtype)
        m = torch.linalg.vecdot(dxhat, xhat).div_(xhat.shape[-1])[..., None]  # mean(dxhat * xhat)
        dx = dxhat.addcmul_(xhat, m, value=-1.0).mul_(r)
        return dx.to(ctx.x_dtype), dw, None


class RMSNorm(nn.Module):
    """y = weight * x / rms(x), computed in float32, returned in the input dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # no conversions: a decode step
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # runs ~30 of these per token
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class _GatedGroupRMSNormFn(torch.autograd.Function):
    """``rmsnorm_per_group(y * silu(z)) * weight`` with its backward written out (float32 math).

    g = y * silu(z); per group ghat = g * r, r = 1 / sqrt(mean(g^2) + eps); out = ghat * w:
    dw = sum_rows dout * ghat; dg = r * (dout w - ghat * mean_group(dout w * ghat)); dy = dg * silu(z);
    dz = dg * y * silu'(z). Keeps y, z, silu(z), ghat and r for the backward.
    """

    @staticmethod
    def forward(ctx, y, z, weight, groups, eps):
        acc = torch.promote_types(y.dtype, torch.float32)
        b, T, inner = y.shape
        s = F.silu(z.to(acc))  # (b, T, I)
        ghat = (s * y).view(b, T, groups, inner // groups)  # (b, T, G, I/G), normalised in place below
        r = torch.linalg.vector_norm(ghat, dim=-1, keepdim=True).square_().div_(inner // groups).add_(eps).rsqrt_()
        ghat = ghat.mul_(r).view(b, T, inner)
        ctx.save_for_backward(y, z, s, ghat, weight, r)
        ctx.groups = groups
        return ghat * weight.to(acc)

    @staticmethod
    def backward(ctx, dout):
        y, z, s, ghat, weight, r = ctx.saved_tensors
        b, T, inner = y.shape
        G, acc = ctx.groups, r.dtype
        dout = dout.to(acc)
        dw = None
        if ctx.needs_input_grad[2]:
            dw = (dout * ghat).reshape(-1, inner).sum(0).to(weight.dtype)
        dghat = (dout * weight.to(acc)).view(b, T, G, inner // G)
        ghat = ghat.view(b, T, G, inner // G)
        m = torch.linalg.vecdot(dghat, ghat).div_(inner // G)[..., None]  # (b, T, G, 1)
        dg = dghat.addcmul_(ghat, m, value=-1.0).mul_(r).view(b, T, inner)  # d(y * silu(z))
        dy = (dg * s).to(y.dtype)
        dz = torch.ops.aten.silu_backward(dg.mul_(y.to(acc)), z.to(acc)).to(z.dtype)
        return dy, dz, dw, None, None


class GatedGroupRMSNorm(nn.Module):
    """Mamba-2's output norm: ``rmsnorm_per_group(y * silu(z)) * weight`` with G groups of I/G channels."""

    def __init__(self, size: int, groups: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.groups, self.eps = groups, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (y, z, self.weight)):
            return _GatedGroupRMSNormFn.apply(y, z, self.weight, self.groups, self.eps)  # (b, T, I) float32
        b, T, inner = y.shape
        w = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        g = F.silu(z if z.dtype == torch.float32 else z.float()).mul_(y)  # one buffer
        g = F.rms_norm(g.view(b, T, self.groups, inner // self.groups), (inner // self.groups,), eps=self.eps)
        return g.view(b, T, inner).mul_(w)  # (b, T, I) float32


ROW_DOT_MAX_IN = 3072  # longest weight row the compiled decode step streams with inductor's loop (else MKL)
ROW_GEMV_MIN_IN = 512  # shortest weight row it streams with nano's GEMV (shorter: inductor's loop, fused)
ROW_GEMV_MIN_IN_ONE_ROW = 256  # the same for one row of x where the GEMV has its one-row loop (AVX-512)


def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``, except for one-token rows of a float32 CPU ``nn.Linear`` inside a compiled decode step
    (``decode.CompiledDecode``, ``aot_decode.AotDecode``). There weights with rows of at least
    ``ROW_GEMV_MIN_IN`` (``ROW_GEMV_MIN_IN_ONE_ROW`` for a single row of x where the library has its one-row
    loop) go through nano's own GEMV, ``torch.ops.nano.row_gemv_f32`` (``row_gemv.py``: faster than inductor's
    and MKL's on every such decode shape measured here); shorter rows (the small profile's 320 at batch > 1, or
    without that loop), or every row where that library is not available, through a row-wise dot product, ``(x[..., None, :] * W).sum(-1)``, which inductor lowers to a vectorised loop fused
    with the RMSNorm before it (faster than a separate call on rows that short; on the medium profile's rows
    1.1-2x faster than MKL's GEMV), up to rows of ``ROW_DOT_MAX_IN`` (longer rows, the released 9B's 4480 and
    more, read at 0.5-0.7x MKL's rate there, so without the library those stay ``linear(x)``, as in eager
    code and prefill). docs/BENCHMARKS.md has the measurements.
    """
    if (x.shape[-2] == 1 and x.device.type == "cpu" and type(linear) is nn.Linear
            and torch.compiler.is_compiling()):
        one_row = x.numel() == x.shape[-1] and row_gemv.one_row_loop()
        if (linear.in_features >= (ROW_GEMV_MIN_IN_ONE_ROW if one_row else ROW_GEMV_MIN_IN)
                and row_gemv.usable(x, linear.weight)):
            y = torch.ops.nano.row_gemv_f32(x, linear.weight)
        elif linear.in_features <= ROW_DOT_MAX_IN:
            y = (x.unsqueeze(-2) * linear.weight).sum(-1)  # (..., 1, out)
        else:
            return linear(x)
        return y if linear.bias is None else y + linear.bias
    return linear(x)


class _ReluSquared(torch.autograd.Function):
    """relu(u)^2 with one saved tensor and a one-pass backward: d/du = 2 relu(u)."""

    @staticmethod
    def forward(ctx, u):
        r = F.relu(u)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, da):
        (r,) = ctx.saved_tensors
        return torch.addcmul(r.new_zeros(()), da, r, value=2.0)  # 2 r da, one pass


class MLP(nn.Module):
    """down_proj(relu(up_proj(x))^2): no gate."""

    def __init__(self, c: NanoConfig):
        super().__init__()
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor, cache=None, start: int = 0, pad: torch.Tensor | None = None) -> torch.Tensor:
        u = project(self.up_proj, x)
        if torch.is_grad_enabled():
            return self.down_proj(_ReluSquared.apply(u))
        return project(self.down_proj, u.relu_().square_())  # same math, no extra buffers at inference


def padded_causal_mask(pad: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """(b, 1, T, start+T) boolean: query start+i sees key j iff j <= start+i and j is not padding.

    A padding query also sees itself, so no row is empty (its output is never read by a real token).
    """
    keys = torch.arange(start + T, device=pad.device)  # (L,)
    queries = start + torch.arange(T, device=pad.device)  # (T,)
    causal = keys[None, :] <= queries[:, None]  # (T, L)
    real_key = keys[None, :] >= pad[:, None]  # (b, L)
    self_key = keys[None, :] == queries[:, None]  # (T, L)
    return ((causal[None] & real_key[:, None, :]) | self_key[None])[:, None]


def padding_mask(pad: torch.Tensor | None, start: int, T: int) -> torch.Tensor | None:
    """(b, T, 1) float mask, 0 at left-padding positions among start..start+T-1; None when there are none."""
    if pad is None or start >= int(pad.max()):
        return None
    return (start + torch.arange(T, device=pad.device)[None, :] >= pad[:, None])[..., None]


ATTENTION_BLOCK = 64  # query rows per block of the training attention (measured best on CPU, T 256-1024)
ATTENTION_SAVED_FLOATS = 1 << 24  # the training attention keeps its probabilities up to this size, else SDPA


@functools.lru_cache(maxsize=16)
def _block_mask(n: int, R: int) -> torch.Tensor:
    """(n*R, n) boolean, True above the diagonal: row (t, r) of a diagonal block must not see key j > t."""
    with torch.inference_mode(False):
        return torch.ones(n, n, dtype=torch.bool).triu(1)[:, None, :].expand(n, R, n).reshape(n * R, n)


class _CausalGQAttention(torch.autograd.Function):
    """Causal GQA attention for training on CPU, blocked over queries; keeps the probabilities for the backward.

    q (b, kv, T, R, d): the R query heads that read one KV head laid out as R rows per position, so one GEMM
    serves them all; k (b, kv, T, d) already scaled by 1/sqrt(d) (the smaller operand); v (b, kv, T, d).
    Query block [s, e) sees keys [0, e) (the diagonal block masked), so about half of the (T, T) scores are
    never computed. Backward, per block: dv += P^T do; dS = P o (do v^T - rowsum(do o out)); dq = dS k;
    dk += dS^T q. Returns (b, kv, T, R, d).
    """

    @staticmethod
    def forward(ctx, q, k, v):
        b, kv, T, R, d = q.shape
        out = torch.empty_like(q)
        probs = []
        for s in range(0, T, ATTENTION_BLOCK):
            e = min(s + ATTENTION_BLOCK, T)
            S = q[:, :, s:e].reshape(b, kv, (e - s) * R, d) @ k[:, :, :e].transpose(-1, -2)  # (b, kv, n*R, e)
            S[..., s:e].masked_fill_(_block_mask(e - s, R), float("-inf"))
            P = torch.softmax(S, dim=-1)
            torch.matmul(P, v[:, :, :e], out=out[:, :, s:e].view(b, kv, (e - s) * R, d))
            probs.append(P)
        ctx.save_for_backward(q, k, v, out, *probs)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *probs = ctx.saved_tensors
        b, kv, T, R, d = q.shape
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        rows = torch.linalg.vecdot(dout, out).view(b, kv, T * R, 1)  # rowsum(do o out)
        for i, s in enumerate(range(0, T, ATTENTION_BLOCK)):
            e, P = min(s + ATTENTION_BLOCK, T), probs[i]  # P (b, kv, n*R, e)
            n = e - s
            do = dout[:, :, s:e].view(b, kv, n * R, d)
            dv[:, :, :e] += P.transpose(-1, -2) @ do
            dS = (do @ v[:, :, :e].transpose(-1, -2)).sub_(rows[:, :, s * R:e * R]).mul_(P)  # (b, kv, n*R, e)
            torch.matmul(dS, k[:, :, :e], out=dq[:, :, s:e].view(b, kv, n * R, d))
            dk[:, :, :e] += dS.transpose(-1, -2) @ q[:, :, s:e].reshape(b, kv, n * R, d)
        return dq, dk, dv


class Attention(nn.Module):
    """Causal grouped-query attention, scale 1/sqrt(head_dim), no positional encoding."""

    def __init__(self, c: NanoConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q, kv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(c.hidden_size, q, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, kv, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, kv, bias=c.attention_bias)
        self.o_proj = nn.Linear(q, c.hidden_size, bias=c.attention_bias)

    def forward(self, x: torch.Tensor, cache: AttentionCache | None = None, start: int = 0,
                pad: torch.Tensor | None = None) -> torch.Tensor:
        b, T, _ = x.shape
        if cache is not None and T == 1:
            return self._decode(x, cache, start, pad)
        if (cache is None and pad is None and T > 1 and torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
                and b * self.n_heads * T * (T + ATTENTION_BLOCK) // 2 <= ATTENTION_SAVED_FLOATS):
            return self._train(x)  # CPU training: blocked causal attention (SDPA's backward is slower there)
        q = self.q_proj(x).view(b, T, self.n_heads, self.head_dim).transpose(1, 2)  # (b, nh, T, d)
        k = self.k_proj(x).view(b, T, self.n_kv, self.head_dim).transpose(1, 2)  # (b, kv, T, d)
        v = self.v_proj(x).view(b, T, self.n_kv, self.head_dim).transpose(1, 2)  # (b, kv, T, d)
        mask, causal = None, True
        if cache is not None:
            cache.k[:, :, start:start + T] = k
            cache.v[:, :, start:start + T] = v
            k, v = cache.k[:, :, :start + T], cache.v[:, :, :start + T]  # (b, kv, start+T, d)
            if start > 0:
                causal = False
                if T > 1:  # query i (absolute start+i) sees keys 0..start+i: causal, aligned bottom-right.
                    # A CausalBias (not a boolean tensor) keeps SDPA on its fused kernels, so a chunked
                    # prefill never materialises a (T, start+T) score matrix.
                    mask = causal_lower_right(T, start + T)
        if pad is not None and T > 1:  # left padding: the first pad[i] positions of row i are no keys for anyone
            out = self._padded_rows(q, k, v, pad, start)  # (b, nh, T, d)
        else:  # GQA: query head i reads KV head i // (n_heads / n_kv)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and T > 1,
                                                 enable_gqa=self.n_kv != self.n_heads)  # (b, nh, T, d)
        return self.o_proj(out.transpose(1, 2).reshape(b, T, self.n_heads * self.head_dim))

    def _padded_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor,
                     start: int) -> torch.Tensor:
        """A left-padded prefill chunk, one row at a time: row i's queries from its first real position pad[i]
        attend to its keys pad[i]..start+T-1, causal and aligned bottom-right.

        Each call is a plain causal attention of the row's real tokens, so SDPA stays on its fused kernels
        (flash / memory-efficient: no score matrix, no K/V copies). One call for the batch would need a
        boolean (b, 1, T, S) mask, and a boolean mask with GQA sends SDPA to its math kernel, whose memory grows
        as b x heads x T x S (fit-check's estimate assumes the fused kernels). Padding queries get zeros: no
        real token reads them. q (b, nh, T, d); k, v (b, kv, start+T, d). Returns (b, nh, T, d).
        """
        T = q.shape[2]
        out = torch.zeros_like(q)  # (b, nh, T, d)
        for i, p in enumerate(pad.tolist()):  # one host read of the (b,) pad lengths per chunk
            first = max(p - start, 0)  # the row's first real query in this chunk
            if first >= T:
                continue  # the whole chunk is padding for this row
            qi, ki, vi = q[i:i + 1, :, first:], k[i:i + 1, :, p:], v[i:i + 1, :, p:]  # (1, nh, Tq, d), (1, kv, S, d)
            Tq, S = qi.shape[2], ki.shape[2]
            mask = None if Tq == S else causal_lower_right(Tq, S)
            out[i:i + 1, :, first:] = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv != self.n_heads)
        return out

    def _train(self, x: torch.Tensor) -> torch.Tensor:
        """Training forward (no cache, no padding) through ``_CausalGQAttention``: with one KV head every
        reshape here is a view."""
        b, T, _ = x.shape
        kv, R, d = self.n_kv, self.n_heads // self.n_kv, self.head_dim
        q = self.q_proj(x).view(b, T, kv, R, d).transpose(1, 2)  # (b, kv, T, R, d)
        k = (self.k_proj(x) * d**-0.5).view(b, T, kv, d).transpose(1, 2)  # (b, kv, T, d), carries the scale
        v = self.v_proj(x).view(b, T, kv, d).transpose(1, 2)  # (b, kv, T, d)
        out = _CausalGQAttention.apply(q.contiguous(), k.contiguous(), v.contiguous())  # (b, kv, T, R, d)
        return self.o_proj(out.transpose(1, 2).reshape(b, T, self.n_heads * d))

    def _decode(self, x: torch.Tensor, cache: AttentionCache, start: int,
                pad: torch.Tensor | None) -> torch.Tensor:
        """One new token against the cached keys: no causal mask (it sees every key), no copies of K and V.

        GQA without repeating K/V: the R = n_heads / n_kv query heads that read one KV head are laid out
        as R query rows of that head, so SDPA runs on (b, kv, R, d) queries against (b, kv, L, d) keys. Inside a
        compiled CPU decode step (float32; left-padded batches too, with an int64 ``pad``) nano's own kernel
        computes the same in one pass over the cache, 1.8-2.2x faster than SDPA from 2k cached tokens up
        (docs/BENCHMARKS.md).
        """
        b, d = x.shape[0], self.head_dim
        q = project(self.q_proj, x).view(b, self.n_kv, self.n_heads // self.n_kv, d)  # (b, kv, R, d): head kv*R + r
        cache.k.select(2, start).copy_(project(self.k_proj, x).view(b, self.n_kv, d))
        cache.v.select(2, start).copy_(project(self.v_proj, x).view(b, self.n_kv, d))
        k, v = cache.k.narrow(2, 0, start + 1), cache.v.narrow(2, 0, start + 1)  # (b, kv, L, d) views
        if torch.compiler.is_compiling() and row_gemv.attention_usable(q, k, v, pad):
            # inside a compiled CPU decode step: nano's kernel, one pass over the cache (row_gemv.decode_attention);
            # a left-padded row skips its padding keys, as the mask below would
            out = (torch.ops.nano.decode_attention(q, k, v) if pad is None
                   else torch.ops.nano.decode_attention_padded(q, k, v, pad))  # (b, kv, R, d)
        else:
            mask = None if pad is None else padded_causal_mask(pad, start, 1)  # (b, 1, 1, L): padding is no key
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (b, kv, R, d)
        return project(self.o_proj, out.reshape(b, 1, self.n_heads * d))


class Mamba2Mixer(nn.Module):
    """Mamba-2 as the released checkpoints compute it.

    in_proj -> [z (I) | x (I) | B (G*N) | C (G*N) | dt (H)]; depthwise causal conv1d + SiLU over x|B|C;
    dt = softplus(dt + dt_bias) within time_step_limit; A = -exp(A_log); SSD scan + D*x;
    gated grouped RMSNorm; out_proj.
    """

    def __init__(self, c: NanoConfig):
        super().__init__()
        self.H, self.P, self.G, self.N = c.mamba_num_heads, c.mamba_head_dim, c.n_groups, c.ssm_state_size
        self.inner, self.conv_dim, self.chunk_size = c.mamba_intermediate_size, c.mamba_conv_dim, c.chunk_size
        self.dt_limit = c.time_step_limit
        self.in_proj = nn.Linear(c.hidden_size, c.mamba_in_proj_dim, bias=c.use_bias)
        # Only a parameter holder ([conv_dim, 1, K], the checkpoint layout); kernels.causal_conv computes.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, c.conv_kernel, groups=self.conv_dim,
                                bias=c.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.H))
        self.A_log = nn.Parameter(torch.zeros(self.H))
        self.D = nn.Parameter(torch.ones(self.H))
        self.norm = GatedGroupRMSNorm(self.inner, self.G, c.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.inner, c.hidden_size, bias=c.use_bias)

    def forward(self, hidden: torch.Tensor, cache: MambaCache | None = None, start: int = 0,
                pad: torch.Tensor | None = None) -> torch.Tensor:
        b, T, _ = hidden.shape
        H, P, G, N, inner = self.H, self.P, self.G, self.N, self.inner
        z, xBC, dt_raw = project(self.in_proj, hidden).split([inner, self.conv_dim, H], dim=-1)  # (b, T, .)
        # (b, T, 1) or None. A single token is never padding: a padded prompt ends with a real token, and
        # decode steps come after it (so the pad-length check, a host sync, is skipped on the decode path).
        real = None if T == 1 else padding_mask(pad, start, T)
        if real is not None:  # left padding: zero conv inputs (as before a sequence start) ...
            xBC = xBC * real
        xBC = kernels.causal_conv(xBC, self.conv1d.weight[:, 0], self.conv1d.bias,
                                  None if cache is None else cache.conv)  # (b, T, conv_dim)
        if real is not None:  # ... and x, B, C, so padding adds nothing to the SSM state
            xBC = xBC * real
        x, B, C = xBC.split([inner, G * N, G * N], dim=-1)
        A = -torch.exp(self.A_log.float())  # (H,)
        if cache is not None and T == 1:
            y = kernels.ssd_step(cache.ssm, x.reshape(b, H, P), dt_raw.reshape(b, H), self.dt_bias, A,
                                 B.reshape(b, G, N), C.reshape(b, G, N), self.D, self.dt_limit)  # (b, H, P)
        else:
            y, final = kernels.ssd_scan(x.reshape(b, T, H, P), dt_raw, self.dt_bias, A, B.reshape(b, T, G, N),
                                        C.reshape(b, T, G, N), self.D, self.chunk_size, self.dt_limit,
                                        initial_state=None if cache is None else cache.ssm)  # (b, T, H, P)
            if cache is not None:
                cache.ssm.copy_(final)
        y = self.norm(y.reshape(b, T, inner), z)  # (b, T, I) float32
        return project(self.out_proj, y if y.dtype == hidden.dtype else y.to(hidden.dtype))


MIXERS = {"mamba": Mamba2Mixer, "attention": Attention, "mlp": MLP}


class Block(nn.Module):
    """Pre-norm residual block: h + mixer(RMSNorm(h))."""

    def __init__(self, c: NanoConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(c.hidden_size, c.layer_norm_epsilon)
        self.mixer = MIXERS[kind](c)

    def forward(self, h: torch.Tensor, cache=None, start: int = 0, pad: torch.Tensor | None = None) -> torch.Tensor:
        out = self.mixer(self.norm(h), cache, start, pad)
        return h + out if torch.is_grad_enabled() else out.add_(h)  # (the mixer's output is a fresh tensor)
