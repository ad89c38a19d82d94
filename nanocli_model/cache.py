"""HybridCache: what incremental decoding keeps between calls.

Attention layers keep K and V for every past position (grows with context: this is what the report's
4-attention-layer design keeps small); Mamba layers keep a constant-size conv window and SSM state.
Allocated once for (batch, max_len) by ``HybridCache.allocate``; ``memory.cache_bytes`` mirrors the
shapes exactly (a test checks them byte for byte).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ATTENTION, MAMBA, NanoConfig
from .errors import CacheError


@dataclass
class AttentionCache:
    k: torch.Tensor  # (b, kv_heads, max_len, head_dim)
    v: torch.Tensor  # (b, kv_heads, max_len, head_dim)


@dataclass
class MambaCache:
    conv: torch.Tensor  # (b, conv_dim, conv_kernel - 1) channel-last view, model dtype: the last inputs of x|B|C
    ssm: torch.Tensor  # (b, heads, head_dim, state), mamba_ssm_cache_dtype


@dataclass
class HybridCache:
    batch: int
    max_len: int
    layers: list[AttentionCache | MambaCache | None]
    seq_len: int = 0  # positions already consumed
    pad_len: torch.Tensor | None = None  # (batch,) left-padding lengths of the prompts, None if unpadded
    _pending: int = field(default=0, repr=False)

    @classmethod
    def allocate(cls, config: NanoConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", ssm_dtype: torch.dtype | None = None) -> HybridCache:
        """Zeroed cache for ``batch`` sequences of up to ``max_len`` tokens. ``ssm_dtype`` defaults to
        the config's ``mamba_ssm_cache_dtype`` (float32 unless the checkpoint says otherwise)."""
        if batch <= 0 or max_len <= 0:
            raise CacheError(f"cache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
        ssm_dtype = ssm_dtype or getattr(torch, config.mamba_ssm_cache_dtype)
        c, layers = config, []
        for kind in config.layer_types:
            if kind == ATTENTION:
                shape = (batch, c.num_key_value_heads, max_len, c.head_dim)
                layers.append(AttentionCache(torch.zeros(shape, dtype=dtype, device=device),
                                             torch.zeros(shape, dtype=dtype, device=device)))
            elif kind == MAMBA:
                # (b, conv_dim, K-1) as a view of a (b, K-1, conv_dim) buffer: channel-last, the layout
                # causal-conv1d's initial/final states need (kernels.py); the reference reads it time-major
                conv = torch.zeros(batch, c.conv_kernel - 1, c.mamba_conv_dim, dtype=dtype, device=device)
                layers.append(MambaCache(
                    conv.transpose(1, 2),
                    torch.zeros(batch, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, dtype=ssm_dtype,
                                device=device)))
            else:
                layers.append(None)
        return cls(batch=batch, max_len=max_len, layers=layers)

    def tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for layer in self.layers:
            if isinstance(layer, AttentionCache):
                out += [layer.k, layer.v]
            elif isinstance(layer, MambaCache):
                out += [layer.conv, layer.ssm]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        """Forget every sequence (zero the states) so the cache can be reused."""
        for t in self.tensors():
            t.zero_()
        self.seq_len, self.pad_len = 0, None

    # The model brackets each forward with begin/commit so every layer sees the same start position.
    def begin(self, n_new: int, batch: int, pad: torch.Tensor | None = None) -> int:
        if batch != self.batch:
            raise CacheError(f"cache was allocated for batch {self.batch}, got input batch {batch}")
        if pad is not None and self.seq_len > 0:
            raise CacheError("attention_mask with padding is accepted only at the first call (the prompt); "
                             "later calls continue every row")
        if self.seq_len + n_new > self.max_len:
            raise CacheError(f"cache full: {self.seq_len} + {n_new} tokens exceed max_len {self.max_len}; "
                             "allocate a larger cache")
        if pad is not None:
            self.pad_len = pad
        self._pending = n_new
        return self.seq_len

    def left_pad(self, lengths: torch.Tensor) -> None:
        """Declare the prompts' left-padding lengths (b,) before the first forward, so a padded prompt can be
        prefilled in chunks of any size (an ``attention_mask`` at the first call declares it for a prompt given
        whole). Padding positions then add nothing to any state and are no keys for attention."""
        if self.seq_len > 0:
            raise CacheError("left padding is declared before the first call (the prompt); later calls continue "
                             "every row")
        if lengths.shape != (self.batch,):
            raise CacheError(f"left_pad: expected {self.batch} lengths, got shape {tuple(lengths.shape)}")
        self.pad_len = lengths if bool(lengths.any()) else None

    def commit(self) -> None:
        self.seq_len += self._pending
        self._pending = 0
