"""Does GRPO raise the reward on the prompts it trains on? (docs/BENCHMARKS.md, issue #6)

Takes a fixed pool of training-split problems, measures the exact-answer reward of the model on it
(sampled: 8 completions per prompt at the given temperature; greedy: one), runs ``nano align --method grpo``
on exactly that pool for N steps, and measures again.

    python benchmarks/grpo_pool.py MODEL OUT [--steps 40] [--lr 1e-4] [--temperature 1.0] [--pool 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanocli.data import synthetic
from nanocli.stages import align as al
from nanocli.train import grpo
from nanocli.train.rewards import resolve_rewards
from nanocli_model import load_pretrained
from nanocli_model.generation import SamplingParams
from nanocli_model.tokenizer import Tokenizer


def pool_reward(path: Path, problems, temperature: float, max_new: int) -> tuple[float, float]:
    model = load_pretrained(path, dtype="fp32").eval()
    tok = Tokenizer.from_dir(path)
    prompts = [tok.encode_chat(synthetic.as_grpo(p)["prompt"]) for p in problems]
    records = [{"answer": p.answer} for p in problems]
    exact = resolve_rewards("exact")
    sampled = grpo.rollout(model, tok, prompts, 8, SamplingParams(temperature=temperature, max_new_tokens=max_new),
                           seed=99).score(exact, records)
    greedy = grpo.rollout(model, tok, prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=max_new),
                          seed=99).score(exact, records)
    return float(sampled.mean()), float(greedy.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--pool", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    a = ap.parse_args()
    problems = synthetic.generate(a.pool, seed=11, split="train", difficulty=(1, 2))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "pool.jsonl"
    data.write_text("".join(json.dumps(synthetic.as_grpo(p)) + "\n" for p in problems))
    before = pool_reward(Path(a.model), problems, a.temperature, a.max_new_tokens)
    al.run(al.AlignOptions(method="grpo", model=a.model, data=str(data), out=str(out / "run"), steps=a.steps,
                           global_batch=8, group_size=8, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                           lr=a.lr, rewards="exact", precision="fp32", eval_problems=0, warmup=0))
    after = pool_reward(out / "run" / "final", problems, a.temperature, a.max_new_tokens)
    print(f"pool of {a.pool} training prompts, exact-answer reward: sampled {before[0]:.3f} -> {after[0]:.3f}, "
          f"greedy {before[1]:.3f} -> {after[1]:.3f}")


if __name__ == "__main__":
    main()
