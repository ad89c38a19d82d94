"""nano align end to end on a tiny base pretrained once per session: each method moves what it must."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanocli.stages import align as al

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def base(tiny_base) -> Path:
    return tiny_base


def align(base: Path, out: Path, method: str, **kw) -> al.AlignResult:
    o = dict(method=method, model=str(base), data="synthetic:reasoning?docs=400&difficulty=1-2", seq_len=128,
             global_batch=8, steps=8, lr=1e-3, warmup=0, precision="fp32", eval_problems=0, out=str(out))
    return al.run(al.AlignOptions(**{**o, **kw}))


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]


def test_sft_learns_the_assistant_turns_and_saves_a_chat_model(base, tmp_path):
    r = align(base, tmp_path, "sft", steps=15, eval_problems=4)
    ls = losses(tmp_path)
    assert ls[-1] < ls[0] - 0.5, ls  # the chat format is new to the base: its loss must drop fast
    assert r.data_stats["think_off"] > 0 and r.data_stats["think_on"] > r.data_stats["think_off"]
    assert set(r.before) == set(r.after) == {"think", "no_think"}
    final = tmp_path / "final"
    assert (final / "tokenizer_config.json").is_file() and json.loads((tmp_path / "eval.json").read_text())["after"]


def test_dpo_raises_the_chosen_over_rejected_margin(base, tmp_path):
    """DPO widens the implicit-reward margin of the pairs it trains on (a wrong gradient sign or a swapped
    pair would shrink it). Held-out pairs are measured before and after; whether a 30-step toy base
    generalises to them is a coin toss, so the held-out rise is measured on the demo model instead
    (docs/BENCHMARKS.md: 0% -> 85% held-out reward accuracy)."""
    # 40 training pairs, 8 per step: each pair comes round four times in 20 steps
    r = align(base, tmp_path, "dpo", data="synthetic:reasoning?docs=48&difficulty=1-2", steps=20, lr=2e-3, beta=0.5,
              heldout_fraction=0.15)
    before, after = r.preference["before"], r.preference["after"]
    assert before["margin"] == pytest.approx(0.0, abs=1e-6) and before["pairs"] == after["pairs"] > 0
    m = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    m = [x for x in m if "margins" in x]
    first, last = m[:4], m[-4:]
    assert sum(x["margins"] for x in last) / 4 > sum(x["margins"] for x in first) / 4 + 0.1, m
    assert sum(x["accuracy"] for x in last) / 4 > 0.7
    assert sum(x["loss"] for x in last) / 4 < 0.69


def test_grpo_rolls_out_groups_and_logs_rewards(base, tmp_path):
    r = align(base, tmp_path, "grpo", steps=2, global_batch=2, group_size=4, max_new_tokens=24,
              data="synthetic:reasoning?docs=50&difficulty=1")
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert r.steps_done == 2 and all({"reward", "reward_exact", "reward_format", "clip_fraction"} <= set(m)
                                     for m in rows)
    assert all(0 < m["completion_tokens"] <= 24 for m in rows)


def test_merge_cli_writes_the_weighted_mean(base, tmp_path):
    a = tmp_path / "a"
    align(base, a, "sft", steps=2)
    out = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "nanocli", "align", "merge", str(base), str(a / "final"),
                        "--weights", "0.25,0.75", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr
    w0, w1, m = (load_file(str(p / "model.safetensors")) for p in (base, a / "final", out))
    assert all(torch.allclose(m[k], 0.25 * w0[k] + 0.75 * w1[k], atol=1e-6) for k in m)


def test_resume_is_exact_for_sft(base, tmp_path):
    align(base, tmp_path / "ref", "sft", steps=6)
    align(base, tmp_path / "cut", "sft", steps=6, save_every=3)
    import shutil

    shutil.rmtree(tmp_path / "cut" / "final")
    align(base, tmp_path / "cut", "sft", steps=6, save_every=3, resume="auto")
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, message", [
    (["--method", "ppo"], "--method 'ppo' is unknown"),
    (["--data", "synthetic:reasoning"], "--model DIR is required"),
    (["--method", "grpo", "--rewards", "nope"], "nope"),
    (["--data", "missing.jsonl"], "missing.jsonl"),
])
def test_bad_input_is_one_line(base, tmp_path, args, message):
    full = ["align", "--model", str(base), "--data", "synthetic:reasoning?docs=20", "--steps", "1",
            "--out", str(tmp_path / "o")]
    if "--model DIR is required" in message:
        full = ["align", "--steps", "1", "--out", str(tmp_path / "o")]
    r = subprocess.run([sys.executable, "-m", "nanocli", *full, *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr


def test_malformed_jsonl_line_is_named_or_skipped(base, tmp_path):
    from nanocli.data import DataError

    f = tmp_path / "sft.jsonl"
    good = {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                         {"role": "assistant", "content": "<think>\n2 + 2 = 4\n</think>\nThe answer is 4."}]}
    f.write_text(json.dumps(good) + "\n{broken\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError, match="sft.jsonl:2"):
        align(base, tmp_path / "o", "sft", data=str(f), steps=1)
    r = align(base, tmp_path / "o2", "sft", data=str(f), steps=1, on_error="skip")
    assert r.data_stats["skipped_malformed"] == 1 and r.steps_done == 1
