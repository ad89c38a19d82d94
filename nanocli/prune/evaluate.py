"""Scoring pruned candidates against their parent: the proxy (KL / LM loss) and the short distillation.

``proxy`` runs the parent and a candidate on held-out calibration rows and returns the mean per-token
forward KL ``KL(p_parent || p_candidate)`` over the full vocabulary (temperature 1) and the candidate's LM
loss. ``short_distill`` trains a candidate a few steps against the parent with ``distill_loss``:
``nano distill``'s loss (``nanocli.train.kd.kd_loss``: logit-only forward KL at temperature 1, as the
report distilled). ``score_candidates`` ranks the candidates of a budget search with both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..report import Reporter

if TYPE_CHECKING:
    from .search import Candidate
    from .shape import Shape
    from .slicing import Plan

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
    """Mean per-token forward KL of the student to the teacher on ``input_ids`` (``nano distill``'s loss)."""
    from ..train.kd import kd_loss

    loss_sum, count, _ = kd_loss(student, teacher, input_ids, labels=None, temperature=1.0, kind="forward")
    return loss_sum / count


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


def score_candidates(parent, pool: Sequence[Candidate], plan_for: Callable[[Shape], Plan],
                     held: Sequence[torch.Tensor], train: Sequence[torch.Tensor], top_k: int, steps: int, lr: float,
                     reporter: Reporter) -> list[Candidate]:
    """The proxy (KL to the parent on the ``held`` rows) of every candidate in ``pool``, then ``steps`` of
    distillation on the ``train`` rows for the ``top_k`` best and their KL again (no steps: the proxy
    decides). Returns the pool by proxy, the best one marked ``chosen``."""
    from .slicing import prune_model

    for n, cand in enumerate(pool):
        cand.proxy, cand.lm_loss = proxy(parent, prune_model(parent, plan_for(cand.shape)), held)
        reporter.progress("proxy (KL to parent)", n + 1, len(pool))
    ranked = sorted(pool, key=lambda c: c.proxy)
    best = ranked[:top_k]
    for n, cand in enumerate(best if steps > 0 else ()):
        reporter.status(f"distilling candidate {n + 1}/{len(best)}: {cand.shape.label()}")
        student = prune_model(parent, plan_for(cand.shape))
        label = f"distill {n + 1}/{len(best)}"
        short_distill(student, parent, train, steps, lr, lambda d, total, label=label: reporter.progress(label, d, total))
        cand.distilled, _ = proxy(parent, student, held)
        del student
    min(best, key=lambda c: (c.distilled if c.distilled is not None else c.proxy)).chosen = True
    return ranked
