"""NanoForCausalLM: embeddings -> hybrid blocks (Mamba-2 / attention / MLP) -> norm_f -> lm_head.

Module names give the released tensor names directly: ``backbone.embeddings.weight``,
``backbone.layers.{i}.norm.weight``, ``backbone.layers.{i}.mixer.*``, ``backbone.norm_f.weight``,
``lm_head.weight``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import HybridCache
from .config import NanoConfig
from .errors import CacheError
from .layers import Block, Mamba2Mixer, RMSNorm, project
from .losses import IGNORE_INDEX, linear_cross_entropy


class Backbone(nn.Module):
    def __init__(self, c: NanoConfig):
        super().__init__()
        self.embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, kind) for kind in c.layer_types)
        self.norm_f = RMSNorm(c.hidden_size, c.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embeddings(input_ids)  # (b, T, hidden)
        pad = left_padding(attention_mask, input_ids.shape)  # (b,) pad lengths, or None
        start = 0
        if cache is not None:
            start = cache.begin(input_ids.shape[1], input_ids.shape[0], pad)
            pad = cache.pad_len
        layer_caches = cache.layers if cache is not None else [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, layer_caches):
            h = layer(h, layer_cache, start, pad)
        if cache is not None:
            cache.commit()
        return self.norm_f(h)


def left_padding(attention_mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """Pad lengths (b,) from a left-padded 0/1 ``attention_mask`` (b, T); None when nothing is padded."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(shape):
        raise CacheError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(shape)}")
    real = attention_mask.to(torch.bool)
    if real.all():
        return None
    if (real.int().diff(dim=1) < 0).any() or not real[:, -1].all():
        raise CacheError("attention_mask: only left padding is supported (each row: zeros, then ones, "
                         "ending with a real token)")
    return (~real).sum(dim=1)


class NanoForCausalLM(nn.Module):
    """The NemotronH hybrid language model.

    ``model(input_ids, cache=None)`` returns float32 logits (batch, seq, vocab); with ``labels`` (batch, seq,
    aligned with the logits, ``ignore_index`` not counted) it returns ``(sum of cross-entropies, count)`` through
    a fused lm_head + cross-entropy that never holds the full logits (``losses.linear_cross_entropy``). With a
    ``HybridCache`` it continues from the cached position: prefill of any length, then single- or
    multi-token steps. ``logits_to_keep=k`` computes logits for the last k positions only.
    ``attention_mask`` (batch, seq; 1 real, 0 padding) batches prompts of different lengths, left-padded:
    padding adds nothing to any Mamba state and is no key for attention, so each row's logits equal
    that prompt run alone. With a cache it is given once, at the first call.
    ``head=fn`` returns ``fn(h, lm_head.weight)`` for the final normed hidden states h (batch, seq, hidden)
    instead of logits: a loss head that never holds the full logits (distillation), run inside ``forward``
    so that DDP / FSDP wrappers see the lm_head in use.
    """

    _decode_layout_done = False  # set by the first cached single-token step (see _use_decode_layout)
    _decode_arena = False  # the Linear weights are in the huge-page arena _use_decode_layout copied them into

    def __init__(self, config: NanoConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None,
                logits_to_keep: int = 0, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX, head=None):
        if cache is not None and input_ids.shape[1] == 1 and not self._decode_layout_done:
            self._use_decode_layout()
        h = self.backbone(input_ids, cache, attention_mask)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if head is not None:
            return head(h, self.lm_head.weight)
        if labels is not None:
            return self._loss(h, labels, ignore_index)
        return project(self.lm_head, h).float()

    def _loss(self, h: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of cross-entropies, count of labels != ignore_index) of the logits at ``h`` against ``labels``."""
        if type(self.lm_head) is nn.Linear and self.lm_head.bias is None:  # the fused, chunked head
            return linear_cross_entropy(h, self.lm_head.weight, labels, ignore_index)
        logits = self.lm_head(h).float()  # a replaced lm_head: its own forward, full logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                               reduction="sum")
        return loss, (labels != ignore_index).sum()

    def _use_decode_layout(self) -> None:
        """Put the Linear weights in their eager-decode layout (``decode.relayout_linear_weights``): one
        huge-page arena, tall float32 weights (out > in) column-major.

        Same values, shapes and parameter objects; only the memory changes. A decode step is a chain of
        matrix-vector products, and on CPU (MKL) a tall matrix with short rows streams about twice as fast
        column-major (in_proj, up_proj, lm_head: most of the weight bytes; wide matrices are faster as
        they are). Prefill GEMMs run as fast either way. Done at the first cached single-token step;
        ``checkpoint.save_pretrained`` writes contiguous tensors as always. A model that trains after it
        generates (``decode.keep_training_layout``) gets its row-major layout back and comes here again at its
        next generation: then the weights switch in place, in the arena they already have.
        """
        from .decode import relayout_linear_weights, set_tall_layout

        self._decode_layout_done = True
        if self._decode_arena:
            set_tall_layout(self, column_major=True)
        else:
            relayout_linear_weights(self, column_major_tall=True)
            self._decode_arena = True

    def allocate_cache(self, batch: int, max_len: int, ssm_dtype: torch.dtype | None = None) -> HybridCache:
        """A cache on this model's device, in its dtype (SSM state in ``mamba_ssm_cache_dtype``)."""
        p = self.backbone.embeddings.weight  # (lm_head may be int8: quant.Int8Linear)
        return HybridCache.allocate(self.config, batch, max_len, dtype=p.dtype, device=p.device,
                                    ssm_dtype=ssm_dtype)

    @property
    def device(self) -> torch.device:
        return self.backbone.embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of the weights and activations (int8 projections compute in it too)."""
        return self.backbone.embeddings.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> NanoForCausalLM:
        """Initialise for training from scratch (transformers' NemotronH rules).

        N(0, initializer_range) for linear and embedding weights, zero biases; Mamba: A_log = log(1..H),
        D = 1, dt_bias = softplus^-1(dt) with dt log-uniform in [time_step_min, time_step_max] floored at
        time_step_floor; residual-output projections (Mamba out_proj, attention o_proj, MLP down_proj)
        scaled by 1/sqrt(n_layers) when ``rescale_prenorm_residual``.
        """
        c, std = self.config, self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Conv1d):
                bound = 1.0 / math.sqrt(module.kernel_size[0])  # PyTorch's default for a depthwise conv
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, RMSNorm) or type(module).__name__ == "GatedGroupRMSNorm":
                module.weight.fill_(1.0)
        for module in self.modules():
            if isinstance(module, Mamba2Mixer):
                H = module.H
                module.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
                module.D.fill_(1.0)
                lo, hi = math.log(c.time_step_min), math.log(c.time_step_max)
                u = torch.rand(H, generator=generator)
                dt = torch.exp(u * (hi - lo) + lo).clamp(min=c.time_step_floor)
                module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        if c.rescale_prenorm_residual:
            scale = 1.0 / math.sqrt(c.num_hidden_layers)
            for name, p in self.named_parameters():
                if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight")):
                    p.mul_(scale)
        return self


def build_model(config: NanoConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int | None = None) -> NanoForCausalLM:
    """A freshly initialised model (for training from scratch and tests)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    model = NanoForCausalLM(config).init_weights(gen)
    return model.to(device=device, dtype=dtype)
