"""NanoConfig: the Hugging Face NemotronH ``config.json``, as one validated dataclass.

Field names are exactly the HF ones, so a config travels unchanged between nano, transformers and
vLLM. Two spellings exist in the wild and both are read:

* NVIDIA's hub configs: ``hybrid_override_pattern`` ("M-M-M-MM-M-..."), ``num_hidden_layers``,
  ``rms_norm_eps``, aliases such as ``mamba_n_groups`` / ``mamba_d_conv`` / ``mamba_expand``, and
  ``time_step_limit: [0.0, Infinity]`` with a bare ``Infinity`` literal;
* what transformers 5.x writes: ``layers_block_type`` (``linear_attention`` / ``full_attention`` /
  ``mlp`` / ``moe``) and ``{"__float__": "Infinity"}``.

nano writes the NVIDIA spelling plus ``layers_block_type`` (transformers reads either).
Pattern letters: ``M`` Mamba-2, ``*`` attention, ``-`` MLP. ``E`` (MoE) is rejected.

This module imports no torch: ``nano fit-check`` reads configs in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

MAMBA, ATTENTION, MLP = "mamba", "attention", "mlp"
LETTER_TO_KIND = {"M": MAMBA, "*": ATTENTION, "-": MLP}
KIND_TO_LETTER = {v: k for k, v in LETTER_TO_KIND.items()}
# transformers 5.x names for the layer kinds in ``layers_block_type``.
HF_BLOCK_TYPE = {MAMBA: "linear_attention", ATTENTION: "full_attention", MLP: "mlp"}
HF_BLOCK_TYPE_ALIASES = {"linear_attention": MAMBA, "mamba": MAMBA, "full_attention": ATTENTION,
                         "attention": ATTENTION, "mlp": MLP}

# NVIDIA / older transformers names -> the canonical HF field.
ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "mamba_d_state": "ssm_state_size",
    "rms_norm_eps": "layer_norm_epsilon",
    "attention_head_dim": "head_dim",
}
# Keys that describe the file, not the model; re-derived on save.
_DERIVED_KEYS = {"hybrid_override_pattern", "layers_block_type", "layer_types", "num_hidden_layers",
                 "model_type", "architectures", "auto_map", "transformers_version"}
SSM_CACHE_DTYPES = ("float32", "bfloat16", "float16")
MAX_SIZE = 1 << 31  # every size field is below this


@dataclass
class NanoConfig:
    """The NemotronH architecture. Every field is the HF ``config.json`` field of the same name."""

    vocab_size: int = 131072
    hidden_size: int = 4480
    hybrid_override_pattern: str = "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"
    # attention
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    sliding_window: int | None = None
    max_position_embeddings: int = 131072
    # MLP
    intermediate_size: int = 15680
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    # Mamba-2
    mamba_num_heads: int = 128
    mamba_head_dim: int = 80
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    expand: int = 2
    chunk_size: int = 128
    mamba_hidden_act: str = "silu"
    use_conv_bias: bool = True
    use_bias: bool = False
    mamba_proj_bias: bool = False
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    mamba_ssm_cache_dtype: str = "float32"
    # everything else
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    residual_in_fp32: bool = False
    hidden_dropout: float = 0.0
    use_cache: bool = True
    num_logits_to_keep: int | None = 1
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    torch_dtype: str | None = None
    # Unknown keys from the file, kept so a load -> save round trip loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name))
        self.time_step_limit = tuple(float(v) for v in _as_pair(self.time_step_limit))
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def layer_types(self) -> list[str]:
        """One of ``mamba`` / ``attention`` / ``mlp`` per layer, from the pattern."""
        return [LETTER_TO_KIND[c] for c in self.hybrid_override_pattern]

    @property
    def num_hidden_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def mamba_intermediate_size(self) -> int:
        """Inner width I = heads * head_dim (9B-v2: 10240, which is NOT expand * hidden_size)."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        """Channels of the depthwise conv: x | B | C = I + 2 * G * N."""
        return self.mamba_intermediate_size + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_dim(self) -> int:
        """Rows of in_proj: z | x | B | C | dt = 2I + 2GN + H."""
        return 2 * self.mamba_intermediate_size + 2 * self.n_groups * self.ssm_state_size + self.mamba_num_heads

    def count(self, kind: str) -> int:
        return sum(1 for k in self.layer_types if k == kind)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        pattern = self.hybrid_override_pattern
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError("hybrid_override_pattern: must be a non-empty string of M (Mamba-2), * (attention), - (MLP)")
        if "E" in pattern:
            raise ConfigError("hybrid_override_pattern: 'E' (mixture-of-experts) layers are not supported; "
                              "nano builds the dense Nemotron-Nano-v2 family (letters M, *, -)")
        bad = sorted(set(pattern) - set(LETTER_TO_KIND))
        if bad:
            raise ConfigError(f"hybrid_override_pattern: unknown letter(s) {bad!r} in {pattern!r}; "
                              "allowed: M (Mamba-2), * (attention), - (MLP)")
        positive = ["vocab_size", "hidden_size", "intermediate_size", "ssm_state_size", "conv_kernel", "chunk_size",
                    "max_position_embeddings"]
        if ATTENTION in self.layer_types:
            positive += ["num_attention_heads", "num_key_value_heads", "head_dim"]
        if MAMBA in self.layer_types:
            positive += ["mamba_num_heads", "mamba_head_dim", "n_groups"]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
            if value >= MAX_SIZE:  # torch takes sizes as 64-bit integers; no real model comes near 2^31
                raise ConfigError(f"{name}: {value} is beyond any model (sizes are below 2^31); fix config.json")
        if ATTENTION in self.layer_types and self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_key_value_heads: must divide num_attention_heads ({self.num_attention_heads}), "
                              f"got {self.num_key_value_heads}")
        if MAMBA in self.layer_types and self.mamba_num_heads % self.n_groups:
            raise ConfigError(f"n_groups: must divide mamba_num_heads ({self.mamba_num_heads}), got {self.n_groups}")
        if self.conv_kernel < 2:
            raise ConfigError(f"conv_kernel: must be at least 2, got {self.conv_kernel}")
        if self.mlp_hidden_act != "relu2":
            raise ConfigError(f"mlp_hidden_act: only 'relu2' (the NemotronH MLP) is supported, got {self.mlp_hidden_act!r}")
        if self.mamba_hidden_act != "silu":
            raise ConfigError(f"mamba_hidden_act: only 'silu' is supported, got {self.mamba_hidden_act!r}")
        if self.sliding_window is not None:
            raise ConfigError(f"sliding_window: NemotronH attention is global; expected null, got {self.sliding_window!r}")
        if self.mamba_ssm_cache_dtype not in SSM_CACHE_DTYPES:
            raise ConfigError(f"mamba_ssm_cache_dtype: must be one of {', '.join(SSM_CACHE_DTYPES)}, "
                              f"got {self.mamba_ssm_cache_dtype!r}")
        lo, hi = self.time_step_limit
        if not (0.0 <= lo <= hi) or math.isnan(hi):
            raise ConfigError(f"time_step_limit: must be [min, max] with 0 <= min <= max, got {list(self.time_step_limit)}")
        if not (0.0 < self.time_step_min <= self.time_step_max):
            raise ConfigError(f"time_step_min/time_step_max: need 0 < min <= max, got {self.time_step_min}, {self.time_step_max}")
        if not (self.layer_norm_epsilon > 0):
            raise ConfigError(f"layer_norm_epsilon: must be > 0, got {self.layer_norm_epsilon!r}")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> NanoConfig:
        """Build from either HF spelling. ``source`` names the file in error messages."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        data = {ALIASES.get(k, k): v for k, v in raw.items()}
        for alias, canonical in ALIASES.items():  # both spellings present: the canonical one wins
            if alias in raw and canonical in raw:
                data[canonical] = raw[canonical]
        model_type = data.get("model_type", "nemotron_h")
        if model_type != "nemotron_h":
            raise ConfigError(f"{source}: model_type is {model_type!r}; nano reads NemotronH checkpoints (model_type 'nemotron_h')")
        data["hybrid_override_pattern"] = _pattern_from(data, source)
        n_layers = data.get("num_hidden_layers")
        if n_layers is not None and n_layers != len(data["hybrid_override_pattern"]):
            raise ConfigError(f"{source}: num_hidden_layers is {n_layers} but the layer pattern has "
                              f"{len(data['hybrid_override_pattern'])} letters; make them agree")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        try:
            kwargs = {k: _decode_floats(v) for k, v in data.items() if k in known}
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        extra = {k: v for k, v in raw.items()
                 if ALIASES.get(k, k) not in known and k not in _DERIVED_KEYS and k != "extra"}
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> NanoConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found; a model directory needs a config.json") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot be read ({e})") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid JSON (nested too deeply); restore the model's config.json") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The NVIDIA spelling plus transformers' ``layers_block_type``; JSON-ready."""
        out: dict[str, Any] = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["time_step_limit"] = list(self.time_step_limit)
        out["num_hidden_layers"] = self.num_hidden_layers
        out["layers_block_type"] = [HF_BLOCK_TYPE[k] for k in self.layer_types]
        # Engines read these spellings too; keep them in step with the canonical fields.
        out["rms_norm_eps"] = self.layer_norm_epsilon
        out["mamba_n_groups"] = self.n_groups
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    def to_json_string(self) -> str:
        # allow_nan writes the bare ``Infinity`` literal, as NVIDIA's configs do; both readers accept it.
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=True) + "\n"

    def replace(self, **changes: Any) -> NanoConfig:
        return dataclasses.replace(self, **changes)


def _pattern_from(data: dict[str, Any], source: str) -> str:
    pattern = data.get("hybrid_override_pattern")
    blocks = data.get("layers_block_type", data.get("layer_types"))
    if blocks is not None:
        if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
            raise ConfigError(f"{source}: layers_block_type must be a list of strings")
        if "moe" in blocks:
            raise ConfigError(f"{source}: layers_block_type contains 'moe'; mixture-of-experts layers are not supported "
                              "(nano builds the dense Nemotron-Nano-v2 family)")
        unknown = sorted(set(blocks) - set(HF_BLOCK_TYPE_ALIASES))
        if unknown:
            raise ConfigError(f"{source}: layers_block_type has unknown type(s) {unknown}; "
                              "allowed: linear_attention, full_attention, mlp")
        from_blocks = "".join(KIND_TO_LETTER[HF_BLOCK_TYPE_ALIASES[b]] for b in blocks)
        if isinstance(pattern, str) and pattern != from_blocks:
            raise ConfigError(f"{source}: hybrid_override_pattern {pattern!r} and layers_block_type "
                              f"({from_blocks!r}) disagree; keep one of them")
        return from_blocks
    if pattern is None:
        raise ConfigError(f"{source}: no layer layout; give hybrid_override_pattern (e.g. 'M-M*-') or layers_block_type")
    if not isinstance(pattern, str):
        raise ConfigError(f"{source}: hybrid_override_pattern must be a string, got {type(pattern).__name__}")
    return pattern


def _decode_floats(value: Any) -> Any:
    """transformers 5.x writes non-finite floats as ``{"__float__": "Infinity"}``."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        try:
            return float(value["__float__"])
        except (TypeError, ValueError):
            raise ConfigError(f"cannot read the float {value!r}") from None
    if isinstance(value, list):
        return [_decode_floats(v) for v in value]
    return value


def _as_pair(value: Any) -> tuple[Any, Any]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"time_step_limit: must be a pair [min, max], got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"time_step_limit: must hold two numbers, got {value!r}")
    return value[0], value[1]


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(NanoConfig)}


def _check_type(name: str, value: Any) -> None:
    """Fields are JSON scalars of one type; the message names the field (``from_dict`` adds the file)."""
    kind = _FIELD_TYPES.get(name)
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if kind == "str" and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if kind in ("int", "int | None") and value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if kind == "str | None" and value is not None and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string or null, got {value!r}")
    if kind == "int | list[int] | None" and value is not None and not (
            (isinstance(value, int) and not isinstance(value, bool))
            or (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))):
        raise ConfigError(f"{name} must be an integer or a list of integers, got {value!r}")
