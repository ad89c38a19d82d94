"""Decode tokens/s of int8 (``--dtype int8``) against fp32, same weights, same threads.

    PYTHONPATH=. .venv/bin/python benchmarks/int8_decode.py --profile medium --threads 1
    PYTHONPATH=. .venv/bin/python benchmarks/int8_decode.py --model runs/demo/grpo/final --chat 20 --tokens 128

Without ``--model`` a profile's model is built with random weights (``init_weights``, seed 0) and saved as an
fp32 checkpoint in a temporary directory; each variant loads it through ``load_pretrained`` as ``nano generate``
does: fp32, int8 (projections + lm_head), int8 with lm_head kept fp32. Each run prefills a fixed prompt and
decodes ``--tokens`` tokens greedily (eager, one token a step); runs alternate A B C A B C so machine noise hits
all alike. Prints ``uptime`` before and after, the median decode tokens/s per variant, the ratio to fp32, and
greedy agreement with fp32 (share of generated positions whose token equals fp32's, over the whole run; the
first disagreement changes every later input, so it is counted up to it and as a plain share).

``--chat N`` (with ``--model``, a trained checkpoint): instead of one random-id prompt, N held-out problems of the
built-in reasoning tasks asked through the model's chat template (reasoning on), each decoded ``--tokens`` tokens
greedily past its end of turn; agreement is the mean over the prompts, and the table adds how many of the N
completions are token-for-token identical to fp32. Speeds are then medians over every prompt and rep.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import yaml

from nanocli_model import NanoConfig, load_pretrained
from nanocli_model.checkpoint import save_pretrained
from nanocli_model.model import build_model

PROFILES = Path(__file__).resolve().parent.parent / "nanocli" / "profiles" / "models"


def load_profile(name: str) -> NanoConfig:
    raw = yaml.safe_load((PROFILES / f"{name}.yaml").read_text())
    return NanoConfig.from_dict(raw["config"], source=name)


@torch.no_grad()
def decode(model, prompt: torch.Tensor, tokens: int, step=None, cache_len: int = 0) -> tuple[float, list[int]]:
    """(decode tokens/s, greedy token ids) after a prefill of ``prompt`` (1, T); ``step``: a compiled step;
    ``cache_len``: the cache's length (default: just enough)."""
    step = step or model
    cache = model.allocate_cache(1, max(cache_len, prompt.shape[1] + tokens + 1))
    tok = model(prompt, cache)[:, -1].argmax(-1)
    out = [int(tok)]
    t = time.perf_counter()
    for _ in range(tokens - 1):
        tok = step(tok[:, None], cache)[:, -1].argmax(-1)
        out.append(int(tok))
    return (tokens - 1) / (time.perf_counter() - t), out


def agreement(a: list[int], b: list[int]) -> tuple[float, int]:
    """(share of equal positions, length of the common prefix)."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    return sum(x == y for x, y in zip(a, b)) / len(a), prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="medium")
    ap.add_argument("--model", help="a checkpoint directory instead of a random profile model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (random ids, seed 0)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chat", type=int, default=0, metavar="N", help="with --model: N held-out problems through "
                    "the chat template (reasoning on) as prompts, agreement averaged over them")
    ap.add_argument("--compile", action="store_true", help="decode every variant through the step nano "
                    "generate compiles (AotDecode on CPU, else CompiledDecode); the compile is done in the warm-up, "
                    "timed apart")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else Path(tmp) / "fp32"
        if not args.model:
            save_pretrained(build_model(load_profile(args.profile), seed=0), path)
        variants = {"fp32": load_pretrained(path, dtype="fp32"),
                    "int8": load_pretrained(path, dtype="int8"),
                    "int8 (lm_head fp32)": load_pretrained(path, dtype="int8", int8_lm_head=False)}
    vocab = variants["fp32"].config.vocab_size
    prompts = [torch.randint(3, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))]
    if args.chat:
        if not args.model:
            ap.error("--chat needs --model (a trained checkpoint with its tokenizer)")
        from nanocli.data import synthetic
        from nanocli_model.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(args.model)
        problems = synthetic.generate(args.chat, seed=1234, split="heldout", difficulty=(1, 2))
        prompts = [torch.tensor([tok.encode_chat(synthetic.as_grpo(p, think=True)["prompt"])]) for p in problems]
    prompt = prompts[0]
    with torch.no_grad():  # the prompt's logits (prefill: the dequantized weights, i.e. the quantization error)
        ref = variants["fp32"](prompt).double()
        errs = {k: ((m(prompt).double() - ref).norm() / ref.norm()).item() for k, m in variants.items()}
    speeds: dict[str, list[float]] = {k: [] for k in variants}
    ids: dict[str, list[list[int]]] = {k: [[] for _ in prompts] for k in variants}
    steps = {k: None for k in variants}
    if args.compile:  # what nano generate compiles: the ahead-of-time step where it runs, else torch.compile
        from nanocli.stages.generate import compile_decode

        steps = {k: compile_decode(m) for k, m in variants.items()}
    for name, model in variants.items():  # warm-up: the decode layout, first-touch of the weights, the compile
        decode(model, prompt, 4, steps[name], prompt.shape[1] + args.tokens + 1)  # the timed runs' cache size
        if steps[name] is not None:
            print(f"  {name}: {type(steps[name]).__name__} compiled in {steps[name].compile_seconds:.1f} s"
                  + (f" (fell back to eager: {steps[name].fallback_reason})" if steps[name].fallback_reason else ""))
    for _ in range(args.reps):
        for i, p in enumerate(prompts):
            for name, model in variants.items():
                tps, ids[name][i] = decode(model, p, args.tokens, steps[name])
                speeds[name].append(tps)
    print("uptime after: ", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    source = args.model or f"profile {args.profile} (random weights, seed 0)"
    what = (f"{len(prompts)} held-out chat prompts (reasoning on)" if args.chat else f"prompt {args.prompt}")
    print(f"{source}, {args.threads} thread(s), {what}, {args.tokens} tokens, {args.reps} reps "
          f"interleaved, {'compiled' if args.compile else 'eager'} decode")
    base = statistics.median(speeds["fp32"])
    for name, runs in speeds.items():
        med = statistics.median(runs)
        pairs = [agreement(a, b) for a, b in zip(ids[name], ids["fp32"])]
        share = statistics.fmean(s for s, _ in pairs)
        same = sum(s == 1.0 for s, _ in pairs)
        shown = runs if len(runs) <= 8 else []
        print(f"  {name:<20} {med:8.1f} tok/s  x{med / base:.2f} vs fp32"
              + (f"  runs {' '.join(f'{r:.1f}' for r in shown)}" if shown else "")
              + f"  greedy agreement {share:.1%}"
              + (f" ({same}/{len(pairs)} completions identical, shortest common prefix {min(p for _, p in pairs)})"
                 if len(pairs) > 1 else f" (first {pairs[0][1]} identical)")
              + f"  prompt logits rel. error {errs[name]:.2e}")


if __name__ == "__main__":
    main()
