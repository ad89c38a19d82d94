"""memory.py (pure arithmetic) against what the meta-device model and allocated caches really hold."""

from pathlib import Path

import pytest
import torch
import yaml

from nanocli_model import HybridCache, NanoConfig, NanoForCausalLM, memory

PROFILES = sorted((Path(__file__).resolve().parent.parent / "nanocli" / "profiles" / "models").glob("*.yaml"))


def _config(path: Path) -> NanoConfig:
    return NanoConfig.from_dict(yaml.safe_load(path.read_text())["config"], source=str(path))


def test_profiles_found():
    names = {p.stem for p in PROFILES}
    assert {"tiny", "small", "medium", "nemotron-nano-9b-v2", "nemotron-nano-9b-v2-base",
            "nemotron-nano-12b-v2-base"} <= names


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_param_count_equals_meta_model(path):
    c = _config(path)
    with torch.device("meta"):
        m = NanoForCausalLM(c)
    counted = memory.param_count(c)
    assert sum(p.numel() for p in m.parameters()) == counted.total
    for i, layer in enumerate(m.backbone.layers):
        assert sum(p.numel() for p in layer.parameters()) == counted.per_layer[i]
    for kind in ("mamba", "attention", "mlp"):
        real = sum(sum(p.numel() for p in layer.parameters()) for layer in m.backbone.layers if layer.kind == kind)
        assert real == counted.per_kind[kind]
    assert memory.weight_bytes(c, "bf16") == 2 * sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("dtype,ssm", [(torch.bfloat16, None), (torch.float32, torch.bfloat16)])
def test_cache_bytes_equal_allocated_cache(path, dtype, ssm):
    c = _config(path)
    cache = HybridCache.allocate(c, batch=3, max_len=1000, dtype=dtype, device="meta", ssm_dtype=ssm)
    dname, sname = str(dtype)[6:], None if ssm is None else str(ssm)[6:]
    expected = memory.cache_bytes(c, batch=3, max_len=1000, dtype=dname, ssm_dtype=sname)
    assert cache.nbytes() == expected.total
    kv = sum(t.numel() * t.element_size() for layer in cache.layers if hasattr(layer, "k") for t in (layer.k, layer.v))
    conv = sum(layer.conv.numel() * layer.conv.element_size() for layer in cache.layers if hasattr(layer, "conv"))
    assert (kv, conv) == (expected.kv, expected.conv)
    assert cache.nbytes() - kv - conv == expected.ssm


RELEASED = {
    # docs/REFERENCE.md: totals equal the released checkpoints' tensor totals
    "nemotron-nano-12b-v2-base": (12_310_001_152, 168_504_704, 209_720_320, 62_919_680, 671_088_640),
    "nemotron-nano-9b-v2": (8_888_227_328, 147_450_624, 140_497_280, 55_054_720, 587_202_560),
    "nemotron-nano-9b-v2-base": (8_888_227_328, 147_450_624, 140_497_280, 55_054_720, 587_202_560),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_parameter_counts(name):
    c = _config(Path(__file__).resolve().parent.parent / "nanocli" / "profiles" / "models" / f"{name}.yaml")
    total, mamba, mlp, attn, emb = RELEASED[name]
    assert memory.param_count(c).total == total
    assert memory.mamba_layer_params(c) == mamba
    assert memory.mlp_layer_params(c) == mlp
    assert memory.attention_layer_params(c) == attn
    assert memory.param_count(c).embedding == emb == memory.param_count(c).lm_head


def test_report_memory_figures_for_9b():
    # docs/REFERENCE.md section 6: 2.00 GiB KV at 128k (4 layers x 8 heads x 128 x 2 x 2 bytes x 131072),
    # 0.07-0.14 GiB Mamba state (bf16 / fp32), 16.56 GiB bf16 weights.
    c = _config(Path(__file__).resolve().parent.parent / "nanocli" / "profiles" / "models" / "nemotron-nano-9b-v2.yaml")
    gib = 2**30
    assert memory.kv_cache_bytes(c, 1, 131072, "bf16") == 2 * gib
    assert memory.ssm_state_bytes(c, 1, "float32") / gib == pytest.approx(0.132, abs=0.005)
    assert memory.ssm_state_bytes(c, 1, "bf16") / gib == pytest.approx(0.066, abs=0.005)
    assert memory.weight_bytes(c, "bf16") / gib == pytest.approx(16.56, abs=0.01)


def test_forward_flops_by_hand():
    # one Mamba layer, one attention layer, one MLP layer: count every term by hand
    c = NanoConfig(vocab_size=100, hidden_size=8, hybrid_override_pattern="M*-", intermediate_size=12,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=4, mamba_num_heads=2, mamba_head_dim=3,
                   n_groups=1, ssm_state_size=5)
    T = 7
    in_proj = 8 * (2 * 6 + 2 * 5 + 2)  # z, x, B, C, dt
    mamba = in_proj + 6 * 8 + 0  # + out_proj
    attn = 8 * (2 + 1 + 1) * 4 + 2 * 4 * 8
    mlp = 2 * 8 * 12
    expected = 2 * T * (mamba + attn + mlp + 8 * 100)
    expected += 2 * 2 * 2 * 4 * (T * (T + 1) // 2)  # QK^T and PV, 2 heads, causal pairs
    expected += 4 * T * 2 * 3 * 5  # SSD state update + read-out
    assert memory.forward_flops(c, T) == expected
    assert memory.forward_flops(c, T, batch=3) == 3 * expected


def test_dtype_bytes_rejects_unknown():
    assert memory.dtype_bytes("torch.bfloat16") == 2
    with pytest.raises(ValueError, match="unknown dtype"):
        memory.dtype_bytes("int3")
