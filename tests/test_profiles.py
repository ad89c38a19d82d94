"""Every shipped profile loads, the released ones match docs/REFERENCE.md, and bad YAML fails loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nanocli.profiles import (
    ProfileError,
    gpu_keys,
    gpu_profile_for_device,
    list_gpu_profiles,
    list_model_profiles,
    load_gpu_profile,
    load_model_profile,
    profiles_dir,
)
from nanocli_model import memory
from nanocli_model.config import ATTENTION, MAMBA, MLP

PROFILES = Path(__file__).resolve().parent.parent / "nanocli" / "profiles"
PATTERN_12B = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
PATTERN_9B = "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"
RELEASED = {  # name: (params, layers, (Mamba, MLP, attention), pattern) from docs/REFERENCE.md section 1
    "nemotron-nano-12b-v2-base": (12_310_001_152, 62, (28, 28, 6), PATTERN_12B),
    "nemotron-nano-9b-v2-base": (8_888_227_328, 56, (27, 25, 4), PATTERN_9B),
    "nemotron-nano-9b-v2": (8_888_227_328, 56, (27, 25, 4), PATTERN_9B),
}
GPU_YAML = {"name": "x", "description": "test GPU", "memory_gib": 24, "framework_overhead": 0.05,
            "reserved_gib": 0, "bandwidth_gbs": 600, "bf16_tflops": 125}
MODEL_YAML = {"name": "x", "description": "test model",
              "config": {"hidden_size": 32, "intermediate_size": 64, "vocab_size": 64,
                         "hybrid_override_pattern": "M-*", "num_attention_heads": 2, "num_key_value_heads": 1,
                         "head_dim": 16, "mamba_num_heads": 4, "mamba_head_dim": 8, "n_groups": 2,
                         "ssm_state_size": 8}}


@pytest.fixture(autouse=True)
def shipped_profiles(monkeypatch):
    """Every test here reads the repo's profiles/, whatever the environment says."""
    monkeypatch.delenv("NANO_PROFILES_DIR", raising=False)


def test_profiles_dir_is_the_repo_folder():
    assert profiles_dir().resolve() == PROFILES


@pytest.mark.parametrize("path", sorted(PROFILES.glob("models/*.yaml")), ids=lambda p: p.stem)
def test_every_model_profile_loads(path):
    profile = load_model_profile(path)
    assert profile.name == path.stem and profile.description
    if profile.params is not None:
        assert profile.params == memory.param_count(profile.config).total


@pytest.mark.parametrize("path", sorted(PROFILES.glob("gpus/*.yaml")), ids=lambda p: p.stem)
def test_every_gpu_profile_loads(path):
    gpu = load_gpu_profile(path)
    assert gpu.name == path.stem and 0 < gpu.budget_gib < gpu.memory_gib


@pytest.mark.parametrize("path", sorted(PROFILES.glob("recipes/*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_loads_into_its_stage_options(path):
    from nanocli.train.recipe import apply_recipe, read_recipe

    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and "stage" in raw, path
    if raw["stage"] == "demo":  # one section per stage, each validated against that stage's options
        from nanocli.demo import options_class, read

        for section in read(str(path)).sections:
            options_class(section.kind)(**section.settings)
        return
    stages = {"pretrain": "nanocli.stages.pretrain:PretrainOptions", "distill": "nanocli.stages.distill:DistillOptions"}
    module, cls = stages[raw["stage"]].split(":")
    options_cls = getattr(__import__(module, fromlist=[cls]), cls)
    settings = apply_recipe(options_cls, read_recipe(str(path))[1], path, raw["stage"])
    options_cls(**settings)  # every key is a field of the stage's options, with the right type


def test_listings_cover_every_file():
    assert [p.name for p in list_model_profiles()] == sorted(p.stem for p in PROFILES.glob("models/*.yaml"))
    assert [g.name for g in list_gpu_profiles()] == sorted(p.stem for p in PROFILES.glob("gpus/*.yaml"))


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_profiles_match_reference(name):
    params, layers, (n_mamba, n_mlp, n_attn), pattern = RELEASED[name]
    profile = load_model_profile(name)
    cfg = profile.config
    assert profile.params == params
    assert memory.param_count(cfg).total == params
    assert cfg.hybrid_override_pattern == pattern
    assert cfg.num_hidden_layers == layers
    assert (cfg.count(MAMBA), cfg.count(MLP), cfg.count(ATTENTION)) == (n_mamba, n_mlp, n_attn)


def test_a10g_budget_is_the_reports():
    assert load_gpu_profile("a10g").budget_gib == pytest.approx(19.66, abs=0.01)


@pytest.mark.parametrize("name, low, high", [("tiny", 1e5, 1e6), ("small", 10e6, 20e6), ("medium", 80e6, 130e6)])
def test_debug_profile_sizes(name, low, high):
    assert low <= memory.param_count(load_model_profile(name).config).total <= high


# ---------------------------------------------------------------------------- bad input
def _write(tmp_path: Path, data, name: str = "x") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_good_test_fixtures_load(tmp_path):
    assert load_model_profile(_write(tmp_path, MODEL_YAML)).config.num_hidden_layers == 3
    assert load_gpu_profile(_write(tmp_path, GPU_YAML)).budget_gib == pytest.approx(22.8)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "name: x\ndescription: [unclosed\nmemory_gib: 3\n")
    with pytest.raises(ProfileError, match=r"x\.yaml: not valid YAML \(line \d+"):
        load_gpu_profile(path)


@pytest.mark.parametrize("loader, data, match", [
    (load_gpu_profile, {k: v for k, v in GPU_YAML.items() if k != "memory_gib"}, "missing field 'memory_gib'"),
    (load_gpu_profile, {**GPU_YAML, "memory_gib": "24 GiB"}, "'memory_gib' must be a number"),
    (load_gpu_profile, {**GPU_YAML, "framework_overhead": 5}, "framework_overhead is a share"),
    (load_gpu_profile, {**GPU_YAML, "reserved_gib": 30}, "leaves -7.20 GiB"),
    (load_gpu_profile, {**GPU_YAML, "memory": 24}, "unknown key"),
    (load_gpu_profile, {**GPU_YAML, "bf16": "no"}, "'bf16' must be true or false"),
    (load_gpu_profile, {**GPU_YAML, "bf16": False}, "bf16 is false but bf16_tflops is given"),
    (load_gpu_profile, {k: v for k, v in GPU_YAML.items() if k != "bf16_tflops"}, "missing field 'bf16_tflops'"),
    (load_gpu_profile, {**{k: v for k, v in GPU_YAML.items() if k != "bf16_tflops"}, "bf16": False},
     "missing field 'fp16_tflops'"),
    (load_gpu_profile, {**GPU_YAML, "vendor_memory_gb": 0}, "vendor_memory_gb must be a finite number > 0"),
    (load_gpu_profile, {**GPU_YAML, "memory_gib": float("inf")}, "memory_gib must be a finite number > 0"),
    (load_gpu_profile, {**GPU_YAML, "reserved_gib": 1.5}, "reserved_for is missing"),
    (load_gpu_profile, {**GPU_YAML, "aliases": "x1"}, "'aliases' must be a list"),
    (load_gpu_profile, {**GPU_YAML, "aliases": [4090]}, "aliases must be a list of names"),
    (load_gpu_profile, {**GPU_YAML, "name": "y"}, "differs from the file name"),
    (load_model_profile, {k: v for k, v in MODEL_YAML.items() if k != "config"}, "missing field 'config'"),
    (load_model_profile, {**MODEL_YAML, "params": "1M"}, "'params' must be an integer"),
    (load_model_profile, {**MODEL_YAML, "params": 123}, "declared count must match"),
    (load_model_profile, {**MODEL_YAML, "config": {**MODEL_YAML["config"], "hidden_size": 0}}, "hidden_size"),
    (load_model_profile, {**MODEL_YAML, "config": {**MODEL_YAML["config"], "use_conv_bias": "yes"}},
     "use_conv_bias"),
    (load_model_profile, {**MODEL_YAML, "config": {**MODEL_YAML["config"], "layer_norm_epsilon": "1e-5"}},
     "write it like 1.0e-5"),
    (load_model_profile, ["not", "a", "mapping"], "expected a mapping"),
    (load_model_profile, "", "got an empty file"),
])
def test_bad_fields_name_file_and_field(tmp_path, loader, data, match):
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError, match=match) as err:
        loader(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unknown_name_lists_the_available_ones(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    _write(tmp_path / "models", MODEL_YAML, name="x")
    monkeypatch.setenv("NANO_PROFILES_DIR", str(tmp_path))
    assert profiles_dir() == tmp_path
    with pytest.raises(ProfileError, match=r"unknown model profile 'nope'; available: x"):
        load_model_profile("nope")
    with pytest.raises(ProfileError, match=r"no gpu profiles: .*gpus is missing; \$NANO_PROFILES_DIR points there"):
        load_gpu_profile("a10g")  # a name is looked up among the aliases too: the folder's absence is the error
    with pytest.raises(ProfileError, match="no such profile file"):
        load_model_profile(tmp_path / "missing.yaml")
    assert [m.name for m in list_model_profiles()] == ["x"]
    with pytest.raises(ProfileError, match=r"no gpu profiles: .*gpus is missing; \$NANO_PROFILES_DIR points there"):
        list_gpu_profiles()  # a listing is never silently empty


# ---------------------------------------------------------------------------- GPU names, aliases, the rented cards
RENTED = {"t4", "l4", "a10", "a10g", "rtx-4090", "rtx-3090", "a100-40gb", "a100-80gb", "h100-80gb", "h200", "b200"}


def test_the_cards_people_rent_have_profiles_with_vendor_memory():
    gpus = {g.name: g for g in list_gpu_profiles()}
    assert RENTED <= set(gpus)
    for g in gpus.values():  # what CUDA reports as total is within 10% of the marketed GB (GB vs GiB, ECC, ...)
        assert g.vendor_memory_gb and abs(g.memory_gib * 2**30 / (g.vendor_memory_gb * 1e9) - 1) < 0.1, g.name
        assert g.tensor_tflops > 0 and g.bandwidth_gbs > 0
    assert (gpus["rtx-4090"].vendor_memory_gb, gpus["rtx-4090"].bandwidth_gbs, gpus["rtx-4090"].bf16_tflops) == (
        24, 1008, 165.2)
    assert (gpus["b200"].vendor_memory_gb, gpus["b200"].memory_gib, gpus["b200"].bf16_tflops) == (180, 179.06, 2250)
    t4 = gpus["t4"]
    assert not t4.bf16 and t4.bf16_tflops is None and t4.fp16_tflops == t4.tensor_tflops == 65
    assert all(g.bf16 for g in gpus.values() if g.name != "t4")
    assert gpus["a10g"].reserved_gib == 1.3 and gpus["a10g"].reserved_for == "a vision encoder, as in the report"
    assert gpus["a10g"].memory_gib == 22.06 and gpus["l4"].memory_gib == 22.03  # the files' figures, kept


@pytest.mark.parametrize("text,name", [("A10G", "a10g"), ("a10g", "a10g"), ("a10", "a10"), ("H100", "h100-80gb"),
                                       ("h100-80GB", "h100-80gb"), ("4090", "rtx-4090"), ("rtx4090", "rtx-4090"),
                                       ("RTX 4090", "rtx-4090"), ("rtx_3090", "rtx-3090"), ("T4", "t4")])
def test_gpu_names_match_in_any_case_and_by_alias(text, name):
    assert load_gpu_profile(text).name == name


@pytest.mark.parametrize("text,message", [
    ("a100", "gpu profile 'a100' is ambiguous; did you mean a100-40gb or a100-80gb?"),
    ("rtx", "gpu profile 'rtx' is ambiguous; did you mean rtx-3090 or rtx-4090?"),
    ("a10gg", "unknown gpu profile 'a10gg'; did you mean a10g"),
    ("l40s", "unknown gpu profile 'l40s'; did you mean l4?"),
    ("quantum", "unknown gpu profile 'quantum'; available: a10, a100-40gb"),
])
def test_unknown_gpu_names_say_what_was_meant(text, message):
    with pytest.raises(ProfileError) as err:
        load_gpu_profile(text)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert all(name in str(err.value) for name in RENTED)


def test_every_name_and_alias_names_one_profile(tmp_path, monkeypatch):
    keys = gpu_keys(list_gpu_profiles())
    assert keys["h100"] == "h100-80gb" and keys["4090"] == "rtx-4090" and "a100" not in keys
    (tmp_path / "gpus").mkdir()
    _write(tmp_path / "gpus", {**GPU_YAML, "name": "x"}, name="x")
    _write(tmp_path / "gpus", {**GPU_YAML, "name": "y", "aliases": ["X"]}, name="y")
    monkeypatch.setenv("NANO_PROFILES_DIR", str(tmp_path))
    assert load_gpu_profile("x").name == "x"  # the file name is found before any alias is read
    with pytest.raises(ProfileError, match="'X' also names the GPU profile 'x'"):
        load_gpu_profile("Y")


@pytest.mark.parametrize("device,name", [
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100-PCIE-40GB", "a100-40gb"), ("NVIDIA A10", "a10"),
    ("NVIDIA A10G", "a10g"), ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("NVIDIA GeForce RTX 3090", "rtx-3090"),
    ("NVIDIA H100 80GB HBM3", "h100-80gb"), ("NVIDIA L4", "l4"), ("Tesla T4", "t4"), ("NVIDIA B200", "b200"),
    ("NVIDIA H200", "h200"), ("NVIDIA L40S", None), ("NVIDIA GeForce RTX 4080", None)])
def test_a_device_name_finds_its_profile_for_mfu(device, name):
    """MFU's peak rate: A10G is not A10, an A100 is not an A10, an L40S is not an L4, a 4090 is not a 3090."""
    g = gpu_profile_for_device(device)
    assert (g and g.name) == name
