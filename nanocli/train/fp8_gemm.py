"""FP8 (E4M3) quantization in tiles and the GEMMs on it: ``C = A @ B^T`` in one of three real forms or emulated.

Split from ``fp8.py`` (the recipe, the Linear's autograd Function and the model conversion), which documents
the recipe. Here: ``quantize`` / ``dequantize`` (one float32 scale per tile), ``gemm(a, b, backend)``, and the
per-device probe (``gemm_probe``) that decides which form of ``torch._scaled_mm`` a GEMM takes: "blockwise"
(ONE call with 1x128 / 128x128 block-wise scales, cuBLASLt on CUDA sm90), "per-block" (one call per 128-wide
contraction block with row/column scales, float32 accumulation) or "emulate" (no FP8 GEMM on the device).
Block-wise layouts follow torch's checks (aten/src/ATen/native/cuda/ScaledBlas.cpp, torch 2.9-2.13):
1x128 scales (rows, ceil(K/128)) outer-dim-major, 128x128 scales (ceil(R/128), ceil(K/128)) row-major,
checked as ``scale_a`` against mat1 and ``scale_b.t()`` against ``mat2.t()``.
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
AMAX_EPS = 1e-12  # an all-zero tile gets a tiny scale and quantizes to zeros (torchao's guard)
FULL = sys.maxsize  # a tile this long covers the whole dimension (tensorwise: one scale per tensor)


# ---------------------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------------------

class Quantized(NamedTuple):
    """An E4M3 matrix with one float32 dequantization scale per tile: value ~ q * s[row // tr, col // tc]."""

    q: Tensor  # (R, C) float8_e4m3fn
    s: Tensor  # (ceil(R / tr), ceil(C / tc)) float32
    tile: tuple[int, int]  # (tr, tc), clipped to (R, C)

    def t(self) -> Quantized:
        """The transpose, same values and tiles (tiles transposed): (C, R)."""
        return Quantized(self.q.t().contiguous(), self.s.t().contiguous(), (self.tile[1], self.tile[0]))


def quantize(x: Tensor, tile: tuple[int, int], pow2: bool = False) -> Quantized:
    R, C = x.shape
    tr, tc = min(tile[0], R), min(tile[1], C)  # a tile longer than the tensor covers the whole dimension
    nr, nc = -(-R // tr), -(-C // tc)
    xf = x.float().contiguous()
    if nr * tr != R or nc * tc != C:  # edge tiles: zero padding changes no amax
        xf = F.pad(xf, (0, nc * tc - C, 0, nr * tr - R))
    blocks = xf.view(nr, tr, nc, tc)  # (nr, tr, nc, tc)
    amax = blocks.abs().amax(dim=3).amax(dim=1)  # (nr, nc); two 1-D reductions beat one 2-D one on CPU
    # float64 division as torchao does, so that tensorwise scales match it bit for bit
    inv = (E4M3_MAX / amax.double().clamp_min(AMAX_EPS)).float()  # (nr, nc) quantization multipliers
    if pow2:
        inv = torch.exp2(torch.floor(torch.log2(inv)))
    q = (blocks * inv[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)  # (nr, tr, nc, tc)
    q = q.reshape(nr * tr, nc * tc)[:R, :C]  # (R, C)
    return Quantized(q.contiguous(), inv.reciprocal(), (tr, tc))


def quantize_blockwise(x: Tensor, tile: tuple[int, int], pow2: bool = False) -> tuple[Tensor, Tensor]:
    """Quantize a 2-D tensor to E4M3 with one scale per ``tile`` (rows, cols); edge tiles may be smaller.

    Returns ``(q, scales)``: q (R, C) float8_e4m3fn, scales (ceil(R/tr), ceil(C/tc)) float32 with
    ``x ~ q * scale`` and ``scale = amax(tile) / 448``. A tile dimension longer than the tensor's means one
    scale along it (``tile=x.shape``: per-tensor scaling).
    """
    qt = quantize(x, tile, pow2)
    return qt.q, qt.s


def dequantize_blockwise(q: Tensor, scales: Tensor, tile: tuple[int, int]) -> Tensor:
    """Float32 values (R, C) of ``quantize_blockwise(x, tile)`` (the tile as given to it)."""
    (R, C), (nr, nc) = q.shape, scales.shape
    tr, tc = min(tile[0], R), min(tile[1], C)
    qf = q.float()
    if nr * tr != R or nc * tc != C:
        qf = F.pad(qf, (0, nc * tc - C, 0, nr * tr - R))
    x = qf.view(nr, tr, nc, tc) * scales[:, None, :, None]  # (nr, tr, nc, tc)
    return x.view(nr * tr, nc * tc)[:R, :C]  # (R, C)


def dequantize(qt: Quantized) -> Tensor:
    return dequantize_blockwise(qt.q, qt.s, qt.tile)


# ---------------------------------------------------------------------------------------------------------
# GEMMs: C = A @ B^T with A (M, K), B (N, K) quantized in tiles of the same length along K
# ---------------------------------------------------------------------------------------------------------

BLOCKWISE_BLOCK = 128  # the only block length torch._scaled_mm's block-wise scales take
# (mat1, mat2) block-wise scale pairs used here, of those torch._scaled_mm accepts: forward and dgrad
# (activations or gradients 1x128, weight 128x128) and wgrad (both 1x128). torch also accepts
# (128x128, 1x128); nothing here produces it, so the probe does not vouch for it and it takes the loop.
_BLOCKWISE_PAIRS = (("1x128", "128x128"), ("1x128", "1x128"))
_PROBE_TOLERANCE = 1e-3  # relative error a correct single call stays far below (~1e-6); wrong layouts give ~1

GEMM_FORMS = ("blockwise", "per-block", "tensorwise", "emulate")
"""What :func:`gemm_form` reports: "blockwise": one ``torch._scaled_mm`` per GEMM with block-wise scales
(cuBLASLt, CUDA sm90); "per-block": one ``_scaled_mm`` per contraction block with row/column scales;
"tensorwise": one ``_scaled_mm`` per GEMM with per-tensor scales; "emulate": quantize-dequantize and a
float32 matmul."""


class BlockwiseLayout(NamedTuple):
    """How the single block-wise call's operands are laid out, as the probe found torch to accept them."""

    padded_ld: bool  # 128x128 scales' row stride rounded up to a multiple of 4 (some torch versions)
    align: int  # M, N and K zero-padded to a multiple of this (torch checks 16)


_LAYOUTS = (BlockwiseLayout(False, 16), BlockwiseLayout(True, 16),
            BlockwiseLayout(False, 128), BlockwiseLayout(True, 128))  # tried in this order


class GemmProbe(NamedTuple):
    """What the probe found on one device for block-wise scaling."""

    form: str  # "blockwise", "per-block" or "emulate"
    reason: str  # why not the single block-wise call ("" when it runs)
    layout: BlockwiseLayout | None  # the single call's layout (form "blockwise" only)


def _device_key(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _failure(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _nrel(got: Tensor, want: Tensor) -> float:
    """||got - want|| / ||want|| in float64; inf when got is not finite."""
    got, want = got.double(), want.double()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _probe_rowwise(device: str) -> str:
    """"" when _scaled_mm runs E4M3 GEMMs with row-wise scales, float32 output on ``device``; else why not."""
    try:
        a = torch.ones(16, 32, device=device).to(E4M3)  # (M, K)
        b = torch.ones(16, 32, device=device).to(E4M3)  # (N, K)
        ones_m = torch.ones(16, 1, device=device)
        out = torch._scaled_mm(a, b.t(), scale_a=ones_m, scale_b=ones_m.t().contiguous(),
                               out_dtype=torch.float32)  # (M, N) rowwise scales, float32 out: what we use
        if not bool((out == 32).all()):
            return f"torch._scaled_mm gave a wrong row-wise result on {device}"
        return ""
    except Exception as e:  # noqa: BLE001 - any failure means "does not run here"; the reason says which
        return f"torch._scaled_mm does not run on {device}: {_failure(e)}"


def _probe_operands(device: str) -> list[tuple[Quantized, Quantized]]:
    """Small random block-wise GEMMs, one per pair used: ragged M, N, K (3 contraction blocks, the last one
    partial; 2 weight block rows) and scales spread over 2^-6..2^6, so that any mislaid scale shows."""
    g = torch.Generator().manual_seed(0)

    def operand(rows: int, cols: int, tile: tuple[int, int]) -> Quantized:
        tr, tc = min(tile[0], rows), min(tile[1], cols)
        q = ((torch.rand(rows, cols, generator=g) * 2 - 1) * E4M3_MAX).to(E4M3)
        s = torch.exp2(torch.randint(-6, 7, (-(-rows // tr), -(-cols // tc)), generator=g).float())
        return Quantized(q.to(device), s.to(device), (tr, tc))

    M, N, K = 40, 160, 320
    act, blk = (1, BLOCKWISE_BLOCK), (BLOCKWISE_BLOCK, BLOCKWISE_BLOCK)
    x = operand(M, K, act)
    return [(x, operand(N, K, blk)), (x, operand(N, K, act))]  # (1x128, 128x128), (1x128, 1x128)


def _probe_blockwise(device: str, layout: BlockwiseLayout) -> str:
    """"" when one block-wise _scaled_mm in ``layout`` gives the emulation's result on ``device``; else why."""
    try:
        for a, b in _probe_operands(device):
            pair = _blockwise_pair(a, b)
            want = dequantize(a).double() @ dequantize(b).double().t()  # float64: no TF32 in the reference
            err = _nrel(_gemm_blockwise(a, b, pair, layout), want)
            if not err < _PROBE_TOLERANCE:
                return (f"gave wrong block-wise results ({pair[0]} x {pair[1]} scales, checked against "
                        "the emulation)")
        return ""
    except Exception as e:  # noqa: BLE001 - any failure means "not this layout"; the reason says which
        return f"refused block-wise scales: {_failure(e)}"


@functools.cache
def _probe_gemm(device: str) -> GemmProbe:
    """Which FP8 GEMM form runs on ``device`` (a normalized device string), tried once per device."""
    reason = _probe_rowwise(device)
    if reason:
        return GemmProbe("emulate", reason, None)
    failures: list[str] = []
    for layout in _LAYOUTS:
        why = _probe_blockwise(device, layout)
        if not why:
            return GemmProbe("blockwise", "", layout)
        if why not in failures:
            failures.append(why)
    return GemmProbe("per-block", "torch._scaled_mm " + "; ".join(failures), None)


def gemm_probe(device: str | torch.device) -> GemmProbe:
    """The probe's finding for ``device`` (cached per device): form, reason and the single call's layout."""
    return _probe_gemm(_device_key(device))


def fp8_available(device: str | torch.device) -> bool:
    """Whether real FP8 GEMMs (``torch._scaled_mm``, E4M3, row-wise scales, float32 output) run on ``device``."""
    return gemm_probe(device).form != "emulate"


def _mm_align(device: torch.device) -> int:
    """Multiple that _scaled_mm needs every dimension padded to: none on CPU, 16 on GPUs."""
    return 1 if device.type == "cpu" else 16


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_fp8(q: Tensor, rows: int, cols: int) -> Tensor:
    if q.shape == (rows, cols):
        return q
    out = torch.zeros(rows, cols, dtype=q.dtype, device=q.device)
    out[: q.shape[0], : q.shape[1]] = q
    return out


def _blockwise_kinds(qt: Quantized) -> tuple[str, ...]:
    """The block-wise scale types of torch._scaled_mm whose grouping ``qt``'s tiles have ("1x128", "128x128"),
    none unless the tiles are 128 long along the contraction (columns) and there is more than one of them."""
    R, (tr, tc) = qt.q.shape[0], qt.tile
    if tc != BLOCKWISE_BLOCK or qt.s.shape[1] < 2:
        return ()
    kinds = ("1x128",) if tr == 1 else ()
    if tr == BLOCKWISE_BLOCK or tr == R <= BLOCKWISE_BLOCK:  # a clipped tile: one block row
        kinds += ("128x128",)
    return kinds


def _blockwise_pair(a: Quantized, b: Quantized) -> tuple[str, str] | None:
    """The (mat1, mat2) block-wise scale pair for C = A @ B^T, or None when the single call cannot take it."""
    ka, kb = _blockwise_kinds(a), _blockwise_kinds(b)
    return next((p for p in _BLOCKWISE_PAIRS if p[0] in ka and p[1] in kb), None)


def _blockwise_scale(qt: Quantized, kind: str, rows: int, padded_ld: bool) -> Tensor:
    """qt's scales laid out as torch._scaled_mm checks them for qt's values zero-padded to ``rows`` rows.

    1x128: (rows, nK), column-major (stride (1, rows)), the padded rows' scales 1.0. 128x128: (nR, nK),
    row-major with row stride nK, or round_up(nK, 4) when ``padded_ld``; padding the rows to a multiple of 16
    or 128 never adds a block row.
    """
    s = qt.s  # (R, nK) for 1x128 tiles, (nR, nK) for 128x128 blocks, float32 contiguous
    if kind == "1x128":
        out = s.new_ones(s.shape[1], rows)  # (nK, rows)
        out[:, : s.shape[0]] = s.t()
        return out.t()  # (rows, nK), strides (1, rows)
    nr, nk = s.shape
    if nr != -(-rows // BLOCKWISE_BLOCK):
        raise AssertionError(f"128x128 scales {tuple(s.shape)} do not fit {rows} rows")
    ld = _round_up(nk, 4) if padded_ld else nk
    if ld == nk:
        return s.contiguous()
    out = s.new_ones(nr, ld)
    out[:, :nk] = s
    return out[:, :nk]  # (nR, nK), strides (ld, 1)


def _gemm_blockwise(a: Quantized, b: Quantized, pair: tuple[str, str], layout: BlockwiseLayout) -> Tensor:
    """Real FP8 in ONE torch._scaled_mm with block-wise scales (cuBLASLt, CUDA sm90): float32 (M, N).

    mat1 is A (Mp, Kp) row-major, mat2 is B^T (Kp, Np) column-major; torch checks scale_a against mat1 and
    scale_b.t() against mat2.t() = B (Np, Kp), so scale_b is B's scales in B's layout, transposed.
    """
    (M, K), N = a.q.shape, b.q.shape[0]
    Mp, Np, Kp = (_round_up(n, layout.align) for n in (M, N, K))  # zeros add nothing, 1.0 scales on them
    aq, bq = _pad_fp8(a.q, Mp, Kp), _pad_fp8(b.q, Np, Kp)
    sa = _blockwise_scale(a, pair[0], Mp, layout.padded_ld)
    sb = _blockwise_scale(b, pair[1], Np, layout.padded_ld).t()
    out = torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)  # (Mp, Np)
    return out[:M, :N]


def _gemm_scaled_mm(a: Quantized, b: Quantized) -> Tensor:
    """Real FP8: the single block-wise call where the probe found it right on this device, else one
    _scaled_mm per contraction block with row/column scales, partial products accumulated in float32."""
    (M, K), N, tk = a.q.shape, b.q.shape[0], a.tile[1]
    if a.s.numel() == 1 and b.s.numel() == 1 and _mm_align(a.q.device) == 1:  # tensorwise: one GEMM
        return torch._scaled_mm(a.q, b.q.t(), scale_a=a.s.reshape(()), scale_b=b.s.reshape(()),
                                out_dtype=torch.float32)  # (M, N)
    pair = _blockwise_pair(a, b)
    if pair is not None:
        probe = gemm_probe(a.q.device)
        if probe.layout is not None:
            return _gemm_blockwise(a, b, pair, probe.layout)
    align = _mm_align(a.q.device)
    Mp, Np, Kp = (_round_up(n, align) for n in (M, N, K))
    aq, bq = _pad_fp8(a.q, Mp, Kp), _pad_fp8(b.q, Np, Kp)  # (Mp, Kp), (Np, Kp): zeros add nothing
    sa = F.pad(a.s.repeat_interleave(a.tile[0], dim=0)[:M], (0, 0, 0, Mp - M), value=1.0)  # (Mp, nK)
    sb = F.pad(b.s.repeat_interleave(b.tile[0], dim=0)[:N], (0, 0, 0, Np - N), value=1.0)  # (Np, nK)
    out = None
    for kb in range(a.s.shape[1]):
        ks = slice(kb * tk, min((kb + 1) * tk, Kp))  # the last block also takes the alignment padding
        part = torch._scaled_mm(aq[:, ks], bq[:, ks].t(), scale_a=sa[:, kb : kb + 1].contiguous(),
                                scale_b=sb[:, kb].reshape(1, Np).contiguous(), out_dtype=torch.float32)
        out = part if out is None else out.add_(part)  # (Mp, Np) float32 accumulation across blocks
    return out[:M, :N]


def gemm(a: Quantized, b: Quantized, backend: str) -> Tensor:
    """(M, N) float32 = A @ B^T from A (M, K) and B (N, K), both tiled along K with the same tile length."""
    if backend == "scaled_mm":
        return _gemm_scaled_mm(a, b)
    return dequantize(a) @ dequantize(b).t()  # emulate: the same E4M3 values, a float32 matmul
