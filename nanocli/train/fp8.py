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

Two backends, one switch (``FP8Recipe.backend``)
    ``scaled_mm``: real FP8 GEMMs, ``torch._scaled_mm`` on E4M3 operands with row/column scales, one call
    per contraction block (a single call for tensorwise). It runs on this CPU and on CUDA sm89+ GPUs.
    ``emulate``: the same quantized E4M3 values dequantized to float32 and multiplied with a plain matmul.
    Both see identical quantized operands, so they differ only by float32 summation order (~1e-6 relative;
    the tests check it). ``auto`` picks ``scaled_mm`` where :func:`fp8_available` says it runs.

torchao
    ``torchao.float8`` (Float8Linear's autograd Function) runs forward and backward on CPU, with real
    ``_scaled_mm`` or its own emulation, and its cast configs can force E4M3 for every operand, so the
    tensorwise option uses it when torchao is installed (it is optional; :class:`_FP8LinearFn` computes the
    same thing without it and the tests hold the two together). Its block-wise training
    (``torchao.prototype.blockwise_fp8_training``) needs triton kernels, i.e. a GPU, so block-wise is
    implemented here. On a GPU the per-block ``_scaled_mm`` loop is correct but slow; fused block-scaled
    kernels are the place for speed there.
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

@functools.cache
def _probe_scaled_mm(device: str) -> bool:
    try:
        a = torch.ones(16, 32, device=device).to(E4M3)  # (M, K)
        b = torch.ones(16, 32, device=device).to(E4M3)  # (N, K)
        ones_m = torch.ones(16, 1, device=device)
        out = torch._scaled_mm(a, b.t(), scale_a=ones_m, scale_b=ones_m.t().contiguous(),
                               out_dtype=torch.float32)  # (M, N) rowwise scales, float32 out: what we use
        return bool((out == 32).all())
    except (RuntimeError, TypeError, AttributeError, NotImplementedError, ValueError):
        return False


def fp8_available(device: str | torch.device) -> bool:
    """Whether real FP8 GEMMs (``torch._scaled_mm``, E4M3, row-wise scales, float32 output) run on ``device``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _probe_scaled_mm(str(device))


def _mm_align(device: torch.device) -> int:
    """Multiple that _scaled_mm needs every dimension padded to: none on CPU, 16 on GPUs."""
    return 1 if device.type == "cpu" else 16


def _pad_fp8(q: Tensor, rows: int, cols: int) -> Tensor:
    if q.shape == (rows, cols):
        return q
    out = torch.zeros(rows, cols, dtype=q.dtype, device=q.device)
    out[: q.shape[0], : q.shape[1]] = q
    return out


def _gemm_scaled_mm(a: Quantized, b: Quantized) -> Tensor:
    """Real FP8: one _scaled_mm per contraction block, partial products accumulated in float32."""
    (M, K), N, tk = a.q.shape, b.q.shape[0], a.tile[1]
    if a.s.numel() == 1 and b.s.numel() == 1 and _mm_align(a.q.device) == 1:  # tensorwise: one GEMM
        return torch._scaled_mm(a.q, b.q.t(), scale_a=a.s.reshape(()), scale_b=b.s.reshape(()),
                                out_dtype=torch.float32)  # (M, N)
    align = _mm_align(a.q.device)
    Mp, Np, Kp = (-(-n // align) * align for n in (M, N, K))
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


def convert_to_fp8(model: nn.Module, recipe: FP8Recipe) -> dict[str, list[str]]:
    """Swap the ``nn.Linear`` modules of ``model.backbone.layers`` for FP8Linear, in place.

    The first and last ``recipe.keep_high_precision`` layers holding a Linear stay as they are, and so do the
    embeddings and lm_head. Parameters are shared, not copied, so optimizers and checkpoints are unaffected.
    Returns ``{"fp8": [module names], "high_precision": [names of the Linears left as they are]}``.
    """
    layers = getattr(getattr(model, "backbone", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError("convert_to_fp8 needs a model with backbone.layers (a NanoForCausalLM)")
    if recipe.backend == "scaled_mm":
        device = next(model.parameters()).device
        if not fp8_available(device):
            raise ConfigError(f"fp8 backend 'scaled_mm': torch._scaled_mm does not run on {device}; "
                              "use backend 'auto' or 'emulate'")
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
            "high_precision": [name for name, m in linears if not isinstance(m, FP8Linear)]}
