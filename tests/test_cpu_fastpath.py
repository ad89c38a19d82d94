"""cpu_fastpath.py, the optimised PyTorch ops the model runs without the CUDA kernels, against reference.py.

Forward and backward (the hand-written backwards of the scan and the conv against autograd of the readable
math, and gradcheck), with and without an initial state, odd lengths, several groups, bf16 inputs with
float32 accumulation, the in-place decode steps and the cache's channel-last conv state.
"""

import pytest
import torch
import torch.nn.functional as F

from model_utils import rel_err
from nanocli_model import cpu_fastpath as FP
from nanocli_model import reference as R

f64 = torch.float64


def _inputs(b, T, H, P, G, N, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g, dtype=dtype)
    dt = torch.rand(b, T, H, generator=g, dtype=dtype) * 0.8 + 0.01
    A = -torch.rand(H, generator=g, dtype=dtype) * 3 - 0.1
    B = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    C = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    D = torch.randn(H, generator=g, dtype=dtype)
    h0 = torch.randn(b, H, P, N, generator=g, dtype=dtype)
    return x, dt, A, B, C, D, h0


# ------------------------------------------------------------------------------------------ scan forward
@pytest.mark.parametrize("T,chunk", [(1, 8), (7, 8), (16, 8), (37, 8), (37, 16), (64, 64), (100, 128)])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_chunked_equals_recurrence_float64(T, chunk, G):
    x, dt, A, B, C, D, h0 = _inputs(2, T, 8, 4, G, 6, seed=T * 10 + G)
    y_ref, s_ref = R.ssd_sequential(x, dt, A, B, C, D, h0)
    y, s = FP.ssd_chunked(x, dt, A, B, C, chunk, D, h0)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    y0, s0 = FP.ssd_chunked(x, dt, A, B, C, chunk)  # no initial state, no D
    y0_ref, s0_ref = R.ssd_chunked(x, dt, A, B, C, chunk)
    torch.testing.assert_close(y0, y0_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s0, s0_ref, rtol=1e-10, atol=1e-10)


def test_chunked_float32_close_to_float64_definition():
    x, dt, A, B, C, D, h0 = _inputs(1, 300, 16, 8, 2, 16, seed=3)
    y_ref, s_ref = R.ssd_sequential(x, dt, A, B, C, D, h0)
    y, s = FP.ssd_chunked(*(t.float() for t in (x, dt, A, B, C)), 128, D.float(), h0.float())
    assert y.dtype == torch.float32
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < 1e-5
    assert (s.double() - s_ref).abs().max() / s_ref.abs().max() < 1e-5


def test_strong_decay_stays_finite_and_close():
    # Far past realistic decay (dt * |A| up to 500 per step, cumulative sums near -1e5 within one chunk):
    # no inf/nan may appear (the future is masked before exp), and the float32 result stays within the
    # cancellation error of the cumulative-sum differences that mamba-ssm's kernels share (~|sum| * 1e-7).
    x, dt, A, B, C, D, _ = _inputs(1, 256, 4, 4, 1, 4, seed=5, dtype=torch.float32)
    y, s = FP.ssd_chunked(x, dt * 20, A * 10, B, C, 256, D)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    y_ref, _ = R.ssd_sequential(x.double(), dt.double() * 20, A.double() * 10, B.double(), C.double(), D.double())
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < 1e-3
    y64, _ = FP.ssd_chunked(x.double(), dt.double() * 20, A.double() * 10, B.double(), C.double(), 256, D.double())
    torch.testing.assert_close(y64, y_ref, rtol=1e-9, atol=1e-9)


def test_split_sequence_carries_state():
    # Scanning [0, 20) then [20, 37) from the carried state equals one scan of [0, 37).
    x, dt, A, B, C, D, h0 = _inputs(2, 37, 8, 4, 2, 6, seed=11)
    y_full, s_full = FP.ssd_chunked(x, dt, A, B, C, 8, D, h0)
    y1, s1 = FP.ssd_chunked(x[:, :20], dt[:, :20], A, B[:, :20], C[:, :20], 8, D, h0)
    y2, s2 = FP.ssd_chunked(x[:, 20:], dt[:, 20:], A, B[:, 20:], C[:, 20:], 8, D, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_full, rtol=1e-10, atol=1e-10)


def test_scan_leaves_its_inputs_alone():
    # the inference forward works in place on its own buffers, never on the caller's tensors
    g = torch.Generator().manual_seed(0)
    x, h0 = torch.randn(1, 40, 4, 8, generator=g), torch.randn(1, 4, 8, 6, generator=g)
    B, C = torch.randn(1, 40, 2, 6, generator=g), torch.randn(1, 40, 2, 6, generator=g)
    dt, A = torch.rand(1, 40, 4, generator=g), -torch.rand(4, generator=g)
    before = [t.clone() for t in (x, h0, B, C, dt, A)]
    with torch.inference_mode():
        FP.ssd_chunked(x, dt, A, B, C, 16, None, h0)
    assert all(torch.equal(a, b) for a, b in zip(before, (x, h0, B, C, dt, A)))


def test_cached_masks_work_with_autograd_after_inference_mode():
    # The (Q, Q) mask is cached per Q; built first under inference_mode, it must still serve autograd.
    FP._upper_mask_cpu.cache_clear()
    x, dt, A, B, C, D, _ = _inputs(1, 16, 4, 2, 2, 3, dtype=torch.float32)
    with torch.inference_mode():
        FP.ssd_chunked(x, dt, A, B, C, 8, D)
    x.requires_grad_(True)
    y, _ = FP.ssd_chunked(x, dt, A, B, C, 8, D)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------ scan backward
def _leaves(inp, names=("x", "dt", "A", "B", "C", "D", "h0")):
    return {k: None if v is None else v.clone().requires_grad_() for k, v in zip(names, inp)}


@pytest.mark.parametrize("T,chunk,G,init", [(37, 8, 2, True), (16, 16, 1, False), (5, 8, 2, True),
                                            (24, 8, 4, False), (1, 8, 1, True)])
def test_ssd_backward_equals_autograd_of_the_recurrence(T, chunk, G, init):
    inp = list(_inputs(2, T, 8, 3, G, 5, seed=T + G))
    if not init:
        inp[-1] = None
    ours, plain, blocks = _leaves(inp), _leaves(inp), _leaves(inp)
    y, s = FP.ssd_chunked(*(ours[k] for k in ("x", "dt", "A", "B", "C")), chunk, ours["D"], ours["h0"])
    y_ref, s_ref = R.ssd_sequential(*plain.values())  # autograd of the recurrence
    y_blk, s_blk = R.ssd_chunked(*(blocks[k] for k in ("x", "dt", "A", "B", "C")), chunk, blocks["D"], blocks["h0"])
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(1)
    gy, gs = torch.randn(y.shape, generator=g, dtype=f64), torch.randn(s.shape, generator=g, dtype=f64)
    for yy, ss in ((y, s), (y_ref, s_ref), (y_blk, s_blk)):
        ((yy * gy).sum() + (ss * gs).sum()).backward()  # through the output and the final state
    for k, v in ours.items():
        if v is not None:
            torch.testing.assert_close(v.grad, plain[k].grad, rtol=1e-9, atol=1e-9, msg=k)
            torch.testing.assert_close(v.grad, blocks[k].grad, rtol=1e-9, atol=1e-9, msg=k)


def test_ssd_gradcheck():
    args = tuple(t.requires_grad_() for t in _inputs(1, 7, 4, 2, 2, 3, seed=0))
    assert torch.autograd.gradcheck(lambda x, dt, A, B, C, D, h0: FP.ssd_chunked(x, dt, A, B, C, 4, D, h0), args)


def test_ssd_float32_gradients_close_to_float64():
    inp = _inputs(2, 200, 8, 8, 2, 16, seed=4)
    grads = {}
    for dtype in (f64, torch.float32):
        t = _leaves([v.to(dtype) for v in inp])
        y, _ = FP.ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], 32, t["D"], t["h0"])
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=f64).to(dtype))
        grads[dtype] = {k: v.grad for k, v in t.items()}
    for k in grads[f64]:
        assert rel_err(grads[torch.float32][k], grads[f64][k]) < 1e-5, k


@pytest.mark.parametrize("T,G,init", [(45, 2, True), (32, 1, False)])
def test_bf16_inputs_accumulate_in_float32_forward_and_backward(T, G, init):
    # as the model calls it under bf16: x, B, C in bf16, dt float32 (discretize_dt), A and D float32
    x, dt, A, B, C, D, h0 = _inputs(2, T, 4, 8, G, 16, seed=T)
    inp = [x.bfloat16(), dt.float(), A.float(), B.bfloat16(), C.bfloat16(), D.float(), h0.float() if init else None]
    ours, ref = _leaves(inp), _leaves(inp)
    y, s = FP.ssd_chunked(*(ours[k] for k in ("x", "dt", "A", "B", "C")), 16, ours["D"], ours["h0"])
    y_ref, s_ref = R.ssd_chunked(*(ref[k] for k in ("x", "dt", "A", "B", "C")), 16, ref["D"], ref["h0"])
    assert y.dtype == s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5  # the same bf16 values, summed in float32
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    (y * gy).sum().backward()
    (y_ref * gy).sum().backward()
    for k, v in ours.items():
        if v is not None:
            assert v.grad.dtype == v.dtype, k  # gradients come back in each input's dtype
            tol = 1e-2 if v.dtype == torch.bfloat16 else 1e-4  # a bf16 gradient is one rounding of a float32 one
            assert rel_err(v.grad, ref[k].grad) < tol, k


# ------------------------------------------------------------------------------------------ decode step
def test_step_matches_closed_form_for_one_token():
    # One step from a zero state: h = dt * x B^T, y = h C + D x (per head, B/C of the head's group).
    x, dt, A, B, C, D, _ = _inputs(1, 1, 4, 3, 2, 5, seed=2)
    state = torch.zeros(1, 4, 3, 5, dtype=torch.float64)
    y = FP.ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    for h in range(4):
        grp = h // 2
        h_expected = dt[0, 0, h] * torch.outer(x[0, 0, h], B[0, 0, grp])
        torch.testing.assert_close(state[0, h], h_expected)
        torch.testing.assert_close(y[0, h], h_expected @ C[0, 0, grp] + D[h] * x[0, 0, h])


@pytest.mark.parametrize("G", [1, 2, 4])
def test_steps_equal_the_reference_steps(G):
    x, dt, A, B, C, D, h0 = _inputs(2, 6, 8, 3, G, 5, seed=G)
    ours, ref = h0.clone(), h0.clone()
    for t in range(6):
        y = FP.ssd_step(ours, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        y_ref = R.ssd_step(ref, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_ssd_step_with_low_precision_state_matches_float32():
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(2, 8, 4, generator=g), torch.rand(2, 8, generator=g)
    A, D = -torch.rand(8, generator=g), torch.randn(8, generator=g)
    B, C = torch.randn(2, 2, 5, generator=g), torch.randn(2, 2, 5, generator=g)
    s32 = torch.randn(2, 8, 4, 5, generator=g)
    s16 = s32.to(torch.bfloat16)
    s16_ref = s16.clone()
    y32 = FP.ssd_step(s32, x, dt, A, B, C, D)
    y16 = FP.ssd_step(s16, x, dt, A, B, C, D)
    assert s16.dtype == torch.bfloat16 and y16.dtype == torch.float32
    assert rel_err(y16, y32) < 2e-2 and rel_err(s16.float(), s32) < 2e-2
    torch.testing.assert_close(y16, R.ssd_step(s16_ref, x, dt, A, B, C, D))  # the same computation as the reference
    torch.testing.assert_close(s16, s16_ref)


# ------------------------------------------------------------------------------------------ causal conv
def _channel_last_state(b, C, K, dtype=f64):
    return torch.zeros(b, K - 1, C, dtype=dtype).transpose(1, 2)  # (b, C, K-1) view, as the cache keeps it


@pytest.mark.parametrize("split", [1, 2, 3, 9])
@pytest.mark.parametrize("layout", ["contiguous", "channel-last"])
def test_causal_conv_with_state_equals_full(split, layout):
    g = torch.Generator().manual_seed(split)
    x = torch.randn(2, 12, 6, generator=g, dtype=torch.float64)  # (b, T, C)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    full = FP.causal_conv1d(x, w, b)
    # the definition, through torch's own grouped conv: zeros before the start, then silu
    expected = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None, :], b, groups=6)).transpose(1, 2)
    torch.testing.assert_close(full, expected)
    torch.testing.assert_close(full, R.causal_conv1d(x, w, b))
    state = torch.zeros(2, 6, 3, dtype=torch.float64) if layout == "contiguous" else _channel_last_state(2, 6, 4)
    parts = [FP.causal_conv1d(x[:, :split], w, b, state)]
    parts += [FP.causal_conv1d(x[:, t:t + 1], w, b, state) for t in range(split, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full)
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))


def test_causal_conv_shorter_than_kernel():
    x = torch.randn(1, 2, 5, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64)
    expected = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None, :], None, groups=5)).transpose(1, 2)
    torch.testing.assert_close(FP.causal_conv1d(x, w, None), expected)


def test_conv_step_equals_the_definition():
    g = torch.Generator().manual_seed(1)
    w, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(6, 4), (6,)])
    state, x = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(3, 6, 3), (3, 6)])
    window = torch.cat([state, x[..., None]], -1)  # (b, C, K)
    ref_state = state.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, channel-last
    expected = F.silu(F.conv1d(window, w[:, None, :], b, groups=6))[..., 0]
    torch.testing.assert_close(FP.causal_conv1d_step(x, w, b, state), expected)
    torch.testing.assert_close(state, window[..., 1:])
    torch.testing.assert_close(R.causal_conv1d_step(x, w, b, ref_state), expected)
    torch.testing.assert_close(ref_state, state)


@pytest.mark.parametrize("T", [1, 3, 12])
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv_backward(T, bias):
    g = torch.Generator().manual_seed(T)
    big = torch.randn(2, T, 10, generator=g, dtype=f64, requires_grad=True)  # x is a strided slice, as in a mixer
    w = torch.randn(6, 4, generator=g, dtype=f64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=f64, requires_grad=True) if bias else None

    def plain(big, w, b=None):
        x = big[..., 2:8].transpose(1, 2)
        return F.silu(F.conv1d(F.pad(x, (3, 0)), w[:, None, :], b, groups=6)).transpose(1, 2)

    ins = (big, w, b) if bias else (big, w)
    torch.testing.assert_close(FP.causal_conv1d(big[..., 2:8], w, b), plain(*ins))
    assert torch.autograd.gradcheck(lambda big, w, b=None: FP.causal_conv1d(big[..., 2:8], w, b), ins)
    gout = torch.randn(2, T, 6, generator=g, dtype=f64)
    grads = []
    for conv in (FP.causal_conv1d, R.causal_conv1d):  # the hand-written backward vs autograd of the reference
        out = conv(big[..., 2:8], w, b)
        grads.append(torch.autograd.grad((out * gout).sum(), ins))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_causal_conv_bf16_forward_and_backward():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 20, 16, generator=g).bfloat16().requires_grad_()
    w, b = torch.randn(16, 4, generator=g, requires_grad=True), torch.randn(16, generator=g, requires_grad=True)
    out = FP.causal_conv1d(x, w, b)  # the taps cast to x's dtype: a bf16 conv
    ref = R.causal_conv1d(x, w, b)  # summed in float32, rounded once
    assert out.dtype == ref.dtype == torch.bfloat16 and rel_err(out, ref) < 2e-2
    gout = torch.randn(out.shape, generator=g)
    ours = torch.autograd.grad((out.float() * gout).sum(), (x, w, b))
    theirs = torch.autograd.grad((ref.float() * gout).sum(), (x, w, b))
    for a, r, name in zip(ours, theirs, ("x", "w", "b")):
        assert a.dtype == r.dtype and rel_err(a, r) < 3e-2, name
