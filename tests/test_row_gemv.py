"""nano's CPU decode kernels (``nanocli_model.row_gemv``, ``csrc/*.cpp``): the GEMVs held to float64 products and to
an exact integer emulation of the int8 kernel's arithmetic, the decode attention to a float64 SDPA, the Mamba-2
state update to the float64 recurrence; their build, their fallback, and the compiled decode steps that call them
(ahead of time: the C shims; int8 models too)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
import zipfile

import pytest
import torch
import torch.nn.functional as F

from model_utils import decode_model, needs_cxx, random_prompts
from nanocli_model import aot_decode, reference, row_gemv
from nanocli_model.generation import SamplingParams, generate
from nanocli_model.layers import padded_causal_mask
from nanocli_model.quant import quantize_int8

pytestmark = pytest.mark.skipif(not row_gemv.available(), reason=f"no CPU GEMV library: {row_gemv.reason()}")

# (out, in): whole blocks of 8 rows and of 8 / 16 / 32 columns, and every kind of tail (rows % 8, columns % 16
# and % 32, narrower than one vector, one row), and rows longer than the int8 kernel's flush interval (2048)
SHAPES = [(64, 256), (13, 37), (7, 5), (1, 1), (9, 16), (16, 48), (24, 2050), (11, 2080), (40, 4500)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def q8_emulation(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 kernel's arithmetic in exact integers: each row of x rounded (half to even) to int16 at
    32767 / max|x| (computed in float32, as the kernel does), products summed exactly, then both scales."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    m = x2.abs().amax(-1, keepdim=True)
    inv = torch.tensor(32767.0) / m
    xq = torch.round(x2 * inv).to(torch.int64)
    acc = (xq[:, None, :] * q.to(torch.int64)[None]).sum(-1)  # exact
    y = acc.double() * (m.double() / 32767.0) * scale.double()
    return y.reshape(*x.shape[:-1], q.shape[0])


@pytest.mark.parametrize("out_f,in_f", SHAPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_float32_gemv_equals_a_float64_product(out_f, in_f, batch):
    g = torch.Generator().manual_seed(out_f * 31 + in_f)
    x, w = torch.randn(batch, 1, in_f, generator=g), torch.randn(out_f, in_f, generator=g)
    y = torch.ops.nano.row_gemv_f32(x, w)
    assert y.shape == (batch, 1, out_f) and y.dtype == torch.float32
    assert rel(y, x.double() @ w.double().t()) < 1e-6  # float32 sums of in_f products: ~1e-7


@pytest.mark.parametrize("out_f,in_f", SHAPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_int8_gemv_equals_its_exact_integer_emulation_and_weight_only_int8(out_f, in_f, batch):
    g = torch.Generator().manual_seed(out_f * 17 + in_f)
    x = torch.randn(batch, 1, in_f, generator=g)
    q = torch.randint(-127, 128, (out_f, in_f), generator=g, dtype=torch.int8)
    scale = torch.rand(out_f, generator=g) + 0.01
    y = torch.ops.nano.row_gemv_q8(x, q, scale)
    assert y.shape == (batch, 1, out_f)
    assert rel(y, q8_emulation(x, q, scale)) < 1e-6  # float32 partial sums and scales: ~1e-7
    # and that is weight-only int8: the 16-bit input rounding is below 1e-4 of the float64 product
    assert rel(y, (x.double() @ q.double().t()) * scale.double()) < 1e-4


def test_int8_sums_do_not_overflow_at_the_extremes():
    """Every weight 127 and every input at its largest: the int32 partial sums would pass 2^31 after 4,229
    columns without the kernel's periodic move into float; 9,000 columns give the exact product."""
    n = 9000
    q = torch.full((9, n), 127, dtype=torch.int8)
    x = torch.ones(1, n)
    y = torch.ops.nano.row_gemv_q8(x, q, torch.ones(9))
    torch.testing.assert_close(y, torch.full((1, 9), 127.0 * n), rtol=1e-6, atol=0)
    y = torch.ops.nano.row_gemv_q8(-x, q, torch.ones(9))
    torch.testing.assert_close(y, torch.full((1, 9), -127.0 * n), rtol=1e-6, atol=0)


def _raw_library(tmp_path, *flags: str) -> ctypes.CDLL:
    """The kernel source built with extra compiler ``flags`` into tmp_path and loaded privately (its plain C
    entry points, outside torch), or a skip when that build is not possible here."""
    out = tmp_path / f"row_gemv{len(flags)}.so"
    done = subprocess.run(row_gemv.compile_command(row_gemv.compiler(), out, *flags), capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"cannot build the kernels with {flags}: {done.stderr[-200:]}")
    lib = ctypes.CDLL(str(out), mode=ctypes.RTLD_LOCAL)
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.nano_row_gemv_q8.argtypes = [p, i64, i64, p, p, i64, i64, p]
    lib.nano_row_gemv_f32.argtypes = [p, i64, i64, p, i64, i64, p]
    lib.nano_decode_attention_f32.argtypes = [p, p, i64, i64, i64, p, i64, i64, i64, i64, i64, i64, i64, i64,
                                              ctypes.c_float, p, p]
    lib.nano_ssm_step_f32.argtypes = [p, p, i64, p, i64, p, p, i64, p, i64, p, i64, i64, i64, i64, i64, p]
    return lib


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _raw_q8(lib, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape[0], q.shape[0])
    lib.nano_row_gemv_q8(_ptr(x), x.shape[1], x.shape[0], _ptr(q), _ptr(scale), q.shape[0], q.shape[1], _ptr(y))
    return y


@pytest.mark.parametrize("flags", [(), ("-mno-avx512f",), ("-mno-avx2", "-mno-fma")],
                         ids=["native", "avx2", "plain-cxx"])
def test_each_instruction_set_form_gives_the_exact_integer_sums(tmp_path, flags):
    """The int8 loop has an AVX-512 VNNI form (32 columns a step), an AVX2 form and plain C++; -march=native
    picks one per machine, so each is built here and held to the exact emulation, the extremes included (the
    float32 forms: AVX-512 for one row of x, AVX2, plain C++, held to float64; so is the decode attention
    kernel's and the Mamba-2 state update's AVX-512 and plain forms)."""
    lib = _raw_library(tmp_path, *flags)
    for out_f, in_f in SHAPES:
        g = torch.Generator().manual_seed(out_f * 7 + in_f)
        x = torch.randn(3, in_f, generator=g)
        q = torch.randint(-127, 128, (out_f, in_f), generator=g, dtype=torch.int8)
        scale = torch.rand(out_f, generator=g) + 0.01
        assert rel(_raw_q8(lib, x, q, scale), q8_emulation(x, q, scale)) < 1e-6, (out_f, in_f)
        w = torch.randn(out_f, in_f, generator=g)
        for rows in (3, 1):  # one row of x takes its own loop on an AVX-512 CPU
            y = torch.empty(rows, out_f)
            lib.nano_row_gemv_f32(_ptr(x), in_f, rows, _ptr(w), out_f, in_f, _ptr(y))
            # the plain form sums each row serially in float32 (4,500 terms: ~1e-6), the vector forms in lanes
            bound = 1e-5 if "-mno-avx2" in flags else 1e-6
            assert rel(y, x[:rows].double() @ w.double().t()) < bound, (out_f, in_f, rows)
    n = 9000  # every product at its largest: no int32 sum may wrap
    q, x = torch.full((9, n), 127, dtype=torch.int8), torch.ones(1, n)
    torch.testing.assert_close(_raw_q8(lib, x, q, torch.ones(9)), torch.full((1, 9), 127.0 * n), rtol=1e-6, atol=0)
    for b, h, r, L, d in ATTENTION_SHAPES:  # the decode attention kernel, built into the same library
        q, k, v = _attention_operands(b, h, r, L, d)
        out = torch.empty_like(q)
        ks, vs = k.stride(), v.stride()
        assert lib.nano_decode_attention_f32(_ptr(q), _ptr(k), ks[0], ks[1], ks[2], _ptr(v), vs[0], vs[1], vs[2], b,
                                             h, r, L, d, ctypes.c_float(d ** -0.5), _ptr(out), None) == 0
        assert rel(out, _sdpa64(q, k, v)) < 2e-6, (b, h, r, L, d)
        pad = _pads(b, L)
        assert lib.nano_decode_attention_f32(_ptr(q), _ptr(k), ks[0], ks[1], ks[2], _ptr(v), vs[0], vs[1], vs[2], b,
                                             h, r, L, d, ctypes.c_float(d ** -0.5), _ptr(out), _ptr(pad)) == 0
        assert rel(out, _sdpa64(q, k, v, pad)) < 2e-6, (b, h, r, L, d, pad)
    for b, H, G, P, N in SSM_SHAPES:  # the Mamba-2 state update, in the same library
        state, x, dt, A, B, C, D = _ssm_operands(b, H, G, P, N)
        y64, s64 = _ssm64(state, x, dt, A, B, C, D)
        y = torch.empty(b, H, P)
        assert lib.nano_ssm_step_f32(_ptr(state), _ptr(x), x.stride(0), _ptr(dt), dt.stride(0), _ptr(A), _ptr(B),
                                     B.stride(0), _ptr(C), C.stride(0), _ptr(D), b, H, G, P, N, _ptr(y)) == 0
        assert rel(state, s64) < 1e-6 and rel(y, y64) < 2e-6, (b, H, G, P, N)


def test_zero_and_non_finite_inputs():
    q = torch.randint(-127, 128, (8, 40), dtype=torch.int8)
    assert torch.equal(torch.ops.nano.row_gemv_q8(torch.zeros(2, 40), q, torch.ones(8)), torch.zeros(2, 8))
    x = torch.randn(2, 40)
    x[1, 3] = float("nan")
    y = torch.ops.nano.row_gemv_q8(x, q, torch.ones(8))
    assert y[0].isfinite().all() and y[1].isnan().all()  # the bad row only, as a float GEMV gives
    x[1, 3] = float("inf")
    assert torch.ops.nano.row_gemv_q8(x, q, torch.ones(8))[1].isnan().all()
    w = torch.randn(8, 40)
    assert torch.ops.nano.row_gemv_f32(x[:1], w).isfinite().all()


def test_wrong_operands_are_refused_in_one_line():
    w = torch.randn(16, 32)
    with pytest.raises(ValueError, match="row-major float32"):
        torch.ops.nano.row_gemv_f32(torch.randn(1, 32), w.t().contiguous().t())  # column-major
    with pytest.raises(ValueError, match="row_gemv_f32 takes x"):
        torch.ops.nano.row_gemv_f32(torch.randn(1, 31), w)
    with pytest.raises(ValueError, match="int8"):
        torch.ops.nano.row_gemv_q8(torch.randn(1, 32), w, torch.ones(16))
    assert not row_gemv.usable(torch.randn(1, 32), w.t().contiguous().t())
    assert not row_gemv.usable(torch.randn(1, 32, dtype=torch.float64), w)


# (batch, KV heads, query heads per KV head R, cached tokens L, head dim d): one key, one query, d below one vector,
# d not a multiple of 16, the released models' 128 and the kernel's largest 256, keys in blocks of 4 and their tails
ATTENTION_SHAPES = [(1, 4, 3, 300, 64), (1, 1, 1, 1, 8), (2, 2, 5, 17, 128), (3, 2, 2, 101, 37), (1, 2, 3, 33, 256),
                    (1, 1, 7, 6, 16), (2, 3, 1, 7, 17), (1, 2, 5, 1030, 128)]


def _attention_operands(b, h, r, L, d, seed=0):
    """q (b, h, r, d) and k, v (b, h, L, d) as views of a longer cache (strided, as a decode step reads them)."""
    g = torch.Generator().manual_seed(seed + 97 * L + d)
    cache = torch.randn(2, b, h, L + 9, d, generator=g)
    return 2 * torch.randn(b, h, r, d, generator=g), cache[0].narrow(2, 0, L), cache[1].narrow(2, 0, L)


def _sdpa64(q, k, v, pad=None):
    """SDPA in float64; with ``pad``, under the decode step's own mask (``layers.padded_causal_mask`` at the
    last position: row b skips its first pad[b] keys and always sees the last)."""
    mask = None if pad is None else padded_causal_mask(pad, k.shape[2] - 1, 1)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)


def _pads(b: int, L: int) -> torch.Tensor:
    """Left-padding lengths for b rows of L keys: none, some, all but the last key, and past the end (a row
    whose query still sees its own key)."""
    return torch.tensor([0, L // 3, L - 1, L + 4][:b] + [L // 2] * max(0, b - 4), dtype=torch.long)


@pytest.mark.parametrize("b,h,r,L,d", ATTENTION_SHAPES)
def test_decode_attention_equals_a_float64_sdpa(b, h, r, L, d):
    q, k, v = _attention_operands(b, h, r, L, d)
    out = torch.ops.nano.decode_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert rel(out, _sdpa64(q, k, v)) < 2e-6  # float32 sums (SDPA in float32: ~1e-6 here too)


@pytest.mark.parametrize("b,h,r,L,d", [s for s in ATTENTION_SHAPES if s[0] > 1] + [(4, 2, 3, 70, 64)])
def test_padded_decode_attention_equals_a_float64_masked_sdpa(b, h, r, L, d):
    """A left-padded batch: each row reads only its real keys, as SDPA under the decode step's padding mask."""
    q, k, v = _attention_operands(b, h, r, L, d)
    pad = _pads(b, L)
    out = torch.ops.nano.decode_attention_padded(q, k, v, pad)
    assert rel(out, _sdpa64(q, k, v, pad)) < 2e-6
    no_pad = torch.ops.nano.decode_attention_padded(q, k, v, torch.zeros(b, dtype=torch.long))
    torch.testing.assert_close(no_pad, torch.ops.nano.decode_attention(q, k, v), rtol=0, atol=0)
    k2, v2 = k.clone(), v.clone()  # the padding keys are not read: nan and huge ones there change nothing
    for i, n in enumerate(pad.clamp(max=L - 1).tolist()):
        k2[i, :, :n], v2[i, :, :n] = float("nan"), 1e30
    torch.testing.assert_close(torch.ops.nano.decode_attention_padded(q, k2, v2, pad), out, rtol=0, atol=0)


def test_decode_attention_softmax_extremes_and_non_finite_rows():
    """Scores far apart (weights that underflow to 0 and one near 1), then a nan and an inf: the rows they reach
    are nan, as SDPA's are, and the other rows are untouched."""
    q, k, v = _attention_operands(1, 2, 3, 50, 32)
    q = q * 40  # scores spread over thousands: most softmax weights are exactly 0
    torch.testing.assert_close(torch.ops.nano.decode_attention(q, k, v).double(), _sdpa64(q, k, v), rtol=2e-5,
                               atol=2e-6)
    q[0, 1, 2, 5] = float("nan")
    q[0, 0, 0, 0] = float("inf")
    out, ref = torch.ops.nano.decode_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any(dim=-1).sum() == 2
    assert rel(out[0, 1, :2], _sdpa64(q, k, v)[0, 1, :2]) < 2e-6
    q, k, v = _attention_operands(1, 2, 3, 50, 32)
    k[0, 1, 3, 7] = float("nan")  # one score of each query of head 1, early in the row: every row of that head
    out = torch.ops.nano.decode_attention(q, k, v)
    assert out[0, 1].isnan().all() and out[0, 0].isfinite().all()


def test_decode_attention_softmax_weights_to_a_few_ulp():
    """Two keys, scores 0 and x (x from -30 to 30): the output is the weight of the second value, exp(x) /
    (1 + exp(x)), which holds the kernel's exp to float32 rounding across the range (2-3 ulp)."""
    x = torch.linspace(-30, 30, 16 * 15, dtype=torch.float64)  # 15 query heads for each of 16 KV heads
    q = torch.zeros(1, 16, 15, 16)
    q[..., 0] = (4 * x).view(16, 15).float()  # score x: q . e_0 / sqrt(16)
    k, v = torch.zeros(1, 16, 2, 16), torch.zeros(1, 16, 2, 16)
    k[:, :, 1, 0], v[:, :, 1, :] = 1.0, 1.0
    got = torch.ops.nano.decode_attention(q, k, v)[..., 0].double().flatten()
    expected = torch.sigmoid(q[..., 0].double().flatten() / 4)
    assert ((got - expected).abs() / expected).max() < 3e-7  # measured 1.5e-7; SDPA's own: 1.1e-7


def test_decode_attention_refuses_what_it_does_not_take():
    q, k, v = _attention_operands(1, 2, 3, 10, 16)
    with pytest.raises(ValueError, match="decode_attention takes"):
        torch.ops.nano.decode_attention(q, k[:, :1], v[:, :1])  # other head count
    with pytest.raises(ValueError, match="decode_attention takes"):
        torch.ops.nano.decode_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="pad as a contiguous"):
        torch.ops.nano.decode_attention_padded(q, k, v, torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="pad as a contiguous"):
        torch.ops.nano.decode_attention_padded(q, k, v, torch.zeros(2, dtype=torch.long))  # batch is 1
    assert not row_gemv.attention_usable(q, k, v, torch.zeros(1, dtype=torch.int32))
    assert row_gemv.attention_usable(q, k, v, torch.zeros(1, dtype=torch.long))
    big = torch.randn(1, 1, 1, 300)
    assert not row_gemv.attention_usable(big, big, big)  # a head longer than the kernel's 256: SDPA
    assert not row_gemv.attention_usable(q, k.transpose(-1, -2), v)
    assert row_gemv.attention_usable(q, k, v)


# (batch, heads H, groups G, head dim P, state N): the medium profile's and the 9B's layouts (128-float state rows,
# whole vectors), rows not a multiple of 16 and shorter than one vector, one head, a batch of three
SSM_SHAPES = [(1, 32, 2, 48, 128), (1, 128, 8, 64, 128), (3, 4, 2, 5, 37), (2, 6, 3, 16, 16), (1, 1, 1, 1, 1),
              (2, 8, 1, 3, 40)]


def _ssm_operands(b, H, G, P, N, seed=0):
    """state (b, H, P, N); x, B, C as the decode step's split leaves them: views of one row per batch row (x | B | C,
    and more after); dt (b, H) discretized (positive), A < 0, D (H,)."""
    g = torch.Generator().manual_seed(seed + 31 * H + N)
    row = torch.randn(b, H * P + 2 * G * N + 5, generator=g)
    x = row[:, :H * P].view(b, H, P)
    B, C = (row[:, H * P + i * G * N:H * P + (i + 1) * G * N].view(b, G, N) for i in (0, 1))
    dt = torch.rand(b, H, generator=g) * 0.5 + 0.01
    A = -(torch.rand(H, generator=g) * 4 + 0.1)
    return torch.randn(b, H, P, N, generator=g), x, dt, A, B, C, torch.randn(H, generator=g)


def _ssm64(state, x, dt, A, B, C, D):
    """(y, the next state) of the recurrence in float64 (``reference.ssd_step``)."""
    s = state.double()
    return reference.ssd_step(s, *(t.double() for t in (x, dt, A, B, C, D))), s


@pytest.mark.parametrize("b,H,G,P,N", SSM_SHAPES)
def test_ssm_step_equals_the_float64_recurrence(b, H, G, P, N):
    """One token: the state updated in place (the same storage) and y, both to float32 rounding of float64."""
    state, x, dt, A, B, C, D = _ssm_operands(b, H, G, P, N)
    y64, s64 = _ssm64(state, x, dt, A, B, C, D)
    storage = state.data_ptr()
    y = torch.ops.nano.ssm_step(state, x, dt, A, B, C, D)
    assert y.shape == (b, H, P) and y.dtype == torch.float32 and state.data_ptr() == storage
    assert rel(state, s64) < 1e-6 and rel(y, y64) < 2e-6
    for _ in range(5):  # and token after token: the recurrence carried in the kernel's own state
        y64, s64 = _ssm64(s64, x, dt, A, B, C, D)
        y = torch.ops.nano.ssm_step(state, x, dt, A, B, C, D)
    assert rel(state, s64) < 2e-6 and rel(y, y64) < 4e-6


def test_ssm_step_keeps_a_nan_where_it_lands():
    """A nan in one state entry reaches that entry and its row's y only; the rest is the clean run, bit for bit."""
    state, x, dt, A, B, C, D = _ssm_operands(2, 4, 2, 5, 37)
    clean, bad = state.clone(), state.clone()
    bad[1, 2, 3, 30] = float("nan")
    y, y_bad = torch.ops.nano.ssm_step(clean, x, dt, A, B, C, D), torch.ops.nano.ssm_step(bad, x, dt, A, B, C, D)
    assert bad.isnan().sum() == 1 and bad[1, 2, 3, 30].isnan()
    assert y_bad.isnan().sum() == 1 and y_bad[1, 2, 3].isnan()
    keep = ~bad.isnan()
    assert torch.equal(bad[keep], clean[keep]) and torch.equal(y_bad[~y_bad.isnan()], y[~y_bad.isnan()])


def test_ssm_step_refuses_what_it_does_not_take():
    state, x, dt, A, B, C, D = _ssm_operands(1, 4, 2, 5, 16)
    assert row_gemv.ssm_usable(state, x, dt, A, B, C, D)
    refused = [
        (state.double(), x, dt, A, B, C, D),  # another dtype
        (state.transpose(2, 3).contiguous().transpose(2, 3), x, dt, A, B, C, D),  # a state not contiguous
        (state, x.transpose(1, 2).contiguous().transpose(1, 2), dt, A, B, C, D),  # x's channels not adjacent
        (state, x, dt, A, B[:, :1].expand(1, 3, 16), C[:, :1].expand(1, 3, 16), D),  # 3 groups of 4 heads
        (state, x, dt, A[:2], B, C, D),  # A for other heads
    ]
    for args in refused:
        assert not row_gemv.ssm_usable(*args)
        with pytest.raises(ValueError, match="ssm_step takes"):
            torch.ops.nano.ssm_step(*args)
    assert not row_gemv.ssm_usable(state, x, dt, A, B, C, None)  # no D: the model's own update


def test_without_a_compiler_or_when_turned_off_it_says_why(monkeypatch, tmp_path):
    """A failed build is one line and no library file; NANO_ROW_GEMV=0 and use(False) turn it off."""
    monkeypatch.setenv("NANO_CACHE", str(tmp_path))
    try:
        monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
        row_gemv.library.cache_clear()
        assert row_gemv.library() is None and not row_gemv.available()
        assert row_gemv.reason().startswith("the CPU GEMV library did not build: false failed")
        assert "\n" not in row_gemv.reason()
        assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing half-written
        monkeypatch.delenv("CXX")
        monkeypatch.setenv(row_gemv.ENV, "0")
        row_gemv.library.cache_clear()
        assert row_gemv.library() is None and row_gemv.reason() == "NANO_ROW_GEMV=0"
    finally:
        monkeypatch.undo()
        row_gemv.library.cache_clear()
    assert row_gemv.available() and row_gemv.reason() is None
    with row_gemv.use(False):
        assert not row_gemv.available() and "use(False)" in row_gemv.reason()
    assert row_gemv.available()


def test_a_damaged_library_file_is_built_again(monkeypatch, tmp_path):
    monkeypatch.setenv("NANO_CACHE", str(tmp_path))
    try:
        built = row_gemv._build(row_gemv.compiler())  # built, not loaded
        data = built.read_bytes()
        built.unlink()
        built.write_bytes(data[:1000])  # truncated under its own name (a new file: nothing has it mapped)
        row_gemv.library.cache_clear()
        assert row_gemv.library() is not None and built.stat().st_size == len(data)  # rebuilt, not loaded
        assert sorted(p.name for p in built.parent.iterdir()) == sorted([built.name, built.with_suffix(".sha256").name])
    finally:
        monkeypatch.undo()
        row_gemv.library.cache_clear()
    assert row_gemv.available()


def test_a_build_keeps_the_most_recently_used_libraries(monkeypatch, tmp_path):
    """Builds for other sources, torch versions or CPUs pile up in <cache dir>/kernels: a build keeps the
    KEEP_LIBRARIES most recently used (with their digests; loading one marks it used) and a killed build's old
    leftovers go."""
    monkeypatch.setenv("NANO_CACHE", str(tmp_path))
    kernels, now = tmp_path / "kernels", time.time()
    kernels.mkdir()
    names = {f"row_gemv-old{i}": i * 3600 for i in range(row_gemv.KEEP_LIBRARIES + 3)}  # old0 used last
    for stem, age in names.items():
        for suffix in (".so", ".sha256"):
            (kernels / f"{stem}{suffix}").write_bytes(b"x")
            os.utime(kernels / f"{stem}{suffix}", (now - age, now - age))
    for name, age in ((".row_gemv-k.1.tmp.so", 2 * 86400), (".row_gemv-k.2.tmp.so", 60), ("notes.txt", 9 * 86400)):
        (kernels / name).write_bytes(b"x")
        os.utime(kernels / name, (now - age, now - age))
    built = row_gemv._build(row_gemv.compiler())
    kept = [f"row_gemv-old{i}" for i in range(row_gemv.KEEP_LIBRARIES - 1)] + [built.stem]
    assert sorted(p.name for p in kernels.iterdir()) == sorted(
        [f"{stem}{suffix}" for stem in kept for suffix in (".so", ".sha256")] + [".row_gemv-k.2.tmp.so", "notes.txt"])
    os.utime(built, (now - 9 * 86400, now - 9 * 86400))
    assert row_gemv._build(row_gemv.compiler()) == built and built.stat().st_mtime > now - 60  # loaded: marked used


def _shim_calls(directory, name: str) -> int:
    """How many calls to the C shim ``name`` the wrapper code of the one package in ``directory`` makes."""
    (package,) = list(directory.iterdir())
    with zipfile.ZipFile(package) as z:
        return sum(z.read(n).decode().count(f"AOTI_TORCH_ERROR_CODE_CHECK({name}(") for n in z.namelist() if n.endswith("wrapper.cpp"))


@needs_cxx
def test_an_int8_model_decodes_ahead_of_time_through_the_int8_shim(tmp_path):
    """An int8 model (smoothed per-channel weights, lm_head too) compiles into a library that calls
    ``aoti_torch_cpu_row_gemv_q8`` for every projection and decodes what the eager int8 model decodes, its
    logits within the input's 16-bit rounding of it."""
    m = decode_model(seed=7, hybrid_override_pattern="M*-")  # one layer of each kind: a shorter compile
    m = quantize_int8(m, calibration=torch.tensor([random_prompts([16], seed=7)[0]]))
    assert aot_decode.supported(m) is None
    greedy = SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=12)
    step = aot_decode.AotDecode(m, tmp_path)
    prompts = random_prompts([9], seed=8)
    got = generate(m, prompts, greedy, decode_step=step).completions[0].token_ids
    assert step.compiled and step.built == 1, step.fallback_reason
    projections = sum(type(mod).__name__ == "Int8Linear" for mod in m.modules())
    assert _shim_calls(tmp_path, "aoti_torch_cpu_row_gemv_q8") == projections
    assert got == generate(m, prompts, greedy).completions[0].token_ids
    with torch.inference_mode():
        cache, ref_cache = m.allocate_cache(1, 30), m.allocate_cache(1, 30)
        prompt = torch.tensor(prompts)
        m(prompt, cache)
        m(prompt, ref_cache)
        for t in range(4):
            tok = torch.tensor([[5 + 11 * t]])
            # float32 reassociation in the fused step can move an input across a 16-bit rounding step (3e-5)
            assert rel(step(tok, cache), m(tok, ref_cache)) < 2e-4


@needs_cxx
def test_a_float32_step_compiled_ahead_of_time_calls_the_attention_kernel(tmp_path):
    """A float32 model's ahead-of-time step calls ``aoti_torch_cpu_decode_attention`` once per attention layer
    and ``aoti_torch_cpu_ssm_step`` once per Mamba layer, and decodes greedily what the eager model (SDPA) decodes, its logits within float32 rounding of it."""
    m = decode_model(seed=3, hybrid_override_pattern="M*-*")  # two attention layers
    greedy = SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=12)
    step = aot_decode.AotDecode(m, tmp_path)
    prompts = random_prompts([10], seed=4)
    got = generate(m, prompts, greedy, decode_step=step).completions[0].token_ids
    assert step.compiled and step.built == 1, step.fallback_reason
    assert _shim_calls(tmp_path, "aoti_torch_cpu_decode_attention") == 2
    assert _shim_calls(tmp_path, "aoti_torch_cpu_ssm_step") == 1  # the Mamba layer's state update
    assert got == generate(m, prompts, greedy).completions[0].token_ids
    with torch.inference_mode():
        cache, ref_cache = m.allocate_cache(1, 40), m.allocate_cache(1, 40)
        m(torch.tensor(prompts), cache)
        m(torch.tensor(prompts), ref_cache)
        for t in range(4):
            tok = torch.tensor([[3 + 7 * t]])
            assert rel(step(tok, cache), m(tok, ref_cache)) < 1e-5


@needs_cxx
def test_a_left_padded_batch_compiled_ahead_of_time_calls_the_padded_attention_kernel(tmp_path):
    """A batch of prompts of three lengths (left-padded) compiles into a step that calls
    ``aoti_torch_cpu_decode_attention_padded`` once per attention layer, and greedy decodes what the eager model
    decodes for each prompt alone (no padding, SDPA)."""
    m = decode_model(seed=3, hybrid_override_pattern="M*-*")  # two attention layers
    greedy = SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=10)
    step = aot_decode.AotDecode(m, tmp_path)
    prompts = random_prompts([11, 3, 7], seed=6)
    batched = generate(m, prompts, greedy, decode_step=step)
    assert step.compiled and step.built == 1, step.fallback_reason
    assert _shim_calls(tmp_path, "aoti_torch_cpu_decode_attention_padded") == 2
    assert _shim_calls(tmp_path, "aoti_torch_cpu_decode_attention") == 0
    assert _shim_calls(tmp_path, "aoti_torch_cpu_ssm_step") == 1  # a batch of 3: strided x, B, C per row
    alone = [generate(m, [p], greedy).completions[0].token_ids for p in prompts]
    assert [c.token_ids for c in batched.completions] == alone
