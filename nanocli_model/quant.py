"""Weight-only int8 for CPU decode: the projection weights in int8 with one float32 scale per output channel.

``quantize_int8(model)`` replaces every projection ``nn.Linear`` (Mamba in/out_proj, attention q/k/v/o, MLP
up/down, and lm_head unless it is tied to the embeddings) by an ``Int8Linear``: symmetric, per output channel,
``scale = max|W_row| / 127``, ``q = round(W / scale)`` in [-127, 127]. Embeddings, norms, conv1d and the SSM
parameters stay in the model's float dtype; activations stay float32.

The matmul, chosen by measurement (docs/BENCHMARKS.md "int8 weight-only decode", 2-core AVX2 CPU, 1 thread):

* one to ``GEMV_ROWS`` rows (decode): ``torch._weight_int8pack_mm`` with the input cast to bf16 (its fp32-input
  kernel is ~10x slower here; the bf16 one reads the int8 weights at 1 byte each), output back to float32;
* more rows (prefill): dequantize to float32 and one MKL GEMM (the int8 kernel is 1.4-2.4x slower there).

Not used: torchao's ``Int8WeightOnlyConfig`` (0.18: 1.5-10x slower than fp32 here) and inductor's lowering of a
compiled ``(x * q.float()).sum(-1) * s`` (8-lane partial int8 loads: ~10x slower than fp32). Under
``CompiledDecode`` the int8 kernel runs as an extern call inside the compiled step.

Saved models (``checkpoint.save_pretrained``) store ``<name>.weight`` as I8 and ``<name>.weight_scale`` as F32,
with ``quantization_config`` = ``{"quant_method": "nano-int8", ...}`` in config.json; ``load_pretrained`` reads
them back as they are (no re-quantization).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

QUANT_METHOD = "nano-int8"
GEMV_ROWS = 8  # up to this many rows the int8 kernel is faster than dequantize + GEMM (measured: 1-4 yes, 16 no)
PROJECTIONS = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


class Int8Linear(nn.Module):
    """``y = (x @ q^T) * scale + bias`` with q (out, in) int8 and scale (out,) float32 (``weight_scale``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._scale_bf16: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype,
                  linear.weight.device)
        q, scale = quantize_rows(w)
        out.weight, out.weight_scale = q, scale
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return out

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the int8 values stand for: q * scale per row."""
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > GEMV_ROWS or x.device.type != "cpu":
            return F.linear(x, self.dequantized().to(x.dtype), self.bias)
        if self._scale_bf16 is None or self._scale_bf16.device != self.weight_scale.device:
            self._scale_bf16 = self.weight_scale.to(torch.bfloat16)
        y = torch._weight_int8pack_mm(x.reshape(rows, self.in_features).to(torch.bfloat16), self.weight,
                                      self._scale_bf16)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y.add_(self.bias)

    def _load_from_state_dict(self, *args, **kwargs):
        self._scale_bf16 = None  # a new scale: the bf16 copy is made again at the next call
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8, scale float32) with w ~ q * scale[:, None]; an all-zero row gets scale 1."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantized_names(model: nn.Module, lm_head: bool = True) -> list[str]:
    """Module names of the Linears int8 covers: the projections, and lm_head when asked and not tied."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, Int8Linear)) and n.rsplit(".", 1)[-1] in PROJECTIONS]
    if lm_head and not model.config.tie_word_embeddings:
        names.append("lm_head")
    return names


def quantization_config(lm_head: bool) -> dict:
    """The config.json entry of a saved int8 model."""
    return {"quant_method": QUANT_METHOD, "bits": 8, "symmetric": True, "granularity": "per-channel",
            "modules": list(PROJECTIONS) + (["lm_head"] if lm_head else []), "activations": "float32"}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def quantize_int8(model: nn.Module, lm_head: bool = True) -> nn.Module:
    """Replace the projections (and lm_head) of ``model`` by ``Int8Linear`` in place, layer by layer (the float
    weight of each is freed as soon as it is replaced). Records ``quantization_config`` in ``model.config``."""
    if model.device.type != "cpu":
        raise ConfigError(f"int8 weights run on the CPU only (torch._weight_int8pack_mm); the model is on "
                          f"{model.device.type}: use --device cpu or --dtype bf16")
    for name in quantized_names(model, lm_head):
        linear = model.get_submodule(name)
        if isinstance(linear, nn.Linear):
            _replace(model, name, Int8Linear.from_linear(linear))
    model.config = model.config.replace(extra={**model.config.extra,
                                               "quantization_config": quantization_config(lm_head)})
    return model


def stored_int8(config) -> dict | None:
    """The config's ``quantization_config`` when it is nano's int8; ConfigError for another method."""
    qc = config.extra.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ConfigError(f"quantization_config: quant_method {method!r} is not supported; nano reads "
                          f"{QUANT_METHOD!r} (saved by `nano generate --dtype int8 --save-quantized DIR`)")
    return qc


def int8_skeleton(model: nn.Module, qc: dict) -> None:
    """Turn a (meta-device) model into the layout a saved int8 model has: Int8Linear where ``qc`` says."""
    for name in quantized_names(model, "lm_head" in qc.get("modules", ())):
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear):
            _replace(model, name, Int8Linear(m.in_features, m.out_features, m.bias is not None,
                                             m.weight.dtype, m.weight.device))


def is_int8(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
