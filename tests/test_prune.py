"""nano prune: exact slicing, importance that means something, group-aware Mamba against a zeroed-heads
reference, the greedy depth rule against brute force, transformers parity, the 12B -> 9B search space,
the budget search end to end, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_utils import randomize, rel_err, tiny_config
from nanocli.prune import depth as dp
from nanocli.prune.importance import Scores, compute_scores
from nanocli.prune.shape import Shape
from nanocli.prune.slicing import identity_plan, make_plan, prune_model
from nanocli.report import SILENT, Silent
from nanocli.stages import prune as pr
from nanocli_model import NanoForCausalLM, load_pretrained

ROOT = Path(__file__).resolve().parent.parent
DATA = "synthetic:reasoning?docs=1500&difficulty=1-2"
CALIB = dict(calib_data=DATA, calib_samples=64, calib_seq_len=64, heldout_samples=32, depth_samples=16)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prune-token-cache")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, cache) -> Path:
    """A tiny model trained 300 steps on the synthetic corpus (random weights show no importance; after 150
    steps the Mamba heads' x-branch scores are still too flat to beat random choice)."""
    from nanocli.stages import pretrain as pt

    out = tmp_path_factory.mktemp("prune-parent")
    pt.run(pt.PretrainOptions(profile="tiny", data=DATA, seq_len=64, global_batch=8, lr=3e-3, warmup=5, decay=40,
                              precision="fp32", heldout_fraction=0.02, eval_batches=1, seed=3, steps=300,
                              out=str(out), cache_dir=str(cache)))
    return out / "final"


@pytest.fixture(scope="session")
def calib(trained, cache):
    """(calibration rows, held-out rows), each (N, 65), tokenized with the parent's tokenizer."""
    o = pr.PruneOptions(model=str(trained), cache_dir=str(cache), **CALIB)
    return pr._calibration(o, trained, load_pretrained(trained).config, SILENT)


@pytest.fixture(scope="session")
def scores(trained, calib) -> Scores:
    model = load_pretrained(trained, dtype="fp32")
    rows = calib[0][:, :-1]
    return compute_scores(model, [rows[i:i + 16] for i in range(0, rows.shape[0], 16)])


@pytest.fixture(scope="session")
def random_parent(trained, tmp_path_factory) -> Path:
    """The tiny profile with weights randomised away from their defaults (``model_utils.randomize``: dt stays
    far above time_step_min, so transformers' dt clamp never fires) and the trained model's tokenizer."""
    from nanocli.profiles import load_model_profile
    from nanocli_model import save_pretrained

    model = NanoForCausalLM(load_model_profile("tiny").config)
    randomize(model, seed=4)
    out = tmp_path_factory.mktemp("random-parent") / "model"
    return save_pretrained(model, out, extra_files=[trained / f for f in ("tokenizer.json", "tokenizer_config.json")])


@pytest.fixture(scope="session")
def sliced(random_parent, cache, tmp_path_factory) -> Path:
    """An explicit target touching every structure: hidden, FFN, GQA heads, Mamba heads and head dim, depth."""
    out = tmp_path_factory.mktemp("pruned") / "out"
    pr.run(pr.PruneOptions(model=str(random_parent), out=str(out), cache_dir=str(cache), hidden_size=48,
                           ffn_hidden_size=192, num_attention_heads=2, num_query_groups=1, mamba_num_heads=6,
                           mamba_head_dim=12, num_layers=7, keep_attention=1, **CALIB))
    return out


def heldout_loss(model, rows: torch.Tensor) -> float:
    with torch.no_grad():
        loss, n = model(rows[:, :-1], labels=rows[:, 1:])
    return loss.item() / n.item()


# ------------------------------------------------------------------------------------------ exactness
class Recorder(Silent):
    """A reporter that keeps what the stage told it."""

    def __init__(self):
        self.said, self.tasks = [], set()

    def status(self, message: str) -> None:
        self.said.append(message)

    def progress(self, task: str, done: int, total: int) -> None:
        self.tasks.add(task)


def test_pruning_nothing_reproduces_the_parent_exactly(trained, cache, tmp_path, calib):
    told = Recorder()
    r = pr.run(pr.PruneOptions(model=str(trained), out=str(tmp_path / "same"), cache_dir=str(cache), **CALIB), told)
    assert r.shape == Shape.of(r.parent)
    assert any(m.startswith("loading ") for m in told.said) and any(m.startswith("importance:") for m in told.said)
    assert "importance" in told.tasks  # the scoring pass, counted
    parent, child = load_pretrained(trained), load_pretrained(tmp_path / "same")
    ids = calib[1][:4, :-1]
    with torch.no_grad():
        assert torch.equal(parent(ids), child(ids))
    assert (tmp_path / "same" / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()


def _expected_slices(parent: dict[str, torch.Tensor], config, kept: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the pruned model, written out from the recorded kept indices with index_select."""
    t = torch.tensor
    hid = t(kept["hidden"])
    W, GN, P, d = (config.mamba_intermediate_size, config.n_groups * config.ssm_state_size, config.mamba_head_dim,
                   config.head_dim)
    out = {"backbone.embeddings.weight": parent["backbone.embeddings.weight"][:, hid],
           "backbone.norm_f.weight": parent["backbone.norm_f.weight"][hid], "lm_head.weight": parent["lm_head.weight"][:, hid]}
    for j, i in enumerate(kept["layers"]):
        a, b, info = f"backbone.layers.{i}.", f"backbone.layers.{j}.", kept["per_layer"][str(i)]
        out[b + "norm.weight"] = parent[a + "norm.weight"][hid]
        if info["kind"] == "mlp":
            n = t(info["neurons"])
            out[b + "mixer.up_proj.weight"] = parent[a + "mixer.up_proj.weight"][n][:, hid]
            out[b + "mixer.down_proj.weight"] = parent[a + "mixer.down_proj.weight"][hid][:, n]
        elif info["kind"] == "attention":
            q = t([h * d + x for h in info["heads"] for x in range(d)])
            kv = t([g * d + x for g in info["kv_heads"] for x in range(d)])
            out[b + "mixer.q_proj.weight"] = parent[a + "mixer.q_proj.weight"][q][:, hid]
            out[b + "mixer.k_proj.weight"] = parent[a + "mixer.k_proj.weight"][kv][:, hid]
            out[b + "mixer.v_proj.weight"] = parent[a + "mixer.v_proj.weight"][kv][:, hid]
            out[b + "mixer.o_proj.weight"] = parent[a + "mixer.o_proj.weight"][hid][:, q]
        else:
            heads = t(info["heads"])
            ch = t([h * P + p for h in info["heads"] for p in info["head_dim"]])
            rows = torch.cat([ch, W + ch, 2 * W + torch.arange(2 * GN), 2 * W + 2 * GN + heads])
            conv = torch.cat([ch, W + torch.arange(2 * GN)])
            out[b + "mixer.in_proj.weight"] = parent[a + "mixer.in_proj.weight"][rows][:, hid]
            out[b + "mixer.conv1d.weight"] = parent[a + "mixer.conv1d.weight"][conv]
            out[b + "mixer.conv1d.bias"] = parent[a + "mixer.conv1d.bias"][conv]
            for name in ("dt_bias", "A_log", "D"):
                out[b + f"mixer.{name}"] = parent[a + f"mixer.{name}"][heads]
            out[b + "mixer.norm.weight"] = parent[a + "mixer.norm.weight"][ch]
            out[b + "mixer.out_proj.weight"] = parent[a + "mixer.out_proj.weight"][hid][:, ch]
    return out


def test_pruned_weights_are_exact_slices_of_the_parent(random_parent, sliced):
    record = json.loads((sliced / "pruning.json").read_text())
    config = json.loads((sliced / "config.json").read_text())
    for key, value in {"hidden_size": 48, "intermediate_size": 192, "num_attention_heads": 2,
                       "num_key_value_heads": 1, "mamba_num_heads": 6, "mamba_head_dim": 12,
                       "num_hidden_layers": 7}.items():
        assert config[key] == value, key
    assert config["hybrid_override_pattern"] == record["pattern"] and len(record["pattern"]) == 7
    assert record["pattern"].count("*") == 1 and len(record["kept"]["removed_layers"]) == 2
    expected = _expected_slices(load_file(str(random_parent / "model.safetensors")),
                                load_pretrained(random_parent).config, record["kept"])
    got = load_file(str(sliced / "model.safetensors"))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert record["depth"]["metric"] == "mse" and len(record["depth"]["order"]) == 2


def test_pruned_checkpoint_loads_in_transformers_with_equal_logits(sliced, calib):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(sliced, dtype=torch.float32).eval()
    nano = load_pretrained(sliced)
    ids = calib[1][:2, :40]
    dt = []
    for layer in nano.backbone.layers:
        if layer.kind == "mamba":
            m = layer.mixer
            m.in_proj.register_forward_hook(
                lambda mod, i, o, m=m: dt.append(torch.nn.functional.softplus(o[..., -m.H:] + m.dt_bias).min().item()))
    with torch.no_grad():
        assert rel_err(nano(ids), hf(ids, use_cache=False).logits.float()) < 1e-4
    assert min(dt) > 5 * nano.config.time_step_min  # transformers' dt clamp never fires (see test_parity_hf)


def test_pruned_checkpoint_generates(sliced, capsys, monkeypatch):
    from nanocli import cli

    monkeypatch.setattr(sys, "argv", ["nano", "generate", "-m", str(sliced), "--raw", "--greedy",
                                      "--max-new-tokens", "6", "--ignore-eos", "--json", "12+7="])
    try:
        cli.main()
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["generated_tokens"] == 6


# ------------------------------------------------------------------------------------------ importance
def _random_plan(plan, parent, structure: str, gen: torch.Generator):
    """The same shape as ``plan`` with the kept indices of one structure drawn at random."""
    def draw(n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=gen)[:k].sort().values

    if structure == "hidden":
        plan.hidden = draw(parent.hidden_size, plan.hidden.numel())
    for keep in plan.per_layer.values():
        if structure == "mlp" and "neurons" in keep:
            keep["neurons"] = draw(parent.intermediate_size, keep["neurons"].numel())
        if structure == "mamba" and "head_dim" in keep:
            per, k = parent.mamba_num_heads // parent.n_groups, keep["heads"].numel() // parent.n_groups
            keep["heads"] = torch.cat([g * per + draw(per, k) for g in range(parent.n_groups)])
    return plan


@pytest.mark.parametrize("structure, change", [("mlp", {"ffn_hidden_size": 192}),
                                               ("mamba", {"mamba_num_heads": 6}),
                                               ("hidden", {"hidden_size": 48})])
def test_pruning_the_lowest_scored_quarter_hurts_less_than_a_random_quarter(trained, calib, scores, structure, change):
    parent = load_pretrained(trained, dtype="fp32")
    c = parent.config
    rows = calib[1]
    shape = Shape(**{**Shape.of(c).to_dict(), **change})
    scored = heldout_loss(prune_model(parent, make_plan(c, scores, shape, list(range(c.num_hidden_layers)))), rows)
    gen = torch.Generator().manual_seed(0)
    randoms = [heldout_loss(prune_model(parent, _random_plan(make_plan(c, scores, shape, list(range(9))), c,
                                                             structure, gen)), rows) for _ in range(6)]
    base = heldout_loss(parent, rows)
    print(f"\n{structure}: held-out loss {base:.4f} -> lowest-scored 25% pruned {scored:.4f}, random 25% pruned "
          f"{sum(randoms) / len(randoms):.4f} (mean of {len(randoms)}; min {min(randoms):.4f}, max {max(randoms):.4f})")
    assert scored - base < sum(randoms) / len(randoms) - base, (base, scored, randoms)


def test_scores_file_round_trips_and_belongs_to_one_architecture(scores, tmp_path, trained):
    path = scores.save(tmp_path / "s.safetensors")
    config = load_pretrained(trained).config
    back = Scores.load(path, config)
    assert torch.equal(back.hidden, scores.hidden) and torch.equal(back.block, scores.block)
    assert all(torch.equal(back.mlp[i], scores.mlp[i]) for i in scores.mlp)
    assert all(torch.equal(back.mamba_channels[i], scores.mamba_channels[i]) for i in scores.mamba_channels)
    assert b"pickle" not in path.read_bytes()[:200] and back.meta["aggregation"].startswith("channel score")
    with pytest.raises(pr.NanoError, match="another architecture"):
        Scores.load(path, config.replace(hidden_size=32))


# ------------------------------------------------------------------------------------------ Mamba, group-aware
def test_group_aware_mamba_equals_the_parent_with_the_removed_heads_zeroed():
    torch.manual_seed(0)
    c = tiny_config(hybrid_override_pattern="M", mamba_num_heads=8, n_groups=2, mamba_head_dim=6)
    parent = NanoForCausalLM(c).eval()
    randomize(parent, seed=5)
    gen = torch.Generator().manual_seed(1)
    fake = Scores(hidden=torch.ones(c.hidden_size), mlp={}, attention={},
                  mamba_channels={0: torch.rand(8, 6, generator=gen)}, block=torch.zeros(1))
    shape = Shape(**{**Shape.of(c).to_dict(), "mamba_num_heads": 4, "mamba_head_dim": 4})
    plan = make_plan(c, fake, shape, [0])
    heads, dims = plan.per_layer[0]["heads"], plan.per_layer[0]["head_dim"]
    assert [int((heads // 4 == g).sum()) for g in range(2)] == [2, 2]  # the same k in every B/C group
    child = prune_model(parent, plan)
    assert child.config.n_groups == 2 and child.config.ssm_state_size == c.ssm_state_size

    pm, cm = parent.backbone.layers[0].mixer, child.backbone.layers[0].mixer
    W, GN, P = c.mamba_intermediate_size, c.n_groups * c.ssm_state_size, c.mamba_head_dim
    W2 = 4 * 4  # 4 heads x 4 channels kept
    assert torch.equal(cm.in_proj.weight[2 * W2:2 * W2 + 2 * GN], pm.in_proj.weight[2 * W:2 * W + 2 * GN])  # B, C
    assert torch.equal(cm.conv1d.weight[W2:], pm.conv1d.weight[W:]) and torch.equal(cm.conv1d.bias[W2:], pm.conv1d.bias[W:])

    # Reference: the parent itself, with the removed channels' x zeroed at the conv (so their SSM state and
    # output stay 0), the group RMS eps scaled by kept/full channels and the norm weight by sqrt(kept/full):
    # rms over the full group of zeros-padded channels then equals the rms over the kept channels.
    ref = NanoForCausalLM(c).eval()
    ref.load_state_dict(parent.state_dict())
    rm = ref.backbone.layers[0].mixer
    kept = torch.zeros(W, dtype=torch.bool)
    kept[(heads[:, None] * P + dims[None, :]).reshape(-1)] = True
    full, k = W // 2, int(kept.sum()) // 2
    with torch.no_grad():
        rm.conv1d.weight[:W][~kept] = 0
        rm.conv1d.bias[:W][~kept] = 0
        rm.norm.eps = rm.norm.eps * k / full
        rm.norm.weight.mul_((k / full) ** 0.5)
        x = torch.randn(2, 19, c.hidden_size, generator=gen)
        assert rel_err(cm(x), rm(x)) < 1e-5
        assert rel_err(cm(x), pm(x)) > 1e-2  # and the reference differs from the untouched parent


def test_gqa_keeps_whole_kv_groups_and_the_same_heads_per_group():
    c = tiny_config(hybrid_override_pattern="*", num_attention_heads=8, num_key_value_heads=4)
    fake = Scores(hidden=torch.ones(c.hidden_size), mlp={}, mamba_channels={}, block=torch.zeros(1),
                  attention={0: torch.tensor([9., 1, 5, 4, 0, 0, 7, 8])})
    plan = make_plan(c, fake, Shape(**{**Shape.of(c).to_dict(), "num_attention_heads": 2, "num_query_groups": 2}), [0])
    # group norms: (9,1)->9.06, (5,4)->6.4, (0,0)->0, (7,8)->10.6: keep groups 0 and 3, the best head of each
    assert plan.per_layer[0]["kv_heads"].tolist() == [0, 3] and plan.per_layer[0]["heads"].tolist() == [0, 7]


# ------------------------------------------------------------------------------------------ depth
def _brute_force_mse(parent, ids, kept: list[int]) -> float:
    plan = identity_plan(parent.config)
    plan.layers = kept
    plan.config = parent.config.replace(hybrid_override_pattern="".join(parent.config.hybrid_override_pattern[i]
                                                                        for i in kept))
    with torch.no_grad():
        return (prune_model(parent, plan)(ids) - parent(ids)).double().square().mean().item()


@pytest.mark.parametrize("pin", [None, 0, 1])
def test_greedy_depth_matches_brute_force(pin):
    c = tiny_config(hybrid_override_pattern="M-M*-M-")
    parent = NanoForCausalLM(c).eval()
    randomize(parent, seed=11)
    ids = torch.randint(0, c.vocab_size, (3, 24), generator=torch.Generator().manual_seed(2))
    order = dp.greedy_order(parent, [ids[:2], ids[2:]], remove=3, keep_attention=pin)
    kept = list(range(7))
    for removed, value in zip(order.order, order.values):
        candidates = [i for i in kept if pin is None or (c.layer_types[i] == "attention") == (
            sum(c.layer_types[j] == "attention" for j in kept) > pin)]
        mse = {i: _brute_force_mse(parent, ids, [j for j in kept if j != i]) for i in candidates}
        assert removed == min(mse, key=mse.get)
        assert value == pytest.approx(mse[removed], rel=1e-4)
        kept.remove(removed)
    if pin is not None:
        assert sum(c.layer_types[i] == "attention" for i in kept) == pin
    if pin == 0:
        assert order.order[0] == 3  # the one attention layer goes first


def test_cosine_depth_order_respects_the_pin():
    kinds = ["mamba", "mlp", "attention", "mlp", "attention"]
    order = dp.cosine_order(torch.tensor([0.5, 0.1, 0.2, 0.3, 0.05]), kinds, remove=3, keep_attention=1)
    assert order.order == [4, 1, 3]  # the weaker attention layer, then Mamba/MLP by score


# ------------------------------------------------------------------------------------------ the report's case
def test_12b_search_space_contains_the_9b_and_fit_check_agrees(tmp_path):
    from nanocli.profiles import load_model_profile
    from nanocli.stages import fit_check as fc

    r = pr.run(pr.PruneOptions(model="nemotron-nano-12b-v2-base", gpu="a10g", context=131072, dry_run=True))
    assert r.budget.limit / 2**30 == pytest.approx(19.66, abs=0.005)
    nine = Shape.of(load_model_profile("nemotron-nano-9b-v2-base").config)
    assert nine == Shape(56, 4, 4480, 15680, 40, 8, 128, 80)
    assert r.space.contains(nine) and r.space.is_fitting(nine)
    assert not r.space.is_fitting(Shape.of(r.parent))  # the 12B itself does not fit
    cand = r.space.candidate(nine)
    assert cand.fits and cand.pattern.count("*") == 4 and len(cand.pattern) == 56
    assert r.space.fitting > 1000 and r.space.frontier and all(c.fits for c in r.space.frontier)
    # fit-check, on the candidate's own config and on the released 9B: both fit at 128k on the A10G
    (tmp_path / "config.json").write_text(nine.config(r.parent, cand.pattern).to_json_string())
    mine = fc.run(fc.FitCheckOptions(model=str(tmp_path / "config.json"), gpu="a10g", context=131072))
    released = fc.run(fc.FitCheckOptions(model="nemotron-nano-9b-v2", gpu="a10g", context=131072))
    assert mine.fits and released.fits
    assert mine.estimate.total == cand.value  # the same memory model
    assert released.estimate.total <= cand.value  # the dry run's layer mix is the heaviest


# ------------------------------------------------------------------------------------------ budget search
def test_budget_search_end_to_end_through_the_cli(trained, cache, tmp_path):
    out, scores_file = tmp_path / "searched", tmp_path / "scores.safetensors"
    args = ["prune", "--model", str(trained), "--out", str(out), "--target-params", "250000", "--calib-data", DATA,
            "--calib-samples", "64", "--calib-seq-len", "64", "--scores", str(scores_file), "--cache-dir", str(cache),
            "--proxy-candidates", "3", "--distill-candidates", "2", "--candidate-steps", "3"]
    result = nano(*args)
    assert result.returncode == 0, result.stderr
    assert "proxy KL" in result.stdout and "pruned:" in result.stdout
    record = json.loads((out / "pruning.json").read_text())
    table = record["search"]["table"]
    assert len(table) == 3 and sum(row["chosen"] for row in table) == 1
    assert [row["proxy_kl"] for row in table] == sorted(row["proxy_kl"] for row in table)
    distilled = [row for row in table if row["distilled_kl"] is not None]
    chosen = next(row for row in table if row["chosen"])
    assert len(distilled) == 2 and chosen["distilled_kl"] == min(row["distilled_kl"] for row in distilled)
    assert record["params"] <= 250000 == record["budget"]["limit"]
    assert load_pretrained(out).num_parameters() == record["params"]
    # the scores file is reused by a second target
    again = pr.run(pr.PruneOptions(model=str(trained), out=str(tmp_path / "again"), cache_dir=str(cache),
                                   scores=str(scores_file), hidden_size=56, **CALIB))
    assert again.scores_reused


# ------------------------------------------------------------------------------------------ bad input
def nano(*args: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "NANO_PROFILES_DIR"}, "COLUMNS": "120",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nanocli.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


@pytest.mark.parametrize("args, needle", [
    (["--model", "tiny", "--out", "x", "--hidden-size", "32"], "--dry-run"),
    (["--model", "tiny", "--hidden-size", "128", "--dry-run"], "larger than the model's 64"),
    (["--model", "tiny", "--mamba-num-heads", "5", "--dry-run"], "multiple of n_groups (2)"),
    (["--model", "tiny", "--num-attention-heads", "3", "--num-query-groups", "2", "--dry-run"], "not a multiple"),
    (["--model", "tiny", "--target-memory", "0.00001", "--context", "256", "--dry-run"], "smallest reachable is"),
    (["--model", "tiny", "--num-layers", "9", "--keep-attention", "0", "--dry-run"], "removes only 0"),
    (["--model", "tiny", "--target-memory", "1", "--target-params", "1000", "--dry-run"], "not both"),
])
def test_bad_input_is_one_line_exit_2(args, needle, capsys, monkeypatch):
    from nanocli import cli

    monkeypatch.setattr(sys, "argv", ["nano", "prune", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (Path.cwd() / "x").exists()  # nothing written


def test_help_shows_the_real_defaults_in_one_panel_per_group():
    result = nano("prune", "--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for flag, default in (("--calib-samples", "256"), ("--context", "131072"), ("--depth-metric", "mse"),
                          ("--device", "auto"), ("--seed", "0"), ("--candidate-lr", "0.0001")):
        at = next(i for i, line in enumerate(lines) if f" {flag} " in line)
        assert f"[default: {default}]" in " ".join(lines[at:at + 3]), (flag, lines[at:at + 3])
    for panel in ("Model", "Target shape", "Budget", "Calibration", "Depth and search", "Run"):
        assert f"─ {panel}" in result.stdout, panel
    assert " mse|cosine " in result.stdout and " auto|cpu|cuda " in result.stdout and "<" not in result.stdout


@pytest.mark.parametrize("args, needle", [
    (["--depth-metric", "l2"], "--depth-metric"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "int4"], "--dtype"),
    (["--context", "lots"], "--context"),
    (["--calib-samples", "0"], "--calib-samples must be at least 1"),
    (["--candidate-steps", "-1"], "--candidate-steps must be at least 0"),
    (["--target-memory", "-2"], "--target-memory must be a finite number > 0"),
    (["--keep-attention", "-1"], "--keep-attention must be at least 0"),
])
def test_bad_value_is_one_error_line_naming_the_flag(args, needle, capsys, monkeypatch):
    from nanocli import cli

    monkeypatch.setattr(sys, "argv", ["nano", "prune", "--model", "tiny", "--dry-run", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


@pytest.mark.parametrize("change, needle", [
    (dict(depth_metric="l2"), "--depth-metric 'l2' is unknown; use one of mse, cosine"),
    (dict(device="tpu"), "--device 'tpu' is unknown"),
    (dict(top_k=0), "--distill-candidates must be at least 1"),
    (dict(out=None, dry_run=False), "--out DIR is required"),
    (dict(model=None), "--model is required"),
])
def test_the_python_api_checks_the_same_before_any_work(change, needle):
    with pytest.raises(pr.PruneError, match=re.escape(needle)):
        pr.run(pr.PruneOptions(**{"model": "tiny", "dry_run": True, **change}))


def test_a_recipe_sets_the_options_under_the_flags(tmp_path):
    recipe = tmp_path / "prune.yaml"
    recipe.write_text("stage: prune\nmodel: tiny\nhidden_size: 48\ncontext: 64k\ndepth_metric: cosine\n")
    o = pr.make_options(str(recipe), {"hidden_size": 32})
    assert (o.model, o.hidden_size, o.context, o.depth_metric) == ("tiny", 32, "64k", "cosine")
    r = pr.run(dataclasses.replace(o, dry_run=True))
    assert r.options.context == 65536 and r.shape.hidden_size == 32
    recipe.write_text("stage: prune\ndepth_metric: l2\n")
    with pytest.raises(pr.NanoError, match="depth_metric"):
        pr.make_options(str(recipe), {})


def test_dry_run_of_the_report_case_prints_the_space_and_bad_input_has_no_traceback():
    result = nano("prune", "--model", "nemotron-nano-12b-v2-base", "--gpu", "a10g", "--context", "128k", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "19.66 GiB" in result.stdout and "fit" in result.stdout and "proxy" not in result.stdout
    bad = nano("prune", "--model", "nemotron-nano-12b-v2-base", "--hidden-size", "6000", "--dry-run")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr, bad.stderr


def test_target_yaml_with_flags_over_it(tmp_path):
    target = tmp_path / "target.yaml"
    target.write_text("hidden_size: 48\nffn_hidden_size: 192\nmamba_num_heads: 6\n")
    r = pr.run(pr.PruneOptions(model="tiny", target=str(target), ffn_hidden_size=128, dry_run=True))
    assert (r.shape.hidden_size, r.shape.ffn_hidden_size, r.shape.mamba_num_heads) == (48, 128, 6)
    target.write_text("hidden: 48\n")
    with pytest.raises(pr.PruneError, match="unknown key 'hidden'"):
        pr.run(pr.PruneOptions(model="tiny", target=str(target), dry_run=True))


def test_existing_output_is_never_overwritten(random_parent, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(pr.PruneError, match="not empty"):
        pr.run(pr.PruneOptions(model=str(random_parent), out=str(tmp_path / "out"), hidden_size=48))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
