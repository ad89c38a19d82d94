"""Depth pruning: which layers to drop.

The report's rule (``mse``): iterative greedy. Each round, every remaining candidate layer is removed in
turn, the model without it is run on the calibration batches, and the mean squared error between its
logits and the *full parent's* logits is measured; the layer with the smallest MSE goes, and the next
round re-scores the rest. The cheap rule (``cosine``): one pass, drop the blocks whose output is most
like their input, i.e. the smallest mean ``1 - cos(x_in, x_out)`` (``Scores.block``).

Attention pin (``keep_attention``): attention layers are removed first, by the same rule among
attention layers only, until ``keep_attention`` remain; after that only Mamba / MLP layers are
candidates. So every prefix of the removal order after the pin is reached has exactly
``keep_attention`` attention layers, and one order serves every depth.

A round reuses the hidden state at every layer input of the current model: removing layer ``k``
re-runs only the layers after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from nanocli_model.config import ATTENTION

from ..report import Reporter

MSE, COSINE = "mse", "cosine"
METRICS = (MSE, COSINE)


@dataclass
class DepthOrder:
    """Layers in the order they are removed, and why (the MSE or 1 - cos that chose each)."""

    metric: str
    keep_attention: int | None
    order: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def kept(self, n_layers: int, depth: int) -> list[int]:
        """Parent layers kept at ``depth`` layers (the first ``n_layers - depth`` removals applied)."""
        removed = set(self.order[:n_layers - depth])
        return [i for i in range(n_layers) if i not in removed]


def _head(model, h: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.backbone.norm_f(h)).float()  # (b, T, V)


@torch.no_grad()
def logits_without(model, ids: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """Logits of the parent restricted to the ``kept`` layers (in order): the depth-pruned model."""
    h = model.backbone.embeddings(ids)  # (b, T, h)
    for i in kept:
        h = model.backbone.layers[i](h)
    return _head(model, h)


@torch.no_grad()
def _round(model, batches: Sequence[torch.Tensor], kept: list[int], candidates: list[int]) -> dict[int, float]:
    """MSE(full parent logits, logits without layer k) for every candidate k, summed over batches."""
    layers = model.backbone.layers
    all_layers = list(range(len(layers)))
    sums = {k: 0.0 for k in candidates}
    count = 0
    for ids in batches:
        ids = ids.to(model.device)
        ref = logits_without(model, ids, all_layers)  # (b, T, V): the full parent
        inputs = []  # hidden state entering kept[j]
        h = model.backbone.embeddings(ids)
        for i in kept:
            inputs.append(h)
            h = layers[i](h)
        for k in candidates:
            j = kept.index(k)
            x = inputs[j]
            for i in kept[j + 1:]:
                x = layers[i](x)
            sums[k] += (_head(model, x) - ref).double().square().sum().item()
        count += ref.numel()
    return {k: v / count for k, v in sums.items()}


def greedy_order(model, batches: Sequence[torch.Tensor], remove: int, keep_attention: int | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> DepthOrder:
    """The iterative greedy MSE order of ``remove`` layers (``keep_attention``: the pin, see the module)."""
    kinds = model.config.layer_types
    kept = list(range(len(kinds)))
    out = DepthOrder(MSE, keep_attention)
    for r in range(remove):
        n_att = sum(kinds[i] == ATTENTION for i in kept)
        if keep_attention is not None and n_att > keep_attention:
            candidates = [i for i in kept if kinds[i] == ATTENTION]
        elif keep_attention is not None:
            candidates = [i for i in kept if kinds[i] != ATTENTION]
        else:
            candidates = list(kept)
        if not candidates or len(kept) == 1:
            break
        mse = _round(model, batches, kept, candidates)
        best = min(candidates, key=lambda k: (mse[k], k))
        out.order.append(best)
        out.values.append(mse[best])
        kept.remove(best)
        if progress is not None:
            progress("depth (greedy MSE)", r + 1, remove)
    return out


def cosine_order(block_scores: torch.Tensor, kinds: Sequence[str], remove: int,
                 keep_attention: int | None = None) -> DepthOrder:
    """Blocks by ascending ``1 - cos(x_in, x_out)``: attention first down to the pin, then the rest."""
    values = block_scores.tolist()
    by_score = sorted(range(len(kinds)), key=lambda i: (values[i], i))
    if keep_attention is None:
        order = by_score
    else:
        att = [i for i in by_score if kinds[i] == ATTENTION]
        n_drop = max(0, len(att) - keep_attention)
        order = att[:n_drop] + [i for i in by_score if kinds[i] != ATTENTION]
    order = order[:remove]
    return DepthOrder(COSINE, keep_attention, order, [values[i] for i in order])


class DepthOrders:
    """One removal order per attention pin, computed once per run (or taken from the scores file, where an
    earlier run saved it) and long enough for every depth asked so far."""

    def __init__(self, model, batches: Sequence[torch.Tensor], metric: str, scores, reporter: Reporter,
                 save: Callable[[], None] | None = None):
        self.model, self.batches, self.metric, self.scores = model, batches, metric, scores
        self.reporter, self.save = reporter, save
        self.orders: dict[int | None, DepthOrder] = {}

    def order(self, pin: int | None, remove: int) -> DepthOrder:
        """The order of at least ``remove`` layers with ``pin`` attention layers kept (None: no pin)."""
        if pin in self.orders and len(self.orders[pin].order) >= remove:
            return self.orders[pin]
        key = f"{self.metric}:{pin}"
        cached = self.scores.depth.get(key)
        if cached is not None and len(cached) >= remove:  # an earlier run's order (from --scores)
            self.orders[pin] = DepthOrder(self.metric, pin, list(cached))
            return self.orders[pin]
        kinds = self.model.config.layer_types
        if self.metric == COSINE:
            self.orders[pin] = cosine_order(self.scores.block, kinds, remove, pin)
        else:
            self.reporter.status(f"depth: greedy logit-MSE order of {remove} layers (attention pin {pin})")
            self.orders[pin] = greedy_order(self.model, self.batches, remove, pin, self.reporter.progress)
        self.scores.depth[key] = self.orders[pin].order
        if self.save is not None:
            self.save()
        return self.orders[pin]

    def kept(self, num_layers: int, pin: int | None) -> list[int]:
        """Parent layers kept at ``num_layers`` layers with ``pin`` attention layers."""
        n = self.model.config.num_hidden_layers
        return self.order(pin, n - num_layers).kept(n, num_layers)
