"""Parity with transformers' NemotronHForCausalLM (the oracle), both ways, on random small checkpoints.

transformers 5.24 clamps dt to >= time_step_min in its chunked path (not in its decode path, and not
in NVIDIA's kernels); nano follows ``time_step_limit`` (default (0, inf)) on every path. The
randomised weights keep dt = softplus(dt + dt_bias) far above time_step_min (checked below), so
the clamp never fires and the comparison is exact.
"""

import json

import pytest
import torch

from model_utils import randomize, rel_err, tiny_config
from nanocli_model import NanoConfig, load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")
from transformers import NemotronHConfig, NemotronHForCausalLM  # noqa: E402

CASES = [
    # (pattern, n_groups, mamba heads, chunk_size, seq_len)
    ("M-M*-M", 2, 8, 8, 37),
    ("M*M-", 1, 4, 16, 16),
    ("*-MM-M", 4, 8, 8, 5),
    ("MM*-M*-", 2, 4, 8, 64),
    ("M-", 8, 8, 32, 45),
]


def _hf_config(c: NanoConfig) -> NemotronHConfig:
    d = c.to_dict()
    for k in ("architectures", "model_type", "layers_block_type", "num_hidden_layers", "mamba_n_groups", "rms_norm_eps"):
        d.pop(k)
    return NemotronHConfig(**d)


def _min_dt(model, ids) -> float:
    """Smallest dt = softplus(dt_raw + dt_bias) any Mamba layer of a nano model sees on ``ids``."""
    seen = []
    for layer in model.backbone.layers:
        if layer.kind == "mamba":
            mixer = layer.mixer

            def hook(mod, inp, out, mixer=mixer):
                dt_raw = out[..., -mixer.H:]
                seen.append(torch.nn.functional.softplus(dt_raw + mixer.dt_bias).min().item())
            layer.mixer.in_proj.register_forward_hook(hook)
    model(ids)
    return min(seen)


@pytest.mark.parametrize("pattern,groups,heads,chunk,T", CASES)
@torch.no_grad()
def test_transformers_checkpoint_loads_in_nano_with_equal_logits(tmp_path, pattern, groups, heads, chunk, T):
    c = tiny_config(hybrid_override_pattern=pattern, n_groups=groups, mamba_num_heads=heads, chunk_size=chunk)
    hf = NemotronHForCausalLM(_hf_config(c)).eval()
    randomize(hf, seed=T)
    hf.save_pretrained(tmp_path)
    nano = load_pretrained(tmp_path)
    ids = torch.randint(0, c.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    expected = hf(ids, use_cache=False).logits
    got = nano(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4
    assert _min_dt(nano, ids) > 5 * c.time_step_min  # transformers' dt clamp never fires


@pytest.mark.parametrize("pattern,groups,heads,chunk,T", CASES[:3])
@torch.no_grad()
def test_nano_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, pattern, groups, heads, chunk, T):
    from nanocli_model import NanoForCausalLM

    c = tiny_config(hybrid_override_pattern=pattern, n_groups=groups, mamba_num_heads=heads, chunk_size=chunk)
    nano = NanoForCausalLM(c).eval()
    randomize(nano, seed=100 + T)
    save_pretrained(nano, tmp_path)
    hf = NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.layers_block_type == [{"M": "linear_attention", "*": "full_attention", "-": "mlp"}[x]
                                           for x in pattern]
    ids = torch.randint(0, c.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    assert rel_err(nano(ids), hf(ids, use_cache=False).logits) < 1e-4


HUB_STYLE_CONFIG = """{
  "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
  "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig"},
  "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 6,
  "hybrid_override_pattern": "M-M*-M", "num_attention_heads": 4, "num_key_value_heads": 2,
  "attention_head_dim": 8, "head_dim": 8, "mamba_num_heads": 8, "mamba_head_dim": 4, "mamba_n_groups": 2,
  "ssm_state_size": 8, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 8, "rms_norm_eps": 1e-05,
  "layer_norm_epsilon": 1e-05, "time_step_limit": [0.0, Infinity], "time_step_min": 0.001,
  "mlp_hidden_act": "relu2", "mamba_hidden_act": "silu", "use_conv_bias": true, "use_bias": false,
  "tie_word_embeddings": false, "torch_dtype": "float32", "eos_token_id": 12
}"""


@torch.no_grad()
def test_nvidia_hub_spelling_loads_in_both(tmp_path):
    # A checkpoint whose config.json is written the way NVIDIA's hub configs are (aliases, bare Infinity).
    c = NanoConfig.from_dict(json.loads(HUB_STYLE_CONFIG))
    assert c.n_groups == 2 and c.chunk_size == 8 and c.time_step_limit == (0.0, float("inf"))
    hf = NemotronHForCausalLM(_hf_config(c)).eval()
    randomize(hf, seed=7)
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(HUB_STYLE_CONFIG)
    nano = load_pretrained(tmp_path)
    hf2 = NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 96, (1, 21), generator=torch.Generator().manual_seed(0))
    assert rel_err(nano(ids), hf2(ids, use_cache=False).logits) < 1e-4
