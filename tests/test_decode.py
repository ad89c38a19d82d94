"""The single-token decode fast path: conv window step, grouped SSD step, grouped-query attention step,
and the column-major layout decode gives tall weights on CPU."""

import pytest
import torch
import torch.nn.functional as F

from model_utils import randomize, rel_err, tiny_config
from nanocli_model import NanoForCausalLM
from nanocli_model import reference as R
from nanocli_model.checkpoint import load_pretrained, save_pretrained


def _model(seed=0, **overrides):
    m = NanoForCausalLM(tiny_config(**overrides)).eval()
    randomize(m, seed)
    return m


@pytest.mark.parametrize("heads,kv", [(4, 1), (4, 2), (4, 4)])
@torch.no_grad()
def test_decode_steps_equal_full_forward_for_every_kv_grouping(heads, kv):
    m = _model(num_attention_heads=heads, num_key_value_heads=kv)
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(kv))
    full = m(ids)
    cache = m.allocate_cache(2, 20)
    steps = [m(ids[:, :5], cache)] + [m(ids[:, t:t + 1], cache) for t in range(5, 20)]
    assert rel_err(torch.cat(steps, 1), full) < 1e-5


@torch.no_grad()
def test_decode_layout_keeps_values_and_checkpoints():
    m = _model()
    tall = {n: p.clone() for n, p in m.named_parameters() if p.dim() == 2 and p.shape[0] > p.shape[1]}
    cache = m.allocate_cache(1, 8)
    m(torch.tensor([[3, 4, 5]]), cache)
    m(torch.tensor([[6]]), cache)  # the first single-token step switches the layout
    params = dict(m.named_parameters())
    for name, before in tall.items():
        if "embeddings" in name:
            continue
        assert not params[name].is_contiguous() and params[name].stride() == (1, params[name].shape[0]), name
        assert torch.equal(params[name], before), name
    ids = torch.randint(0, 96, (1, 9))
    assert rel_err(m(ids), _model()(ids)) < 1e-5  # same weights; only the summation order may differ


def test_training_and_saving_after_decode(tmp_path):
    m = _model()
    with torch.inference_mode():
        cache = m.allocate_cache(1, 4)
        m(torch.tensor([[1, 2]]), cache)
        m(torch.tensor([[3]]), cache)
    m.train()
    loss = m(torch.randint(0, 96, (2, 7))).logsumexp(-1).mean()
    loss.backward()  # parameters made under inference_mode would refuse this
    assert all(p.grad is not None for p in m.parameters())
    save_pretrained(m, tmp_path)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path)(ids), m(ids))


def test_ssd_step_with_low_precision_state_matches_float32():
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(2, 8, 4, generator=g), torch.rand(2, 8, generator=g)
    A, D = -torch.rand(8, generator=g), torch.randn(8, generator=g)
    B, C = torch.randn(2, 2, 5, generator=g), torch.randn(2, 2, 5, generator=g)
    s32 = torch.randn(2, 8, 4, 5, generator=g)
    s16 = s32.to(torch.bfloat16)
    y32 = R.ssd_step(s32, x, dt, A, B, C, D)
    y16 = R.ssd_step(s16, x, dt, A, B, C, D)
    assert s16.dtype == torch.bfloat16 and y16.dtype == torch.float32
    assert rel_err(y16, y32) < 2e-2 and rel_err(s16.float(), s32) < 2e-2


def test_conv_step_equals_the_definition():
    g = torch.Generator().manual_seed(1)
    w, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(6, 4), (6,)])
    state, x = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(3, 6, 3), (3, 6)])
    window = torch.cat([state, x[..., None]], -1)  # (b, C, K)
    expected = F.silu(F.conv1d(window, w[:, None, :], b, groups=6))[..., 0]
    torch.testing.assert_close(R.causal_conv1d_step(x, w, b, state), expected)
    torch.testing.assert_close(state, window[..., 1:])
