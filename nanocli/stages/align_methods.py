"""The three methods of ``nano align``, each one class with the same small interface: ``size`` (examples,
pairs or prompts), ``bind(dist)``, ``reference`` (whether it trains against a frozen reference) and
``prepare(ref)`` (that reference: the run's input model, built by ``stages/align.py``), ``heldout(model)``
(held-out metrics before and after), ``batches(step, wrapped)``, ``loss(model, batch)``, ``count(batch)`` and, for
GRPO only, ``state(step)`` / ``restore(state, step)`` (the rollout batch a checkpoint inside a batch's
``mu`` steps carries). ``stages/align.py`` reads the data, picks the method and runs it through the training
skeleton; the GRPO schedule of rollouts and ``mu`` passes is described there.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanocli_model.errors import NanoError


class AlignError(NanoError):
    """Bad input to ``nano align``."""


@dataclass(frozen=True)
class PairAccuracy:
    """DPO on its held-out pairs: how the policy ranks chosen against rejected."""

    pairs: int
    accuracy_vs_reference: float  # share whose implicit reward (vs the reference) favours the chosen answer
    chosen_over_rejected: float  # share where the policy's own log-probability favours the chosen answer
    margin: float  # mean implicit-reward margin


def pad_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its first EOS."""
    if tokenizer.pad_id is not None:
        return tokenizer.pad_id
    if not tokenizer.eos_ids:
        raise AlignError("the tokenizer has neither a pad token nor an EOS token; set pad_token or eos_token in "
                         "tokenizer_config.json")
    return tokenizer.eos_ids[0]


class SFT:
    """Token-mean cross-entropy on assistant tokens of packed chat rows."""

    def __init__(self, o, tokenizer, records, stats):
        from ..data.chat import SFTConfig, prepare_sft

        cfg = SFTConfig(seq_len=o.seq_len, think_mix=o.think_mix, budget_fraction=o.budget_fraction,
                        too_long=o.too_long, pack=o.pack, seed=o.seed)
        self.o, self.dist = o, None
        self.examples = prepare_sft(records, tokenizer, cfg, stats)
        self.pad = pad_id(tokenizer)
        self.size = len(self.examples)

    state = restore = None  # nothing beyond the weights and the step: a resume recomputes the batches
    reference = False

    def bind(self, dist) -> None:
        self.dist = dist

    def prepare(self, ref) -> None:
        pass

    def heldout(self, model) -> PairAccuracy | None:
        return None

    def batches(self, step: int, wrapped) -> list[dict]:
        from ..data.chat import sft_batches

        ids, labels = sft_batches(self.examples, self.o.global_batch, step, seed=self.o.seed, rank=self.dist.rank,
                                  world=self.dist.world, pad_id=self.pad)
        m = self.o.micro_batch or ids.shape[0]
        dev = self.dist.device
        return [{"input_ids": ids[i:i + m].to(dev), "labels": labels[i:i + m].to(dev)} for i in range(0, ids.shape[0], m)]

    @staticmethod
    def count(batch: dict) -> int:
        return int((batch["labels"] != -100).sum())

    @staticmethod
    def loss(model, batch):
        from nanocli_model.losses import causal_lm_loss

        loss, n = causal_lm_loss(model, batch["input_ids"], batch["labels"])
        return loss, n, {}


class DPO:
    """Sigmoid DPO against a frozen reference (the run's input model); held-out pair accuracy before and after."""

    def __init__(self, o, tokenizer, records, stats):
        from ..data.chat import build_preference_examples

        pairs = build_preference_examples(records, tokenizer, o.seq_len, too_long=o.too_long, stats=stats)
        n_eval = int(len(pairs) * o.heldout_fraction)
        self.eval_pairs, self.pairs = pairs[:n_eval], pairs[n_eval:]
        if not self.pairs:
            raise AlignError("no preference pairs left to train on; add data or lower --heldout-fraction")
        self.o, self.dist = o, None
        self.pad = pad_id(tokenizer)
        self.size = len(self.pairs)
        self.ref = None

    state = restore = None  # nothing beyond the weights and the step: a resume recomputes the batches
    reference = True

    def bind(self, dist) -> None:
        self.dist = dist

    def prepare(self, ref) -> None:
        self.ref = ref

    def _batch(self, pairs, idx):
        from ..data.chat import preference_batch

        b = preference_batch(pairs, idx, pad_id=self.pad)
        return {k: v.to(self.dist.device) for k, v in b.items()}

    def heldout(self, model) -> PairAccuracy | None:
        import torch

        from ..train.preference import dpo_loss, pair_logprobs, reference_logprobs

        if not self.eval_pairs:
            return None
        with torch.no_grad():
            b = self._batch(self.eval_pairs, list(range(len(self.eval_pairs))))
            was = model.training
            model.eval()
            pc, pr = pair_logprobs(model, b, chunk=8)
            model.train(was)
            rc, rr = reference_logprobs(self.ref, b)
            _, m = dpo_loss(pc, pr, rc, rr, self.o.beta)
        return PairAccuracy(len(self.eval_pairs), m["accuracy"], float((pc > pr).float().mean()), m["margins"])

    def batches(self, step: int, wrapped) -> list[dict]:
        from ..data.chat import batch_indices

        idx = batch_indices(self.size, self.o.global_batch, step, seed=self.o.seed, rank=self.dist.rank,
                            world=self.dist.world)
        m = self.o.micro_batch or len(idx)
        return [self._batch(self.pairs, idx[i:i + m]) for i in range(0, len(idx), m)]

    @staticmethod
    def count(batch: dict) -> int:
        return int(batch["chosen_input_ids"].shape[0])

    def loss(self, model, batch):
        from ..train.preference import dpo_loss, pair_logprobs, reference_logprobs

        pc, pr = pair_logprobs(model, batch)
        rc, rr = reference_logprobs(self.ref, batch)
        loss, m = dpo_loss(pc, pr, rc, rr, self.o.beta, self.o.label_smoothing)
        return loss.sum(), loss.shape[0], {k: float(v) for k, v in m.items()}


class GRPO:
    """Group rollouts with nano's cached generator, group-normalised advantages, clipped surrogate; each batch
    of rollouts serves ``mu`` optimizer steps against log-probabilities fixed at rollout (module docstring)."""

    def __init__(self, o, tokenizer, records, stats):
        from ..data.chat import build_prompts
        from ..train.rewards import resolve_rewards

        self.prompts = build_prompts(records, tokenizer, max_prompt_len=o.seq_len, stats=stats)
        if not self.prompts:
            raise AlignError("no GRPO prompts left; check the data and --seq-len")
        self.rewards = resolve_rewards(o.rewards)
        self.o, self.dist, self.tokenizer = o, None, tokenizer
        self.pad = pad_id(tokenizer)
        self.size = len(self.prompts)
        self.ref = None
        self.current: tuple[int, dict] | None = None  # (rollout batch index, this process's batch) for its mu steps

    def bind(self, dist) -> None:
        self.dist = dist

    @property
    def reference(self) -> bool:
        return self.o.kl_beta > 0

    def prepare(self, ref) -> None:
        self.ref = ref

    def heldout(self, model) -> PairAccuracy | None:
        return None

    def batches(self, step: int, wrapped) -> list[dict]:
        k = step // self.o.mu
        if self.current is None or self.current[0] != k:
            self.current = (k, self._rollout_batch(k, wrapped))
        return [self.current[1]]

    def _rollout_batch(self, index: int, wrapped) -> dict:
        """Rollout batch ``index`` (its prompts chosen as step ``index``'s were before ``mu``): sampled, scored,
        group advantages, the fixed log-probabilities (``logp_old`` when mu > 1, ``logp_ref`` with a KL)."""
        import torch

        from nanocli_model.decode import keep_training_layout
        from nanocli_model.generation import SamplingParams

        from ..data.chat import batch_indices
        from ..train.distributed import unwrap
        from ..train.grpo import completion_batch, completion_logprobs, group_advantages, rollout
        from ..train.loop import autocast

        idx = batch_indices(self.size, self.o.global_batch, index, seed=self.o.seed, rank=self.dist.rank,
                            world=self.dist.world)
        chosen = [self.prompts[i] for i in idx]
        policy = unwrap(wrapped)
        params = SamplingParams(temperature=self.o.temperature, top_p=self.o.top_p, max_new_tokens=self.o.max_new_tokens)
        seed = self.o.seed * 1_000_003 + index * 101 + self.dist.rank
        with keep_training_layout(policy):  # train on the row-major layout a resumed run starts with
            r = rollout(policy, self.tokenizer, [p.prompt_ids for p in chosen], self.o.group_size, params,
                        seed=seed, thinking_budget=self.o.thinking_budget)
        rewards = r.score(self.rewards, [p.extra for p in chosen])
        adv = group_advantages(rewards, self.o.group_size)
        b = {k: v.to(self.dist.device) for k, v in completion_batch(r, self.pad).items()}
        b["advantages"] = adv.to(self.dist.device)
        with torch.no_grad():
            if self.o.mu > 1:  # the policy that sampled, fixed for the batch's mu steps (as the loss computes them)
                with autocast(self.o.precision, self.dist.device):
                    b["logp_old"] = completion_logprobs(policy, b)
            if self.ref is not None:
                b["logp_ref"] = completion_logprobs(self.ref, b)
        b["stats"] = {"reward": float(rewards.mean()), **{f"reward_{k}": v for k, v in r.reward_means.items()},
                      "completion_tokens": float(b["completion_lengths"].float().mean())}
        return b

    def state(self, step: int) -> dict:
        """The batch in use when a checkpoint falls inside its ``mu`` steps (every process's; a collective)."""
        if step % self.o.mu == 0 or self.current is None:
            return {}  # a boundary: the next step samples a new batch from the saved weights
        k, b = self.current
        mine = {key: v.detach().cpu() if hasattr(v, "detach") else v for key, v in b.items()}
        return {"grpo_rollout": {"index": k, "per_rank": self.dist.all_gather_object(mine)}}

    def restore(self, state: dict, step: int) -> None:
        """Resume as the run stood after ``step`` steps: inside a batch's ``mu`` steps, the batch the checkpoint
        carries (module docstring). The weights need nothing: every rollout gives them back in the training
        layout (``keep_training_layout``), the row-major one the freshly loaded policy has."""
        if step % self.o.mu == 0:
            return
        saved = state.get("grpo_rollout")
        k = step // self.o.mu
        if not isinstance(saved, dict) or saved.get("index") != k:
            raise AlignError(f"the checkpoint of step {step} falls inside rollout batch {k + 1} (--mu {self.o.mu}) "
                             "but does not carry that batch; resume from a checkpoint at a multiple of --mu")
        per_rank = saved["per_rank"]
        if len(per_rank) != self.dist.world:
            raise AlignError(f"the checkpoint of step {step} falls inside a batch of rollouts sampled by "
                             f"{len(per_rank)} processes; resume it with {len(per_rank)} processes (or from a "
                             f"checkpoint at a multiple of --mu {self.o.mu})")
        dev = self.dist.device
        self.current = (k, {key: v.to(dev) if hasattr(v, "to") else v for key, v in per_rank[self.dist.rank].items()})

    @staticmethod
    def count(batch: dict) -> int:
        return int(batch["input_ids"].shape[0])

    def loss(self, model, batch):
        from ..train.grpo import completion_logprobs, grpo_loss

        logp = completion_logprobs(model, batch)
        old = batch.get("logp_old")  # mu > 1: fixed at rollout; mu = 1: this forward's, detached (ratio 1)
        loss, m = grpo_loss(logp, logp.detach() if old is None else old, batch["advantages"], batch["mask"],
                            clip_eps=self.o.clip_eps, kl_beta=self.o.kl_beta, logp_ref=batch.get("logp_ref"))
        n = batch["input_ids"].shape[0]
        return loss * n, n, {**{k: float(v) for k, v in m.items()}, **batch["stats"]}


METHODS = {"sft": SFT, "dpo": DPO, "grpo": GRPO}
