"""Logit distillation losses: a student learns the teacher's next-token distributions (Hinton et al. 2015).

With student logits ``z`` and teacher logits ``u`` at one position, temperature ``T``, ``p = softmax(z / T)``,
``q = softmax(u / T)``::

    forward   KD = T^2 * KL(q || p) = T^2 * sum_v q_v (log q_v - log p_v)     d/dz = T (p - q)
    reverse   KD = T^2 * KL(p || q) = T^2 * sum_v p_v (log p_v - log q_v)     d/dz = T p (r - KL), r = log p - log q
    top-k     forward KD against q~: the teacher's k largest logits only, softmax-renormalised over those
              k tokens (zero elsewhere); the student keeps its full-vocabulary log-softmax, so it is also
              pushed to move mass off the other tokens. Zero only when p equals q~.
    CE        = logsumexp(z) - z_label (temperature 1)                        d/dz = softmax(z) - onehot
    loss      = kd_ratio * KD + (1 - kd_ratio) * CE

The T^2 factor keeps gradient magnitudes comparable across temperatures. The report (docs/REFERENCE.md §6)
distilled with forward KL, T = 1, over the full vocabulary and no CE term: the defaults here.

Memory. Both models' full (tokens, vocab) logits never exist at once: ``kd_loss`` runs the student through
its own ``forward(..., head=fn)`` (so DDP / FSDP hooks run) and ``linear_kd`` computes the student's lm_head,
the teacher's logits and the loss chunk by chunk over tokens, in float32. Under autograd a custom
``Function`` turns each chunk's logits straight into dloss/dz and multiplies out the gradients of the hidden
states and the lm_head weight during the forward, as ``nanocli_model.losses.linear_cross_entropy`` does;
the backward only scales them by the incoming scalar.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanocli_model.errors import ConfigError
from nanocli_model.losses import IGNORE_INDEX

KINDS = ("forward", "reverse")
CHUNK_TOKENS = 256  # token rows per chunk: a few (256, vocab) float32 blocks live at a time

# A teacher chunk: ("full", logits (c, V)) or ("topk", values (c, k), indices (c, k)), float32 values.
TeacherChunk = tuple
TeacherFn = Callable[[int, int], TeacherChunk]


@dataclass(frozen=True)
class TeacherTopK:
    """Precomputed teacher top-k logits for ``kd_loss``: values (B, T, k) raw logits (before temperature),
    indices (B, T, k) token ids, aligned with the student's positions (``input_ids``)."""

    values: torch.Tensor
    indices: torch.Tensor


@dataclass(frozen=True)
class KDConfig:
    temperature: float = 1.0
    kind: str = "forward"
    kd_ratio: float = 1.0
    ignore_index: int = IGNORE_INDEX
    chunk: int = CHUNK_TOKENS


MIN_TEMPERATURE = 0.01  # the KD term scales like T as T -> 0 (0.9 at 0.01 on the tests' pair, 1e-18 at 1e-20, nan at 1e-45)


def check_kd_args(temperature: float, kind: str, top_k: int | None, kd_ratio: float, chunk: int,
                  has_labels: bool = True) -> None:
    """The one place the KD settings are validated (``nano distill`` calls it before any work)."""
    if kind not in KINDS:
        raise ConfigError(f"--kd-kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    if not temperature >= MIN_TEMPERATURE:
        raise ConfigError(f"--temperature must be at least {MIN_TEMPERATURE} (got {temperature}): the KD term, "
                          "scaled by T^2, vanishes below it; to train on the teacher's argmax use --kd-top-k 1")
    if not 0.0 <= kd_ratio <= 1.0:
        raise ConfigError(f"--kd-ratio must be in [0, 1] (1: KD only, 0: CE only), got {kd_ratio}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--kd-top-k must be at least 1, got {top_k}")
    if top_k is not None and kind == "reverse":
        raise ConfigError("--kd-top-k works with forward KL only (reverse KL needs the teacher's whole distribution)")
    if chunk < 1:
        raise ConfigError(f"--kd-chunk must be at least 1 token row, got {chunk}")
    if kd_ratio < 1.0 and not has_labels:
        raise ConfigError("kd_ratio < 1 mixes in cross-entropy, which needs labels")


# ------------------------------------------------------------------------------------------ public API
def kd_loss(student: torch.nn.Module, teacher: torch.nn.Module | TeacherTopK, input_ids: torch.Tensor,
            labels: torch.Tensor | None = None, *, temperature: float = 1.0, kind: str = "forward",
            top_k: int | None = None, kd_ratio: float = 1.0, ignore_index: int = IGNORE_INDEX,
            chunk: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Distillation loss of ``student`` towards ``teacher`` on ``input_ids`` (B, T).

    Returns ``(loss_sum, count, parts)``: the float32 *sum* over counted positions of
    ``kd_ratio * KD + (1 - kd_ratio) * CE`` (differentiable w.r.t. the student), the number of counted
    positions, and ``parts = {"kd": KD sum, "ce": CE sum}`` as detached floats (CE is nan without labels).
    Divide by the count (summed over micro-batches and ranks) for the mean, as with ``causal_lm_loss``.

    ``labels`` (B, T) are aligned with the logits (``labels[:, t]`` is the next token after position t);
    positions equal to ``ignore_index`` count for neither term. Without labels every position counts for KD
    (``kd_ratio`` must then be 1). ``student`` is a ``NanoForCausalLM`` or its DDP / FSDP wrapper: it is
    called as ``student(input_ids, head=...)``. ``teacher`` is a ``NanoForCausalLM`` (run here under
    ``no_grad`` in its own dtype and on its own device, autocast off) or a ``TeacherTopK`` of precomputed
    logits. ``kind``: "forward" KL(teacher || student) or "reverse" KL(student || teacher), scaled by
    ``temperature``^2; ``top_k``: forward KL against the teacher's top-k tokens only, renormalised.
    ``chunk``: token rows per chunk (peak memory ~ a few chunk x vocab float32 blocks).
    """
    check_kd_args(temperature, kind, top_k, kd_ratio, chunk, labels is not None)
    if isinstance(teacher, TeacherTopK) and kind != "forward":
        raise ConfigError("precomputed top-k teacher logits work with forward KL only")
    cfg = KDConfig(temperature=float(temperature), kind=kind, kd_ratio=float(kd_ratio),
                   ignore_index=ignore_index, chunk=chunk)
    teacher_fn = teacher_chunks(teacher, input_ids, top_k)

    def head(h: torch.Tensor, weight: torch.Tensor):
        return linear_kd(h, weight, teacher_fn, labels, cfg)

    loss, kd, ce, count = student(input_ids, head=head)
    return loss, count, {"kd": float(kd), "ce": float(ce) if labels is not None else float("nan")}


def teacher_chunks(teacher: torch.nn.Module | TeacherTopK, input_ids: torch.Tensor,
                   top_k: int | None = None) -> TeacherFn:
    """``fn(s, e)``: the teacher's side of token rows ``[s, e)`` of the flattened (B*T) positions.

    A model runs its backbone once here (no grad, its dtype and device, autocast off); each chunk's logits
    come from its lm_head on demand, as float32 ("full") or their top-k ("topk")."""
    if isinstance(teacher, TeacherTopK):
        vals = teacher.values.reshape(-1, teacher.values.shape[-1])  # (n, k)
        idx = teacher.indices.reshape(-1, teacher.indices.shape[-1])  # (n, k)
        if vals.shape[0] != input_ids.numel():
            raise ConfigError(f"precomputed teacher logits cover {vals.shape[0]} positions, the batch has "
                              f"{input_ids.numel()}")
        vals = vals.to(torch.promote_types(vals.dtype, torch.float32))
        return lambda s, e: ("topk", vals[s:e], idx[s:e].long())
    device = teacher.lm_head.weight.device
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        ht = teacher.backbone(input_ids.to(device))  # (B, T, d_teacher)
    ht = ht.reshape(-1, ht.shape[-1])  # (n, d_teacher)

    def fn(s: int, e: int) -> TeacherChunk:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            u = teacher.lm_head(ht[s:e])  # (c, V), float32 (float64 stays float64)
            u = u.to(torch.promote_types(u.dtype, torch.float32))
            if top_k is None:
                return ("full", u)
            v, i = u.topk(min(top_k, u.shape[-1]), dim=-1)  # (c, k)
            return ("topk", v, i)

    return fn


def teacher_topk(teacher: torch.nn.Module, input_ids: torch.Tensor, k: int,
                 chunk: int = CHUNK_TOKENS) -> TeacherTopK:
    """The teacher's top-k logits (float32) and token ids (int64) at every position of ``input_ids``
    (B, T) -> (B, T, k) each, computed chunk by chunk (for caching on disk)."""
    fn = teacher_chunks(teacher, input_ids, k)
    n = input_ids.numel()
    parts = [fn(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    vals = torch.cat([p[1] for p in parts]).reshape(*input_ids.shape, -1)  # (B, T, k)
    idx = torch.cat([p[2] for p in parts]).reshape(*input_ids.shape, -1)  # (B, T, k)
    return TeacherTopK(vals.cpu(), idx.cpu())


def linear_kd(hidden: torch.Tensor, weight: torch.Tensor, teacher_fn: TeacherFn, labels: torch.Tensor | None,
              cfg: KDConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's lm_head (``weight`` (V, d) on ``hidden`` (..., d)) fused with the KD + CE loss, by chunks.

    Returns (loss sum, KD sum, CE sum, count); only the loss sum carries a gradient. Under autocast the
    student GEMMs run in the autocast dtype, the softmaxes in float32 (float64 inputs stay float64).
    """
    h = hidden.reshape(-1, hidden.shape[-1])  # (n, d)
    n = h.shape[0]
    y = labels.reshape(-1).to(h.device) if labels is not None else None  # (n,)
    valid = (y != cfg.ignore_index) if y is not None else torch.ones(n, dtype=torch.bool, device=h.device)
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else None
    with torch.autocast(h.device.type, enabled=False):
        hc = h if dtype is None else h.to(dtype)
        wc = weight if dtype is None else weight.to(dtype)
        count = valid.sum()
        if torch.is_grad_enabled() and (hc.requires_grad or wc.requires_grad):
            loss, kd, ce = _LinearKD.apply(hc, wc, teacher_fn, y, valid, cfg)
            return loss, kd, ce, count
        acc = torch.promote_types(hc.dtype, torch.float32)
        kd = ce = hc.new_zeros((), dtype=acc)
        for s in range(0, n, cfg.chunk):
            e = min(s + cfg.chunk, n)
            z = (hc[s:e] @ wc.t()).to(acc)  # (c, V)
            k, c, _ = chunk_terms(z, teacher_fn(s, e), None if y is None else y[s:e], valid[s:e], cfg, grad=False)
            kd, ce = kd + k, ce + c
        return cfg.kd_ratio * kd + (1 - cfg.kd_ratio) * ce, kd, ce, count


# ------------------------------------------------------------------------------------------ the math
def chunk_terms(z: torch.Tensor, teacher: TeacherChunk, y: torch.Tensor | None, valid: torch.Tensor,
                cfg: KDConfig, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk: student logits z (c, V) in float32/64 -> (KD sum, CE sum, d(loss sum)/dz or None).

    ``z`` is overwritten (it becomes the log-softmax, then the gradient): with the teacher's logits and
    their log-softmax, at most four (c, V) blocks live at once. Rows where ``valid`` is False add nothing
    and get a zero gradient. CE is 0 without labels ``y``."""
    T, a = cfg.temperature, cfg.kd_ratio
    want_kd, want_ce = grad and a > 0, grad and a < 1 and y is not None
    ce, g_ce = z.new_zeros(()), None
    if y is not None:  # CE at temperature 1, before z is overwritten
        target = y.clamp(min=0)[:, None]  # (c, 1); ignored rows read column 0, masked below
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (c, 1)
        ce = torch.where(valid, (lse - z.gather(1, target))[:, 0], 0.0).sum()
        if want_ce:  # softmax - onehot
            g_ce = (z - lse).exp_().scatter_add_(1, target, -torch.ones_like(target, dtype=z.dtype))
    logp = z.div_(T) if T != 1.0 else z
    logp = logp.sub_(torch.logsumexp(logp, dim=-1, keepdim=True))  # (c, V) student log-softmax at T, in place
    if teacher[0] == "full":
        u = teacher[1]
        if u.shape[-1] != z.shape[-1]:
            raise ConfigError(f"the teacher's vocabulary ({u.shape[-1]}) differs from the student's "
                              f"({z.shape[-1]}); distillation needs the same tokenizer and vocab_size")
        u = u.to(z)
        logq = (u if T == 1.0 else u / T).log_softmax(dim=-1)  # (c, V)
        if cfg.kind == "forward":
            q = logq.exp()  # (c, V)
            kd_row = logq.sub_(logp).mul_(q).sum(dim=-1)  # (c,) sum q (log q - log p)
            g_kd = logp.exp_().sub_(q).mul_(T) if want_kd else None  # T (p - q)
        else:
            p = logp.exp()  # (c, V)
            r = logq.neg_().add_(logp)  # (c, V) log p - log q
            kd_row = (p * r).sum(dim=-1)  # (c,) sum p (log p - log q)
            g_kd = r.sub_(kd_row[:, None]).mul_(p).mul_(T) if want_kd else None  # T p (r - KL)
    else:  # forward KL against the renormalised top-k teacher
        vals, idx = teacher[1].to(z), teacher[2].to(z.device)  # (c, k)
        logq = (vals / T).log_softmax(dim=-1)  # (c, k)
        q = logq.exp()
        kd_row = (q * (logq - logp.gather(1, idx))).sum(dim=-1)  # (c,)
        g_kd = logp.exp_().scatter_add_(1, idx, -q).mul_(T) if want_kd else None  # T (p - q~)
    kd = torch.where(valid, kd_row, 0.0).sum() * (T * T)
    if not grad:
        return kd, ce, None
    g = g_kd.mul_(a) if g_kd is not None else None
    if g_ce is not None:
        g = g_ce.mul_(1 - a) if g is None else g.add_(g_ce, alpha=1 - a)
    return kd, ce, g.mul_(valid[:, None].to(g.dtype))


class _LinearKD(torch.autograd.Function):
    """Per chunk: student logits -> dloss/dz -> dh = g w, dw += g^T h, during the forward; the backward scales
    them by the incoming scalar. Outputs (loss sum, KD sum, CE sum); the last two carry no gradient."""

    @staticmethod
    def forward(ctx, h, w, teacher_fn, y, valid, cfg):
        n = h.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(h.dtype, torch.float32)
        dh = torch.zeros_like(h) if want_h else None  # (n, d)
        dw = torch.zeros(w.shape, dtype=acc, device=w.device) if want_w else None  # (V, d)
        kd = torch.zeros((), dtype=acc, device=h.device)
        ce = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, n, cfg.chunk):
            e = min(s + cfg.chunk, n)
            hs = h[s:e]  # (c, d)
            z = (hs @ w.t()).to(acc)  # (c, V)
            k, c, g = chunk_terms(z, teacher_fn(s, e), None if y is None else y[s:e], valid[s:e], cfg, grad=True)
            kd, ce = kd + k, ce + c
            del z
            g = g.to(h.dtype)  # (c, V)
            if want_h:
                torch.mm(g, w, out=dh[s:e])
            if want_w and g.dtype == acc:
                dw.addmm_(g.t(), hs)
            elif want_w:  # autocast: each chunk's GEMM in the autocast dtype, summed in float32
                dw.add_((g.t() @ hs).to(acc))
        ctx.save_for_backward(dh, dw)
        ctx.w_dtype = w.dtype
        ctx.mark_non_differentiable(kd, ce)
        return cfg.kd_ratio * kd + (1 - cfg.kd_ratio) * ce, kd, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss, dkd, dce):  # noqa: ARG004 (kd and ce are logged, not differentiated)
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * dloss.to(dh.dtype)
        dw = None if dw is None else (dw * dloss).to(ctx.w_dtype)
        return dh, dw, None, None, None, None
