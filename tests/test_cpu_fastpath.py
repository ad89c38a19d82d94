"""cpu_fastpath.py, the optimised PyTorch ops the model runs without the CUDA kernels, against reference.py.

Forward and backward (the hand-written backwards of the scan and the conv against autograd of the readable
math, and gradcheck), with and without an initial state, odd lengths, several groups, bf16 inputs with
float32 accumulation, the in-place decode steps and the cache's channel-last conv state. The definition tests
it shares with reference.py (the float64 recurrence, closed forms) are test_reference.py's, run on both.
"""

import pytest
import torch
import torch.nn.functional as F

from model_utils import rel_err, ssd_inputs
from nanocli_model import cpu_fastpath as FP
from nanocli_model import reference as R

f64 = torch.float64


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
    x, dt, A, B, C, D, _ = ssd_inputs(1, 16, 4, 2, 2, 3, dtype=torch.float32)
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
    inp = list(ssd_inputs(2, T, 8, 3, G, 5, seed=T + G))
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
    args = tuple(t.requires_grad_() for t in ssd_inputs(1, 7, 4, 2, 2, 3, seed=0))
    assert torch.autograd.gradcheck(lambda x, dt, A, B, C, D, h0: FP.ssd_chunked(x, dt, A, B, C, 4, D, h0), args)


def test_ssd_float32_gradients_close_to_float64():
    inp = ssd_inputs(2, 200, 8, 8, 2, 16, seed=4)
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
    x, dt, A, B, C, D, h0 = ssd_inputs(2, T, 4, 8, G, 16, seed=T)
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
@pytest.mark.parametrize("G", [1, 2, 4])
def test_steps_equal_the_reference_steps(G):
    x, dt, A, B, C, D, h0 = ssd_inputs(2, 6, 8, 3, G, 5, seed=G)
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
def test_conv_step_on_the_cache_layout():
    # the cache keeps the conv state channel-last; the step writes it in place, as the reference does
    g = torch.Generator().manual_seed(1)
    w, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(6, 4), (6,)])
    state, x = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(3, 6, 3), (3, 6)])
    cache = state.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, channel-last
    torch.testing.assert_close(FP.causal_conv1d_step(x, w, b, cache), R.causal_conv1d_step(x, w, b, state))
    torch.testing.assert_close(cache, state)


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
