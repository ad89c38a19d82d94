"""FP8 training GEMMs: E4M3 quantization, block-wise and tensorwise GEMMs on both backends (real
``torch._scaled_mm`` and quantize-dequantize emulation) held against each other, against an independent
reference built from the public quantize helpers, and against float32; the model conversion."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from model_utils import randomize, tiny_config
from nanocli.train import fp8, fp8_gemm
from nanocli.train.fp8 import (
    FP8Linear,
    FP8Recipe,
    convert_to_fp8,
    dequantize_blockwise,
    fp8_available,
    quantize_blockwise,
    revert_fp8,
)
from nanocli_model.errors import ConfigError
from nanocli_model.model import build_model

SCALED_MM = fp8_available("cpu")
needs_scaled_mm = pytest.mark.skipif(not SCALED_MM, reason="torch._scaled_mm does not run on this CPU")
FULL = (10**9, 10**9)  # a tile covering the whole tensor: per-tensor scaling


def nrel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius) in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def qdq(x: torch.Tensor, tile) -> torch.Tensor:
    return dequantize_blockwise(*quantize_blockwise(x, tile), tile)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- quantization

def test_quantize_gives_e4m3_values_and_per_tile_scales():
    x = torch.randn(300, 200, generator=gen(0)) * 3
    q, s = quantize_blockwise(x, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (3, 2)  # edge blocks 44 rows, 72 columns
    assert q.float().abs().max() <= 448
    # each tile's largest magnitude lands on E4M3's max: the scale is amax / 448
    blocks = q.float()[:256, :128].reshape(2, 128, 1, 128)
    assert torch.equal(blocks.abs().amax(dim=(1, 3)).flatten(), torch.full((2,), 448.0))
    torch.testing.assert_close(s[0, 0], x[:128, :128].abs().max() / 448)
    q1, s1 = quantize_blockwise(x[:5], (1, 128))
    assert s1.shape == (5, 2)
    _, s_tensor = quantize_blockwise(x, FULL)
    assert s_tensor.shape == (1, 1)


def test_quantization_error_is_e4m3s():
    x = torch.randn(64, 384, generator=gen(1))
    s = quantize_blockwise(x, (1, 128))[1]
    err = (qdq(x, (1, 128)) - x).abs()
    # round to nearest with 3 mantissa bits: <= 2^-4 relative; subnormals (below 2^-6 * scale): <= 2^-10 * scale
    scale = s.repeat_interleave(128, dim=1)
    assert (err <= x.abs() * 2**-4 + scale * 2**-10 + 1e-12).all()
    normal = x.abs() >= 2**-6 * scale
    mean_rel = (err[normal] / x.abs()[normal]).mean().item()
    assert 2**-7 < mean_rel < 2**-5  # typical error ~2^-5.5; it is not float32 either


def test_tiles_are_independent():
    x = torch.randn(4, 256, generator=gen(2))
    spiked = x.clone()
    spiked[1, 3] = 1e4  # an outlier in tile (row 1, cols 0..127)
    a, b = qdq(x, (1, 128)), qdq(spiked, (1, 128))
    other = torch.ones_like(x, dtype=torch.bool)
    other[1, :128] = False
    assert torch.equal(a[other], b[other])  # no other tile's values moved
    assert (b[1, :128] - x[1, :128]).abs().max() > 10 * (a[1, :128] - x[1, :128]).abs().max()
    # per-tensor scaling lets the same outlier wreck every value
    assert (qdq(spiked, FULL) - spiked)[other].abs().max() > 0.1


def test_zero_tiles_and_power_of_two_scales():
    x = torch.randn(8, 256, generator=gen(3))
    x[:, :128] = 0
    q, s = quantize_blockwise(x, (1, 128))
    assert torch.isfinite(s).all() and (q.float()[:, :128] == 0).all()
    q2, s2 = quantize_blockwise(x, (1, 128), pow2=True)
    assert torch.equal(torch.exp2(torch.log2(s2).round()), s2) and q2.float().abs().max() <= 448
    assert (dequantize_blockwise(q2, s2, (1, 128)) - x).abs().max() < 0.07 * x.abs().max()


# ---------------------------------------------------------------------------------------------- GEMMs

def reference(x, w, gy, tiles):
    """y, gx, gW from the public quantize helpers: every GEMM operand E4M3 in its tiles, float32 matmuls."""
    act, blk = tiles
    y = qdq(x, act) @ qdq(w, blk).t()  # (M, N), contraction over K
    gx = qdq(gy, act) @ qdq(w.t(), blk).t()  # (M, K), contraction over N: W^T's blocks
    gw = qdq(gy.t(), act) @ qdq(x.t(), act).t()  # (N, K), contraction over tokens: 128x1 tiles
    return y, gx, gw


def run_linear(lin, x, gy, recipe, use_torchao=False):
    f = FP8Linear.from_linear(lin, recipe)
    f.use_torchao = use_torchao
    x = x.clone().requires_grad_(True)
    lin.zero_grad(set_to_none=True)
    y = f(x)
    y.backward(gy)
    return y.detach(), x.grad, lin.weight.grad.clone(), lin.bias.grad.clone()


def fp32_linear(lin, x, gy):
    x = x.clone().requires_grad_(True)
    lin.zero_grad(set_to_none=True)
    y = lin(x)
    y.backward(gy)
    return y.detach(), x.grad, lin.weight.grad.clone(), lin.bias.grad.clone()


def problem(shape, k, n, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    x = torch.randn(*shape, k)
    gy = torch.randn(*shape, n)
    return lin, x, gy


@pytest.mark.parametrize("scaling", ["blockwise", "tensorwise"])
@pytest.mark.parametrize("shape,k,n", [((2, 50), 300, 200), ((130,), 64, 96), ((3, 7), 32, 20)])
def test_fp8_linear_matches_reference_and_fp32(scaling, shape, k, n):
    lin, x, gy = problem(shape, k, n)
    tiles = ((1, 128), (128, 128)) if scaling == "blockwise" else (FULL, FULL)
    ref = reference(x.reshape(-1, k), lin.weight.detach(), gy.reshape(-1, n), tiles)
    exact = fp32_linear(lin, x, gy)
    got = {be: run_linear(lin, x, gy, FP8Recipe(scaling=scaling, backend=be))
           for be in (["scaled_mm"] if SCALED_MM else []) + ["emulate"]}
    for y, gx, gw, gb in got.values():
        assert y.shape == x.shape[:-1] + (n,) and gx.shape == x.shape and gw.shape == (n, k)
        # exactly the quantized GEMMs of the reference (only float32 summation order differs) ...
        assert nrel(y.reshape(-1, n), ref[0] + lin.bias.detach()) < 1e-6
        assert nrel(gx.reshape(-1, k), ref[1]) < 1e-6
        assert nrel(gw, ref[2]) < 1e-6
        torch.testing.assert_close(gb, exact[3])  # the bias gradient is a float32 sum of gy
        # ... which are E4M3-close to float32, and not float32 (a silent high-precision fall-back fails here)
        for a, b in zip((y, gx, gw), exact[:3]):
            assert 2**-9 < nrel(a, b) < 0.06
    if SCALED_MM:
        for a, b in zip(got["scaled_mm"], got["emulate"]):
            assert nrel(a, b) < 1e-6


@needs_scaled_mm
def test_blockwise_accumulates_per_contraction_block():
    """With 2 K-blocks of very different magnitude, a per-block scale keeps the small block's precision."""
    lin, x, gy = problem((64,), 256, 32, seed=4)
    x[:, :128] *= 1000
    y = run_linear(lin, x, gy, FP8Recipe(backend="scaled_mm"))[0]
    small = x[:, 128:] @ lin.weight.detach()[:, 128:].t()  # the small block's contribution
    y_small = run_linear(lin, torch.cat([torch.zeros_like(x[:, :128]), x[:, 128:]], 1), gy,
                         FP8Recipe(backend="scaled_mm"))[0] - lin.bias.detach()
    assert nrel(y_small, small) < 0.06  # its tiles did not inherit the big block's scales
    assert nrel(y, fp32_linear(lin, x, gy)[0]) < 0.06


@needs_scaled_mm
def test_scaled_mm_padding_for_gpu_alignment(monkeypatch):
    lin, x, gy = problem((37,), 150, 24, seed=5)
    plain = run_linear(lin, x, gy, FP8Recipe(backend="scaled_mm"))
    monkeypatch.setattr(fp8_gemm, "_mm_align", lambda device: 16)  # what a GPU needs, exercised on CPU
    padded = run_linear(lin, x, gy, FP8Recipe(backend="scaled_mm"))
    for a, b in zip(plain, padded):
        assert nrel(a, b) < 1e-6


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
@pytest.mark.parametrize("backend", ["scaled_mm", "emulate"])
def test_tensorwise_torchao_path_equals_native(backend):
    if backend == "scaled_mm" and not SCALED_MM:
        pytest.skip("torch._scaled_mm does not run on this CPU")
    lin, x, gy = problem((2, 40), 96, 80, seed=6)
    recipe = FP8Recipe(scaling="tensorwise", backend=backend)
    assert FP8Linear.from_linear(lin, recipe).use_torchao
    ours, theirs = run_linear(lin, x, gy, recipe), run_linear(lin, x, gy, recipe, use_torchao=True)
    for a, b in zip(ours, theirs):
        assert nrel(a, b) < 1e-6


def test_autocast_bf16_and_frozen_weight():
    lin, x, gy = problem((2, 16), 64, 48, seed=7)
    f = FP8Linear.from_linear(lin, FP8Recipe())
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f(xg)
    assert y.dtype == torch.bfloat16
    y.float().backward(gy)
    assert xg.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    exact = fp32_linear(lin, x, gy)
    assert nrel(y, exact[0]) < 0.06 and nrel(xg.grad, exact[1]) < 0.06 and nrel(lin.weight.grad, exact[2]) < 0.06
    lin.weight.requires_grad_(False)  # no wgrad operand is kept, dgrad still flows
    xg.grad = None
    f(xg).backward(gy)
    assert xg.grad is not None and nrel(xg.grad, exact[1]) < 0.06
    with torch.no_grad():
        assert f(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_auto_backend_and_availability():
    assert fp8._resolve_backend("auto", torch.device("cpu")) == ("scaled_mm" if SCALED_MM else "emulate")
    assert fp8._resolve_backend("emulate", torch.device("cpu")) == "emulate"
    assert fp8_available("meta") is False


# ---------------------------------------------------------------------------------------------- recipe

@pytest.mark.parametrize("kwargs,field", [
    ({"scaling": "rowwise"}, "scaling"), ({"backend": "cuda"}, "backend"),
    ({"keep_high_precision": -1}, "keep_high_precision"), ({"keep_high_precision": True}, "keep_high_precision"),
    ({"block": 100}, "block"), ({"block": 0}, "block"), ({"pow2_scales": "yes"}, "pow2_scales"),
])
def test_bad_recipe_values_are_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field) as info:
        FP8Recipe(**kwargs)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- the model

def tiny_model(seed=0):
    m = build_model(tiny_config(), seed=seed)
    randomize(m, seed)
    return m


def test_convert_picks_the_middle_layers_and_keeps_checkpoints():
    m = tiny_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = {k: p for k, p in m.named_parameters()}
    ids = torch.randint(0, 96, (2, 24), generator=gen(8))
    with torch.no_grad():
        ref = m(ids)
    report = convert_to_fp8(m, FP8Recipe(keep_high_precision=2))  # 6 layers "M-M*-M": 2 and 3 in FP8
    assert report.fp8 == ["backbone.layers.2.mixer.in_proj", "backbone.layers.2.mixer.out_proj",
                             "backbone.layers.3.mixer.q_proj", "backbone.layers.3.mixer.k_proj",
                             "backbone.layers.3.mixer.v_proj", "backbone.layers.3.mixer.o_proj"]
    assert "lm_head" in report.high_precision and "backbone.layers.0.mixer.in_proj" in report.high_precision
    assert isinstance(m.backbone.layers[3].mixer.q_proj, FP8Linear)
    assert type(m.backbone.layers[1].mixer.up_proj) is nn.Linear
    sd = m.state_dict()
    assert list(sd) == list(before) and all(torch.equal(sd[k], before[k]) for k in before)
    assert all(p is params[k] for k, p in m.named_parameters())  # shared, not copied
    with torch.no_grad():
        out = m(ids)
    assert 0 < nrel(out, ref) < 0.08
    assert len(convert_to_fp8(m, FP8Recipe(keep_high_precision=0)).fp8) == 14  # every block's Linears
    assert convert_to_fp8(m, FP8Recipe(keep_high_precision=3)).fp8 == []
    revert_fp8(m)
    assert not any(isinstance(mod, FP8Linear) for mod in m.modules())
    assert all(p is params[k] for k, p in m.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(m(ids), ref, rtol=0, atol=0)


@pytest.mark.parametrize("scaling", ["blockwise", "tensorwise"])
def test_fp8_training_lowers_the_loss(scaling):
    torch.manual_seed(9)
    m = tiny_model(seed=1)
    convert_to_fp8(m, FP8Recipe(scaling=scaling, keep_high_precision=1))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    ids = torch.randint(0, 96, (2, 33), generator=gen(10))
    losses = []
    for _ in range(6):
        logits = m(ids[:, :-1])  # float32 compute: autocast is covered per Linear above
        loss = nn.functional.cross_entropy(logits.reshape(-1, 96), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert m.backbone.layers[2].mixer.in_proj.weight.grad.abs().sum() > 0  # an FP8 layer learns
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_convert_rejects_other_models_and_unavailable_backends(monkeypatch):
    with pytest.raises(TypeError):
        convert_to_fp8(nn.Sequential(nn.Linear(4, 4)), FP8Recipe())
    monkeypatch.setattr(fp8, "fp8_available", lambda device: False)
    with pytest.raises(ConfigError, match="backend"):
        convert_to_fp8(tiny_model(), FP8Recipe(backend="scaled_mm"))


# ---------------------------------------------------------------------------------------------- GEMM forms
# The single block-wise _scaled_mm runs on CUDA sm90 only; on this CPU torch refuses block-wise scales. A
# stand-in _scaled_mm that enforces torch's checks for them (ScaledBlas.cpp) holds the layouts to account.

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _size_stride(scale, dim, size, stride) -> bool:
    """torch's check_size_stride: the stride is not checked where the size is 1."""
    return scale.size(dim) == size and (size <= 1 or scale.stride(dim) == stride)


class FakeBlockwiseScaledMM:
    """torch._scaled_mm as CUDA sm90 with cuBLASLt >= 12.9 takes block-wise scales: the same checks (pairs,
    dtypes, sizes, strides, dims % 16), the product computed from the dequantized operands in float64.
    Tensorwise and row-wise scales (and anything torch would refuse) go to the real CPU _scaled_mm.

    ``padded_ld``: 128x128 scales need their row stride rounded up to a multiple of 4 (some torch versions).
    ``wrong``: reads every scale tensor's memory as if it were row-major contiguous (a layout bug).
    """

    PAIRS = (("128x128", "1x128"), ("1x128", "128x128"), ("1x128", "1x128"))  # torch's order

    def __init__(self, real, padded_ld=False, wrong=False):
        self.real, self.padded_ld, self.wrong = real, padded_ld, wrong
        self.calls: list = []  # a block-wise (lhs, rhs) pair, or "delegated"

    @staticmethod
    def _fp8(t) -> bool:
        return t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    def is_1x128(self, t, s) -> bool:
        return (self._fp8(t) and s.dtype == torch.float32 and s.dim() == 2 and _size_stride(s, 0, t.size(0), 1)
                and _size_stride(s, 1, _cdiv(t.size(1), 128), t.size(0)))

    def is_128x128(self, t, s) -> bool:
        nc = _cdiv(t.size(1), 128)
        ld = _cdiv(nc, 4) * 4 if self.padded_ld else nc
        return (self._fp8(t) and s.dtype == torch.float32 and s.dim() == 2
                and _size_stride(s, 0, _cdiv(t.size(0), 128), ld) and _size_stride(s, 1, nc, 1))

    def dequantize(self, t, s, kind):
        """float64 values of t (R, C) with scales s in ``kind``'s grouping (read through s's strides)."""
        if self.wrong:
            s = torch.as_strided(s, s.shape, (s.shape[1], 1))
        rows = torch.arange(t.size(0)) // (1 if kind == "1x128" else 128)
        cols = torch.arange(t.size(1)) // 128
        return t.double() * s.double()[rows][:, cols]

    def __call__(self, mat1, mat2, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None,
                 use_fast_accum=False):
        def delegate():
            self.calls.append("delegated")
            return self.real(mat1, mat2, scale_a=scale_a, scale_b=scale_b, bias=bias, scale_result=scale_result,
                             out_dtype=out_dtype, use_fast_accum=use_fast_accum)

        a, bt, sbt = mat1, mat2.t(), scale_b.t()  # torch checks scale_b.t() against mat2.t() (N, K)
        tensorwise = scale_a.numel() == 1 and scale_b.numel() == 1
        rowwise = (scale_a.dim() == 2 and tuple(scale_a.shape) == (a.size(0), 1) and scale_a.is_contiguous()
                   and sbt.dim() == 2 and tuple(sbt.shape) == (bt.size(0), 1) and sbt.is_contiguous())
        if tensorwise or rowwise:  # torch tries these first
            return delegate()
        checks = {"1x128": self.is_1x128, "128x128": self.is_128x128}
        pair = next(((lhs, rhs) for lhs, rhs in self.PAIRS if checks[lhs](a, scale_a) and checks[rhs](bt, sbt)),
                    None)
        if pair is None:
            return delegate()  # the real one refuses it: "Invalid scaling configuration"
        if a.size(1) % 16 or mat2.size(0) % 16 or mat2.size(1) % 16:
            raise RuntimeError(f"mat1 {tuple(a.shape)} / mat2 {tuple(mat2.shape)} must be divisible by 16")
        self.calls.append(pair)
        out = self.dequantize(a, scale_a, pair[0]) @ self.dequantize(bt, sbt, pair[1]).t()  # (M, N) float64
        return out.to(out_dtype if out_dtype is not None else torch.bfloat16)


@pytest.fixture
def fresh_probe():
    """The probe's per-device cache cleared before and after (it remembers what torch._scaled_mm did)."""
    fp8_gemm._probe_gemm.cache_clear()
    yield
    fp8_gemm._probe_gemm.cache_clear()


@pytest.fixture
def fake_mm(monkeypatch, fresh_probe):
    """Install a FakeBlockwiseScaledMM as torch._scaled_mm (for this test only); returns the installer."""
    real = torch._scaled_mm

    def install(**kwargs) -> FakeBlockwiseScaledMM:
        fake = FakeBlockwiseScaledMM(real, **kwargs)
        monkeypatch.setattr(torch, "_scaled_mm", fake)
        fp8_gemm._probe_gemm.cache_clear()
        return fake

    return install


def counting_real_mm(monkeypatch) -> list:
    calls: list = []
    real = torch._scaled_mm

    def counted(*args, **kwargs):
        calls.append("real")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counted)
    return calls


ACT, BLK = (1, 128), (128, 128)


def three_gemms(M, N, K, seed=0, block=128):
    """(name, A, B) of a Linear's forward, dgrad and wgrad, quantized as _FP8LinearFn does."""
    g = gen(seed)
    x, w, gy = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(M, N, generator=g)
    x[:, :7] *= 50  # uneven tiles: scales differ from tile to tile
    w[: N // 2] *= 0.01
    act, blk = (1, block), (block, block)
    qw = fp8.quantize(w, blk)
    return [("forward", fp8.quantize(x, act), qw),  # (M, K) x (N, K): contraction over K
            ("dgrad", fp8.quantize(gy, act), qw.t()),  # (M, N) x (K, N): contraction over N
            ("wgrad", fp8.quantize(gy.t(), act), fp8.quantize(x.t(), act))]  # (N, M) x (K, M): over M


EXPECTED_PAIR = {"forward": ("1x128", "128x128"), "dgrad": ("1x128", "128x128"), "wgrad": ("1x128", "1x128")}


@needs_scaled_mm
@pytest.mark.parametrize("padded_ld", [False, True])
def test_probe_picks_the_single_blockwise_call_where_torch_takes_it(fake_mm, padded_ld):
    fake = fake_mm(padded_ld=padded_ld)
    probe = fp8.gemm_probe("cpu")
    assert probe.form == "blockwise" and probe.reason == ""
    assert probe.layout == fp8.BlockwiseLayout(padded_ld=padded_ld, align=16)  # plain tried first
    refused = fake.calls.count("delegated") - 1  # the row-wise probe is delegated too
    assert refused == (1 if padded_ld else 0)  # the plain 128x128 layout was refused where padding is needed
    assert fp8.gemm_form("cpu") == "blockwise" and fp8.gemm_reason("cpu") == ""
    assert fp8.describe_gemm("cpu") == "block-wise single _scaled_mm (cuBLASLt)"
    assert fp8_available("cpu")
    assert fp8.gemm_form("cpu", FP8Recipe(block=64)) == "per-block"
    assert "128" in fp8.gemm_reason("cpu", FP8Recipe(block=64))
    assert fp8.gemm_form("cpu", FP8Recipe(scaling="tensorwise")) == "tensorwise"
    assert fp8.gemm_form("cpu", FP8Recipe(backend="emulate")) == "emulate"


@needs_scaled_mm
@pytest.mark.parametrize("padded_ld", [False, True])
@pytest.mark.parametrize("M,N,K", [(200, 300, 520), (37, 150, 300), (130, 257, 129), (300, 20, 256),
                                   (16, 384, 384)])
def test_single_blockwise_call_equals_emulation(fake_mm, padded_ld, M, N, K):
    fake = fake_mm(padded_ld=padded_ld)
    assert fp8.gemm_form("cpu") == "blockwise"
    for name, a, b in three_gemms(M, N, K):
        fake.calls.clear()
        got = fp8.gemm(a, b, "scaled_mm")
        want = fp8.gemm(a, b, "emulate")
        assert got.shape == want.shape == (a.q.shape[0], b.q.shape[0])
        assert nrel(got, want) < 1e-5, name
        contraction = a.q.shape[1]
        # exactly one _scaled_mm per GEMM: block-wise where the contraction has several blocks, else row-wise
        assert fake.calls == [EXPECTED_PAIR[name] if contraction > 128 else "delegated"], (name, fake.calls)


@needs_scaled_mm
def test_single_blockwise_call_through_the_linear(fake_mm, monkeypatch):
    fake = fake_mm()
    assert fp8.gemm_form("cpu") == "blockwise"  # probed now: the calls below are the GEMMs' own
    lin, x, gy = problem((2, 100), 300, 200, seed=11)  # 200 tokens: every contraction has 2+ blocks
    emulated = run_linear(lin, x, gy, FP8Recipe(backend="emulate"))
    fake.calls.clear()
    real = run_linear(lin, x, gy, FP8Recipe(backend="scaled_mm"))
    assert fake.calls == [("1x128", "128x128"), ("1x128", "128x128"), ("1x128", "1x128")]  # y, gx, gW
    for a, b in zip(real, emulated):
        assert nrel(a, b) < 1e-5
    monkeypatch.setattr(fp8_gemm, "_mm_align", lambda device: 16)  # what a GPU needs: the single call stays
    fake.calls.clear()
    padded = run_linear(lin, x, gy, FP8Recipe(backend="scaled_mm"))
    assert len(fake.calls) == 3 and "delegated" not in fake.calls
    for a, b in zip(padded, emulated):
        assert nrel(a, b) < 1e-5


@needs_scaled_mm
def test_other_block_lengths_keep_the_loop(fake_mm):
    fake = fake_mm()
    assert fp8.gemm_form("cpu") == "blockwise"
    for name, a, b in three_gemms(200, 300, 520, block=64):
        fake.calls.clear()
        assert nrel(fp8.gemm(a, b, "scaled_mm"), fp8.gemm(a, b, "emulate")) < 1e-5
        assert fake.calls == ["delegated"] * a.s.shape[1], name  # one row-wise call per 64-wide block


@needs_scaled_mm
def test_real_cpu_refuses_blockwise_scales_and_keeps_the_loop(monkeypatch, fresh_probe):
    probe = fp8.gemm_probe("cpu")
    assert probe.form == "per-block" and probe.layout is None
    assert "refused block-wise scales" in probe.reason and "Invalid scaling configuration" in probe.reason
    assert fp8.gemm_form("cpu") == "per-block" and fp8.gemm_reason("cpu") == probe.reason
    assert fp8.describe_gemm("cpu").startswith("per-128-block _scaled_mm loop: torch._scaled_mm refused")
    calls = counting_real_mm(monkeypatch)
    for name, a, b in three_gemms(200, 300, 520):
        calls.clear()
        assert nrel(fp8.gemm(a, b, "scaled_mm"), fp8.gemm(a, b, "emulate")) < 1e-6, name
        assert len(calls) == a.s.shape[1]  # one call per contraction block


@needs_scaled_mm
def test_a_wrong_single_call_is_never_used(fake_mm):
    fake = fake_mm(wrong=True)  # accepts the layouts, misreads the scales
    probe = fp8.gemm_probe("cpu")
    assert ("1x128", "128x128") in fake.calls  # it was tried
    assert probe.form == "per-block" and probe.layout is None
    assert "wrong block-wise results" in probe.reason
    for name, a, b in three_gemms(200, 300, 520):
        fake.calls.clear()
        assert nrel(fp8.gemm(a, b, "scaled_mm"), fp8.gemm(a, b, "emulate")) < 1e-6, name
        assert fake.calls == ["delegated"] * a.s.shape[1]  # the per-block loop


def test_scale_layouts_match_torchs_checks():
    """The layouts on their own: shapes and strides as torch's block-wise checks want them."""
    q = fp8.quantize(torch.randn(40, 300, generator=gen(12)), ACT)  # (40, 300): 3 K tiles
    s = fp8_gemm._blockwise_scale(q, "1x128", 48, padded_ld=False)
    assert s.shape == (48, 3) and s.stride() == (1, 48)  # column-major, padded rows 1.0
    assert torch.equal(s[:40], q.s) and (s[40:] == 1).all()
    w = fp8.quantize(torch.randn(160, 300, generator=gen(13)), BLK)  # (2, 3) blocks
    plain = fp8_gemm._blockwise_scale(w, "128x128", 160, padded_ld=False)
    padded = fp8_gemm._blockwise_scale(w, "128x128", 160, padded_ld=True)
    assert plain.shape == padded.shape == (2, 3) and plain.stride() == (3, 1) and padded.stride() == (4, 1)
    assert torch.equal(plain, w.s) and torch.equal(padded, w.s)
    assert fp8_gemm._blockwise_pair(q, w) == ("1x128", "128x128")
    assert fp8_gemm._blockwise_pair(q, q) == ("1x128", "1x128")
    assert fp8_gemm._blockwise_pair(w, q) is None  # (128x128, 1x128): not vouched for by the probe, the loop runs
    one_tile = fp8.quantize(torch.randn(4, 100, generator=gen(14)), ACT)  # one K tile: a row-wise call
    assert fp8_gemm._blockwise_pair(one_tile, fp8.quantize(torch.randn(8, 100, generator=gen(15)), BLK)) is None


def test_convert_reports_the_gemm_form(fake_mm):
    m = tiny_model()
    report = convert_to_fp8(m, FP8Recipe(backend="emulate"))
    assert report.gemm_form == "emulate" and report.gemm.startswith("emulated (quantize-dequantize")
    assert "'emulate'" in report.gemm
    if SCALED_MM:
        report = convert_to_fp8(m, FP8Recipe())
        assert report.gemm_form == "per-block"
        assert report.gemm.startswith("per-128-block _scaled_mm loop: torch._scaled_mm refused block-wise")
        assert convert_to_fp8(m, FP8Recipe(scaling="tensorwise")).gemm == "tensorwise single _scaled_mm"
        fake_mm()
        report = convert_to_fp8(m, FP8Recipe())
        assert report.gemm_form == "blockwise" and report.gemm == "block-wise single _scaled_mm (cuBLASLt)"
    assert len(report.fp8) == 6 and "lm_head" in report.high_precision  # the old keys are unchanged


def test_auto_on_a_gpu_without_fp8_says_it_emulates(monkeypatch, fresh_probe):
    """backend auto on a CUDA device where no FP8 GEMM runs (an sm80, say): emulated, and the result says so."""
    def no_fp8(*args, **kwargs):
        raise RuntimeError("torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0 "
                           "or 8.9, or ROCm MI300+")

    monkeypatch.setattr(torch, "_scaled_mm", no_fp8)
    monkeypatch.setattr(fp8, "_model_device", lambda model: torch.device("cuda", 0))
    report = convert_to_fp8(tiny_model(), FP8Recipe(backend="auto"))
    assert report.gemm_form == "emulate"
    assert report.gemm.startswith("emulated (quantize-dequantize float32 matmul): torch._scaled_mm does not "
                                     "run on cuda:0: ")
    assert fp8.gemm_reason("cuda:0") in report.gemm and fp8.gemm_reason("cuda:0")
    assert fp8._resolve_backend("auto", torch.device("cuda", 0)) == "emulate"
    assert len(report.fp8) == 6
    with pytest.raises(ConfigError, match="scaled_mm"):
        convert_to_fp8(tiny_model(), FP8Recipe(backend="scaled_mm"))
