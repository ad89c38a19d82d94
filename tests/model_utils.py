"""Shared helpers for the model tests: small configs and weights randomised away from their defaults."""

from __future__ import annotations

import shutil

import pytest
import torch

from nanocli_model import NanoConfig

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, hybrid_override_pattern="M-M*-M",
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=8, mamba_head_dim=4,
            n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8, max_position_embeddings=512)


# torch.compile on CPU builds C++ kernels: tests that compile for real need a compiler on the PATH.
needs_cxx = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                               reason="torch.compile on CPU needs a C++ compiler (g++ or clang++)")


def tiny_config(**overrides) -> NanoConfig:
    return NanoConfig(**{**TINY, **overrides})


# Two attention layers and GQA with two query heads per KV head: the decode-step tests' model (compiled steps)
DECODE_PATTERN = dict(hybrid_override_pattern="M-M*-M*", n_groups=2, mamba_num_heads=8, num_attention_heads=4,
                      num_key_value_heads=2)


def decode_model(seed=0, dtype=torch.float32, **overrides):
    """A tiny DECODE_PATTERN model with ``randomize(seed)`` weights, in ``dtype``, in eval mode."""
    from nanocli_model import NanoForCausalLM

    m = NanoForCausalLM(tiny_config(**{**DECODE_PATTERN, **overrides})).eval()
    randomize(m, seed)
    return m.to(dtype)


def random_prompts(lengths, seed=0) -> list[list[int]]:
    """Prompts of the given lengths, ids 3..95 (the tiny vocabulary without the special ids)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter away from its default so parity tests can fail.

    Norm weights around 1 (not 1), D and conv bias varied, A_log in [-1, 1.5] (A in [-4.5, -0.4]),
    dt_bias in [-1, 1] so that dt = softplus(dt + dt_bias) stays well above time_step_min (1e-3).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 2)
        if name.endswith("A_log"):
            new = torch.rand(p.shape, generator=g) * 2.5 - 1.0
        elif name.endswith("dt_bias"):
            new = torch.rand(p.shape, generator=g) * 2.0 - 1.0
        elif name.endswith(".D"):
            new = torch.randn(p.shape, generator=g)
        elif "norm" in leaf[-2] or name.endswith("norm_f.weight"):
            new = 1.0 + 0.3 * torch.randn(p.shape, generator=g)
        elif name.endswith("conv1d.weight") or name.endswith("conv1d.bias"):
            new = 0.4 * torch.randn(p.shape, generator=g)
        else:  # projections, embeddings: std ~ 1/sqrt(fan_in) keeps activations O(1)
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            new = torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5
            if name.endswith("embeddings.weight"):
                new = torch.randn(p.shape, generator=g)
        p.copy_(new.to(p.dtype))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def ssd_inputs(b, T, H, P, G, N, seed=0, dtype=torch.float64):
    """Random scan operands x (b,T,H,P), dt (b,T,H) in (0.01, 0.81), A (H,) negative, B, C (b,T,G,N), D (H,),
    an initial state (b,H,P,N): what the SSD tests of reference.py and cpu_fastpath.py run on."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g, dtype=dtype)
    dt = torch.rand(b, T, H, generator=g, dtype=dtype) * 0.8 + 0.01
    A = -torch.rand(H, generator=g, dtype=dtype) * 3 - 0.1
    B = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    C = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    D = torch.randn(H, generator=g, dtype=dtype)
    h0 = torch.randn(b, H, P, N, generator=g, dtype=dtype)
    return x, dt, A, B, C, D, h0


def write_header_only_checkpoint(out, config: NanoConfig, shards: int = 4, st_dtype: str = "BF16") -> int:
    """A model directory of ``config`` whose safetensors shards carry the real headers (every tensor name, dtype,
    full shape and offset, with an index) but sparse data: each file is extended with ``truncate`` to its full
    size and costs no disk. Header readers (fit-check, the host-memory check) see a full-size checkpoint; reading
    a tensor gives zeros. Returns the tensor bytes the headers describe."""
    import json
    import struct
    from pathlib import Path

    from nanocli_model.model import NanoForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json_string(), encoding="utf-8")
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in NanoForCausalLM(config).state_dict().items()}
    size = {"BF16": 2, "F16": 2, "F32": 4}[st_dtype]
    names, per = list(shapes), -(-len(shapes) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names[i * per:(i + 1) * per]:
            n = size
            for d in shapes[name]:
                n *= d
            header[name] = {"dtype": st_dtype, "shape": shapes[name], "data_offsets": [offset, offset + n]}
            weight_map[name] = fname
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return total
