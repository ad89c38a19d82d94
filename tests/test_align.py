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
from nanocli.train.checkpoints import checkpoint_name, list_checkpoints

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
    stats = r.plan.data_stats
    assert stats["think_off"] > 0 and stats["think_on"] > stats["think_off"]
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
    before, after = r.pairs_before, r.pairs_after
    assert before.margin == pytest.approx(0.0, abs=1e-6) and before.pairs == after.pairs > 0
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


@pytest.fixture
def chars_reward(tmp_path, monkeypatch) -> str:
    """A reward that differs between the completions of a group (the toy base rarely earns ``exact``/``format``,
    and a group of equal rewards has zero advantages: nothing would move)."""
    (tmp_path / "nano_test_rewards.py").write_text("def chars(completion, record):\n    return len(completion) / 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "nano_test_rewards:chars"


def grpo(base: Path, out: Path, **kw) -> al.AlignResult:
    o = dict(global_batch=2, group_size=4, max_new_tokens=24, data="synthetic:reasoning?docs=50&difficulty=1")
    return align(base, out, "grpo", **{**o, **kw})


def metrics(out: Path) -> list[dict]:
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def weights(out: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return load_file(str(out / name / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_clip_eps_acts_on_the_later_passes_of_a_rollout_batch_only(base, tmp_path, chars_reward):
    """mu = 2: the second step reuses the first step's rollouts against the log-probs fixed at rollout, so its
    ratio is no longer 1 and a small --clip-eps changes its update; the first step (ratio 1, up to the ~1e-7
    between the model's no-grad and training forwards) is the same whatever the clip. mu = 1: every step is
    a fresh rollout's first pass, the ratio is exactly 1 and clip_eps changes nothing at all."""
    kw = dict(steps=2, lr=1e-3, rewards=chars_reward, save_every=1, keep_last=5)
    runs = {(mu, eps): tmp_path / f"mu{mu}-eps{eps:g}" for mu in (1, 2) for eps in (1e-3, 1e3)}
    for (mu, eps), out in runs.items():
        grpo(base, out, mu=mu, clip_eps=eps, **kw)
    w0 = load_file(str(base / "model.safetensors"))
    # mu = 1: bitwise the same whatever the clip, and the run did learn something (the advantages are not all 0)
    assert same(weights(runs[1, 1e-3]), weights(runs[1, 1e3]))
    assert not same(weights(runs[1, 1e-3]), w0)
    assert all(m["clip_fraction"] == 0.0 and m["ratio_mean"] == 1.0 for m in metrics(runs[1, 1e-3]))
    # mu = 2: the first pass is the same however tight the clip (ratio 1), the second pass is not
    assert same(weights(runs[2, 1e-3], checkpoint_name(1)), weights(runs[2, 1e3], checkpoint_name(1)))
    assert not same(weights(runs[2, 1e-3]), weights(runs[2, 1e3]))
    tight, loose = metrics(runs[2, 1e-3]), metrics(runs[2, 1e3])
    assert tight[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and tight[0]["clip_fraction"] == 0.0
    assert abs(tight[1]["ratio_mean"] - 1.0) > 1e-3 and tight[1]["clip_fraction"] > 0.1, tight[1]
    assert loose[1]["ratio_mean"] == tight[1]["ratio_mean"] and loose[1]["clip_fraction"] == 0.0
    assert tight[0]["reward"] == tight[1]["reward"]  # the same rollouts, trained on twice


def test_grpo_mu_rolls_out_once_per_mu_steps_and_resumes_exactly_inside_a_batch(base, tmp_path, chars_reward,
                                                                                 monkeypatch):
    """--steps counts optimizer steps; a batch of rollouts serves --mu of them (5 steps, mu 2: 3 rollouts).
    A checkpoint inside a batch carries it: resuming there trains on those rollouts (no new generation)
    and ends bit-identical to the uninterrupted run."""
    import shutil

    from nanocli.train import grpo as g

    calls = []
    real = g.generate
    monkeypatch.setattr(g, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(steps=5, mu=2, lr=1e-3, rewards=chars_reward, save_every=1, keep_last=10)
    ref = tmp_path / "ref"
    r = grpo(base, ref, **kw)
    assert r.steps_done == 5 and len(calls) == 3  # steps 1-2, 3-4, 5
    rewards = [m["reward"] for m in metrics(ref)]
    assert rewards[0] == rewards[1] and rewards[2] == rewards[3]
    for newest, rollouts in ((3, 1), (1, 2)):  # inside batches 2 and 1 (steps 3-4, 1-2)
        cut = tmp_path / f"cut-{newest}"
        shutil.copytree(ref, cut)
        for step, d in list_checkpoints(cut):
            if step > newest or d.name == "final":
                shutil.rmtree(d)
        calls.clear()
        r = grpo(base, cut, resume="auto", **kw)
        assert r.start_step == newest and len(calls) == rollouts, newest
        assert same(weights(ref), weights(cut)), newest
        assert [m["loss"] for m in metrics(cut)] == [m["loss"] for m in metrics(ref)]
    # a checkpoint inside a batch that does not carry it cannot resume exactly: one line, before any step
    from nanocli.train.checkpoints import TRAINER_STATE

    bad = tmp_path / "bad"
    shutil.copytree(ref, bad)
    for step, d in list_checkpoints(bad):
        if step > 1 or d.name == "final":
            shutil.rmtree(d)
    f = bad / checkpoint_name(1) / TRAINER_STATE
    state = torch.load(f, weights_only=True)
    del state["grpo_rollout"]
    torch.save(state, f)
    with pytest.raises(al.AlignError, match="falls inside rollout batch 1 .* does not carry that batch") as e:
        grpo(base, bad, resume="auto", **kw)
    assert "\n" not in str(e.value) and [s for s, _ in list_checkpoints(bad)] == [1]


def test_grpo_epochs_count_passes_over_the_prompts_times_mu(base, tmp_path):
    r = align(base, tmp_path, "grpo", data="synthetic:reasoning?docs=20&difficulty=1", steps=None, epochs=1,
              global_batch=4, mu=3, dry_run=True)
    assert r.plan.rollout_batches == 5 and r.plan.steps == 15 and r.plan.options.mu == 3


@pytest.mark.parametrize("kw, message", [
    (dict(mu=0), "--mu must be an integer of at least 1"),
    (dict(mu=1.5), "--mu must be an integer of at least 1"),
    (dict(mu=True), "--mu must be an integer of at least 1"),
    (dict(mu=2, method="sft"), "--mu 2 applies to --method grpo only"),
    (dict(clip_eps=0.0), "--clip-eps must be a finite number > 0"),
])
def test_bad_grpo_options_fail_before_any_work(base, tmp_path, kw, message):
    with pytest.raises(al.AlignError, match=message) as e:
        align(base, tmp_path / "o", **{"method": "grpo", **kw})
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


def test_bad_mu_from_a_recipe_is_one_line(base, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: align\nmethod: grpo\nmu: 0\n")
    r = subprocess.run([sys.executable, "-m", "nanocli", "align", "--recipe", str(recipe), "--model", str(base),
                        "--data", "synthetic:reasoning?docs=20", "--steps", "1", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--mu must be an integer of at least 1" in lines[0], r.stderr


def test_fp8_precision_runs_fp8_gemms(base, tmp_path):
    """--precision fp8 converts the policy's Linears (align trained in bf16 before the one training run)."""
    r = align(base, tmp_path, "sft", steps=2, precision="fp8", fp8_keep=1)
    assert r.fp8 and r.fp8.fp8 and r.steps_done == 2 and (tmp_path / "final" / "model.safetensors").is_file()


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
    r = subprocess.run([sys.executable, "-m", "nanocli", "align", "merge", str(base), str(a / "final")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --out DIR is required: where the merged checkpoint goes"


def test_resume_is_exact_for_sft(base, tmp_path):
    align(base, tmp_path / "ref", "sft", steps=6)
    align(base, tmp_path / "cut", "sft", steps=6, save_every=3)
    import shutil

    shutil.rmtree(tmp_path / "cut" / "final")
    align(base, tmp_path / "cut", "sft", steps=6, save_every=3, resume="auto")
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method, kw", [("dpo", dict(beta=0.5)), ("grpo", dict(kl_beta=0.5, global_batch=2,
                                                                              group_size=4, max_new_tokens=16))],
                         ids=["dpo", "grpo-kl"])
def test_resume_keeps_the_input_model_as_the_reference(base, tmp_path, method, kw, request):
    """DPO's and GRPO-KL's reference is the run's input model, not the checkpoint a resume starts from: a run
    cut at step 3 and resumed ends bit-identical to the uninterrupted run (weights and every logged loss).
    Against a reference copied from the checkpoint the resumed steps' losses differ (DPO's margins restart
    at 0, GRPO's KL term at 0)."""
    import shutil

    if method == "grpo":
        kw = {**kw, "rewards": request.getfixturevalue("chars_reward"),
              "data": "synthetic:reasoning?docs=50&difficulty=1"}
    kw = dict(steps=6, lr=2e-3, **kw)
    align(base, tmp_path / "ref", method, **kw)
    align(base, tmp_path / "cut", method, save_every=3, **kw)
    for step, d in list_checkpoints(tmp_path / "cut"):
        if step > 3 or d.name == "final":
            shutil.rmtree(d)
    r = align(base, tmp_path / "cut", method, save_every=3, resume="auto", **kw)
    assert r.start_step == 3 and r.steps_done == 6
    assert [m["loss"] for m in metrics(tmp_path / "cut")] == [m["loss"] for m in metrics(tmp_path / "ref")]
    assert same(weights(tmp_path / "ref"), weights(tmp_path / "cut"))


@pytest.mark.parametrize("method, kw", [("sft", {}), ("dpo", dict(beta=0.5)),
                                        ("grpo", dict(kl_beta=0.5, global_batch=2, group_size=4, max_new_tokens=16))])
def test_resume_is_exact_with_the_held_out_evaluation_on(base, tmp_path, method, kw, request):
    """--eval-problems on (the default is 64): the uninterrupted run generates with the input model before its
    first step, the resumed run does not. Generation moves the weights into the decode layout; training must run
    on the same layout either way (the training layout, row-major), or the resumed steps round differently:
    a run cut at step 3 and resumed ends bit-identical to the uninterrupted run (weights and every logged loss).
    GRPO also generates (its rollouts) at every step."""
    import shutil

    if method == "grpo":
        kw = {**kw, "rewards": request.getfixturevalue("chars_reward"),
              "data": "synthetic:reasoning?docs=50&difficulty=1"}
    kw = dict(steps=6, lr=2e-3, eval_problems=4, **kw)
    r = align(base, tmp_path / "ref", method, **kw)
    assert set(r.before) == set(r.after) == {"think", "no_think"} and r.before["think"].mean_tokens > 0
    align(base, tmp_path / "cut", method, save_every=3, **kw)
    for step, d in list_checkpoints(tmp_path / "cut"):
        if step > 3 or d.name == "final":
            shutil.rmtree(d)
    r = align(base, tmp_path / "cut", method, save_every=3, resume="auto", **kw)
    assert r.start_step == 3 and r.steps_done == 6 and not r.before and set(r.after) == {"think", "no_think"}
    assert [m["loss"] for m in metrics(tmp_path / "cut")] == [m["loss"] for m in metrics(tmp_path / "ref")]
    assert same(weights(tmp_path / "ref"), weights(tmp_path / "cut"))


def test_a_resume_reloads_the_reference_from_the_saved_input_model_and_refuses_another(base, tmp_path, capsys):
    """``nano align --out RUN --resume auto`` alone: the reference is the input model the run's saved settings
    name, re-read from there; a model that moved keeps working when --model gives its new place. An input
    model whose weights changed since the start, or one that is gone, is one line, exit 2, before any step."""
    import shutil

    from nanocli.cli import main

    def nano(*args) -> tuple[int, str]:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        return e.value.code, capsys.readouterr().err

    inp, run = tmp_path / "input", tmp_path / "run"
    shutil.copytree(base, inp)
    code, err = nano("align", "--method", "dpo", "--model", inp, "--data", "synthetic:reasoning?docs=40",
                     "--seq-len", 64, "--global-batch", 4, "--precision", "fp32", "--eval-problems", 0, "--lr", 2e-3,
                     "--beta", 0.5, "--steps", 4, "--save-every", 2, "--keep-last", 5, "--out", run)
    assert code == 0, err
    straight, logged = weights(run), [m["loss"] for m in metrics(run)]
    for step, d in list_checkpoints(run):
        if step > 2 or d.name == "final":
            shutil.rmtree(d)
    # the input model overwritten with other weights of the same shape (the checkpoint's): refused
    shutil.copy(run / checkpoint_name(2) / "model.safetensors", inp / "model.safetensors")
    code, err = nano("align", "--out", run, "--resume", "auto")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--model {inp}: its weights" in err and "not the reference this run started from" in err
    shutil.rmtree(inp)  # gone: what to do, in one line
    code, err = nano("align", "--out", run, "--resume", "auto")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "give --model where that model is now" in err, err
    assert [s for s, _ in list_checkpoints(run)] == [2]
    moved = tmp_path / "moved"
    shutil.copytree(run, tmp_path / "run2")
    shutil.copytree(base, inp)
    shutil.copytree(base, moved)
    for out, extra in ((run, ()), (tmp_path / "run2", ("--model", moved))):
        code, err = nano("align", "--out", out, "--resume", "auto", *extra)
        assert code == 0, err
        assert same(weights(out), straight) and [m["loss"] for m in metrics(out)] == logged, out


@pytest.mark.parametrize("args, message", [
    (["--method", "ppo"], "--method ppo: use one of sft, dpo, grpo"),
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
    assert r.plan.data_stats["skipped_malformed"] == 1 and r.steps_done == 1
