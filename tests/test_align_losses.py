"""Alignment building blocks against hand computations: DPO, GRPO, rewards, rollouts, checkpoint merging."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model_utils import tiny_config
from nanocli.data import synthetic
from nanocli.train.grpo import (
    completion_batch,
    completion_logprobs,
    group_advantages,
    grpo_loss,
    rollout,
    token_logprobs,
)
from nanocli.train.merge import merge_checkpoints
from nanocli.train.preference import (
    dpo_loss,
    pair_logprobs,
    preference_batch,
    reference_logprobs,
    sequence_logprobs,
)
from nanocli.train.rewards import REWARDS, RewardError, resolve_rewards, score
from nanocli_model.checkpoint import load_pretrained, save_pretrained
from nanocli_model.errors import CheckpointError, ConfigError
from nanocli_model.generation import SamplingParams
from nanocli_model.model import build_model
from nanocli_model.tokenizer import build_test_tokenizer, render_chat


def softplus(x: float) -> float:  # -log(sigmoid(-x)) = log(1 + e^x)
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------------------------------- sequence log-probs
def test_sequence_logprobs_match_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g) * 3
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, :] = -100
    got = sequence_logprobs(logits, labels)
    for b in range(3):
        want = 0.0
        for t in range(5):
            if labels[b, t] != -100:
                want += torch.log_softmax(logits[b, t].double(), dim=-1)[labels[b, t]].item()
        assert got[b].item() == pytest.approx(want, abs=1e-5)
    assert got[2].item() == 0.0


# ----------------------------------------------------------------------------------------------------------- DPO
def test_dpo_loss_equals_hand_computation_and_metrics():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.0, -1.5])
    beta = 0.5
    loss, m = dpo_loss(pc, pr, rc, rr, beta)
    # pair 0: chosen reward 0.5*(-1+1.5)=0.25, rejected 0.5*(-2+1)=-0.5, x=0.75
    # pair 1: chosen reward 0.5*(-3+2)=-0.5, rejected 0.5*(-1+1.5)=0.25, x=-0.75
    assert loss[0].item() == pytest.approx(math.log(1 + math.exp(-0.75)), abs=1e-6)
    assert loss[1].item() == pytest.approx(math.log(1 + math.exp(0.75)), abs=1e-6)
    assert m["rewards_chosen"] == pytest.approx((0.25 - 0.5) / 2)
    assert m["rewards_rejected"] == pytest.approx((-0.5 + 0.25) / 2)
    assert m["margins"] == pytest.approx((0.75 - 0.75) / 2)
    assert m["accuracy"] == pytest.approx(0.5)


def test_dpo_label_smoothing_and_gradient_sign():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    rc, rr = torch.tensor([-1.2]), torch.tensor([-1.9])
    x = 0.1 * ((-1.0 + 1.2) - (-2.0 + 1.9))  # 0.03
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    want = 0.8 * softplus(-x) + 0.2 * softplus(x)
    assert loss.item() == pytest.approx(want, abs=1e-7)
    loss.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # raising chosen logp lowers the loss, raising rejected raises it
    # analytic: dL/dx = -(1-ls)*sigmoid(-x) + ls*sigmoid(x); dx/dpc = beta
    sig = 1 / (1 + math.exp(-x))
    assert pc.grad.item() == pytest.approx(0.1 * (-0.8 * (1 - sig) + 0.2 * sig), abs=1e-7)
    with pytest.raises(ConfigError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ConfigError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


def test_preference_batch_and_reference_logprobs_on_a_model():
    model = build_model(tiny_config(), seed=0)
    pairs = [([5, 6, 7], [8, 9], [10]), ([11], [12, 13, 14], [15, 16])]
    batch = preference_batch(pairs, pad_id=0)
    assert batch["chosen_input_ids"].shape == batch["rejected_labels"].shape == (2, 5)
    assert batch["chosen_input_ids"][0].tolist() == [5, 6, 7, 8, 9]
    assert batch["chosen_labels"][0].tolist() == [-100, -100, 8, 9, -100]
    assert batch["rejected_input_ids"][1].tolist() == [11, 15, 16, 0, 0]
    assert batch["rejected_labels"][1].tolist() == [15, 16, -100, -100, -100]
    model.train()
    ref_c, ref_r = reference_logprobs(model, batch, chunk=1)
    assert model.training and not ref_c.requires_grad
    # each sequence alone, unpadded: sum of log p(completion token | prefix)
    for (p, c, r), got_c, got_r in zip(pairs, ref_c, ref_r):
        for comp, got in ((c, got_c), (r, got_r)):
            ids = torch.tensor([p + comp])
            logp = torch.log_softmax(model(ids)[0].double(), -1)
            want = sum(logp[len(p) - 1 + j, tok].item() for j, tok in enumerate(comp))
            assert got.item() == pytest.approx(want, abs=1e-4)
    pol_c, pol_r = pair_logprobs(model, batch)
    assert pol_c.requires_grad and torch.allclose(pol_c.detach(), ref_c, atol=1e-5)
    loss, m = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1)
    assert loss.mean().item() == pytest.approx(math.log(2), abs=1e-5) and m["margins"] == pytest.approx(0, abs=1e-5)


# ---------------------------------------------------------------------------------------------------- advantages
def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 3.0])
    adv = group_advantages(r, 4)
    std1 = math.sqrt(4 * 0.25 / 3)  # unbiased: sum of squared deviations / (G - 1)
    std3 = math.sqrt((3 * 0.75**2 + 2.25**2) / 3)
    a1, a3 = 0.5 / (std1 + 1e-4), 1 / (std3 + 1e-4)
    want = [a1, -a1, -a1, a1] + [0.0] * 4 + [-0.75 * a3] * 3 + [2.25 * a3]
    assert adv.tolist() == pytest.approx(want, abs=1e-5)
    assert adv[4:8].tolist() == [0.0] * 4
    # identical rewards: exactly zero (0.9 * 3 in float32: r - mean is 6e-8, / (std + eps) would leave 6e-4)
    assert group_advantages(torch.full((6,), 0.9), 3).tolist() == [0.0] * 6
    assert group_advantages(r, 4, scale=False)[8:].tolist() == pytest.approx([-0.75, -0.75, -0.75, 2.25])
    with pytest.raises(ConfigError, match="group"):
        group_advantages(r, 5)
    with pytest.raises(ConfigError, match="group_size"):
        group_advantages(r, 1)


# ------------------------------------------------------------------------------------------------------ GRPO loss
def test_grpo_loss_ratio_one_is_minus_mean_advantage_per_sequence():
    g = torch.Generator().manual_seed(1)
    new = torch.randn(3, 4, generator=g).requires_grad_()
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.float32)
    loss, m = grpo_loss(new, new.detach(), adv, mask)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3, abs=1e-6)
    assert m["clip_fraction"] == 0.0 and m["ratio_mean"] == pytest.approx(1.0) and m["kl"] == 0.0
    loss.backward()
    # d/dlogp of -ratio*A/n_i/B at ratio 1: -A_i / (n_i * B) on each counted token, 0 on masked ones
    want = torch.tensor([[-1 / 6, -1 / 6, 0, 0], [1 / 6] * 4, [0, -0.5 / 3, 0, 0]])
    assert torch.allclose(new.grad, want, atol=1e-6)


def test_grpo_loss_aggregates_per_sequence_then_over_sequences():
    new = torch.zeros(2, 3)
    old = torch.log(torch.tensor([[1 / 1.1, 1 / 0.9, 1.0], [1 / 1.05, 1.0, 1.0]]))  # ratios 1.1, 0.9 | 1.05
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, m = grpo_loss(new, old, adv, mask, clip_eps=0.2)
    seq0 = -(1.1 * 2 + 0.9 * 2) / 2  # inside the clip range: ratio * A
    seq1 = -(1.05 * -1.0) / 1
    assert loss.item() == pytest.approx((seq0 + seq1) / 2, abs=1e-6)
    assert m["ratio_mean"] == pytest.approx((1.1 + 0.9 + 1.05) / 3, abs=1e-6)


def test_grpo_clipping_zeroes_the_gradient_of_clipped_tokens():
    new = torch.zeros(2, 2, requires_grad=True)
    # ratios: [1.5 (A>0: clipped), 1.0] and [0.5 (A<0: clipped), 1.5 (A<0: not clipped, pessimistic branch)]
    old = torch.log(torch.tensor([[1 / 1.5, 1.0], [1 / 0.5, 1 / 1.5]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    loss, m = grpo_loss(new, old, adv, mask, clip_eps=0.2)
    # seq0: -(min(1.5, 1.2) + 1.0)/2 ; seq1: -(min(-0.5, -0.8) + min(-1.5, -1.2))/2 = -(-0.8 - 1.5)/2
    assert loss.item() == pytest.approx((-(1.2 + 1.0) / 2 + (0.8 + 1.5) / 2) / 2, abs=1e-6)
    assert m["clip_fraction"] == pytest.approx(2 / 4)
    loss.backward()
    assert new.grad[0, 0].item() == 0.0 and new.grad[1, 0].item() == 0.0
    assert new.grad[0, 1].item() == pytest.approx(-1.0 / 4, abs=1e-6)  # -A * ratio / (n * B)
    assert new.grad[1, 1].item() == pytest.approx(1.5 / 4, abs=1e-6)


@pytest.mark.parametrize("adv", [2.0, -2.0])
def test_grpo_clip_stops_the_gradient_once_the_ratio_leaves_the_range_on_the_advantages_side(adv):
    """Old log-probs fixed (as at rollout), current ones moved: a token whose ratio left [1 - eps, 1 + eps]
    in the direction the advantage pushes (up for A > 0, down for A < 0) gets exactly zero gradient; every
    other token keeps the unclipped gradient -A * ratio / (n * B), which is not zero."""
    eps = 0.2
    old = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.4, 0.6, 0.1]]))  # fixed: no gradient flows to it
    shift = torch.tensor([[-1.0, -0.3, -0.1, 0.0, 0.1, 1.0]])  # ratios 0.37, 0.74, 0.90, 1, 1.11, 2.72
    new = (old + shift).requires_grad_()
    ratio = shift.exp()[0]
    loss, m = grpo_loss(new, old, torch.tensor([adv]), torch.ones(1, 6), clip_eps=eps)
    loss.backward()
    grad = new.grad[0]
    clipped = (ratio > 1 + eps) if adv > 0 else (ratio < 1 - eps)
    assert clipped.sum() == (1 if adv > 0 else 2)
    assert m["clip_fraction"] == pytest.approx(clipped.float().mean().item())
    for t in range(6):
        if clipped[t]:
            assert grad[t].item() == 0.0, t
        else:
            assert grad[t].item() != 0.0 and grad[t].item() == pytest.approx(-adv * ratio[t].item() / 6, rel=1e-5), t
    # the same tokens with a clip range wide enough to hold every ratio: nothing is clipped
    wide = (old + shift).requires_grad_()
    grpo_loss(wide, old, torch.tensor([adv]), torch.ones(1, 6), clip_eps=5.0)[0].backward()
    assert (wide.grad[0] != 0).all()


def test_grpo_k3_kl_penalty_and_mask():
    new = torch.tensor([[-1.0, -2.0, -0.5]])
    adv, mask = torch.tensor([0.0]), torch.tensor([[1.0, 1.0, 0.0]])
    _, m0 = grpo_loss(new, new, adv, mask, kl_beta=0.1, logp_ref=new.clone())
    assert m0["kl"] == 0.0
    ref = torch.tensor([[-1.5, -1.0, 9.0]])  # the masked third token must not count
    loss, m = grpo_loss(new, new, adv, mask, kl_beta=0.1, logp_ref=ref)
    k = [math.exp(d) - d - 1 for d in (-0.5, 1.0)]
    assert all(v > 0 for v in k)
    assert m["kl"] == pytest.approx(sum(k) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * sum(k) / 2, abs=1e-6)  # A = 0: only the penalty
    ref2 = ref.clone()
    ref2[0, 2] = -50.0
    new2 = new.clone()
    new2[0, 2] = 3.0
    assert grpo_loss(new2, new2, adv, mask, kl_beta=0.1, logp_ref=ref2)[0].item() == pytest.approx(loss.item())
    with pytest.raises(ConfigError, match="logp_ref"):
        grpo_loss(new, new, adv, mask, kl_beta=0.1)


def test_token_logprobs_matches_log_softmax():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([[1, 4, -100], [0, 2, 3]])
    got = token_logprobs(logits, targets)
    ls = torch.log_softmax(logits.double(), -1)
    assert got[0, 2].item() == 0.0
    assert got[1, 2].item() == pytest.approx(ls[1, 2, 3].item(), abs=1e-6)
    assert got[0, 1].item() == pytest.approx(ls[0, 1, 4].item(), abs=1e-6)


# -------------------------------------------------------------------------------------------------------- rollout
@pytest.fixture(scope="module")
def tok_and_model(tmp_path_factory):
    problems = synthetic.generate(300, seed=0)
    texts = [synthetic.as_text(p) for p in problems] + [synthetic.as_chat(p)["messages"][2]["content"]
                                                        for p in problems]
    tok = build_test_tokenizer(tmp_path_factory.mktemp("tok"), texts, vocab_size=512)
    model = build_model(tiny_config(vocab_size=tok.vocab_size), seed=0).eval()
    return tok, model


def _prompts(tok, n=2):
    return [tok.encode(render_chat(tok, synthetic.as_grpo(p)["prompt"])) for p in synthetic.generate(n, seed=5)]


def test_rollout_groups_and_is_deterministic_by_seed(tok_and_model):
    tok, model = tok_and_model
    prompts = _prompts(tok)
    sampling = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=6)
    a = rollout(model, tok, prompts, group_size=3, sampling=sampling, seed=7)
    b = rollout(model, tok, prompts, group_size=3, sampling=sampling, seed=7)
    c = rollout(model, tok, prompts, group_size=3, sampling=sampling, seed=8)
    assert len(a.completion_ids) == 6 and a.num_prompts == 2 and a.seed == 7
    assert a.prompt_ids == [prompts[0]] * 3 + [prompts[1]] * 3
    assert all(1 <= len(x) <= 6 for x in a.completion_ids) and len(a.texts) == 6
    assert a.completion_ids == b.completion_ids and a.texts == b.texts
    assert a.completion_ids != c.completion_ids
    assert len({tuple(x) for x in a.completion_ids[:3]}) > 1  # the group samples, it does not repeat
    # rewards: one record per prompt, repeated over its group
    records = [synthetic.as_grpo(p) for p in synthetic.generate(2, seed=5)]
    total = a.score(resolve_rewards("format"), records)
    assert total.shape == (6,) and a.reward_means == {"format": pytest.approx(total.mean().item())}


def test_rollout_thinking_budget_forces_the_close(tok_and_model):
    tok, model = tok_and_model
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True)
    r = rollout(model, tok, _prompts(tok, 1), group_size=2, sampling=sampling, seed=0, thinking_budget=2,
                thinking_grace=0)
    from nanocli.thinking import think_close_text

    close = tok.encode("\n" + think_close_text(tok))  # cut mid-line (grace 0): a newline, then the template's close
    for ids, forced in zip(r.completion_ids, r.budget_forced):
        assert forced and ids[2:2 + len(close)] == close


def test_completion_batch_masks_only_completion_tokens(tok_and_model):
    tok, model = tok_and_model
    prompts = [p[-5:] for p in _prompts(tok)]  # short prompts of two different lengths (5 and 3)
    prompts[1] = prompts[1][-3:]
    r = rollout(model, tok, prompts, group_size=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=4), seed=1)
    batch = completion_batch(r, pad_id=0)
    B, T = batch["input_ids"].shape
    assert B == 4 and T == max(len(p) + len(c) for p, c in zip(r.prompt_ids, r.completion_ids))
    for i, (p, c) in enumerate(zip(r.prompt_ids, r.completion_ids)):
        cols = batch["mask"][i].nonzero().flatten().tolist()
        assert cols == list(range(len(p) - 1, len(p) + len(c) - 1))  # logits at t predict token t + 1
        assert batch["targets"][i, cols].tolist() == c
        assert batch["input_ids"][i, :len(p)].tolist() == p
        assert (batch["input_ids"][i, len(p) + len(c):] == 0).all()
    assert batch["mask"][:, -1].sum() == 0
    # padded batch log-probs == each row alone, unpadded
    with torch.no_grad():
        logp = completion_logprobs(model, batch, chunk=3)
        for i, (p, c) in enumerate(zip(r.prompt_ids, r.completion_ids)):
            alone = torch.log_softmax(model(torch.tensor([p + c]))[0].double(), -1)
            want = sum(alone[len(p) - 1 + j, t].item() for j, t in enumerate(c))
            assert logp[i].sum().item() == pytest.approx(want, abs=1e-4)
    # one GRPO step through the model: the loss has a gradient
    model.train()
    try:
        new = completion_logprobs(model, batch)
        adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
        loss, m = grpo_loss(new, new.detach(), adv, batch["mask"])
        loss.backward()
        assert m["clip_fraction"] == 0.0 and model.lm_head.weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


# -------------------------------------------------------------------------------------------------------- rewards
def test_builtin_rewards_on_synthetic_completions():
    p = synthetic.generate(1, seed=3)[0]
    good = synthetic.as_chat(p)["messages"][2]["content"]  # "<think>\n...\n</think>\nThe answer is X."
    wrong = synthetic.as_preference(p, __import__("random").Random(0))["rejected"][0]["content"]
    no_think = synthetic.final_text(p.answer)
    record = synthetic.as_grpo(p)
    assert REWARDS["exact"](good, record) == 1.0 and REWARDS["format"](good, record) == 1.0
    assert REWARDS["exact"](wrong, record) == 0.0 and REWARDS["format"](wrong, record) == 1.0
    assert REWARDS["exact"](no_think, record) == 1.0 and REWARDS["format"](no_think, record) == 0.0
    rewards = resolve_rewards("exact:1.0,format:0.2")
    assert [(n, w) for n, _, w in rewards] == [("exact", 1.0), ("format", 0.2)]
    total, means = score(rewards, [good, wrong, no_think], [record] * 3)
    assert total.tolist() == pytest.approx([1.2, 0.2, 1.0])
    assert means == {"exact": pytest.approx(2 / 3), "format": pytest.approx(2 / 3)}
    with pytest.raises(RewardError, match="answer"):
        score(resolve_rewards(["exact"]), [good], [{}])


def test_custom_reward_functions_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(completion, record):\n    return -len(completion) / 10\n\n"
        "class Scores:\n    @staticmethod\n    def one(completion, record):\n        return 1\n\n"
        "NOT_CALLABLE = 3\n\ndef bad(completion, record):\n    return 'high'\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = resolve_rewards(["my_rewards:brevity:0.5", "my_rewards:Scores.one", "format"])
    assert [(n, w) for n, _, w in rewards] == [("my_rewards:brevity", 0.5), ("my_rewards:Scores.one", 1.0),
                                               ("format", 1.0)]
    total, means = score(rewards, ["abcd"], [{}])
    assert total.item() == pytest.approx(0.5 * -0.4 + 1.0) and means["my_rewards:brevity"] == pytest.approx(-0.4)
    with pytest.raises(RewardError, match="my_rewards:bad"):
        score(resolve_rewards("my_rewards:bad"), ["x"], [{}])
    for spec, words in [("nope", ["'nope'", "exact, format"]), ("no_such_module_xyz:fn", ["no_such_module_xyz"]),
                        ("my_rewards:missing", ["missing", "exact, format"]),
                        ("my_rewards:NOT_CALLABLE", ["not callable"]), ("exact:inf", ["finite"]),
                        ("exact,exact:2", ["twice"]), ("", ["no rewards"])]:
        with pytest.raises(ConfigError) as err:
            resolve_rewards(spec)
        assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


# ---------------------------------------------------------------------------------------------------------- merge
def _save(tmp: Path, name: str, seed: int, dtype=torch.float32, **cfg) -> Path:
    model = build_model(tiny_config(**cfg), seed=seed, dtype=dtype)
    with torch.no_grad():  # norms and Mamba constants differ between checkpoints too
        for p in model.parameters():
            p.add_(0.01 * seed)
    tokdir = tmp / f"{name}-tok"
    tokdir.mkdir()
    (tokdir / "tokenizer_config.json").write_text(json.dumps({"from": name}))
    (tokdir / "chat_template.jinja").write_text(name)
    return save_pretrained(model, tmp / name, extra_files=[tokdir / "tokenizer_config.json",
                                                           tokdir / "chat_template.jinja"])


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("weights", [None, (0.3, 0.7)])
def test_merge_is_the_weighted_mean_tensor_by_tensor(tmp_path, weights):
    a, b = _save(tmp_path, "a", 1), _save(tmp_path, "b", 2)
    out = merge_checkpoints([a, b], weights, tmp_path / "merged")
    wa, wb = weights or (0.5, 0.5)
    ta, tb, tm = _tensors(a), _tensors(b), _tensors(out)
    assert set(tm) == set(ta)
    for name in ta:
        assert torch.allclose(tm[name], wa * ta[name] + wb * tb[name], atol=1e-6, rtol=0), name
    assert (out / "tokenizer_config.json").read_text() == json.dumps({"from": "a"})
    assert (out / "chat_template.jinja").read_text() == "a"
    merged = load_pretrained(out)
    assert merged.dtype == torch.float32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_merge_writes_the_first_models_dtype_from_float32_accumulation(tmp_path):
    a, b = _save(tmp_path, "a", 1, dtype=torch.bfloat16), _save(tmp_path, "b", 2)
    out = merge_checkpoints([a, b], [0.25, 0.75], tmp_path / "m")
    ta, tb, tm = _tensors(a), _tensors(b), _tensors(out)
    for name in ta:
        want = (0.25 * ta[name].float() + 0.75 * tb[name].float()).to(torch.bfloat16)
        assert tm[name].dtype == torch.bfloat16 and torch.equal(tm[name], want), name
    assert load_pretrained(out).dtype == torch.bfloat16


def test_merge_rejects_mismatches_and_bad_weights_without_leaving_anything(tmp_path, monkeypatch):
    a, b = _save(tmp_path, "a", 1), _save(tmp_path, "b", 2)
    other = _save(tmp_path, "c", 3, intermediate_size=64)
    out = tmp_path / "merged"
    with pytest.raises(CheckpointError, match="intermediate_size"):
        merge_checkpoints([a, other], None, out)
    # same config, a tensor missing / reshaped
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_bytes((b / "config.json").read_bytes())
    tensors = _tensors(b)
    tensors.pop("backbone.norm_f.weight")
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="norm_f"):
        merge_checkpoints([a, d], None, out)
    tensors["backbone.norm_f.weight"] = torch.ones(3)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"norm_f.*shape"):
        merge_checkpoints([a, d], None, out)
    for paths, weights, words in [([a], None, "at least 2"), ([a, b], (0.5, 0.6), "sum to 1"),
                                  ([a, b], (1.5, -0.5), ">= 0"), ([a, b], (1.0,), "one weight")]:
        with pytest.raises(ConfigError, match=words):
            merge_checkpoints(paths, weights, out)
    # a failure while writing leaves no partial directory
    import nanocli_model.checkpoint as ck

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoints([a, b], None, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with safe_open(str(a / "model.safetensors"), framework="pt") as f:  # inputs untouched
        assert set(f.keys()) == set(_tensors(b))


def test_budget_close_is_what_sft_trained_the_model_to_see(tiny_base):
    """The forced end of a thinking span is the template's own text between a budget-cut trace and the
    answer, so a budgeted generation looks like the SFT budget examples (not an extra blank line)."""
    from nanocli.data.chat import SFTConfig, build_sft_examples
    from nanocli.thinking import DEFAULT_THINK_CLOSE, think_close_text
    from nanocli_model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_base)
    close = think_close_text(tok)
    records = [synthetic.as_chat(p) for p in synthetic.generate(20, seed=3)]
    examples = build_sft_examples(records, tok, SFTConfig(seq_len=512, think_mix=1.0, budget_fraction=1.0,
                                                          budget_share=(0.5, 0.5), pack=False))
    cut = [e for e in examples if e.budgeted]
    assert cut
    for e in cut:
        completion = tok.decode([t for t in e.labels if t >= 0])
        assert "\n" + close + "The answer is" in completion  # thinking line, then the template's close
    bare = Tokenizer.from_dir(tiny_base)
    # a template that drops the thinking of assistant turns shows no close: the default is used
    bare.chat_template = "{% for m in messages %}{{ m['content'].split('</think>')[-1] }}{% endfor %}"
    bare.chat_templates = {"default": bare.chat_template}
    assert think_close_text(bare) == DEFAULT_THINK_CLOSE
