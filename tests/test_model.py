"""The model: cached prefill + decode against the full forward, dtypes, errors, initialisation."""

import math

import pytest
import torch

from model_utils import randomize, rel_err, tiny_config
from nanocli_model import CacheError, HybridCache, NanoForCausalLM, build_model, memory


def _model(seed=0, **overrides):
    m = NanoForCausalLM(tiny_config(**overrides)).eval()
    randomize(m, seed)
    return m


@pytest.mark.parametrize("splits", [[37], [1] * 12, [20, 1, 1, 1, 9, 1, 5], [8, 8, 8, 1, 12], [3, 30, 1, 3]])
@torch.no_grad()
def test_cached_prefill_and_decode_equal_full_forward(splits):
    m = _model(seed=len(splits))
    ids = torch.randint(0, 96, (3, sum(splits)), generator=torch.Generator().manual_seed(1))
    full = m(ids)
    cache = m.allocate_cache(batch=3, max_len=64)
    outs, pos = [], 0
    for n in splits:
        outs.append(m(ids[:, pos:pos + n], cache))
        pos += n
    assert cache.seq_len == pos
    assert rel_err(torch.cat(outs, 1), full) < 1e-5


@torch.no_grad()
def test_logits_are_float32_and_shaped():
    m = _model()
    ids = torch.randint(0, 96, (2, 11))
    out = m(ids)
    assert out.shape == (2, 11, 96) and out.dtype == torch.float32
    last = m(ids, logits_to_keep=1)
    assert last.shape == (2, 1, 96)
    torch.testing.assert_close(last[:, 0], out[:, -1])


@torch.no_grad()
def test_bf16_model_tracks_fp32():
    m = _model()
    ids = torch.randint(0, 96, (2, 29), generator=torch.Generator().manual_seed(0))
    ref = m(ids)
    m16 = _model().to(torch.bfloat16)
    out = m16(ids)
    assert out.dtype == torch.float32
    # bf16 weights and activations (fp32 scan) through 6 random layers: ~5-10% of the largest logit;
    # a wrong bf16 path (e.g. the SSM in bf16, a dropped cast) lands far outside.
    assert rel_err(out, ref) < 0.15
    cache = m16.allocate_cache(2, 32)
    assert cache.layers[0].ssm.dtype == torch.float32 and cache.layers[0].conv.dtype == torch.bfloat16
    steps = torch.cat([m16(ids[:, :20], cache)] + [m16(ids[:, t:t + 1], cache) for t in range(20, 29)], 1)
    assert rel_err(steps, out) < 0.05


def test_cache_errors_and_reset():
    m = _model()
    cache = m.allocate_cache(batch=1, max_len=8)
    m(torch.zeros(1, 6, dtype=torch.long), cache)
    with pytest.raises(CacheError, match="cache full"):
        m(torch.zeros(1, 3, dtype=torch.long), cache)
    with pytest.raises(CacheError, match="batch"):
        m(torch.zeros(2, 1, dtype=torch.long), cache)
    cache.reset()
    assert cache.seq_len == 0 and all(not t.any() for t in cache.tensors())
    with pytest.raises(CacheError):
        HybridCache.allocate(m.config, batch=0, max_len=4)


def test_ssm_cache_dtype_from_config():
    m = _model(mamba_ssm_cache_dtype="bfloat16")
    assert m.allocate_cache(1, 4).layers[0].ssm.dtype == torch.bfloat16


@torch.no_grad()
def test_init_weights_follow_the_recipe():
    c = tiny_config(hybrid_override_pattern="M-M*-M-M")
    m = build_model(c, seed=0)
    mixer = m.backbone.layers[0].mixer
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1, c.mamba_num_heads + 1, dtype=torch.float32)))
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert (dt >= c.time_step_min * 0.999).all() and (dt <= c.time_step_max * 1.001).all()
    big = build_model(tiny_config(hidden_size=256, intermediate_size=512, vocab_size=1024), seed=0)
    assert big.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    n = big.config.num_hidden_layers
    down = big.backbone.layers[1].mixer.down_proj.weight
    assert down.std().item() == pytest.approx(0.02 / math.sqrt(n), rel=0.05)
    assert torch.equal(build_model(c, seed=0).lm_head.weight, build_model(c, seed=0).lm_head.weight)


def test_param_count_matches_memory_formula():
    for overrides in [{}, dict(tie_word_embeddings=True), dict(use_bias=True, mlp_bias=True, attention_bias=True),
                      dict(use_conv_bias=False)]:
        c = tiny_config(**overrides)
        m = NanoForCausalLM(c)
        assert m.num_parameters() == memory.param_count(c).total, overrides


@torch.no_grad()
def test_tied_embeddings_share_storage():
    m = _model(tie_word_embeddings=True)
    assert m.lm_head.weight is m.backbone.embeddings.weight


def test_backward_reaches_every_parameter():
    m = _model()
    m.train()
    loss = m(torch.randint(0, 96, (2, 19))).logsumexp(-1).mean()
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "norm" not in n or "mixer" in n)


def _left_pad(prompts, pad_id=0):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("lengths", [(5, 21, 13), (1, 17), (16, 16, 3)])
@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone(lengths):
    m = _model(seed=sum(lengths))
    g = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in lengths]
    ids, mask = _left_pad(prompts)
    batched = m(ids, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = m(torch.tensor([p]))
        assert rel_err(batched[i, -len(p):], alone[0]) < 1e-5


@torch.no_grad()
def test_left_padded_prefill_then_decode_equals_each_prompt_alone():
    m = _model(seed=5)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (3, 19, 11)]
    steps = torch.randint(1, 96, (3, 6), generator=g)  # the same continuation tokens for every row
    ids, mask = _left_pad(prompts)
    cache = m.allocate_cache(3, 40)
    outs = [m(ids, cache, attention_mask=mask)[:, -1:]]
    outs += [m(steps[:, t:t + 1], cache) for t in range(6)]
    batched = torch.cat(outs, 1)  # (3, 7, V): last prompt position, then 6 steps
    for i, p in enumerate(prompts):
        c1 = m.allocate_cache(1, 40)
        alone = [m(torch.tensor([p]), c1)[:, -1:]] + [m(steps[i:i + 1, t:t + 1], c1) for t in range(6)]
        assert rel_err(batched[i], torch.cat(alone, 1)[0]) < 1e-5
    with pytest.raises(CacheError, match="first call"):
        m(steps[:, :2], cache, attention_mask=torch.tensor([[0, 1], [1, 1], [1, 1]]))


@torch.no_grad()
def test_left_padded_prefill_keeps_sdpa_on_its_fused_kernels():
    # On CUDA a boolean attention mask together with GQA sends SDPA to its math kernel, whose memory grows as
    # batch x heads x T x S (far above fit-check's estimate). Left-padded prefill chunks must never pass one:
    # each row runs as a plain causal attention of its real tokens.
    import torch.nn.functional as F
    from torch.nn.attention.bias import CausalBias
    from torch.overrides import TorchFunctionMode

    top = []

    class Spy(TorchFunctionMode):  # sees what nano asks SDPA for (not CausalBias's own inner calls)
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                q, mask_ = args[0], kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
                top.append((q.shape[-2], mask_, kwargs.get("enable_gqa", False)))
            return func(*args, **kwargs)

    m = _model(seed=2)
    g = torch.Generator().manual_seed(2)
    ids, mask = _left_pad([torch.randint(1, 96, (n,), generator=g).tolist() for n in (4, 17, 10)])
    cache = m.allocate_cache(3, 24)
    cache.left_pad((1 - mask).sum(1))
    with Spy():
        for chunk in (slice(0, 8), slice(8, 17)):  # chunked prefill: row 0 is all padding in the first chunk
            m(ids[:, chunk], cache)
    prefill = [(T, mask_, gqa) for T, mask_, gqa in top if T > 1]
    assert prefill and all(mask_ is None or isinstance(mask_, CausalBias) for _, mask_, _ in prefill)
    assert any(gqa for _, _, gqa in prefill)  # the tiny model is GQA (4 query heads on 2 KV heads)


@torch.no_grad()
def test_padding_matches_transformers_left_padding(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nanocli_model import load_pretrained, save_pretrained

    m = _model(seed=8)
    save_pretrained(m, tmp_path)
    hf = transformers.NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = _left_pad([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24]])
    ours = load_pretrained(tmp_path)(ids, attention_mask=mask)
    theirs = hf(ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert rel_err(ours[real], theirs[real]) < 1e-4


def test_only_left_padding_is_accepted():
    m = _model()
    ids = torch.ones(2, 4, dtype=torch.long)
    for bad in ([[1, 1, 0, 0], [1, 1, 1, 1]], [[0, 1, 0, 1], [1, 1, 1, 1]], [[0, 0, 0, 0], [1, 1, 1, 1]]):
        with pytest.raises(CacheError, match="left padding"):
            m(ids, attention_mask=torch.tensor(bad))
    with pytest.raises(CacheError, match="shape"):
        m(ids, attention_mask=torch.ones(2, 3))
    assert torch.equal(m(ids, attention_mask=torch.ones(2, 4)), m(ids))
