"""DPO: the sigmoid preference loss on summed completion log-probabilities, against a frozen reference.

The math follows TRL's ``DPOTrainer`` (``loss_type="sigmoid"``), Rafailov et al. 2023. With
``pc, pr`` the policy's and ``rc, rr`` the reference's summed log-probabilities of the chosen and the
rejected completion of one pair::

    x      = beta * ((pc - rc) - (pr - rr))                  # the implicit reward margin
    loss   = -(1 - ls) * logsigmoid(x) - ls * logsigmoid(-x)  # ls: conservative-DPO label smoothing
    rewards_chosen = beta * (pc - rc), rewards_rejected = beta * (pr - rr)   (logged, detached)
    margins = rewards_chosen - rewards_rejected, accuracy = mean(rewards_chosen > rewards_rejected)

Log-probabilities are *sums* over the completion tokens (not means), as in TRL and the paper.

Batches. A preference batch (``preference_batch``) holds ``chosen_input_ids`` / ``chosen_labels`` and
``rejected_input_ids`` / ``rejected_labels``, all (B, T) with one common T: each row is prompt +
completion, right-padded with ``pad_id``; ``labels[:, t]`` is the target of the logits at position t
(the next token) and ``IGNORE_INDEX`` (-100) everywhere except on completion tokens. Right padding needs
no attention mask: the model is causal (attention and the Mamba scan alike), so padding after a row's
last token cannot change the logits of any earlier position. Chosen and rejected rows go through the
model in one concatenated forward (as TRL's ``concatenated_forward``), ``chunk`` rows at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nanocli_model.errors import ConfigError
from nanocli_model.losses import IGNORE_INDEX

PAIR_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


# ------------------------------------------------------------------------------------ log-probabilities
def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum over labelled positions of ``log p(labels[:, t] | logits[:, t])``: (B, T, V), (B, T) -> (B,).

    ``labels`` are already aligned with the logits (``labels[:, t]`` is the target of ``logits[:, t]``);
    positions equal to ``ignore_index`` count nothing. Computed in float32 (float64 stays float64).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    valid = labels != ignore_index  # (B, T)
    logp = gather_logprobs(logits, labels.clamp(min=0))  # (B, T)
    return torch.where(valid, logp, 0.0).sum(dim=-1)  # (B,)


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., target]`` without materialising the full log-softmax: (B, T, V) -> (B, T).

    ``targets`` must be valid ids (callers clamp ignored positions and mask them afterwards)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def pair_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) summed completion log-probabilities under ``model``, with autograd.

    Chosen and rejected rows are concatenated along the batch (2B, T) and run ``chunk`` rows per forward
    (all at once when None), so the full (rows, T, vocab) float32 logits exist only per chunk.
    """
    _check_batch(batch)
    device = next(model.parameters()).device
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]).to(device)  # (2B, T)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]]).to(device)  # (2B, T)
    step = chunk or ids.shape[0]
    if step < 1:
        raise ConfigError(f"chunk must be >= 1 rows, got {chunk}")
    out = [sequence_logprobs(model(ids[s:s + step]), labels[s:s + step]) for s in range(0, ids.shape[0], step)]
    logps = torch.cat(out)  # (2B,)
    b = batch["chosen_input_ids"].shape[0]
    return logps[:b], logps[b:]


@torch.no_grad()
def reference_logprobs(ref_model: torch.nn.Module, batch: dict[str, torch.Tensor],
                       chunk: int | None = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref_chosen (B,), ref_rejected (B,)) under the frozen reference: no autograd, eval mode.

    The model's training/eval mode is restored afterwards (nano's model has no dropout today; the
    reference is evaluated deterministically regardless).
    """
    was_training = ref_model.training
    ref_model.eval()
    try:
        return pair_logprobs(ref_model, batch, chunk)
    finally:
        ref_model.train(was_training)


def _check_batch(batch: dict[str, torch.Tensor]) -> None:
    missing = [k for k in PAIR_KEYS if k not in batch]
    if missing:
        raise ConfigError(f"preference batch lacks {', '.join(missing)}; build it with preference_batch()")
    shapes = {tuple(batch[k].shape) for k in PAIR_KEYS}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ConfigError(f"preference batch tensors must all be (B, T) with one T, got shapes "
                          f"{[tuple(batch[k].shape) for k in PAIR_KEYS]}")


def preference_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                     pad_id: int) -> dict[str, torch.Tensor]:
    """Collate (prompt_ids, chosen_ids, rejected_ids) token lists into a preference batch (module docstring).

    Each row is ``prompt + completion`` right-padded to the longest row of both sides;
    ``labels[:, t] = ids[:, t + 1]`` where token t + 1 is a completion token, else ``IGNORE_INDEX``.
    """
    if not pairs:
        raise ConfigError("no preference pairs to collate")
    rows = {"chosen": [(list(p), list(c)) for p, c, _ in pairs], "rejected": [(list(p), list(r)) for p, _, r in pairs]}
    for i, (p, c, r) in enumerate(pairs):
        if not p or not c or not r:
            raise ConfigError(f"preference pair {i}: prompt, chosen and rejected must each hold at least one token")
    T = max(len(p) + len(c) for side in rows.values() for p, c in side)
    out = {}
    for side, seqs in rows.items():
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for i, (p, c) in enumerate(seqs):
            seq = torch.tensor(p + c, dtype=torch.long)
            ids[i, :len(seq)] = seq
            labels[i, len(p) - 1:len(seq) - 1] = seq[len(p):]  # logits at t predict token t + 1
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
    return out


# ------------------------------------------------------------------------------------------------ loss
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The sigmoid DPO loss per pair (B,) and the batch means TRL logs (module docstring).

    Metrics: ``rewards_chosen``, ``rewards_rejected``, ``margins``, ``accuracy`` (share of pairs whose
    chosen reward is strictly above the rejected one). Reduce the loss with ``.mean()`` (or a sum over
    pairs divided by the global pair count under gradient accumulation).
    """
    if not beta > 0:
        raise ConfigError(f"beta must be > 0, got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    chosen_ratio = policy_chosen - ref_chosen  # (B,) log pi/pi_ref of the chosen completion
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    x = beta * (chosen_ratio - rejected_ratio)
    loss = -(1.0 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)
    with torch.no_grad():
        r_c, r_r = beta * chosen_ratio.float(), beta * rejected_ratio.float()
        metrics = {"rewards_chosen": r_c.mean().item(), "rewards_rejected": r_r.mean().item(),
                   "margins": (r_c - r_r).mean().item(), "accuracy": (r_c > r_r).float().mean().item()}
    return loss, metrics
