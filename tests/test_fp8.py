"""FP8 training GEMMs: E4M3 quantization, block-wise and tensorwise GEMMs on both backends (real
``torch._scaled_mm`` and quantize-dequantize emulation) held against each other, against an independent
reference built from the public quantize helpers, and against float32; the model conversion."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from model_utils import randomize, tiny_config
from nanocli.train import fp8
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
    monkeypatch.setattr(fp8, "_mm_align", lambda device: 16)  # what a GPU needs, exercised on CPU
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
    assert report["fp8"] == ["backbone.layers.2.mixer.in_proj", "backbone.layers.2.mixer.out_proj",
                             "backbone.layers.3.mixer.q_proj", "backbone.layers.3.mixer.k_proj",
                             "backbone.layers.3.mixer.v_proj", "backbone.layers.3.mixer.o_proj"]
    assert "lm_head" in report["high_precision"] and "backbone.layers.0.mixer.in_proj" in report["high_precision"]
    assert isinstance(m.backbone.layers[3].mixer.q_proj, FP8Linear)
    assert type(m.backbone.layers[1].mixer.up_proj) is nn.Linear
    sd = m.state_dict()
    assert list(sd) == list(before) and all(torch.equal(sd[k], before[k]) for k in before)
    assert all(p is params[k] for k, p in m.named_parameters())  # shared, not copied
    with torch.no_grad():
        out = m(ids)
    assert 0 < nrel(out, ref) < 0.08
    assert len(convert_to_fp8(m, FP8Recipe(keep_high_precision=0))["fp8"]) == 14  # every block's Linears
    assert convert_to_fp8(m, FP8Recipe(keep_high_precision=3))["fp8"] == []
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
