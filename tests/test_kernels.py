"""kernels.py: the one switch between the GPU kernels and nano's pure-PyTorch path (cpu_fastpath.py).

On CPU tensors the pure-PyTorch path runs (its own tests: test_cpu_fastpath.py). Here: the switch itself, the
32-bit offset guard's arithmetic (at the 9B's widths), nano's causal-conv1d calls held to that extension's
argument contract by a stand-in that enforces its checks, and what ``kernels.status`` reports. mamba-ssm's
Triton kernels themselves run on the CPU in test_kernels_triton.py (Triton's interpreter). The ``gpu`` tests
compare the real kernels against the pure-PyTorch path where CUDA and mamba-ssm exist (``make gpu-check``).
"""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from model_utils import randomize, rel_err, tiny_config
from nanocli_model import NanoConfig, NanoForCausalLM, kernels
from nanocli_model import reference as R


def test_cpu_tensors_use_the_reference():
    assert kernels.backend_for(torch.zeros(1)) == "reference"


def test_cpu_tensors_run_the_fast_path_not_the_readable_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 10, 4, 2, generator=g, requires_grad=True)
    B, C = torch.randn(1, 10, 2, 3, generator=g), torch.randn(1, 10, 2, 3, generator=g)
    y, _ = kernels.ssd_scan(x, torch.randn(1, 10, 4), torch.zeros(4), -torch.rand(4), B, C, None, 8,
                            (0.0, float("inf")))
    assert type(y.grad_fn).__name__ == "_SSDChunkedBackward"  # cpu_fastpath's hand-written backward
    out = kernels.causal_conv(torch.randn(1, 10, 6, requires_grad=True), torch.randn(6, 4), None)
    assert type(out.grad_fn).__name__ == "_CausalConv1dBackward"


def test_switch_forces_reference_and_validates(monkeypatch):
    with kernels.use("reference"):
        assert kernels._forced == "reference"
        with kernels.use("auto"):
            assert kernels._forced == "auto"
        assert kernels._forced == "reference"
    assert kernels._forced is None
    with pytest.raises(ValueError, match="reference"):
        with kernels.use("triton"):
            pass
    monkeypatch.setenv("NANO_KERNELS", "reference")
    assert kernels.backend_for(torch.zeros(1)) == "reference"


def test_importing_the_library_needs_no_cuda_packages():
    import subprocess
    import sys

    code = ("import sys, nanocli_model, nanocli_model.model, nanocli_model.kernels;"
            "print(any(m.startswith(('mamba_ssm', 'causal_conv1d')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("state", [16, 128])
def test_cpu_block_choice_does_not_change_results(state):
    # kernels.ssd_scan picks its own block length on CPU; the decomposition is exact for any length.
    g = torch.Generator().manual_seed(state)
    x = torch.randn(1, 150, 4, 8, generator=g, dtype=torch.float64)
    dt_raw = torch.randn(1, 150, 4, generator=g, dtype=torch.float64)
    B, C = (torch.randn(1, 150, 2, state, generator=g, dtype=torch.float64) for _ in range(2))
    A, D, dt_bias = -torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), torch.zeros(4)
    y, s = kernels.ssd_scan(x, dt_raw, dt_bias, A, B, C, D, 128, (0.0, float("inf")))
    dt = R.discretize_dt(dt_raw, dt_bias, (0.0, float("inf")))
    y_ref, s_ref = R.ssd_sequential(x, dt, A, B, C, D)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True, scope="module")
def _forget_kernel_imports():
    """``kernels.status("cuda")`` imports mamba-ssm's Triton modules (a bare ``mamba_ssm`` package); drop them
    after this module, or transformers, imported later in the session, would take its CUDA-kernel path."""
    yield
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[name]
    kernels._reset_imports()


# ------------------------------------------------------------------------------------------ 32-bit offsets
NANO_9B = NanoConfig(hybrid_override_pattern="M-M*-", hidden_size=4480, intermediate_size=15680, mamba_num_heads=128,
                     mamba_head_dim=80, n_groups=8, ssm_state_size=128, chunk_size=128, num_attention_heads=40,
                     num_key_value_heads=8, head_dim=128)


def test_the_9b_at_batch_48_would_wrap_with_in_proj_views_and_does_not_now():
    c, T = NANO_9B, 2048
    assert c.mamba_in_proj_dim == 22656 and c.mamba_conv_dim == 12288
    # dt as a split view of in_proj's output: batch stride T x 22656, so row 47's offset passes 2**31
    assert 47 * T * c.mamba_in_proj_dim >= 2**31 > 46 * T * c.mamba_in_proj_dim
    # contiguous operands: the largest row is x / the output / the chunk states, T x 10240
    row = kernels.scan_row_elements(T, 128, 80, 8, 128, 128)
    assert row == T * 10240
    assert kernels.batch_pieces(48, row) == [slice(0, 48)]  # no split needed at 48 ...
    pieces = kernels.batch_pieces(256, row)  # ... while bench --batch max (256) runs in calls of 102 rows
    assert [p.stop - p.start for p in pieces] == [102, 102, 52]
    assert all((p.stop - p.start) * row < 2**31 for p in pieces)
    conv = kernels.batch_pieces(256, T * c.mamba_conv_dim)  # causal-conv1d: x (b, 12288, T), uint32 strides
    assert max(p.stop - p.start for p in conv) * T * c.mamba_conv_dim < 2**31 and len(conv) == 4


def test_pieces_cover_everything_once():
    for batch, row, limit in [(1, 10, 100), (7, 10, 35), (5, 1000, 10), (9, 3, 1000)]:
        pieces = kernels.batch_pieces(batch, row, limit)
        assert [i for p in pieces for i in range(p.start, p.stop)] == list(range(batch))
        assert all((p.stop - p.start) * row < limit or p.stop - p.start == 1 for p in pieces)
    assert kernels.time_pieces(100, 10, 16, limit=10_000) == [slice(0, 100)]
    t = kernels.time_pieces(100, 10, 16, limit=500)  # 49 tokens fit, rounded down to 48 (chunk multiples)
    assert [(p.start, p.stop) for p in t] == [(0, 48), (48, 96), (96, 100)]


# ------------------------------------------------------------------------------------------ causal-conv1d
def _fake_causal_conv1d() -> types.ModuleType:
    """A stand-in for causal-conv1d 1.7.0 that enforces what its C++ checks (csrc/causal_conv1d.cpp) and Python
    wrapper demand of the arguments, and computes in float64 from the arguments' values."""

    def check_common(x, weight, bias):
        assert x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        dim, width = weight.shape
        assert 2 <= width <= 4 and x.shape[1] == dim
        if bias is not None:
            assert bias.dtype == weight.dtype and bias.stride(-1) == 1 and bias.shape == (dim,)

    def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         final_states_out=None, activation=None):
        check_common(x, weight, bias)
        assert activation in (None, "silu", "swish")
        batch, dim, seqlen = x.shape
        width = weight.shape[1]
        assert x.stride(2) == 1 or x.stride(1) == 1
        channel_last = x.stride(1) == 1 and x.stride(2) > 1
        if channel_last:
            assert dim % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0
        if return_final_states:
            assert x.stride(1) == 1, "Only channel-last layout support returning final_states_out"
        for states in (initial_states, final_states_out):
            if states is not None:
                assert channel_last, "initial/final states are only supported for channel last layout"
                assert states.dtype == x.dtype and states.shape == (batch, dim, width - 1) and states.stride(1) == 1
        calls.append(("fn", tuple(x.shape), initial_states is not None))
        xin = x.double() if initial_states is None else torch.cat([initial_states.double(), x.double()], -1)
        out = F.conv1d(xin, weight.double()[:, None], None if bias is None else bias.double(),
                       padding=width - 1 if initial_states is None else 0, groups=dim)[..., :seqlen]
        out = F.silu(out) if activation else out
        result = torch.empty_like(x).copy_(out)  # empty_like(x): the input's layout, as the kernel's output
        if not return_final_states:
            return result
        final = F.pad(xin, (width - 1 - xin.shape[-1], 0))[..., -(width - 1):]
        if final_states_out is None:
            final_states_out = torch.empty(batch, width - 1, dim, dtype=x.dtype).transpose(1, 2)
        final_states_out.copy_(final)
        return result, final_states_out

    def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                             conv_state_indices=None):
        squeeze = x.dim() == 2
        x3 = x[..., None] if squeeze else x
        check_common(x3, weight, bias)
        assert conv_state.dtype == x.dtype, "conv_state.scalar_type() == input_type"
        width = weight.shape[1]
        assert conv_state.shape[:2] == x3.shape[:2] and conv_state.shape[2] >= width - 1
        calls.append(("update", tuple(x3.shape), True))
        window = torch.cat([conv_state.double(), x3.double()], -1)
        out = F.conv1d(window[..., -(x3.shape[-1] + width - 1):], weight.double()[:, None],
                       None if bias is None else bias.double(), groups=x3.shape[1])
        conv_state.copy_(window[..., -conv_state.shape[2]:])
        out = (F.silu(out) if activation else out).to(x.dtype)
        return out[..., 0] if squeeze else out

    calls: list = []
    mod = types.ModuleType("causal_conv1d")
    mod.__version__ = "1.7.0 (test stand-in)"
    mod.causal_conv1d_fn, mod.causal_conv1d_update, mod.calls = causal_conv1d_fn, causal_conv1d_update, calls
    return mod


@pytest.fixture
def fake_conv(monkeypatch):
    mod = _fake_causal_conv1d()
    monkeypatch.setitem(sys.modules, "causal_conv1d", mod)
    monkeypatch.setattr(kernels, "_on_kernel_device", lambda t: True)
    kernels._reset_imports()
    yield mod
    kernels._reset_imports()


def test_cache_conv_state_is_channel_last():
    cache = NanoForCausalLM(tiny_config()).allocate_cache(3, 16)
    conv = cache.layers[0].conv
    assert conv.shape == (3, 64, 3) and conv.stride(1) == 1  # what causal_conv1d_fn's states need


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_dispatch_meets_the_extension_contract(fake_conv, dtype):
    # prefill from an empty cache, a second chunk continuing from the cached state, a 2-token chunk (shorter
    # than the window), then decode steps through the update kernel: outputs and the cached state equal the
    # reference at every piece
    g = torch.Generator().manual_seed(0)
    C, K = 64, 4
    w, bias = (0.4 * torch.randn(C, K, generator=g)).to(dtype), (0.4 * torch.randn(C, generator=g)).to(dtype)
    fused = torch.randn(2, 40, C + 24, generator=g).to(dtype)  # x|B|C as a view of a wider projection
    x = fused[..., 8:8 + C]
    cache = NanoForCausalLM(tiny_config()).to(dtype).allocate_cache(2, 64).layers[0].conv  # (2, 64, 3)
    ref_state = torch.zeros(2, C, K - 1, dtype=dtype)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for piece in (slice(0, 20), slice(20, 33), slice(33, 35), slice(35, 36), slice(36, 37), slice(37, 40)):
        out = kernels.causal_conv(x[:, piece], w, bias, cache)
        with kernels.use("reference"):
            ref = kernels.causal_conv(x[:, piece], w, bias, ref_state)
        assert out.shape == ref.shape and rel_err(out, ref) < tol
        assert rel_err(cache, ref_state) < tol
    kinds = [kind for kind, _, _ in fake_conv.calls]
    assert kinds == ["fn", "fn", "fn", "update", "update", "fn"]  # every piece on the extension
    assert all(with_state for _, _, with_state in fake_conv.calls)


def test_conv_without_a_cache_and_the_batch_split(fake_conv, monkeypatch):
    g = torch.Generator().manual_seed(1)
    w, bias = 0.4 * torch.randn(64, 4, generator=g), 0.4 * torch.randn(64, generator=g)
    x = torch.randn(5, 30, 64, generator=g)
    with kernels.use("reference"):
        ref = kernels.causal_conv(x, w, bias)
    monkeypatch.setattr(kernels, "INT32_LIMIT", 2 * 30 * 64 + 1)  # two rows a call: 3 calls for 5 rows
    out = kernels.causal_conv(x, w, bias)
    assert [shape[0] for _, shape, _ in fake_conv.calls] == [2, 2, 1]
    assert rel_err(out, ref) < 1e-6
    state, ref_state = torch.zeros(5, 4 - 1, 64).transpose(1, 2), torch.zeros(5, 64, 3)
    monkeypatch.setattr(kernels, "INT32_LIMIT", 12 * 64)  # one row is too long: time pieces, state carried
    out = kernels.causal_conv(x, w, bias, state)
    with kernels.use("reference"):
        ref = kernels.causal_conv(x, w, bias, ref_state)
    assert rel_err(out, ref) < 1e-6 and rel_err(state, ref_state) < 1e-6


def test_conv_falls_back_where_the_extension_cannot_take_it(fake_conv):
    x = torch.randn(1, 10, 60)  # 60 channels: not a multiple of 8
    kernels.causal_conv(x, torch.randn(60, 4), torch.randn(60))
    assert fake_conv.calls == []
    assert kernels.status("cuda").conv.startswith("causal-conv1d 1.7.0")


def test_status_says_why_a_kernel_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)  # import fails: ModuleNotFoundError
    kernels._reset_imports()
    try:
        s = kernels.status("cuda")
        assert s.conv == "reference" and any("causal-conv1d not importable" in m for m in s.missing)
        assert "conv pure PyTorch" in s.describe()
        cpu = kernels.status("cpu")
        assert cpu.label == "reference" and "CUDA tensors" in cpu.describe()
    finally:
        kernels._reset_imports()


# ------------------------------------------------------------------------------------------ on a GPU
def _triton_kernels_on_gpu() -> bool:
    return torch.cuda.is_available() and kernels.backend_for(torch.zeros(1, device="cuda")) == "cuda"


gpu = pytest.mark.skipif(not _triton_kernels_on_gpu(), reason="needs CUDA and mamba-ssm's Triton kernels")
# Triton's tl.dot runs float32 in TF32 on a GPU: fp32 kernels are held to ~5e-3 (mamba-ssm's own tests use
# rtol 1e-2), bf16 to bf16 tolerances.
FP32_TOL, BF16_TOL = 5e-3, 3e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 37, 256, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_scan_matches_reference(T, dtype):
    g = torch.Generator(device="cuda").manual_seed(T)
    kw = dict(device="cuda", generator=g)
    x = torch.randn(2, T, 8, 16, **kw).to(dtype)
    dt_raw, B, C = (torch.randn(2, T, 8, **kw).to(dtype), torch.randn(2, T, 2, 32, **kw).to(dtype),
                    torch.randn(2, T, 2, 32, **kw).to(dtype))
    A, D, dt_bias, h0 = -torch.rand(8, **kw), torch.randn(8, **kw), torch.randn(8, **kw), torch.randn(2, 8, 16, 32, **kw)
    limit = (0.0, float("inf"))
    y_k, s_k = kernels.ssd_scan(x, dt_raw, dt_bias, A, B, C, D, 64, limit, initial_state=h0)
    with kernels.use("reference"):
        y_r, s_r = kernels.ssd_scan(x, dt_raw, dt_bias, A, B, C, D, 64, limit, initial_state=h0)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert rel_err(y_k, y_r) < tol and rel_err(s_k, s_r) < tol


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_model_matches_reference_prefill_and_decode(dtype):
    m = NanoForCausalLM(tiny_config(chunk_size=16)).eval()
    randomize(m, 0)
    m = m.to(device="cuda", dtype=dtype)
    ids = torch.randint(0, 96, (2, 50), device="cuda")
    with torch.no_grad():
        with kernels.use("reference"):
            ref = m(ids)
        full = m(ids)
        cache = m.allocate_cache(2, 64)
        steps = torch.cat([m(ids[:, :30], cache), m(ids[:, 30:40], cache)]
                          + [m(ids[:, t:t + 1], cache) for t in range(40, 50)], 1)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert rel_err(full, ref) < tol and rel_err(steps, ref) < tol
