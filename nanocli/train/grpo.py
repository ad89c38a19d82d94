"""GRPO: group rollouts, group-normalised advantages and the clipped policy loss with a k3 KL penalty.

Follows TRL's ``GRPOTrainer`` (DeepSeekMath, Shao et al. 2024) with ``loss_type="grpo"``:

1. ``rollout``: every prompt is sampled ``G`` times (rows ``[p0]*G + [p1]*G + ...``) with nano's cached
   generator, seeded, so a rollout is a pure function of (model, prompts, sampling, seed).
2. ``rewards.score`` gives each completion a scalar reward ``r``; ``group_advantages`` turns them into
   ``A_i = (r_i - mean_group) / (std_group + eps)`` with the *unbiased* (n - 1) group std as TRL does
   (``scale=False``: ``r_i - mean_group`` only, the Dr. GRPO choice); a group whose rewards are all
   equal carries no signal and gets exactly 0.
3. ``grpo_loss`` per completion token t of sequence i (``ratio = exp(logp_new - logp_old)``)::

       l_it = -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i) + beta * KL_k3
       KL_k3 = exp(logp_ref - logp_new) - (logp_ref - logp_new) - 1        (>= 0, 0 iff equal)

   Aggregation (TRL's "grpo"): each sequence's token losses are averaged over *its own* completion
   tokens, then sequences are averaged: ``loss = mean_i( sum_t m_it * l_it / max(sum_t m_it, 1) )``.
   Every sequence weighs the same whatever its length (a known length bias: long wrong answers are
   penalised less per token; TRL's "bnpo"/"dr_grpo" variants change exactly this step).
   ``logp_old`` is the sampling policy's, computed once per batch of rollouts without gradient and
   kept fixed while ``mu`` optimizer steps reuse the batch (TRL's ``num_iterations``; ``mu`` of
   ``nano align``): from the second step on the ratio leaves 1 and the clip bounds the move, a clipped
   token getting exactly zero gradient. With one policy update per rollout (mu = 1) pass
   ``logp_old = logp_new.detach()``: the ratio is 1 in value, the clip never acts and the loss is the
   plain policy gradient ``-mean_i(A_i)`` with the correct gradient.

Alignment (``completion_batch``): row i holds ``prompt_i + completion_i`` right-padded with ``pad_id``
(no attention mask: the model is causal, padding after the last token changes no earlier logit).
``logits[:, t]`` predicts ``input_ids[:, t + 1]``; ``targets[:, t] = input_ids[:, t + 1]`` and
``mask[:, t] = 1`` exactly when ``input_ids[:, t + 1]`` is a completion token, so
``token_logprobs(model(input_ids), targets) * mask`` are the completion's log-probabilities. The last
column never counts. Completion tokens include the final EOS and any tokens the thinking budget forced
(their log-probabilities come from the forward pass like the others).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from nanocli_model.errors import ConfigError
from nanocli_model.generation import SamplingParams, ThinkingBudget, generate

from .preference import gather_logprobs
from .rewards import RewardFn, score

DEFAULT_GRACE = 500  # model card: end the thinking at the first newline after the budget, else at budget + 500


# ----------------------------------------------------------------------------------------- advantages
def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages (P*G,) of rewards (P*G,) laid out group by group (module docstring)."""
    if group_size < 2:
        raise ConfigError(f"group_size must be >= 2 (advantages are relative to the group), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ConfigError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)  # (P, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # unbiased std, as torch / TRL
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # (P, 1) groups without any spread
    return adv.masked_fill(flat, 0.0).view(-1)


# ------------------------------------------------------------------------------------- log-probabilities
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(targets[:, t] | logits[:, t])`` per position: (B, T, V), (B, T) -> (B, T) float32.

    Negative targets (padding, ``-100``) give 0; mask the rest yourself."""
    valid = targets >= 0
    return torch.where(valid, gather_logprobs(logits, targets.clamp(min=0)), 0.0)


def completion_logprobs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                        chunk: int | None = None) -> torch.Tensor:
    """Per-token log-probabilities (B, T) of ``batch["targets"]`` under ``model``, 0 where the mask is 0.

    Runs ``chunk`` rows per forward (all when None). Autograd follows the caller: wrap in
    ``torch.no_grad()`` for the old / reference log-probabilities.
    """
    device = next(model.parameters()).device
    ids, targets, mask = (batch[k].to(device) for k in ("input_ids", "targets", "mask"))
    step = chunk or ids.shape[0]
    if step < 1:
        raise ConfigError(f"chunk must be >= 1 rows, got {chunk}")
    out = [token_logprobs(model(ids[s:s + step]), targets[s:s + step]) for s in range(0, ids.shape[0], step)]
    return torch.cat(out) * mask


# ----------------------------------------------------------------------------------------------- loss
def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, kl_beta: float = 0.0,
              logp_ref: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO loss (scalar) and metrics ``clip_fraction``, ``kl``, ``ratio_mean`` (module docstring).

    logp_* (B, T) per-token log-probabilities of the sampled tokens; advantages (B,); mask (B, T) 1 on
    completion tokens. ``clip_fraction``: share of completion tokens whose ratio is clipped (zero
    gradient); ``kl``: token mean of KL_k3 (0 without ``logp_ref``); ``ratio_mean``: token mean of the ratio.
    """
    if logp_new.shape != logp_old.shape or logp_new.shape != mask.shape or advantages.shape != logp_new.shape[:1]:
        raise ValueError(f"shapes do not match: logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)}, "
                         f"mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}")
    if not clip_eps > 0:
        raise ConfigError(f"clip_eps must be > 0, got {clip_eps!r}")
    if not kl_beta >= 0:
        raise ConfigError(f"kl_beta must be >= 0, got {kl_beta!r}")
    if kl_beta > 0 and logp_ref is None:
        raise ConfigError("kl_beta > 0 needs the reference log-probabilities (logp_ref)")
    m = mask.to(logp_new.dtype)  # (B, T)
    a = advantages.to(logp_new.dtype)[:, None]  # (B, 1)
    ratio = torch.exp(logp_new - logp_old)  # (B, T)
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    per_token = -torch.min(ratio * a, clipped * a)  # (B, T)
    kl = None
    if logp_ref is not None:
        d = logp_ref - logp_new
        kl = torch.exp(d) - d - 1.0  # (B, T) k3 estimator of KL(new || ref)
        if kl_beta > 0:
            per_token = per_token + kl_beta * kl
    loss = ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).mean()
    with torch.no_grad():
        n = m.sum().clamp(min=1.0)
        hit = ((ratio < 1.0 - clip_eps) & (a < 0)) | ((ratio > 1.0 + clip_eps) & (a > 0))
        metrics = {"clip_fraction": ((hit * m).sum() / n).item(), "ratio_mean": ((ratio * m).sum() / n).item(),
                   "kl": ((kl * m).sum() / n).item() if kl is not None else 0.0}
    return loss, metrics


# -------------------------------------------------------------------------------------------- rollout
@dataclass
class Rollout:
    """G sampled completions per prompt, rows grouped: row i belongs to prompt ``i // group_size``."""

    prompt_ids: list[list[int]]  # (P*G) each prompt repeated G times
    completion_ids: list[list[int]]  # generated ids, final EOS and forced budget tokens included
    texts: list[str]  # completions decoded without special tokens (what rewards read)
    group_size: int
    seed: int
    finish_reasons: list[str] = field(default_factory=list)  # "eos" | "stop" | "length"
    budget_forced: list[bool] = field(default_factory=list)  # the thinking budget closed the thinking
    rewards: torch.Tensor | None = None  # (P*G,) total rewards once scored
    reward_means: dict[str, float] = field(default_factory=dict)  # per reward, unweighted

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids) // self.group_size

    def score(self, rewards: Sequence[tuple[str, RewardFn, float]], records: Sequence[Mapping]) -> torch.Tensor:
        """Fill ``rewards`` / ``reward_means`` from one record per *prompt* (repeated over its group)."""
        if len(records) != self.num_prompts:
            raise ConfigError(f"{len(records)} records for {self.num_prompts} prompts; give one record per prompt")
        per_row = [records[i // self.group_size] for i in range(len(self.texts))]
        self.rewards, self.reward_means = score(rewards, self.texts, per_row)
        return self.rewards


def _thinking(tokenizer, prompts: Sequence[Sequence[int]], budget: int | None, grace: int) -> ThinkingBudget | None:
    """``nano generate``'s budget rule (``nanocli.thinking.budget_controller``); None without a budget."""
    if budget is None:
        return None
    from nanocli.thinking import (  # vocabulary scans cached on the tokenizer
        budget_controller,
        prompt_opens_thinking,
    )

    thinking = budget_controller(tokenizer, budget, grace,
                                 [prompt_opens_thinking(tokenizer.decode(list(p))) for p in prompts])
    if thinking is None:
        raise ConfigError("thinking_budget: this tokenizer has no single </think> token to end the thinking with")
    return thinking


def rollout(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]], group_size: int,
            sampling: SamplingParams, seed: int, thinking_budget: int | None = None,
            thinking_grace: int = DEFAULT_GRACE, prefill_chunk: int = 2048) -> Rollout:
    """Sample ``group_size`` completions of every prompt (token ids) in one batched, cached generation.

    ``sampling`` gives temperature / top-p / max_new_tokens...; its seed is replaced by ``seed`` and,
    when it names no EOS ids, the tokenizer's are used. ``thinking_budget`` applies the model card's
    budget rule per row (as ``nano generate --thinking-budget``). The model's mode is left as it was.
    """
    if group_size < 1:
        raise ConfigError(f"group_size must be >= 1, got {group_size}")
    if not prompts:
        raise ConfigError("no prompts to roll out")
    rows = [list(p) for p in prompts for _ in range(group_size)]  # (P*G) grouped
    params = dataclasses.replace(sampling, seed=seed, eos_ids=sampling.eos_ids or frozenset(tokenizer.eos_ids))
    result = generate(model, rows, params, prefill_chunk=prefill_chunk,
                      thinking=_thinking(tokenizer, rows, thinking_budget, thinking_grace))
    completions = [list(c.token_ids) for c in result.completions]
    return Rollout(prompt_ids=rows, completion_ids=completions,
                   texts=[tokenizer.decode(c, skip_special_tokens=True) for c in completions],
                   group_size=group_size, seed=result.seed,
                   finish_reasons=[c.finish_reason for c in result.completions],
                   budget_forced=[c.budget_forced for c in result.completions])


def completion_batch(rollout: Rollout, pad_id: int) -> dict[str, torch.Tensor]:
    """Training tensors of a rollout (module docstring, "Alignment"): ``input_ids``, ``targets`` (B, T)
    long, ``mask`` (B, T) float32, ``prompt_lengths`` and ``completion_lengths`` (B,) long."""
    seqs = [p + c for p, c in zip(rollout.prompt_ids, rollout.completion_ids)]
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
    for i, (p, c) in enumerate(zip(rollout.prompt_ids, rollout.completion_ids)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[i, len(p) - 1:len(p) + len(c) - 1] = 1.0  # logits at t predict completion token t + 1
    targets = torch.cat([ids[:, 1:], torch.full((B, 1), pad_id, dtype=torch.long)], dim=1)  # (B, T)
    return {"input_ids": ids, "targets": targets, "mask": mask,
            "prompt_lengths": torch.tensor([len(p) for p in rollout.prompt_ids]),
            "completion_lengths": torch.tensor([len(c) for c in rollout.completion_ids])}
