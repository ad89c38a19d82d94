"""Training losses on NanoForCausalLM outputs.

``causal_lm_loss`` returns the *sum* of per-token cross-entropies and the number of counted tokens,
so gradient accumulation and data parallelism normalise once, by the global token count.

``linear_cross_entropy`` is the loss head it runs on: ``lm_head`` and the cross-entropy fused and chunked
over tokens, so the full (tokens, vocab) float32 logits, their log-softmax and their gradient are never held
at once. Each chunk's logits become the softmax gradient in place, and the gradients for the hidden states
and the lm_head weight are multiplied out right there, during the forward (the loss is a sum, so its
gradient needs only the scalar that ``backward`` brings, applied at the end).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .model import NanoForCausalLM

IGNORE_INDEX = -100
CHUNK_TOKENS = 256  # rows of logits per chunk: a (256, vocab) float32 block stays cache-sized for the softmax


def causal_lm_loss(model: NanoForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies (float32) and the count of labels != ``ignore_index``.

    ``input_ids`` (B, T) and ``labels`` (B, T) are already aligned: ``labels[:, t]`` is the target
    for the logits at position t. Runs ``model(input_ids, labels=labels)``, so a DDP / FSDP wrapper's
    forward hooks run as usual.
    """
    return model(input_ids, labels=labels, ignore_index=ignore_index)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX,
                         chunk: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")`` without full logits.

    hidden (..., d); weight (V, d); labels (...) aligned with hidden. Returns the float32 loss sum and the
    count of counted labels. Under CPU/CUDA autocast the logits GEMMs run in the autocast dtype, the softmax
    in float32, as ``lm_head(h).float()`` would (float64 inputs stay float64). Not twice-differentiable.
    """
    h = hidden.reshape(-1, hidden.shape[-1])  # (n, d)
    y = labels.reshape(-1)  # (n,)
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else None
    with torch.autocast(h.device.type, enabled=False):
        hc = h if dtype is None else h.to(dtype)
        wc = weight if dtype is None else weight.to(dtype)
        count = (y != ignore_index).sum()
        if torch.is_grad_enabled() and (hc.requires_grad or wc.requires_grad):
            return _LinearCrossEntropy.apply(hc, wc, y, ignore_index, chunk), count
        acc = torch.promote_types(hc.dtype, torch.float32)
        loss = hc.new_zeros((), dtype=acc)
        for s in range(0, h.shape[0], chunk):
            logits = (hc[s:s + chunk] @ wc.t()).to(acc)  # (c, V)
            loss += F.cross_entropy(logits, y[s:s + chunk], ignore_index=ignore_index, reduction="sum")
        return loss, count


VOCAB_BLOCK = 1024  # lm_head columns per GEMM: a (chunk, 1024) output tile stays in cache (~10% faster on CPU)


def _logits(h: torch.Tensor, w: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """h @ w^T (c, V) in ``acc``; on CPU in vocabulary blocks written straight into one buffer."""
    if h.device.type != "cpu" or h.dtype != acc:
        return (h @ w.t()).to(acc)
    out = h.new_empty(h.shape[0], w.shape[0])
    for v in range(0, w.shape[0], VOCAB_BLOCK):
        torch.mm(h, w[v:v + VOCAB_BLOCK].t(), out=out[:, v:v + VOCAB_BLOCK])
    return out


def _softmax_grad_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Turn float32 logits (c, V) into d(sum of cross-entropies)/d logits = softmax - onehot, in place (zero rows
    for ignored labels). Returns the loss sum of the chunk."""
    valid = labels != ignore_index
    target = labels.clamp(min=0)[:, None]  # (c, 1); ignored rows read column 0, masked below
    m = logits.amax(dim=-1, keepdim=True)  # (c, 1)
    z_target = logits.gather(1, target)  # (c, 1)
    p = logits.sub_(m).exp_()  # (c, V) unnormalised
    s = p.sum(dim=-1, keepdim=True)  # (c, 1)
    loss = (s.log() + m - z_target)[:, 0]  # (c,) lse - z_target
    p.mul_(torch.where(valid, s[:, 0].reciprocal(), 0.0)[:, None])  # softmax, zero where ignored
    p.scatter_add_(1, target, -valid[:, None].to(p.dtype))  # - onehot
    return torch.where(valid, loss, 0.0).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """Per chunk of tokens: logits -> softmax - onehot (in place) -> dh = g w, dw += g^T h. The forward keeps
    the gradients of the loss sum; the backward scales them by the incoming scalar."""

    @staticmethod
    def forward(ctx, h, w, labels, ignore_index, chunk):
        n = h.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(h.dtype, torch.float32)  # float32, float64 for float64 inputs
        dh = torch.empty_like(h) if want_h else None  # (n, d)
        dw = None
        if want_w:  # (V, d); the first chunk writes it
            dw = (torch.empty if n else torch.zeros)(w.shape, dtype=acc, device=w.device)
        loss = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, n, chunk):
            hs = h[s:s + chunk]  # (c, d)
            g = _logits(hs, w, acc)  # (c, V) logits ...
            loss += _softmax_grad_(g, labels[s:s + chunk], ignore_index)  # ... now their gradient
            g = g.to(h.dtype)
            if want_h:
                torch.mm(g, w, out=dh[s:s + chunk])
            if want_w and g.dtype == acc:  # the first chunk writes dw, the others accumulate into it
                if s == 0:
                    torch.mm(g.t(), hs, out=dw)
                else:
                    dw.addmm_(g.t(), hs)
            elif want_w:  # autocast: each chunk's GEMM in the autocast dtype, summed in float32
                part = (g.t() @ hs).to(acc)
                if s == 0:
                    dw.copy_(part)
                else:
                    dw.add_(part)
        ctx.save_for_backward(dh, dw)
        ctx.w_dtype = w.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss):
        dh, dw = ctx.saved_tensors  # gradients of the loss sum; scaled out of place (retain_graph stays valid)
        dh = None if dh is None else dh * dloss.to(dh.dtype)
        dw = None if dw is None else (dw * dloss).to(ctx.w_dtype)
        return dh, dw, None, None, None
