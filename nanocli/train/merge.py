"""Checkpoint merging by linear interpolation: ``sum_i w_i * W_i`` tensor by tensor (Nano 2: ``(1-a)*w1 + a*w2``).

Weights are taken as given: non-negative, summing to 1 within 1e-6 (default: equal). The checkpoints
must share their architecture (every ``ARCH_FIELDS`` value of config.json) and hold the same tensor
names with the same shapes. Memory: the first model is loaded once (``load_pretrained``); each of its
tensors is then replaced by the float32 (float64 for float64 weights) accumulation of that tensor across
all checkpoints, read one tensor at a time through ``safe_open``, so never more than one model plus one
tensor per checkpoint is in memory. The result is written in the first model's dtype through
``save_pretrained`` (atomic: the output directory appears complete or not at all), with the first
checkpoint's tokenizer files and a ``merge_config.json`` recording sources and weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from nanocli_model.checkpoint import canonical_name, load_pretrained, save_pretrained, weight_files
from nanocli_model.config import NanoConfig
from nanocli_model.errors import CheckpointError, ConfigError
from nanocli_model.headers import read_safetensors_header

# config.json fields that decide the weights' shapes or the forward computation. Not compared: token ids,
# dtype, init ranges, dropout, cache/serving settings, the SSD chunk size, max_position_embeddings.
ARCH_FIELDS = (
    "vocab_size", "hidden_size", "hybrid_override_pattern", "num_attention_heads", "num_key_value_heads",
    "head_dim", "attention_bias", "sliding_window", "intermediate_size", "mlp_hidden_act", "mlp_bias",
    "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "expand",
    "mamba_hidden_act", "use_conv_bias", "use_bias", "mamba_proj_bias", "time_step_limit",
    "layer_norm_epsilon", "tie_word_embeddings", "residual_in_fp32",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")
MERGE_RECORD = "merge_config.json"
TOLERANCE = 1e-6


def check_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    """Validated interpolation weights for ``n`` checkpoints (equal when None)."""
    if n < 2:
        raise ConfigError(f"merging needs at least 2 checkpoints, got {n}")
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ConfigError(f"{len(weights)} weights for {n} checkpoints; give one weight per checkpoint")
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad:
        raise ConfigError(f"merge weights must be finite and >= 0, got {bad[0]}")
    if abs(sum(weights) - 1.0) > TOLERANCE:
        raise ConfigError(f"merge weights must sum to 1 (within {TOLERANCE}), got {weights} (sum {sum(weights)!r})")
    return weights


def check_configs(paths: Sequence[Path]) -> NanoConfig:
    """The first config; ``CheckpointError`` naming the first architecture field another checkpoint changes."""
    configs = [NanoConfig.from_json_file(p / "config.json") for p in paths]
    for path, config in zip(paths[1:], configs[1:]):
        for name in ARCH_FIELDS:
            a, b = getattr(configs[0], name), getattr(config, name)
            if a != b:
                raise CheckpointError(f"{path}: config.json {name} is {b!r}, {paths[0]} has {a!r}; only "
                                      "checkpoints of one architecture can be merged")
    return configs[0]


def _tensor_index(path: Path) -> dict[str, tuple[str, Path, tuple[int, ...]]]:
    """canonical name -> (stored name, file, shape) from the safetensors headers (``mtp.*`` dropped)."""
    out = {}
    for name, file in weight_files(path).items():
        canon = canonical_name(name)
        if canon is not None:
            out[canon] = (name, file, read_safetensors_header(file)[name].shape)
    return out


def check_tensors(paths: Sequence[Path]) -> list[dict[str, tuple[str, Path, tuple[int, ...]]]]:
    """Per checkpoint, its tensor index; ``CheckpointError`` naming the first tensor that differs."""
    indexes = [_tensor_index(p) for p in paths]
    first = indexes[0]
    for path, index in zip(paths[1:], indexes[1:]):
        for name in sorted(set(first) | set(index)):
            if name not in index:
                raise CheckpointError(f"{path}: has no tensor {name}, {paths[0]} does; cannot merge")
            if name not in first:
                raise CheckpointError(f"{path}: tensor {name} is not in {paths[0]}; cannot merge")
            if index[name][2] != first[name][2]:
                raise CheckpointError(f"{path}: tensor {name} has shape {list(index[name][2])}, {paths[0]} has "
                                      f"{list(first[name][2])}; cannot merge")
    return indexes


def merge_checkpoints(paths: Sequence[str | Path], weights: Sequence[float] | None, out: str | Path) -> Path:
    """Write ``sum_i weights[i] * checkpoint_i`` to ``out`` (module docstring); returns ``out``."""
    from ..resolve import model_target

    out = Path(out)
    weights = check_weights(len(paths), weights)
    for p in paths:
        if not Path(p).is_dir():
            raise CheckpointError(f"{p}: no config.json; pass model directories")
    # a model directory, or a run directory: its final (or newest) checkpoint
    paths = [model_target(str(p), "checkpoint", kinds=("checkpoint", "run")).directory for p in paths]
    if out.exists():
        raise ConfigError(f"{out}: already exists; choose a new output directory (merging never overwrites)")
    check_configs(paths)
    indexes = check_tensors(paths)
    model = load_pretrained(paths[0])
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with contextlib.ExitStack() as stack, torch.no_grad():
        handles: dict[Path, object] = {}

        def read(i: int, name: str) -> torch.Tensor:
            stored, file, _ = indexes[i][name]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            return handles[file].get_tensor(stored)

        for name, target in state.items():
            acc = None
            try:
                for i, w in enumerate(weights):
                    t = read(i, name)
                    if acc is None:
                        acc = torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32))
                    acc.add_(t.to(acc.dtype), alpha=w)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{indexes[i][name][1]}: cannot read tensor {name} ({e}); the file is "
                                      "truncated or corrupt") from None
            target.copy_(acc.to(device=target.device, dtype=target.dtype))  # (same shape) in model 0's dtype
    return _write(model, paths, weights, out)


def _write(model, paths: Sequence[Path], weights: Sequence[float], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
    try:
        record = {"method": "linear", "sources": [str(p) for p in paths], "weights": list(weights)}
        (scratch / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        extra = [paths[0] / f for f in TOKENIZER_FILES if (paths[0] / f).is_file()]
        return save_pretrained(model, out, extra_files=[*extra, scratch / MERGE_RECORD])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
