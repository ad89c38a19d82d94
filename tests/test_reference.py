"""The SSD scan and causal conv against their definitions (step-by-step recurrence, float64)."""

import pytest
import torch
import torch.nn.functional as F

from nanocli_model import reference as R


def _inputs(b, T, H, P, G, N, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g, dtype=dtype)
    dt = torch.rand(b, T, H, generator=g, dtype=dtype) * 0.8 + 0.01
    A = -torch.rand(H, generator=g, dtype=dtype) * 3 - 0.1
    B = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    C = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    D = torch.randn(H, generator=g, dtype=dtype)
    h0 = torch.randn(b, H, P, N, generator=g, dtype=dtype)
    return x, dt, A, B, C, D, h0


@pytest.mark.parametrize("T,chunk", [(1, 8), (7, 8), (16, 8), (37, 8), (37, 16), (64, 64), (100, 128)])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_chunked_equals_recurrence_float64(T, chunk, G):
    x, dt, A, B, C, D, h0 = _inputs(2, T, 8, 4, G, 6, seed=T * 10 + G)
    y_ref, s_ref = R.ssd_sequential(x, dt, A, B, C, D, h0)
    y, s = R.ssd_chunked(x, dt, A, B, C, chunk, D, h0)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_chunked_float32_close_to_float64_definition():
    x, dt, A, B, C, D, h0 = _inputs(1, 300, 16, 8, 2, 16, seed=3)
    y_ref, s_ref = R.ssd_sequential(x, dt, A, B, C, D, h0)
    y, s = R.ssd_chunked(*(t.float() for t in (x, dt, A, B, C)), 128, D.float(), h0.float())
    assert y.dtype == torch.float32
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < 1e-5
    assert (s.double() - s_ref).abs().max() / s_ref.abs().max() < 1e-5


def test_strong_decay_stays_finite_and_close():
    # Far past realistic decay (dt * |A| up to 500 per step, cumulative sums near -1e5 within one chunk):
    # no inf/nan may appear (the future is masked before exp), and the float32 result stays within the
    # cancellation error of the cumulative-sum differences that mamba-ssm's kernels share (~|sum| * 1e-7).
    x, dt, A, B, C, D, _ = _inputs(1, 256, 4, 4, 1, 4, seed=5, dtype=torch.float32)
    y, s = R.ssd_chunked(x, dt * 20, A * 10, B, C, 256, D)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    y_ref, _ = R.ssd_sequential(x.double(), dt.double() * 20, A.double() * 10, B.double(), C.double(), D.double())
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < 1e-3
    y64, _ = R.ssd_chunked(x.double(), dt.double() * 20, A.double() * 10, B.double(), C.double(), 256, D.double())
    torch.testing.assert_close(y64, y_ref, rtol=1e-9, atol=1e-9)


def test_split_sequence_carries_state():
    # Scanning [0, 20) then [20, 37) from the carried state equals one scan of [0, 37).
    x, dt, A, B, C, D, h0 = _inputs(2, 37, 8, 4, 2, 6, seed=11)
    y_full, s_full = R.ssd_chunked(x, dt, A, B, C, 8, D, h0)
    y1, s1 = R.ssd_chunked(x[:, :20], dt[:, :20], A, B[:, :20], C[:, :20], 8, D, h0)
    y2, s2 = R.ssd_chunked(x[:, 20:], dt[:, 20:], A, B[:, 20:], C[:, 20:], 8, D, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_full, rtol=1e-10, atol=1e-10)


def test_step_matches_closed_form_for_one_token():
    # One step from a zero state: h = dt * x B^T, y = h C + D x (per head, B/C of the head's group).
    x, dt, A, B, C, D, _ = _inputs(1, 1, 4, 3, 2, 5, seed=2)
    state = torch.zeros(1, 4, 3, 5, dtype=torch.float64)
    y = R.ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    for h in range(4):
        grp = h // 2
        h_expected = dt[0, 0, h] * torch.outer(x[0, 0, h], B[0, 0, grp])
        torch.testing.assert_close(state[0, h], h_expected)
        torch.testing.assert_close(y[0, h], h_expected @ C[0, 0, grp] + D[h] * x[0, 0, h])


def test_discretize_dt_follows_time_step_limit():
    raw = torch.tensor([-30.0, 0.0, 30.0])
    bias = torch.zeros(3)
    assert torch.equal(R.discretize_dt(raw, bias, (0.0, float("inf"))), F.softplus(raw))
    clamped = R.discretize_dt(raw, bias, (0.01, 5.0))
    assert clamped[0].item() == pytest.approx(0.01) and clamped[2].item() == 5.0


@pytest.mark.parametrize("split", [1, 2, 3, 9])
def test_causal_conv_with_state_equals_full(split):
    g = torch.Generator().manual_seed(split)
    x = torch.randn(2, 12, 6, generator=g, dtype=torch.float64)  # (b, T, C)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    full = R.causal_conv1d(x, w, b)
    # the definition, through torch's own grouped conv: zeros before the start, then silu
    expected = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None, :], b, groups=6)).transpose(1, 2)
    torch.testing.assert_close(full, expected)
    state = torch.zeros(2, 6, 3, dtype=torch.float64)
    parts = [R.causal_conv1d(x[:, :split], w, b, state)]
    parts += [R.causal_conv1d(x[:, t:t + 1], w, b, state) for t in range(split, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full)
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))


def test_causal_conv_shorter_than_kernel():
    x = torch.randn(1, 2, 5, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64)
    expected = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None, :], None, groups=5)).transpose(1, 2)
    torch.testing.assert_close(R.causal_conv1d(x, w, None), expected)


def test_cached_masks_work_with_autograd_after_inference_mode():
    # The (Q, Q) mask is cached per Q; built first under inference_mode, it must still serve autograd.
    R._upper_mask_cpu.cache_clear()
    x, dt, A, B, C, D, _ = _inputs(1, 16, 4, 2, 2, 3, dtype=torch.float32)
    with torch.inference_mode():
        R.ssd_chunked(x, dt, A, B, C, 8, D)
    x.requires_grad_(True)
    y, _ = R.ssd_chunked(x, dt, A, B, C, 8, D)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
