"""NanoConfig reads both config.json spellings and names the field of every invalid value."""

import json
import math

import pytest

from nanocli_model import ConfigError, NanoConfig, memory

# The released 9B-v2 config.json, NVIDIA's spelling (bare Infinity literal, rms_norm_eps, aliases).
NVIDIA_9B = """{
  "architectures": ["NemotronHForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "attention_head_dim": 128, "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig"},
  "bos_token_id": 1, "chunk_size": 128, "conv_kernel": 4, "eos_token_id": 12, "head_dim": 128,
  "hidden_dropout": 0.0, "hidden_size": 4480,
  "hybrid_override_pattern": "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
  "initializer_range": 0.02, "intermediate_size": 15680, "layer_norm_epsilon": 1e-05, "mamba_head_dim": 80,
  "mamba_hidden_act": "silu", "mamba_num_heads": 128, "mamba_proj_bias": false, "max_position_embeddings": 131072,
  "mlp_bias": false, "mlp_hidden_act": "relu2", "model_type": "nemotron_h", "n_groups": 8,
  "num_attention_heads": 40, "num_hidden_layers": 56, "num_key_value_heads": 8, "num_logits_to_keep": 1,
  "pad_token_id": 0, "rescale_prenorm_residual": true, "residual_in_fp32": false, "rms_norm_eps": 1e-05,
  "sliding_window": null, "ssm_state_size": 128, "tie_word_embeddings": false, "time_step_floor": 0.0001,
  "time_step_limit": [0.0, Infinity], "time_step_max": 0.1, "time_step_min": 0.001, "torch_dtype": "bfloat16",
  "transformers_version": "4.51.3", "use_bias": false, "use_cache": true, "use_conv_bias": true,
  "use_mamba_kernels": true, "vocab_size": 131072, "expand": 2
}"""

# What transformers 5.x writes for the same kind of model (layers_block_type, {"__float__": ...}).
TRANSFORMERS_STYLE = {
    "model_type": "nemotron_h", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
    "layers_block_type": ["linear_attention", "mlp", "full_attention", "linear_attention"],
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "mamba_num_heads": 4, "mamba_head_dim": 8,
    "n_groups": 2, "ssm_state_size": 8, "chunk_size": 8, "conv_kernel": 4, "expand": 2,
    "time_step_limit": [0.0, {"__float__": "Infinity"}], "layer_norm_epsilon": 1e-5,
    "mtp_layers_block_type": ["full_attention", "moe"], "n_routed_experts": 8,
}


def test_reads_nvidia_spelling():
    c = NanoConfig.from_dict(json.loads(NVIDIA_9B))
    assert c.hybrid_override_pattern.count("*") == 4 and c.num_hidden_layers == 56
    assert c.time_step_limit == (0.0, math.inf)
    assert c.mamba_intermediate_size == 10240 != c.expand * c.hidden_size
    assert c.mamba_conv_dim == 12288 and c.mamba_in_proj_dim == 22656
    assert memory.param_count(c).total == 8_888_227_328
    assert "auto_map" not in c.to_dict()  # remote-code pointers are not carried into nano's checkpoints


def test_reads_transformers_spelling():
    c = NanoConfig.from_dict(TRANSFORMERS_STYLE)
    assert c.hybrid_override_pattern == "M-*M" and c.time_step_limit == (0.0, math.inf)
    assert c.layer_types == ["mamba", "mlp", "attention", "mamba"]
    assert c.extra["n_routed_experts"] == 8  # unknown keys are kept for the round trip


@pytest.mark.parametrize("alias,canonical,value", [
    ("mamba_n_groups", "n_groups", 4), ("mamba_d_conv", "conv_kernel", 3), ("mamba_expand", "expand", 1),
    ("mamba_chunk_size", "chunk_size", 16), ("mamba_dt_limit", "time_step_limit", [0.001, 10.0]),
    ("mamba_dt_min", "time_step_min", 0.002), ("rms_norm_eps", "layer_norm_epsilon", 1e-6),
    ("mamba_conv_bias", "use_conv_bias", False), ("attention_head_dim", "head_dim", 16),
])
def test_aliases(alias, canonical, value):
    raw = {k: v for k, v in TRANSFORMERS_STYLE.items() if k != canonical}
    raw[alias] = value
    got = getattr(NanoConfig.from_dict(raw), canonical)
    assert got == (tuple(value) if isinstance(value, list) else value)


def test_round_trip_writes_both_spellings():
    c = NanoConfig.from_dict(json.loads(NVIDIA_9B))
    text = c.to_json_string()
    assert '"time_step_limit": [\n    0.0,\n    Infinity\n  ]' in text
    d = json.loads(text)
    assert d["hybrid_override_pattern"] == c.hybrid_override_pattern
    assert d["layers_block_type"][:3] == ["linear_attention", "mlp", "linear_attention"]
    assert d["num_hidden_layers"] == 56 and d["model_type"] == "nemotron_h"
    assert NanoConfig.from_dict(d) == c


@pytest.mark.parametrize("change,field", [
    ({"hybrid_override_pattern": "M-E*"}, "mixture-of-experts"),
    ({"hybrid_override_pattern": "M-X*"}, "unknown letter"),
    ({"hybrid_override_pattern": ""}, "hybrid_override_pattern"),
    ({"layers_block_type": ["linear_attention", "moe"]}, "mixture-of-experts"),
    ({"layers_block_type": ["linear_attention", "conv"]}, "layers_block_type has unknown type"),
    ({"num_hidden_layers": 5}, "num_hidden_layers is 5"),
    ({"hybrid_override_pattern": "M--*"}, "disagree"),
    ({"num_key_value_heads": 3}, "num_key_value_heads: must divide"),
    ({"n_groups": 3}, "n_groups: must divide"),
    ({"hidden_size": -4}, "hidden_size: must be a positive integer"),
    ({"vocab_size": 10**30}, f"vocab_size: {10**30} is beyond any model"),  # the fuzz soak drew it: a traceback
    ({"head_dim": 1 << 31}, "head_dim: 2147483648 is beyond any model"),
    ({"hidden_size": "32"}, "hidden_size must be an integer"),
    ({"expand": "two"}, "expand must be an integer"),
    ({"eos_token_id": "2"}, "eos_token_id must be an integer or a list"),
    ({"time_step_limit": [0.0, {"__float__": "abc"}]}, "cannot read the float"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"use_conv_bias": "yes"}, "use_conv_bias must be true or false"),
    ({"layer_norm_epsilon": "tiny"}, "layer_norm_epsilon must be a number"),
    ({"time_step_limit": [1.0]}, "time_step_limit"),
    ({"time_step_limit": [2.0, 1.0]}, "time_step_limit"),
    ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act"),
    ({"mamba_ssm_cache_dtype": "int8"}, "mamba_ssm_cache_dtype"),
    ({"sliding_window": 1024}, "sliding_window"),
    ({"model_type": "llama"}, "model_type is 'llama'"),
])
def test_invalid_values_name_the_field(change, field):
    raw = {**TRANSFORMERS_STYLE, **change}
    if field != "disagree" and "hybrid_override_pattern" in change:
        del raw["layers_block_type"]
    with pytest.raises(ConfigError, match=field) as err:
        NanoConfig.from_dict(raw, source="dir/config.json")
    assert str(err.value).startswith("dir/config.json")
    assert isinstance(err.value, ValueError)


def test_no_layout_at_all():
    raw = {k: v for k, v in TRANSFORMERS_STYLE.items() if k != "layers_block_type"}
    with pytest.raises(ConfigError, match="no layer layout"):
        NanoConfig.from_dict(raw)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        NanoConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"hidden_size": 32,\n "oops"}')
    with pytest.raises(ConfigError, match="not valid JSON \\(line 2"):
        NanoConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot be read"):
        NanoConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        NanoConfig.from_json_file(tmp_path / "config.json")
