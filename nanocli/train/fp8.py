"""FP8 training GEMMs: the Nemotron Nano 2 recipe (REFERENCE.md §4) and Nemotron-H's per-tensor option.

The recipe
    Every GEMM operand of a Linear, in forward *and* backward, is E4M3 (``torch.float8_e4m3fn``, max 448):
    activations, weights and gradients alike (no E5M2). Scaling is DeepSeek-V3's block-wise scheme: weights
    in 128x128 blocks, activations and gradients in 1x128 tiles along the GEMM's contraction dimension, one
    float32 scale per block (scale = amax / 448, optionally rounded to a power of two). The three GEMMs of a
    Linear ``y = x W^T`` (x: (M tokens, K), W: (N, K)) are

        forward  y  = x  @ W^T   contraction over K: x in 1x128 tiles, W in 128x128 blocks
        dgrad    gx = gy @ W     contraction over N: gy in 1x128 tiles, W's blocks transposed
        wgrad    gW = gy^T @ x   contraction over M: gy and x in 128x1 tiles (128 tokens of one column)

    Each GEMM is a sum over 128-wide contraction blocks kb of ``diag(sa[:, kb]) (A_kb @ B_kb^T) diag(sb[:, kb])``
    accumulated in float32: DeepSeek's "promote to fp32 every 128 elements". The first and last
    ``keep_high_precision`` GEMM-holding layers (2 in the report's launch scripts), the embeddings and the
    lm_head stay in high precision; master weights and optimizer state stay float32 (see ``optim.py``).
    ``scaling="tensorwise"`` is Nemotron-H's per-tensor current scaling instead: one scale per tensor from its
    current amax (that paper kept 4 layers at each end in BF16; set ``keep_high_precision=4``).

Backends (``FP8Recipe.backend``) and the three forms of a real FP8 GEMM
    ``scaled_mm``: real FP8 GEMMs, ``torch._scaled_mm`` on E4M3 operands, in one of three forms:
    "blockwise", ONE call per GEMM with block-wise scales (1x128 x 128x128 for forward and dgrad, 1x128 x
    1x128 for wgrad; cuBLASLt on CUDA sm90 with CUDA >= 12.9, block 128 only); "per-block", one call per
    128-wide contraction block with row/column scales, accumulated in float32 (any device where row-wise
    ``_scaled_mm`` runs: this CPU, CUDA sm89+); "tensorwise", one call per GEMM with per-tensor scales.
    ``emulate``: the same quantized E4M3 values dequantized to float32 and multiplied with a plain matmul.
    All see identical quantized operands, so they differ only by float32 summation order (~1e-6 relative;
    the tests check it). ``auto`` picks ``scaled_mm`` where :func:`fp8_available` says it runs.

    Which form runs is decided by a probe, once per device (:func:`gemm_probe`, :func:`gemm_form`,
    :func:`gemm_reason`, :func:`describe_gemm`): row-wise ``_scaled_mm`` with float32 output must run (else
    "emulate"), and the single block-wise call must give the emulation's result on a small random GEMM with
    several contraction blocks, ragged sizes and scales spread over 2^-6..2^6, for each scale pair used (else
    "per-block", with torch's refusal or "wrong results" as the reason). Layouts are tried in turn, 128x128
    scales with a plain or a 4-padded row stride, sizes padded to 16 or 128, and the first one that is right
    is the one used, so a wrong layout never runs. ``convert_to_fp8`` returns the form and reason ("gemm"),
    so an emulation on a GPU is never silent. On this CPU torch refuses block-wise scales ("Invalid scaling
    configuration"), so the CPU runs the per-block loop; the tests check the single call's layouts against a
    stand-in ``_scaled_mm`` that enforces torch's checks.

torchao
    ``torchao.float8`` (Float8Linear's autograd Function) runs forward and backward on CPU, with real
    ``_scaled_mm`` or its own emulation, and its cast configs can force E4M3 for every operand, so the
    tensorwise option uses it when torchao is installed (it is optional; :class:`_FP8LinearFn` computes the
    same thing without it and the tests hold the two together). Its block-wise training
    (``torchao.prototype.blockwise_fp8_training``) needs triton kernels, i.e. a GPU, so block-wise is
    implemented here: the single block-wise ``_scaled_mm`` on Hopper, the per-block loop (correct but slower)
    elsewhere.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanocli_model.errors import ConfigError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
AMAX_EPS = 1e-12  # an all-zero tile gets a tiny scale and quantizes to zeros (torchao's guard)
FULL = sys.maxsize  # a tile this long covers the whole dimension (tensorwise: one scale per tensor)

SCALINGS = ("blockwise", "tensorwise")
BACKENDS = ("auto", "scaled_mm", "emulate")


@dataclass(frozen=True)
class FP8Recipe:
    """How FP8 training GEMMs are computed."""

    scaling: str = "blockwise"
    """"blockwise": 1x128 activation/gradient tiles and 128x128 weight blocks (the Nano 2 recipe);
    "tensorwise": one scale per tensor from its current amax (Nemotron-H)."""
    backend: str = "auto"
    """"scaled_mm": real FP8 GEMMs (torch._scaled_mm); "emulate": quantize-dequantize and a float32 matmul;
    "auto": scaled_mm where it runs on the tensors' device, else emulate."""
    keep_high_precision: int = 2
    """The first and last this many GEMM-holding layers stay in high precision (Nano 2: 2; Nemotron-H: 4)."""
    block: int = 128
    """Tile length along the contraction dimension and weight block side (a positive multiple of 16)."""
    pow2_scales: bool = False
    """Round each scale to a power of two (rounding the quantization multiplier down, so nothing overflows)."""

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ConfigError(f"fp8 scaling must be one of {', '.join(SCALINGS)}; got {self.scaling!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"fp8 backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        k = self.keep_high_precision
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"fp8 keep_high_precision must be an integer >= 0; got {k!r}")
        b = self.block
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0 or b % 16:
            raise ConfigError(f"fp8 block must be a positive multiple of 16 (e.g. 128); got {b!r}")
        if not isinstance(self.pow2_scales, bool):
            raise ConfigError(f"fp8 pow2_scales must be true or false; got {self.pow2_scales!r}")


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


def _quantize(x: Tensor, tile: tuple[int, int], pow2: bool = False) -> Quantized:
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
    qt = _quantize(x, tile, pow2)
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


def _dequantize(qt: Quantized) -> Tensor:
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
            want = _dequantize(a).double() @ _dequantize(b).double().t()  # float64: no TF32 in the reference
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


def _gemm_choice(device: str | torch.device, recipe: FP8Recipe | None) -> tuple[str, str]:
    """(form, reason) of the GEMMs ``recipe`` runs on ``device``; the reason is "" for the best form."""
    recipe = recipe if recipe is not None else FP8Recipe()
    if recipe.backend == "emulate":
        return "emulate", "fp8 backend 'emulate' was asked for"
    probe = gemm_probe(device)
    if probe.form == "emulate":
        return "emulate", probe.reason
    if recipe.scaling == "tensorwise":
        return "tensorwise", ""
    if recipe.block != BLOCKWISE_BLOCK:
        return "per-block", (f"fp8 block {recipe.block}: torch._scaled_mm's block-wise scales take "
                             f"{BLOCKWISE_BLOCK}-wide blocks only")
    return probe.form, probe.reason


def gemm_form(device: str | torch.device, recipe: FP8Recipe | None = None) -> str:
    """Which form the FP8 GEMMs of ``recipe`` (default: block-wise, backend auto) take on ``device``: one of
    :data:`GEMM_FORMS`. :func:`gemm_reason` says why when it is not the best one."""
    return _gemm_choice(device, recipe)[0]


def gemm_reason(device: str | torch.device, recipe: FP8Recipe | None = None) -> str:
    """Why :func:`gemm_form` is less than the best form ("" when it is the best)."""
    return _gemm_choice(device, recipe)[1]


def describe_gemm(device: str | torch.device, recipe: FP8Recipe | None = None) -> str:
    """One line for people: the form of ``recipe``'s FP8 GEMMs on ``device``, and why when not the best."""
    recipe = recipe if recipe is not None else FP8Recipe()
    form, reason = _gemm_choice(device, recipe)
    text = {"blockwise": "block-wise single _scaled_mm (cuBLASLt)",
            "per-block": f"per-{recipe.block}-block _scaled_mm loop",
            "tensorwise": "tensorwise single _scaled_mm",
            "emulate": "emulated (quantize-dequantize float32 matmul)"}[form]
    return f"{text}: {reason}" if reason else text


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


def _gemm(a: Quantized, b: Quantized, backend: str) -> Tensor:
    """(M, N) float32 = A @ B^T from A (M, K) and B (N, K), both tiled along K with the same tile length."""
    if backend == "scaled_mm":
        return _gemm_scaled_mm(a, b)
    return _dequantize(a) @ _dequantize(b).t()  # emulate: the same E4M3 values, a float32 matmul


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "scaled_mm" if fp8_available(device) else "emulate"
    return backend


# ---------------------------------------------------------------------------------------------------------
# The Linear's autograd Function
# ---------------------------------------------------------------------------------------------------------

class _FP8LinearFn(torch.autograd.Function):
    """y = x W^T with all three GEMMs in E4M3. ``block=None``: one scale per tensor (tensorwise)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, block: int | None, pow2: bool, backend: str,
                need_wgrad: bool) -> Tensor:
        # x (M, K) in the compute dtype, weight (N, K) the master copy
        act = (1, block) if block else (FULL, FULL)  # 1x128 tiles along the contraction dim
        blk = (block, block) if block else (FULL, FULL)  # 128x128 weight blocks
        with torch.autocast(x.device.type, enabled=False):
            qw = _quantize(weight, blk, pow2)
            y = _gemm(_quantize(x, act, pow2), qw, backend).to(x.dtype)  # (M, N)
            # wgrad contracts over tokens: keep x^T (K, M) in E4M3, tiled along M (DeepSeek's 128x1 tiles of x)
            qxt = _quantize(x.t(), act, pow2) if need_wgrad else None
        saved = (qw.q, qw.s) + ((qxt.q, qxt.s) if qxt is not None else ())
        ctx.save_for_backward(*saved)
        ctx.tiles = (act, qw.tile, qxt.tile if qxt is not None else None)
        ctx.conf = (pow2, backend, x.dtype, weight.dtype)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        # gy (M, N)
        act, wtile, xttile = ctx.tiles
        pow2, backend, x_dtype, w_dtype = ctx.conf
        saved = ctx.saved_tensors
        qw = Quantized(saved[0], saved[1], wtile)  # (N, K)
        gx = gw = None
        with torch.autocast(gy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:  # dgrad: contraction over N
                gx = _gemm(_quantize(gy, act, pow2), qw.t(), backend).to(x_dtype)  # (M, N) x (K, N) -> (M, K)
            if ctx.needs_input_grad[1]:  # wgrad: contraction over M (tokens)
                qxt = Quantized(saved[2], saved[3], xttile)  # (K, M)
                gw = _gemm(_quantize(gy.t(), act, pow2), qxt, backend).to(w_dtype)  # (N, M) x (K, M) -> (N, K)
        return gx, gw, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# torchao's float8 training Function for the tensorwise option
# ---------------------------------------------------------------------------------------------------------

def _torchao_installed() -> bool:
    return importlib.util.find_spec("torchao") is not None


@functools.cache
def _torchao_parts(emulate: bool, pow2: bool):
    """(torchao's matmul Function, an all-E4M3 tensorwise config, its GEMM config), or None without torchao."""
    import logging

    # torchao logs a warning per GPU-only extension it cannot load on import, and torch one per enum it
    # registers: noise on a CPU; silenced for the import only.
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        from torchao.float8.config import CastConfig, Float8LinearConfig, ScalingGranularity, ScalingType
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
        from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig
    except ImportError:
        return None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    e4m3 = CastConfig(ScalingType.DYNAMIC, ScalingGranularity.TENSORWISE, target_dtype=E4M3)  # grads too
    config = Float8LinearConfig(cast_config_input=e4m3, cast_config_weight=e4m3, cast_config_grad_output=e4m3,
                                emulate=emulate, round_scales_to_power_of_2=pow2)
    exact = ScaledMMConfig(emulate, False, False, False)  # (emulate, use_fast_accum, fp8_output, pad_inner_dim)
    return matmul_with_hp_or_float8_args, config, LinearMMConfig(exact, exact, exact)


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------

def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None, recipe: FP8Recipe, use_torchao: bool = False
               ) -> Tensor:
    """``F.linear(x, weight, bias)`` with FP8 GEMMs; output in x's dtype, or the autocast dtype under autocast."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (M, K): leading dims flattened into tokens
    if x2.shape[0] == 0:
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    backend = _resolve_backend(recipe.backend, x.device)
    parts = _torchao_parts(backend == "emulate", recipe.pow2_scales) if use_torchao else None
    with torch.autocast(dev, enabled=False):
        if parts is not None and recipe.scaling == "tensorwise":
            fn, config, mm_config = parts
            y = fn.apply(x2, weight.t(), mm_config, config)  # (M, N) in x2's dtype
        else:
            block = recipe.block if recipe.scaling == "blockwise" else None
            y = _FP8LinearFn.apply(x2, weight, block, recipe.pow2_scales, backend,
                                   torch.is_grad_enabled() and weight.requires_grad)  # (M, N)
        if bias is not None:
            y = y + bias.to(dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., N)


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose GEMMs (forward, dgrad, wgrad) run in E4M3; same parameters and state_dict keys.

    ``use_torchao`` (tensorwise only) routes through torchao's float8 Function; it defaults to True when
    torchao is installed.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 recipe: FP8Recipe | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe if recipe is not None else FP8Recipe()
        self.use_torchao = self.recipe.scaling == "tensorwise" and _torchao_installed()

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: FP8Recipe) -> FP8Linear:
        """An FP8Linear holding ``linear``'s own Parameter objects (no copy)."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False, recipe=recipe)
        new.weight, new.bias = linear.weight, linear.bias
        return new.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.bias, self.recipe, self.use_torchao)

    def extra_repr(self) -> str:
        r = self.recipe
        impl = ", torchao" if self.use_torchao else ""
        return f"{super().extra_repr()}, fp8={r.scaling}/{r.backend}, block={r.block}{impl}"


def _to_linear(module: FP8Linear) -> nn.Linear:
    with torch.device("meta"):
        lin = nn.Linear(module.in_features, module.out_features, bias=False)
    lin.weight, lin.bias = module.weight, module.bias
    return lin.train(module.training)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def revert_fp8(model: nn.Module) -> None:
    """Every FP8Linear back to a plain ``nn.Linear`` holding the same parameters (for saving and eval)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FP8Linear):
            _replace(model, name, _to_linear(module))


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def convert_to_fp8(model: nn.Module, recipe: FP8Recipe) -> dict[str, list[str] | str]:
    """Swap the ``nn.Linear`` modules of ``model.backbone.layers`` for FP8Linear, in place.

    The first and last ``recipe.keep_high_precision`` layers holding a Linear stay as they are, and so do the
    embeddings and lm_head. Parameters are shared, not copied, so optimizers and checkpoints are unaffected.
    Returns ``{"fp8": [module names], "high_precision": [names of the Linears left as they are],
    "gemm_form": one of GEMM_FORMS, "gemm": how the FP8 GEMMs run on the model's device}``; "gemm" says
    why when that is less than the best form, and an emulation (backend "auto" where no FP8 GEMM runs) is
    always named as one, with the reason.
    """
    layers = getattr(getattr(model, "backbone", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError("convert_to_fp8 needs a model with backbone.layers (a NanoForCausalLM)")
    device = _model_device(model)
    if recipe.backend == "scaled_mm":
        if not fp8_available(device):
            why = gemm_probe(device).reason
            raise ConfigError(f"fp8 backend 'scaled_mm': torch._scaled_mm does not run on {device}"
                              f"{f' ({why})' if why else ''}; use backend 'auto' or 'emulate'")
    revert_fp8(model)
    gemm_layers = [i for i, layer in enumerate(layers) if any(isinstance(m, nn.Linear) for m in layer.modules())]
    n = recipe.keep_high_precision
    keep = set(gemm_layers[:n]) | set(gemm_layers[len(gemm_layers) - n:] if n else [])
    for i in gemm_layers:
        if i in keep:
            continue
        for name, module in list(layers[i].named_modules()):
            if type(module) is nn.Linear:  # exact type: subclasses (adapters, ...) are left alone
                _replace(layers[i], name, FP8Linear.from_linear(module, recipe))
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {"fp8": [name for name, m in linears if isinstance(m, FP8Linear)],
            "high_precision": [name for name, m in linears if not isinstance(m, FP8Linear)],
            "gemm_form": gemm_form(device, recipe), "gemm": describe_gemm(device, recipe)}
