"""reference.py, the readable Mamba-2 math, against its definitions: the step-by-step recurrence in float64,
the conv as an explicit loop (and torch's grouped conv), closed forms, and gradcheck for its autograd.

The definition tests (``impl``) also hold cpu_fastpath.py, the optimised ops the model runs on CPU, to the same
definitions; test_cpu_fastpath.py holds what is its own (hand-written backwards, layouts, in-place steps)."""

import pytest
import torch
import torch.nn.functional as F

from model_utils import ssd_inputs
from nanocli_model import cpu_fastpath as FP
from nanocli_model import reference as R

IMPLS = [pytest.param(R, id="reference"), pytest.param(FP, id="cpu_fastpath")]


def _conv_loop(x, w, b, past=None):
    """out[t, c] = silu(b[c] + sum_k w[c, k] x[t - (K-1) + k, c]), zeros (or ``past`` (b, C, K-1)) before x."""
    batch, T, C = x.shape
    K = w.shape[1]
    out = torch.empty_like(x)
    for i in range(batch):
        for t in range(T):
            for c in range(C):
                acc = b[c].item() if b is not None else 0.0
                for k in range(K):
                    j = t - (K - 1) + k
                    if j >= 0:
                        acc += w[c, k].item() * x[i, j, c].item()
                    elif past is not None:
                        acc += w[c, k].item() * past[i, c, K - 1 + j].item()
                out[i, t, c] = acc
    return F.silu(out)


# ------------------------------------------------------------------------------------------ the SSD scan
@pytest.mark.parametrize("T,chunk", [(1, 8), (7, 8), (16, 8), (37, 8), (37, 16), (64, 64), (100, 128)])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_equals_recurrence_float64(impl, T, chunk, G):
    x, dt, A, B, C, D, h0 = ssd_inputs(2, T, 8, 4, G, 6, seed=T * 10 + G)
    y_ref, s_ref = R.ssd_sequential(x, dt, A, B, C, D, h0)
    y, s = impl.ssd_chunked(x, dt, A, B, C, chunk, D, h0)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    y0, s0 = impl.ssd_chunked(x, dt, A, B, C, chunk)  # no initial state, no D
    y0_ref, s0_ref = R.ssd_sequential(x, dt, A, B, C)
    torch.testing.assert_close(y0, y0_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s0, s0_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_float32_close_to_float64_definition(impl):
    x, dt, A, B, C, D, h0 = ssd_inputs(1, 300, 16, 8, 2, 16, seed=3)
    y_ref, s_ref = R.ssd_sequential(x, dt, A, B, C, D, h0)
    y, s = impl.ssd_chunked(*(t.float() for t in (x, dt, A, B, C)), 128, D.float(), h0.float())
    assert y.dtype == torch.float32
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < 1e-5
    assert (s.double() - s_ref).abs().max() / s_ref.abs().max() < 1e-5


def test_bf16_inputs_accumulate_in_float32():
    x, dt, A, B, C, D, h0 = ssd_inputs(1, 40, 4, 4, 2, 8, seed=6)
    xb, Bb, Cb = (t.to(torch.bfloat16) for t in (x, B, C))
    y, s = R.ssd_chunked(xb, dt.float(), A.float(), Bb, Cb, 16, D.float(), h0.float())
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    y_ref, s_ref = R.ssd_sequential(xb.double(), dt, A, Bb.double(), Cb.double(), D, h0)  # the same bf16 values
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < 1e-5
    assert (s.double() - s_ref).abs().max() / s_ref.abs().max() < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_strong_decay_stays_finite_and_close(impl):
    # Far past realistic decay (dt * |A| up to 500 per step, segment sums near -1e5 within one chunk): the
    # future is -inf before exp, so no inf/nan appears, and the segment sums are summed, not differenced.
    x, dt, A, B, C, D, _ = ssd_inputs(1, 256, 4, 4, 1, 4, seed=5, dtype=torch.float32)
    y, s = impl.ssd_chunked(x, dt * 20, A * 10, B, C, 256, D)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    y_ref, _ = R.ssd_sequential(x.double(), dt.double() * 20, A.double() * 10, B.double(), C.double(), D.double())
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < 1e-3
    y64, _ = impl.ssd_chunked(x.double(), dt.double() * 20, A.double() * 10, B.double(), C.double(), 256, D.double())
    torch.testing.assert_close(y64, y_ref, rtol=1e-9, atol=1e-9)


def test_segsum():
    a = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    inf = float("inf")
    expected = torch.tensor([[0.0, -inf, -inf], [2.0, 0.0, -inf], [6.0, 4.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(R.segsum(a), expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_split_sequence_carries_state(impl):
    # Scanning [0, 20) then [20, 37) from the carried state equals one scan of [0, 37).
    x, dt, A, B, C, D, h0 = ssd_inputs(2, 37, 8, 4, 2, 6, seed=11)
    y_full, s_full = impl.ssd_chunked(x, dt, A, B, C, 8, D, h0)
    y1, s1 = impl.ssd_chunked(x[:, :20], dt[:, :20], A, B[:, :20], C[:, :20], 8, D, h0)
    y2, s2 = impl.ssd_chunked(x[:, 20:], dt[:, 20:], A, B[:, 20:], C[:, 20:], 8, D, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_step_matches_closed_form_for_one_token(impl):
    # One step from a zero state: h = dt * x B^T, y = h C + D x (per head, B/C of the head's group).
    x, dt, A, B, C, D, _ = ssd_inputs(1, 1, 4, 3, 2, 5, seed=2)
    state = torch.zeros(1, 4, 3, 5, dtype=torch.float64)
    y = impl.ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    for h in range(4):
        grp = h // 2
        h_expected = dt[0, 0, h] * torch.outer(x[0, 0, h], B[0, 0, grp])
        torch.testing.assert_close(state[0, h], h_expected)
        torch.testing.assert_close(y[0, h], h_expected @ C[0, 0, grp] + D[h] * x[0, 0, h])


def test_steps_equal_sequential():
    x, dt, A, B, C, D, h0 = ssd_inputs(2, 9, 8, 3, 4, 5, seed=8)
    y_ref, s_ref = R.ssd_sequential(x, dt, A, B, C, D, h0)
    state = h0.clone()
    ys = [R.ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(9)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, s_ref, rtol=1e-12, atol=1e-12)


def test_step_with_low_precision_state():
    x, dt, A, B, C, D, h0 = ssd_inputs(2, 1, 8, 4, 2, 5, seed=9, dtype=torch.float32)
    s32, s16 = h0.clone(), h0.to(torch.bfloat16)
    y32 = R.ssd_step(s32, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    y16 = R.ssd_step(s16, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    assert s16.dtype == torch.bfloat16 and y16.dtype == torch.float32
    assert (y16 - y32).abs().max() / y32.abs().max() < 2e-2
    assert (s16.float() - s32).abs().max() / s32.abs().max() < 2e-2


def test_discretize_dt_follows_time_step_limit():
    raw = torch.tensor([-30.0, 0.0, 30.0])
    bias = torch.zeros(3)
    assert torch.equal(R.discretize_dt(raw, bias, (0.0, float("inf"))), F.softplus(raw))
    clamped = R.discretize_dt(raw, bias, (0.01, 5.0))
    assert clamped[0].item() == pytest.approx(0.01) and clamped[2].item() == 5.0


def test_ssd_gradcheck():
    # odd length (T = 7, chunk 4: a padded tail), two groups, an initial state, D
    x, dt, A, B, C, D, h0 = (t.requires_grad_() for t in ssd_inputs(1, 7, 4, 2, 2, 3, seed=0))
    args = (x, dt, A, B, C, D, h0)
    assert torch.autograd.gradcheck(lambda x, dt, A, B, C, D, h0: R.ssd_chunked(x, dt, A, B, C, 4, D, h0), args)
    assert torch.autograd.gradcheck(R.ssd_sequential, args)


# ------------------------------------------------------------------------------------------ the causal conv
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv_equals_explicit_loop(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if bias else None
    torch.testing.assert_close(R.causal_conv1d(x, w, b), _conv_loop(x, w, b))
    past = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    state = past.clone()
    torch.testing.assert_close(R.causal_conv1d(x, w, b, state), _conv_loop(x, w, b, past))
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))


def _conv_state(layout: str) -> torch.Tensor:
    """A zero conv state (b=2, C=6, K-1=3): contiguous, or channel-last as the cache keeps it."""
    if layout == "contiguous":
        return torch.zeros(2, 6, 3, dtype=torch.float64)
    return torch.zeros(2, 3, 6, dtype=torch.float64).transpose(1, 2)  # (b, C, K-1) view


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["contiguous", "channel-last"])
@pytest.mark.parametrize("split", [1, 2, 3, 9])
def test_causal_conv_with_state_equals_full(impl, layout, split):
    g = torch.Generator().manual_seed(split)
    x = torch.randn(2, 12, 6, generator=g, dtype=torch.float64)  # (b, T, C)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    full = impl.causal_conv1d(x, w, b)
    # the definition, through torch's own grouped conv: zeros before the start, then silu
    expected = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None, :], b, groups=6)).transpose(1, 2)
    torch.testing.assert_close(full, expected)
    state = _conv_state(layout)
    parts = [impl.causal_conv1d(x[:, :split], w, b, state)]
    parts += [impl.causal_conv1d(x[:, t:t + 1], w, b, state) for t in range(split, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full)
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))
    state = _conv_state(layout)
    steps = [impl.causal_conv1d_step(x[:, t], w, b, state) for t in range(12)]
    torch.testing.assert_close(torch.stack(steps, 1), full)
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_conv_shorter_than_kernel(impl):
    x = torch.randn(1, 2, 5, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64)
    expected = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None, :], None, groups=5)).transpose(1, 2)
    torch.testing.assert_close(impl.causal_conv1d(x, w, None), expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_conv_step_equals_the_definition(impl):
    g = torch.Generator().manual_seed(1)
    w, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(6, 4), (6,)])
    state, x = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(3, 6, 3), (3, 6)])
    window = torch.cat([state, x[..., None]], -1)  # (b, C, K)
    expected = F.silu(F.conv1d(window, w[:, None, :], b, groups=6))[..., 0]
    torch.testing.assert_close(impl.causal_conv1d_step(x, w, b, state), expected)
    torch.testing.assert_close(state, window[..., 1:])


def test_causal_conv_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(R.causal_conv1d, (x, w, b))
    past = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, w, b: R.causal_conv1d(x, w, b, past.clone()), (x, w, b))
