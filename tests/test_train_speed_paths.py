"""The training-only fast paths (hand-written backwards) against autograd of the plain formulation, in float64.

The custom ``autograd.Function``s of layers.py and losses.py: the RMSNorms, relu^2, the blocked causal GQA
attention and the fused lm_head + cross-entropy, each against autograd of its definition (and ``gradcheck`` on
a tiny shape). The chunked SSD scan's and the causal conv's are cpu_fastpath.py's (test_cpu_fastpath.py holds
them to reference.py). The whole model's gradients, every fast path at once, are held against autograd of the
plain formulation and against transformers' NemotronH, which is plain autograd end to end.
"""

import pytest
import torch
import torch.nn.functional as F

from model_utils import randomize, rel_err, tiny_config
from nanocli_model import NanoForCausalLM
from nanocli_model import cpu_fastpath as FP
from nanocli_model import layers as L
from nanocli_model.losses import causal_lm_loss, linear_cross_entropy

f64 = torch.float64


def _ssd_plain(x, dt, A, B, C, D, h0):
    """The recurrence, out of place, so autograd can differentiate it: the definition."""
    b, T, H, P = x.shape
    heads_per_group = H // B.shape[2]
    Bh, Ch = B.repeat_interleave(heads_per_group, 2), C.repeat_interleave(heads_per_group, 2)  # (b, T, H, N)
    h = h0 if h0 is not None else x.new_zeros(b, H, P, B.shape[-1])
    ys = []
    for t in range(T):
        xdt = (dt[:, t, :, None] * x[:, t])[..., None]  # (b, H, P, 1)
        h = h * torch.exp(dt[:, t] * A)[..., None, None] + xdt * Bh[:, t, :, None]
        ys.append((h * Ch[:, t, :, None]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, 1), h


def test_norms_and_relu_squared_backward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, generator=g, dtype=f64, requires_grad=True)
    w = torch.randn(8, generator=g, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: L._RMSNormFn.apply(x, w, 1e-5), (x, w))
    torch.testing.assert_close(L._RMSNormFn.apply(x, w, 1e-5), F.rms_norm(x, (8,), w, 1e-5))
    zx = torch.randn(2, 3, 12, generator=g, dtype=f64, requires_grad=True)  # z a strided slice of in_proj's output

    def gated(y, zx, w):
        return L._GatedGroupRMSNormFn.apply(y, zx[..., 2:10], w, 2, 1e-5)

    def gated_plain(y, zx, w):
        v = (F.silu(zx[..., 2:10]) * y).view(2, 3, 2, 4)
        return F.rms_norm(v, (4,), eps=1e-5).view(2, 3, 8) * w

    torch.testing.assert_close(gated(x, zx, w), gated_plain(x, zx, w))
    assert torch.autograd.gradcheck(gated, (x, zx, w))
    u = torch.randn(4, 5, generator=g, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(L._ReluSquared.apply, (u,))


@pytest.mark.parametrize("heads,kv,T,block,bias", [(4, 2, 37, 8, False), (4, 1, 16, 8, True), (6, 3, 5, 8, False),
                                                   (4, 4, 9, 4, True)])
def test_blocked_attention_equals_sdpa(monkeypatch, heads, kv, T, block, bias):
    monkeypatch.setattr(L, "ATTENTION_BLOCK", block)
    att = L.Attention(tiny_config(num_attention_heads=heads, num_key_value_heads=kv, attention_bias=bias)).double()
    randomize(att, seed=heads + kv)
    x = torch.randn(2, T, att.q_proj.in_features, dtype=f64, generator=torch.Generator().manual_seed(T))
    gy = torch.randn(2, T, att.o_proj.out_features, dtype=f64, generator=torch.Generator().manual_seed(1))
    results = []
    for saved_floats in (L.ATTENTION_SAVED_FLOATS, 0):  # the blocked path, then SDPA (nothing may be kept)
        monkeypatch.setattr(L, "ATTENTION_SAVED_FLOATS", saved_floats)
        xg = x.clone().requires_grad_()
        att.zero_grad()
        y = att(xg)
        (y * gy).sum().backward()
        results.append([y.detach(), xg.grad] + [p.grad.clone() for p in att.parameters()])
    for ours, sdpa in zip(*results):
        torch.testing.assert_close(ours, sdpa, rtol=1e-10, atol=1e-10)
    q = torch.randn(1, kv, 9, heads // kv, 8, dtype=f64, requires_grad=True)
    k, v = (torch.randn(1, kv, 9, 8, dtype=f64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(L._CausalGQAttention.apply, (q, k, v))


def test_linear_cross_entropy_equals_cross_entropy_of_logits():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=g, dtype=f64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=f64, requires_grad=True)
    y = torch.randint(0, 50, (3, 7), generator=g)
    y[0, 3], y[2] = -100, -100
    loss, n = linear_cross_entropy(h, w, y, chunk=4)
    ref = F.cross_entropy(F.linear(h, w).flatten(0, 1), y.flatten(), reduction="sum")
    assert int(n) == int((y != -100).sum())
    torch.testing.assert_close(loss, ref)
    (loss * 0.3).backward(retain_graph=True)
    got = h.grad.clone(), w.grad.clone()
    (loss * 0.3).backward()  # a second backward over the same graph sees the same (unscaled) gradients
    torch.testing.assert_close(h.grad, 2 * got[0])
    h.grad = w.grad = None
    (ref * 0.3).backward()
    torch.testing.assert_close(got[0], h.grad)
    torch.testing.assert_close(got[1], w.grad)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk=4)[0], ref)
    hs, ws = h[0, :5].detach().requires_grad_(), w.detach()[:9].clone().requires_grad_()
    ys = torch.tensor([1, -100, 8, 0, 3])
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, ys, chunk=2)[0], (hs, ws))


def test_linear_cross_entropy_under_bf16_autocast_matches_lm_head_then_float():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(100, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(h, w, y, chunk=16)
        ref = F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-3 * abs(ref.item())
    loss.backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(h.grad).all()


def _pair(dtype):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    c = tiny_config(hybrid_override_pattern="M-M*-M*", chunk_size=8)
    d = c.to_dict()
    for k in ("architectures", "model_type", "layers_block_type", "num_hidden_layers", "mamba_n_groups",
              "rms_norm_eps"):
        d.pop(k)
    hf = NemotronHForCausalLM(NemotronHConfig(**d)).to(dtype).train()
    randomize(hf, seed=3)
    nano = NanoForCausalLM(c).to(dtype).train()
    nano.load_state_dict({("backbone." + k[6:] if k.startswith("model.") else k): v
                          for k, v in hf.state_dict().items()})
    ids = torch.randint(0, c.vocab_size, (2, 29), generator=torch.Generator().manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    return nano, hf, ids, labels


def _plain_paths(monkeypatch):
    """Route every training fast path of nano through autograd of its plain formulation."""

    def ssd(x, dt, A, B, C, chunk_size, D, h0):
        return _ssd_plain(x, dt, A, B, C, D, h0)

    def conv(x, w, b):
        C = x.shape[-1]
        x = F.pad(x.transpose(1, 2), (w.shape[1] - 1, 0))
        return F.silu(F.conv1d(x, w[:, None], b, groups=C)).transpose(1, 2)

    def gated(y, z, w, groups, eps):
        b, T, inner = y.shape
        v = (F.silu(z) * y).view(b, T, groups, inner // groups)
        return F.rms_norm(v, (inner // groups,), eps=eps).view(b, T, inner) * w

    monkeypatch.setattr(FP._SSDChunked, "apply", staticmethod(ssd))
    monkeypatch.setattr(FP._CausalConv1d, "apply", staticmethod(conv))
    monkeypatch.setattr(L._RMSNormFn, "apply", staticmethod(lambda x, w, eps: F.rms_norm(x, w.shape, w, eps)))
    monkeypatch.setattr(L._GatedGroupRMSNormFn, "apply", staticmethod(gated))
    monkeypatch.setattr(L._ReluSquared, "apply", staticmethod(lambda u: F.relu(u).square()))
    monkeypatch.setattr(L, "ATTENTION_SAVED_FLOATS", 0)  # SDPA


def test_model_gradients_equal_plain_autograd_float64(monkeypatch):
    """The whole training step (every fast path at once, the fused loss included) against autograd of the
    plain formulation of the same model, in float64."""
    nano, _, ids, labels = _pair(f64)
    loss, n = causal_lm_loss(nano, ids, labels)
    (loss / n).backward()
    ours = {k: p.grad.clone() for k, p in nano.named_parameters()}
    nano.zero_grad()
    _plain_paths(monkeypatch)
    ref = F.cross_entropy(nano.lm_head(nano.backbone(ids)).flatten(0, 1), labels.flatten())  # float64 logits
    ref.backward()
    torch.testing.assert_close(loss / n, ref, rtol=1e-12, atol=1e-12)
    for name, p in nano.named_parameters():
        tol = 1e-6 if name.endswith("A_log") else 1e-10  # the mixer takes A = -exp(A_log.float()): float32
        assert rel_err(ours[name], p.grad) < tol, name


def test_model_gradients_match_transformers_float32():
    """And against transformers' NemotronH training loss (plain autograd, its own float32 casts) in float32."""
    nano, hf, ids, labels = _pair(torch.float32)
    loss, n = causal_lm_loss(nano, ids, labels)
    (loss / n).backward()
    ref = hf(input_ids=ids, labels=ids, use_cache=False).loss
    ref.backward()
    assert abs(loss.item() / n.item() - ref.item()) < 1e-6 * abs(ref.item())
    hf_grads = {("backbone." + k[6:] if k.startswith("model.") else k): p.grad for k, p in hf.named_parameters()}
    for name, p in nano.named_parameters():
        assert rel_err(p.grad, hf_grads[name]) < 1e-4, name
