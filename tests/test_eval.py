"""nano eval: accuracy is scored against the problems' own answers, the budget sweep asks with each budget,
perplexity equals a float64 hand computation, and the command's outputs and errors are what it says."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanocli.data import synthetic
from nanocli.stages import evaluate as ev
from nanocli.train import grpo

ROOT = Path(__file__).resolve().parent.parent


def nano(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanocli.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_accuracy_counts_exactly_the_right_answers_and_sweeps_the_budgets(tiny_base, monkeypatch):
    n, seed = 12, 7
    problems = synthetic.generate(n, seed=seed, split="heldout", tasks=("add", "sort"), difficulty=(1, 2))
    calls = []

    def fake_rollout(model, tokenizer, prompts, group_size, params, seed, thinking_budget=None):
        calls.append(thinking_budget)
        assert len(prompts) == n and params.temperature == 0.0
        texts = []
        for i, p in enumerate(problems):  # right answers at even positions, well-formed wrong ones at odd
            answer = p.answer if i % 2 == 0 else synthetic.wrong_answer(p, __import__("random").Random(i))
            texts.append(f"<think>\nsteps\n</think>\nThe answer is {answer}.")
        ids = [[5] * (10 + i) for i in range(n)]
        return grpo.Rollout(prompt_ids=list(prompts), completion_ids=ids, texts=texts, group_size=1, seed=seed)

    monkeypatch.setattr(grpo, "rollout", fake_rollout)
    r = ev.run(ev.EvalOptions(model=str(tiny_base), problems=n, tasks="add,sort", difficulty="1-2", seed=seed,
                              budgets=(4, 16), batch=n, device="cpu"))
    assert calls == [None, None, 4, 16]  # think, no_think, then the sweep with reasoning on
    for a in [*r.accuracy.values(), *r.sweep]:
        assert a.correct == n // 2 and a.accuracy == 0.5
        assert a.mean_tokens == sum(10 + i for i in range(n)) / n
    assert r.accuracy["think"].formatted == n  # every completion closed its thinking and answered in form
    assert [s.budget for s in r.sweep] == [4, 16]


def test_text_format_asks_in_the_pretraining_format_and_scores_the_first_answer(tiny_base, monkeypatch):
    n, seed = 6, 3
    problems = synthetic.generate(n, seed=seed, split="heldout", tasks=("add",), difficulty=(1, 1))
    seen = []

    def fake_rollout(model, tokenizer, prompts, group_size, params, seed, thinking_budget=None):
        seen.extend(tokenizer.decode(p) for p in prompts)
        # a base model answers, then runs on into a new document with another "Answer:" (ignored)
        texts = [f"1 + 1 = 2\nAnswer: {p.answer if i < 4 else 'x'}\nQuestion: What is 1 + 1?\nAnswer: 7\n"
                 for i, p in enumerate(problems)]
        return grpo.Rollout(prompt_ids=list(prompts), completion_ids=[[1]] * n, texts=texts, group_size=1, seed=seed)

    monkeypatch.setattr(grpo, "rollout", fake_rollout)
    r = ev.run(ev.EvalOptions(model=str(tiny_base), problems=n, tasks="add", difficulty="1", seed=seed,
                              prompt_format="text", batch=n, device="cpu"))
    assert seen == [f"Question: {p.question}\nReasoning:\n" for p in problems]
    assert list(r.accuracy) == ["text"] and r.accuracy["text"].correct == 4
    assert r.accuracy["text"].formatted == n


def test_samples_score_every_completion_of_every_problem(tiny_base, monkeypatch):
    n, k, seed = 5, 3, 2
    problems = synthetic.generate(n, seed=seed, split="heldout", tasks=("max",), difficulty=(1, 1))

    def fake_rollout(model, tokenizer, prompts, group_size, params, seed, thinking_budget=None):
        assert group_size == k and params.temperature == 0.8
        # rows grouped by prompt: problem i's completions are rows i*k .. i*k + k - 1; only the first is right
        texts = [f"<think>\nx\n</think>\nThe answer is {p.answer if j == 0 else 'no'}."
                 for p in problems for j in range(group_size)]
        return grpo.Rollout(prompt_ids=[q for q in prompts for _ in range(group_size)],
                            completion_ids=[[1, 2]] * len(texts), texts=texts, group_size=group_size, seed=seed)

    monkeypatch.setattr(grpo, "rollout", fake_rollout)
    r = ev.run(ev.EvalOptions(model=str(tiny_base), problems=n, tasks="max", difficulty="1", seed=seed,
                              mode="think", samples=k, temperature=0.8, batch=n, device="cpu"))
    a = r.accuracy["think"]
    assert (a.correct, a.samples, a.formatted) == (n, k, n * k)
    assert a.accuracy == pytest.approx(1 / k) and a.mean_tokens == 2


def test_perplexity_equals_a_float64_hand_computation(tiny_base, tmp_path):
    spec, seq_len = "synthetic:reasoning?docs=200&difficulty=1-2", 32
    o = ev.EvalOptions(model=str(tiny_base), problems=0, data=spec, seq_len=seq_len, ppl_tokens=700, batch=4,
                       device="cpu", cache_dir=str(tmp_path))
    r = ev.run(o)
    assert r.perplexity.tokens == (700 // seq_len) * seq_len == r.perplexity.windows * seq_len

    from nanocli.data import parse_data_spec, prepare_source
    from nanocli_model import load_pretrained
    from nanocli_model.tokenizer import Tokenizer

    source = prepare_source(parse_data_spec(spec + "&split=heldout")[0], Tokenizer.from_dir(tiny_base), tmp_path)
    model = load_pretrained(tiny_base, dtype="fp32").double().eval()
    tokens = torch.tensor(source.tokens[:r.perplexity.windows * seq_len + 1].astype("int64"))
    total = 0.0
    with torch.no_grad():
        for w in range(r.perplexity.windows):
            x = tokens[w * seq_len:(w + 1) * seq_len + 1]
            logits = model(x[None, :-1])
            logits = logits if isinstance(logits, torch.Tensor) else logits.logits
            total += F.cross_entropy(logits[0].double(), x[1:], reduction="sum").item()
    expected = total / r.perplexity.tokens
    assert r.perplexity.loss == pytest.approx(expected, rel=1e-5)
    assert r.perplexity.ppl == pytest.approx(math.exp(expected), rel=1e-5)


def test_cli_writes_json_table_and_plot(tiny_base, tmp_path):
    out, plot = tmp_path / "eval.json", tmp_path / "sweep.png"
    p = nano("eval", "--model", str(tiny_base), "-n", "4", "--budgets", "16,4", "--max-new-tokens", "24",
             "--json", "--output", str(out), "--plot", str(plot), "--device", "cpu")
    assert p.returncode == 0, p.stderr
    record = json.loads(p.stdout)
    assert record == json.loads(out.read_text())
    assert set(record["accuracy"]) == {"think", "no_think"}
    assert [s["budget"] for s in record["budget_sweep"]] == [4, 16]
    assert all(0 <= a["accuracy"] <= 1 and a["n"] == 4 for a in [*record["accuracy"].values(), *record["budget_sweep"]])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = nano("eval", "--model", str(tiny_base), "-n", "2", "--mode", "no_think", "--max-new-tokens", "8")
    assert table.returncode == 0 and "reasoning off" in table.stdout and "reasoning on" not in table.stdout


def test_help_shows_the_real_defaults():
    p = subprocess.run([sys.executable, "-m", "nanocli.cli", "eval", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    rows = p.stdout.splitlines()
    for flag, default in (("--problems", "100"), ("--mode", "both"), ("--prompt-format", "chat"),
                          ("--difficulty", "1-3"), ("--max-new-tokens", "256"), ("--temperature", "0.0"),
                          ("--batch", "32"), ("--seed", "1234"), ("--seq-len", "512"), ("--device", "auto")):
        row = next(r for r in rows if r.startswith(f"│ {flag} "))
        assert f"[default: {default}]" in row, (flag, row)
    assert "both|think|no_think" in next(r for r in rows if r.startswith("│ --mode "))


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent"], "no such model directory"),
    (["--budgets", "8,x"], "--budgets"),
    (["--budgets", "0"], "positive"),
    (["--mode", "sometimes"], "--mode"),
    (["--problems", "0"], "nothing to evaluate"),
    (["--difficulty", "9"], "difficulty"),
    (["--tasks", "poetry"], "poetry"),
    (["--plot", "x.jpg"], ".png"),
    (["--mode", "no_think", "--budgets", "8"], "--budgets"),
    (["--prompt-format", "xml"], "--prompt-format"),
    (["--samples", "4"], "--temperature"),
    (["--prompt-format", "text", "--budgets", "8"], "--budgets"),
    (["--device", "tpu"], "--device"),
    (["--batch", "0"], "--batch"),
    (["--temperature", "nan"], "--temperature"),
])
def test_bad_input_is_one_line(tiny_base, args, message):
    argv = ["eval", *args] if args[0] == "--model" else ["eval", "--model", str(tiny_base), *args]
    p = nano(*argv)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
