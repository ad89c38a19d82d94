"""The training-only fast paths (hand-written backwards) against autograd of the plain formulation, in float64.

Every custom ``autograd.Function`` the training step runs through: the chunked SSD scan, the causal conv, the
RMSNorms, relu^2, the blocked causal GQA attention and the fused lm_head + cross-entropy. Each is held against
autograd of its definition (and ``gradcheck`` on a tiny shape); the whole model's gradients are held against
transformers' NemotronH, which is plain autograd end to end.
"""

import pytest
import torch
import torch.nn.functional as F

from model_utils import randomize, rel_err, tiny_config
from nanocli_model import NanoForCausalLM
from nanocli_model import layers as L
from nanocli_model import reference as R
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


def _ssd_inputs(b, T, H, P, G, N, seed, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(b, T, H, P, generator=g, dtype=dtype),
                dt=torch.rand(b, T, H, generator=g, dtype=dtype) * 0.8 + 0.01,
                A=-torch.rand(H, generator=g, dtype=dtype) * 3 - 0.1,
                B=torch.randn(b, T, G, N, generator=g, dtype=dtype),
                C=torch.randn(b, T, G, N, generator=g, dtype=dtype),
                D=torch.randn(H, generator=g, dtype=dtype),
                h0=torch.randn(b, H, P, N, generator=g, dtype=dtype))


@pytest.mark.parametrize("T,chunk,G,init", [(37, 8, 2, True), (16, 16, 1, False), (5, 8, 2, True),
                                            (24, 8, 4, False), (1, 8, 1, True)])
def test_ssd_backward_equals_autograd_of_the_recurrence(T, chunk, G, init):
    inp = _ssd_inputs(2, T, 8, 3, G, 5, seed=T + G)
    if not init:
        inp["h0"] = None
    ours = {k: None if v is None else v.clone().requires_grad_() for k, v in inp.items()}
    plain = {k: None if v is None else v.clone().requires_grad_() for k, v in inp.items()}
    y, s = R.ssd_chunked(ours["x"], ours["dt"], ours["A"], ours["B"], ours["C"], chunk, ours["D"], ours["h0"])
    y_ref, s_ref = _ssd_plain(**plain)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(1)
    gy, gs = torch.randn(y.shape, generator=g, dtype=f64), torch.randn(s.shape, generator=g, dtype=f64)
    ((y * gy).sum() + (s * gs).sum()).backward()  # through the output and the final state
    ((y_ref * gy).sum() + (s_ref * gs).sum()).backward()
    for k, v in ours.items():
        if v is not None:
            torch.testing.assert_close(v.grad, plain[k].grad, rtol=1e-9, atol=1e-9, msg=k)


def test_ssd_gradcheck():
    inp = _ssd_inputs(1, 7, 4, 2, 2, 3, seed=0)
    args = tuple(inp[k].requires_grad_() for k in ("x", "dt", "A", "B", "C", "D", "h0"))
    assert torch.autograd.gradcheck(lambda x, dt, A, B, C, D, h0: R.ssd_chunked(x, dt, A, B, C, 4, D, h0), args)


def test_ssd_float32_gradients_close_to_float64():
    inp = _ssd_inputs(2, 200, 8, 8, 2, 16, seed=4)
    grads = {}
    for dtype in (f64, torch.float32):
        t = {k: v.to(dtype).clone().requires_grad_() for k, v in inp.items()}
        y, _ = R.ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], 32, t["D"], t["h0"])
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=f64).to(dtype))
        grads[dtype] = {k: v.grad for k, v in t.items()}
    for k in inp:
        assert rel_err(grads[torch.float32][k], grads[f64][k]) < 1e-5, k


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
    torch.testing.assert_close(R.causal_conv1d(big[..., 2:8], w, b), plain(*ins))
    assert torch.autograd.gradcheck(lambda big, w, b=None: R.causal_conv1d(big[..., 2:8], w, b), ins)


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

    monkeypatch.setattr(R._SSDChunked, "apply", staticmethod(ssd))
    monkeypatch.setattr(R._CausalConv1d, "apply", staticmethod(conv))
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
