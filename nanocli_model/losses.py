"""Training losses on NanoForCausalLM outputs.

``causal_lm_loss`` returns the *sum* of per-token cross-entropies and the number of counted tokens,
so gradient accumulation and data parallelism normalise once, by the global token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import NanoForCausalLM

IGNORE_INDEX = -100


def causal_lm_loss(model: NanoForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies (float32) and the count of labels != ``ignore_index``.

    ``input_ids`` (B, T) and ``labels`` (B, T) are already aligned: ``labels[:, t]`` is the target
    for the logits at position t.
    """
    logits = model(input_ids)  # (B, T, V) float32
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()
