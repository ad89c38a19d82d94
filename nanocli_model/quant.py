"""int8 for CPU decode: the projection weights in int8 with one float32 scale per output channel.

``quantize_int8(model)`` replaces every projection ``nn.Linear`` (Mamba in/out_proj, attention q/k/v/o, MLP
up/down, and lm_head unless it is tied to the embeddings) by an ``Int8Linear``: symmetric, per output channel,
``scale = max|W_row| / 127``, ``q = round(W / scale)`` in [-127, 127]. Embeddings, norms, conv1d and the SSM
parameters stay in the model's float dtype, and so does everything between the projections.

The matmul, chosen by measurement (docs/BENCHMARKS.md "int8 decode", 2-core AVX2 CPU, 1 thread):

* one to ``GEMV_ROWS`` rows (decode): nano's own int8 GEMV (``row_gemv.row_gemv_q8``, ``csrc/row_gemv.cpp``) on the
  plain row-major int8 values: each input row rounded to 16 bits at its own scale, multiplied in int16 pairs and
  summed in int32, so decode is weight-only int8 to within 1e-4 of the input's largest entry. It reads medium's
  int8 matrices at 11-13 GB/s, faster than fbgemm's dynamic int8 GEMM (8-11 GB/s), and an ahead-of-time decode
  step calls it directly (``aot_decode.AotDecode``, nano generate's CPU default). Where that library cannot be
  built (no C++ compiler, not x86-64 Linux, ``NANO_ROW_GEMV=0``): fbgemm's dynamic int8 GEMM
  (``torch.ops.quantized.linear_dynamic`` on the weights packed once by ``linear_prepack``), which quantizes the
  input too, to 7-bit uint8 with one scale and zero point per call, so decode is then W8A8 (~1.5-2% output
  error per layer vs ~0.5-0.8% weight-only); without fbgemm, ``torch._weight_int8pack_mm`` on a bf16 input
  (weight-only, 1.1-1.5x fp32 here: compute-bound);
* more rows (prefill): dequantize to float32 and one MKL GEMM (weight-only: the prompt's numerics stay fp32's).

Quantizing the input to 7 bits per call (fbgemm) costs most where a few input channels are far larger than the
rest (the MLP's down_proj reads relu^2 outputs: max/median 10-35 on the trained demo model). So the input is
smoothed first, as
in SmoothQuant (Xiao et al., 2023): each Linear keeps a per-input-channel divisor ``smooth`` and computes
``(x / smooth) @ (W * smooth)^T``, the product unchanged, with ``smooth_j = max|x_j|^alpha / max|W_:,j|^(1 -
alpha)`` (``SMOOTH_ALPHA``) from the fp32 model's inputs on a fixed calibration batch (``CALIBRATION``: random
token ids, seed 0, so any checkpoint quantizes the same way without data). On the demo's trained model, greedy
agreement with fp32 over 128 tokens went from ~91% to ~97.5% (docs/BENCHMARKS.md "int8 decode"). The
calibration is one fp32 prefill of 4,096 tokens at load; a ``--save-quantized`` directory skips it.

Not used: torchao's ``Int8WeightOnlyConfig`` (0.18: 1.5-10x slower than fp32 here), ``torch._int_mm`` (int8 x
int8, ~200x slower than fp32 at decode shapes), and inductor's lowering of a compiled ``(x * q.float()).sum(-1)
* s`` (8-lane partial int8 loads: ~10x slower than fp32). Under ``CompiledDecode`` the fbgemm call runs as an
opaque custom op (``nano::int8_gemv``) inside the compiled step. The smoothing divisors stay with nano's GEMV
(the product is unchanged; a 16-bit input needs none), so a saved model decodes either way.

Saved models (``checkpoint.save_pretrained``) store ``<name>.weight`` as I8, ``<name>.weight_scale`` and
``<name>.smooth`` as F32,
with ``quantization_config`` = ``{"quant_method": "nano-int8", ...}`` in config.json; ``load_pretrained`` reads
them back as they are (no re-quantization).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import row_gemv
from .errors import ConfigError

QUANT_METHOD = "nano-int8"
GEMV_ROWS = 8  # up to this many rows the int8 kernel is faster than dequantize + GEMM (measured: 1-4 yes, 16 no)
PROJECTIONS = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
SMOOTH_ALPHA = 0.65  # demo model, 40 held-out prompts: 0.5 -> 96.0%, 0.65 -> 96.4%, 0.8 -> 96.1% agreement
CALIBRATION = (16, 256)  # sequences x tokens of random ids (seed 0) whose inputs set the smoothing (4 x 256: 94-99.7%
# agreement by seed; 16 x 256: 97.5% on two seeds)


class Int8Linear(nn.Module):
    """``y = ((x / smooth) @ q^T) * scale + bias`` with q (out, in) int8, scale (out,) float32 (``weight_scale``)
    and ``smooth`` (in,) float32, or no smoothing when ``smooth`` is None; q * scale stands for W * smooth.

    On the CPU the int8 values live in fbgemm's packed matrix (``torch.ops.quantized.linear_prepack``, packed as
    soon as they are set): ``weight`` is then a meta tensor with the shape and dtype (so byte counts and shapes
    hold, and nothing can read stale values), ``int8_weight()`` unpacks the values, and ``state_dict`` carries
    them, so saving and reloading are unchanged.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, smooth: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device) if smooth else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._packed = None  # fbgemm's packed int8 matrix (a torchbind object) once the values are on the CPU
        self._handle = None  # this module's key in _PACKED (how a compiled step reaches the packed matrix)
        self._scale_bf16: torch.Tensor | None = None  # the fallback kernel's scale (no fbgemm)
        self._pack()

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: torch.Tensor | None = None) -> Int8Linear:
        """Quantize ``linear``; with ``smooth`` (in,), quantize W * smooth and divide inputs by ``smooth``."""
        w = linear.weight.detach().float()
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, "meta",
                  smooth=smooth is not None)
        if smooth is not None:
            out.smooth = smooth.detach().float().clone()
            w = w * out.smooth
        out.weight, out.weight_scale = quantize_rows(w)
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        out._pack()
        return out

    def _pack(self) -> None:
        """Move the int8 values from the ``weight`` buffer into fbgemm's packed matrix (CPU values only)."""
        w = self.weight
        if w.device.type != "cpu" or w.is_meta:
            return
        if row_gemv.available() or not fbgemm_available():  # nano's own GEMV reads the plain int8 values
            return
        with warnings.catch_warnings():  # torch marks its quantized tensors deprecated; fbgemm's ops stay (2.13)
            warnings.simplefilter("ignore", UserWarning)
            q = torch._make_per_channel_quantized_tensor(w, self.weight_scale.double(),
                                                         torch.zeros(self.out_features, dtype=torch.long), 0)
            self._packed = torch.ops.quantized.linear_prepack(q, None)
        self._buffers["weight"] = torch.empty(w.shape, dtype=torch.int8, device="meta")
        if self._handle is None:
            self._handle = _register(self)

    def int8_weight(self) -> torch.Tensor:
        """The int8 values q (out, in), unpacked from fbgemm's matrix when packed."""
        if self._packed is None:
            return self.weight
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the int8 values stand for: q * scale per row (W * smooth when smoothed)."""
        return self.int8_weight().float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if rows > GEMV_ROWS or x.device.type != "cpu":
            return F.linear(x, self.dequantized().to(x.dtype), self.bias)
        x2 = x.reshape(rows, self.in_features)
        if self._packed is None and row_gemv.usable(x2f := x2.float(), self.weight):  # eager: ctypes; compiled: shim
            y = torch.ops.nano.row_gemv_q8(x2f, self.weight, self.weight_scale)
        elif self._packed is None:  # no fbgemm in this torch: the weight-only kernel on a bf16 input
            if self._scale_bf16 is None:
                self._scale_bf16 = self.weight_scale.to(torch.bfloat16)
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self._scale_bf16)
        elif torch.compiler.is_compiling():  # dynamo cannot pass the torchbind object: a custom op looks it up
            y = torch.ops.nano.int8_gemv(x2.float(), self._handle, self.out_features)
        else:
            y = torch.ops.quantized.linear_dynamic(x2.float(), self._packed, True)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y.add_(self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:
            destination[prefix + "weight"] = self.int8_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._packed is not None:  # a real buffer to load into (a copy_ into the meta one would drop values)
            self._buffers["weight"] = self.int8_weight()
            self._packed = None
        self._scale_bf16 = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._pack()  # with the loaded values and scale

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"
                + (", smoothed" if self.smooth is not None else ""))


@functools.cache
def fbgemm_available() -> bool:
    """Whether this torch has fbgemm's dynamic int8 linear (x86 CPUs; torch marks the API deprecated)."""
    try:
        return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized,
                                                                                 "linear_dynamic")
    except (AttributeError, RuntimeError):
        return False


_PACKED: dict[int, weakref.ref] = {}
_next_handle = itertools.count()


def _register(module: Int8Linear) -> int:
    handle = next(_next_handle)
    _PACKED[handle] = weakref.ref(module, lambda _ref, h=handle: _PACKED.pop(h, None))
    return handle


@torch.library.custom_op("nano::int8_gemv", mutates_args=())
def _int8_gemv(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """``linear_dynamic`` on the packed matrix of the Int8Linear registered as ``handle`` (compiled steps)."""
    module = _PACKED[handle]()
    return torch.ops.quantized.linear_dynamic(x, module._packed, True)


@_int8_gemv.register_fake
def _(x, handle, out_features):
    return x.new_empty(x.shape[0], out_features)


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


def quantization_config(lm_head: bool, alpha: float | None) -> dict:
    """The config.json entry of a saved int8 model."""
    qc = {"quant_method": QUANT_METHOD, "bits": 8, "symmetric": True, "granularity": "per-channel",
          "modules": list(PROJECTIONS) + (["lm_head"] if lm_head else []),
          "activations": "int8 per call at decode (fbgemm dynamic, up to 8 rows), float32 otherwise"}
    if alpha is not None:
        qc["smoothing"] = {"alpha": alpha, "calibration": f"{CALIBRATION[0]} x {CALIBRATION[1]} random token ids, "
                                                          "seed 0"}
    return qc


def calibration_ids(vocab_size: int) -> torch.Tensor:
    """The fixed calibration batch (``CALIBRATION``): random ids in [3, vocab), seed 0."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(min(3, vocab_size - 1), vocab_size, CALIBRATION, generator=g)


def smoothing_divisors(amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel divisors of one Linear: ``max|x_j|^alpha / max|W_:,j|^(1-alpha)``, with
    ``amax`` (in,) the max |input| each channel saw on the calibration batch.

    A channel the calibration never drives above a tenth of the median channel's range is taken at that tenth,
    so a rare channel cannot get a tiny divisor that would blow its inputs up later."""
    a = torch.maximum(amax, 0.1 * amax.median()).clamp(min=1e-5)
    w = weight.detach().float().abs().amax(0).clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


@contextlib.contextmanager
def input_maxima(model: nn.Module, names: list[str]):
    """Yields a dict that fills, while the block runs, with max |x_j| (in,) over the inputs each Linear in
    ``names`` sees (forward hooks, removed on exit)."""
    amax: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, inputs, _output):
            a = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).abs().amax(0)
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    try:
        yield amax
    finally:
        for h in hooks:
            h.remove()


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def quantize_int8(model: nn.Module, lm_head: bool = True, alpha: float | None = SMOOTH_ALPHA,
                  calibration: torch.Tensor | None = None,
                  read: Callable[[str], torch.Tensor] | None = None) -> nn.Module:
    """Replace the projections (and lm_head) of ``model`` by ``Int8Linear`` in place. Records
    ``quantization_config`` in ``model.config``.

    With ``alpha`` (default ``SMOOTH_ALPHA``; None: no smoothing) each Linear's smoothing divisors
    (``smoothing_divisors``) come from the inputs it sees while the float model runs ``calibration`` (default
    ``calibration_ids``; one sequence a forward). This goes layer by layer: the calibration hidden states run
    through the float layer i, recording its projections' inputs; then those projections are quantized and
    their float weights freed, and the float layer's outputs go on to layer i + 1. So beyond the int8 weights
    one layer's float projections are in memory at a time, and the divisors are the float model's.

    ``read(name)``: the float weight of Linear ``name``, for a model whose projection weights are not loaded
    yet (meta tensors: ``checkpoint.load_pretrained`` reads each as the pass reaches it); by default the weight
    the model holds."""
    if model.device.type != "cpu":
        raise ConfigError(f"int8 weights run on the CPU only (fbgemm's int8 kernels); the model is on "
                          f"{model.device.type}: use --device cpu or --dtype bf16")
    names = [n for n in quantized_names(model, lm_head) if isinstance(model.get_submodule(n), nn.Linear)]

    def float_linear(name: str) -> nn.Linear:
        linear = model.get_submodule(name)
        if read is not None:
            linear.weight = nn.Parameter(read(name), requires_grad=False)
        return linear

    def quantize(name: str, amax: torch.Tensor | None) -> None:
        linear = model.get_submodule(name)
        smooth = None if amax is None else smoothing_divisors(amax, linear.weight, alpha)
        _replace(model, name, Int8Linear.from_linear(linear, smooth))

    if alpha is None or not names:
        for name in names:
            float_linear(name)
            quantize(name, None)
    else:
        was_training = model.training
        model.eval()
        try:
            ids = calibration_ids(model.config.vocab_size) if calibration is None else calibration
            hidden = [model.backbone.embeddings(row[None]) for row in ids]
            for i, layer in enumerate(model.backbone.layers):
                group = [n for n in names if n.startswith(f"backbone.layers.{i}.")]
                for name in group:
                    float_linear(name)
                with input_maxima(model, group) as amax:
                    hidden = [layer(h, None, 0, None) for h in hidden]
                for name in group:
                    quantize(name, amax[name])
            if "lm_head" in names:
                float_linear("lm_head")
                normed = [model.backbone.norm_f(h).reshape(-1, h.shape[-1]).abs().amax(0) for h in hidden]
                quantize("lm_head", torch.stack(normed).amax(0))
        finally:
            model.train(was_training)
    model.config = model.config.replace(extra={**model.config.extra,
                                               "quantization_config": quantization_config(lm_head, alpha)})
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
                                             m.weight.dtype, m.weight.device, smooth="smoothing" in qc))


def parameter_count(model: nn.Module) -> int:
    """The model's parameters, the int8 weights (buffers, not ``nn.Parameter``) counted as the weights they are."""
    return sum(p.numel() for p in model.parameters()) + sum(
        m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear))


def is_int8(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
