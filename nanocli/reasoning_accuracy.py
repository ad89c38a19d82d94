"""Accuracy on held-out problems of the built-in reasoning tasks (exact answer after the thinking span).

The problems come from ``synthetic.generate(split="heldout")``: their keys never occur in training
data. Each is asked through the model's chat template with reasoning on or off (and an optional
thinking budget), answered greedily with nano's cached generator, and scored by
``synthetic.is_correct`` on the text after the last ``</think>``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .data import synthetic


@dataclass
class Accuracy:
    """Answers to ``n`` held-out problems in one setting (reasoning on or off, a thinking budget)."""

    n: int
    correct: int
    formatted: int  # completions that closed the thinking span (think on) / answered in the form (off)
    mean_tokens: float
    think: bool
    budget: int | None
    seconds: float = 0.0  # generation wall time (batched, prefill included)
    samples: int = 1  # completions per problem (1 greedy; more: sampled at ``temperature``)
    temperature: float = 0.0

    @property
    def accuracy(self) -> float:
        """Share of correct completions (with samples > 1: the mean exact-answer reward, pass@1)."""
        return self.correct / (self.n * self.samples) if self.n else 0.0

    def to_json(self) -> dict:
        return {"n": self.n, "accuracy": self.accuracy, "correct": self.correct, "formatted": self.formatted,
                "mean_tokens": self.mean_tokens, "think": self.think, "budget": self.budget,
                "seconds": self.seconds, "samples": self.samples, "temperature": self.temperature,
                "tokens_per_s": self.mean_tokens * self.n * self.samples / self.seconds if self.seconds > 0 else 0.0}


def reasoning_accuracy(model, tokenizer, n: int = 64, think: bool = True, seed: int = 1234,
                       budget: int | None = None, max_new_tokens: int = 160, batch: int = 32,
                       tasks=None, difficulty=(1, 3), prompt_format: str = "chat", samples: int = 1,
                       temperature: float = 0.0) -> Accuracy:
    """Greedy accuracy on ``n`` held-out problems (deterministic for a given ``seed``); with ``samples`` > 1,
    that many completions per problem sampled at ``temperature`` (seeded) and the share of correct ones.

    ``prompt_format="text"`` asks a base model in its pretraining format instead of the chat template:
    ``Question: ...\nReasoning:\n``, scored on the first ``Answer:`` line it writes (``think`` is ignored).
    """
    from nanocli_model.generation import SamplingParams

    from .train.grpo import rollout

    problems = synthetic.generate(n, seed=seed, split="heldout", tasks=tasks, difficulty=difficulty)
    text_format = prompt_format == "text"
    if text_format:
        prompts = [tokenizer.encode(f"Question: {p.question}\nReasoning:\n") for p in problems]
    else:
        prompts = [tokenizer.encode_chat(synthetic.as_grpo(p, think=think)["prompt"]) for p in problems]
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    correct = formatted = tokens = 0
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        for i in range(0, n, batch):
            r = rollout(model, tokenizer, prompts[i:i + batch], samples, params, seed=seed, thinking_budget=budget)
            rows = [p for p in problems[i:i + batch] for _ in range(samples)]  # rollout rows: each prompt G times
            for p, text, ids in zip(rows, r.texts, r.completion_ids):
                if text_format:
                    text = first_answer_line(text)
                    formatted += "Answer:" in text
                else:
                    formatted += (synthetic.reward_format(text) > 0) if think else ("The answer is" in text)
                correct += synthetic.is_correct(text, p.answer)
                tokens += len(ids)
    finally:
        model.train(was_training)
    return Accuracy(n=n, correct=correct, formatted=formatted, mean_tokens=tokens / max(n * samples, 1), think=think,
                    budget=budget, seconds=time.perf_counter() - t0, samples=samples, temperature=temperature)


def first_answer_line(text: str) -> str:
    """The completion up to the end of its first ``Answer:`` line (a base model may go on to a new document)."""
    at = text.find("Answer:")
    if at < 0:
        return text
    end = text.find("\n", at)
    return text if end < 0 else text[:end]
