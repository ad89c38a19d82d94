"""The single-token decode path through the model: every kv grouping against the full forward, and the
column-major layout decode gives tall weights on CPU. (The conv and SSD steps themselves:
test_cpu_fastpath.py.)"""

import pytest
import torch

from model_utils import randomize, rel_err, tiny_config
from nanocli_model import NanoForCausalLM
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
