"""FP8 training GEMMs: the Nemotron Nano 2 recipe (docs/REFERENCE.md §4) and Nemotron-H's per-tensor option.

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

Layout: this module holds the recipe, the Linear's autograd Function and the model conversion;
``fp8_gemm.py`` the tile quantization, the GEMM forms and the probe (re-exported here).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanocli_model.errors import ConfigError

from .fp8_gemm import (  # noqa: F401  (re-exported: the quantization and GEMM API of FP8 training)
    BLOCKWISE_BLOCK,
    E4M3,
    E4M3_MAX,
    FULL,
    GEMM_FORMS,
    BlockwiseLayout,
    GemmProbe,
    Quantized,
    dequantize,
    dequantize_blockwise,
    fp8_available,
    gemm,
    gemm_probe,
    quantize,
    quantize_blockwise,
)

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
# Which GEMM form a recipe takes (the probe itself is in fp8_gemm.py)
# ---------------------------------------------------------------------------------------------------------

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
            qw = quantize(weight, blk, pow2)
            y = gemm(quantize(x, act, pow2), qw, backend).to(x.dtype)  # (M, N)
            # wgrad contracts over tokens: keep x^T (K, M) in E4M3, tiled along M (DeepSeek's 128x1 tiles of x)
            qxt = quantize(x.t(), act, pow2) if need_wgrad else None
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
                gx = gemm(quantize(gy, act, pow2), qw.t(), backend).to(x_dtype)  # (M, N) x (K, N) -> (M, K)
            if ctx.needs_input_grad[1]:  # wgrad: contraction over M (tokens)
                qxt = Quantized(saved[2], saved[3], xttile)  # (K, M)
                gw = gemm(quantize(gy.t(), act, pow2), qxt, backend).to(w_dtype)  # (N, M) x (K, M) -> (N, K)
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


@dataclass(frozen=True)
class FP8Conversion:
    """What ``convert_to_fp8`` did: the Linears in FP8 and in high precision (module names), and how the FP8
    GEMMs run on the model's device (``gemm_form``: one of GEMM_FORMS; ``gemm``: in words, with the reason when
    that is less than the best form; an emulation is always named as one)."""

    fp8: list[str]
    high_precision: list[str]
    gemm_form: str
    gemm: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def convert_to_fp8(model: nn.Module, recipe: FP8Recipe) -> FP8Conversion:
    """Swap the ``nn.Linear`` modules of ``model.backbone.layers`` for FP8Linear, in place.

    The first and last ``recipe.keep_high_precision`` layers holding a Linear stay as they are, and so do the
    embeddings and lm_head. Parameters are shared, not copied, so optimizers and checkpoints are unaffected.
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
    return FP8Conversion(fp8=[name for name, m in linears if isinstance(m, FP8Linear)],
                         high_precision=[name for name, m in linears if not isinstance(m, FP8Linear)],
                         gemm_form=gemm_form(device, recipe), gemm=describe_gemm(device, recipe))
