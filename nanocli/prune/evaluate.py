"""Scoring pruned candidates against their parent: the proxy (KL / LM loss) and the short distillation.

``proxy`` runs the parent and a candidate on held-out calibration rows and returns the mean per-token
forward KL ``KL(p_parent || p_candidate)`` over the full vocabulary (temperature 1) and the candidate's LM
loss. ``short_distill`` trains a candidate a few steps against the parent with ``distill_loss``, the
one plug-in point for the distillation objective: ``nanocli.train.kd.kd_loss`` when that module is
present (logit-only forward KL, as the report distilled), else the same forward KL on full logits here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

KL_CHUNK = 1024  # token rows of logits per KL chunk


def forward_kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """sum over tokens of KL(softmax(teacher) || softmax(student)), float32, chunked over tokens."""
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])  # (n, V)
    s = student_logits.reshape(-1, student_logits.shape[-1])  # (n, V)
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, t.shape[0], KL_CHUNK):
        lt = F.log_softmax(t[i:i + KL_CHUNK].float(), dim=-1)
        ls = F.log_softmax(s[i:i + KL_CHUNK].float(), dim=-1)
        total = total + (lt.exp() * (lt - ls)).sum()
    return total


def distill_loss(student, teacher, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean per-token forward KL of the student to the teacher on ``input_ids`` (the plug-in point)."""
    try:
        from nanocli.train.kd import kd_loss
    except ImportError:
        kd_loss = None
    if kd_loss is not None:
        loss_sum, count, _ = kd_loss(student, teacher, input_ids, labels=None, temperature=1.0, kind="forward")
        return loss_sum / count
    with torch.no_grad():
        t = teacher(input_ids)  # (b, T, V)
    return forward_kl_sum(t, student(input_ids)) / input_ids.numel()


@torch.no_grad()
def proxy(parent, candidate, rows: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(mean KL(parent || candidate) per token, candidate LM loss per token) over rows (b, T + 1)."""
    kl, ce, n = 0.0, 0.0, 0
    for r in rows:
        r = r.to(parent.device)
        ids, labels = r[:, :-1], r[:, 1:]
        t, s = parent(ids), candidate(ids)  # (b, T, V)
        kl += forward_kl_sum(t, s).item()
        ce += F.cross_entropy(s.flatten(0, 1), labels.flatten(), reduction="sum").item()
        n += labels.numel()
    return kl / n, ce / n


def short_distill(student, teacher, rows: Sequence[torch.Tensor], steps: int, lr: float,
                  progress: Callable[[int, int], None] | None = None) -> list[float]:
    """``steps`` AdamW steps of ``distill_loss`` on ``rows`` (cycled), constant LR; returns the losses."""
    from ..train.optim import OptimConfig, build_optimizer, clip_gradients

    config = OptimConfig(weight_decay=0.0)
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    optimizer = build_optimizer(student, config, lr)
    teacher.eval()
    losses = []
    for step in range(steps):
        ids = rows[step % len(rows)].to(teacher.device)[:, :-1]
        loss = distill_loss(student, teacher, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(student, config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return losses
