"""nano distill: the KD losses against float64 hand computations, and the stage end to end on a tiny teacher
(pretrained once per session) and a student pruned from it by dropping layers: distillation must lower the
student's KL to the teacher and its held-out loss more than the same steps of plain cross-entropy."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model_utils import randomize, tiny_config
from nanocli.stages import distill as ds
from nanocli.stages import pretrain as pt
from nanocli.train import checkpoints as ckpt
from nanocli.train.kd import KDConfig, TeacherTopK, kd_loss, linear_kd, teacher_topk
from nanocli_model import NanoForCausalLM, load_pretrained
from nanocli_model.checkpoint import save_pretrained
from nanocli_model.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DATA = "synthetic:reasoning?docs=1500&difficulty=1-2"
DROP = (1, 2, 3, 4)  # tiny "M-M-M*-M-" -> student "M*-M-": 5 of 9 layers, embeddings and lm_head kept


# ------------------------------------------------------------------------------------------- references
def reference(z, u, y, T=1.0, kind="forward", top_k=None, ratio=1.0, ignore=-100):
    """Naive float64 KD + CE on full logits z (student), u (teacher): (loss, kd, ce), differentiable in z."""
    valid = y != ignore
    logp = F.log_softmax(z / T, dim=-1)
    if top_k is not None:  # the teacher's top-k tokens only, renormalised; zero probability elsewhere
        v, i = u.topk(top_k, dim=-1)
        q = torch.zeros_like(u).scatter_(1, i, F.softmax(v / T, dim=-1))
        row = torch.stack([sum(q[r, j] * (torch.log(q[r, j]) - logp[r, j]) for j in i[r].tolist())
                           for r in range(z.shape[0])])
    elif kind == "forward":
        row = F.kl_div(logp, F.log_softmax(u / T, dim=-1), log_target=True, reduction="none").sum(-1)
    else:
        p, logq = logp.exp(), F.log_softmax(u / T, dim=-1)
        row = (p * (logp - logq)).sum(-1)  # explicit sum of KL(p || q)
    kd = row[valid].sum() * T * T
    ce = F.cross_entropy(z, y, ignore_index=ignore, reduction="sum")
    return ratio * kd + (1 - ratio) * ce, kd, ce


def problem(n=23, d=6, V=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    u = 2 * torch.randn(n, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (n,), generator=g)
    y[[2, 9]] = -100
    return h, w, u, y


def full(u):
    return lambda s, e: ("full", u[s:e])


def topk_fn(u, k):
    return lambda s, e: ("topk", *u[s:e].topk(k, dim=-1))


CASES = [dict(kind="forward", T=1.0, ratio=1.0), dict(kind="forward", T=2.0, ratio=0.3),
         dict(kind="reverse", T=1.0, ratio=1.0), dict(kind="reverse", T=0.5, ratio=0.7),
         dict(kind="forward", T=1.5, ratio=1.0, top_k=5), dict(kind="forward", T=1.0, ratio=0.0)]


# ------------------------------------------------------------------------------------------- the loss math
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_chunked_loss_and_gradients_match_naive_float64(case):
    h, w, u, y = problem()
    k = case.get("top_k")
    cfg = KDConfig(temperature=case["T"], kind=case["kind"], kd_ratio=case["ratio"], chunk=4)
    loss, kd, ce, count = linear_kd(h, w, topk_fn(u, k) if k else full(u), y, cfg)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref, rkd, rce = reference(h @ w.t(), u, y, case["T"], case["kind"], k, case["ratio"])
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert int(count) == 21
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert kd.item() == pytest.approx(rkd.item(), rel=1e-12) and ce.item() == pytest.approx(rce.item(), rel=1e-12)
    assert (gh - rh).abs().max() < 1e-10 * rh.abs().max() and (gw - rw).abs().max() < 1e-10 * rw.abs().max()
    assert rkd.item() > 0.1  # the comparison is not between two zeros


@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_chunked_equals_unchunked(case):
    h, w, u, y = problem(n=31)
    k = case.get("top_k")
    results = []
    for chunk in (1, 7, 31, 1000):
        cfg = KDConfig(temperature=case["T"], kind=case["kind"], kd_ratio=case["ratio"], chunk=chunk)
        loss, kd, ce, _ = linear_kd(h, w, topk_fn(u, k) if k else full(u), y, cfg)
        results.append((loss.detach(), kd, ce, *torch.autograd.grad(loss, (h, w))))
        with torch.no_grad():  # the no-grad path (evaluation) gives the same numbers
            assert linear_kd(h, w, topk_fn(u, k) if k else full(u), y, cfg)[0].item() == pytest.approx(loss.item(), rel=1e-12)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


def test_forward_kl_is_the_explicit_sum_and_scales_with_t_squared():
    h, w, u, y = problem()
    z = (h @ w.t()).detach()
    for T in (1.0, 3.0):
        _, kd, _, _ = linear_kd(h.detach(), w.detach(), full(u), y, KDConfig(temperature=T))
        p, q = F.softmax(z / T, -1), F.softmax(u / T, -1)
        explicit = sum((q[r] * (q[r].log() - p[r].log())).sum() for r in range(z.shape[0]) if y[r] != -100)
        assert kd.item() == pytest.approx(T * T * explicit.item(), rel=1e-12)
    # T^2 scaling: KD at T on (z, u) is T^2 times KD at 1 on (z/T, u/T)
    T = 2.5
    at_t = linear_kd(h.detach(), w.detach(), full(u), y, KDConfig(temperature=T))[1]
    at_1 = linear_kd(h.detach() / T, w.detach(), full(u / T), y, KDConfig(temperature=1.0))[1]
    assert at_t.item() == pytest.approx(T * T * at_1.item(), rel=1e-12)


def test_top_k_against_hand_computation_and_full_vocabulary_limit():
    h, w, u, y = problem()
    z = (h @ w.t()).detach()
    k = 3
    _, kd, _, _ = linear_kd(h.detach(), w.detach(), topk_fn(u, k), y, KDConfig())
    hand = 0.0
    for r in range(z.shape[0]):
        if y[r] == -100:
            continue
        top = sorted(range(u.shape[1]), key=lambda j: -u[r, j].item())[:k]
        mass = sum(torch.exp(u[r, j]).item() for j in top)
        lse = torch.logsumexp(z[r], 0).item()
        for j in top:
            qj = torch.exp(u[r, j]).item() / mass
            hand += qj * (torch.log(torch.tensor(qj, dtype=torch.float64)).item() - (z[r, j].item() - lse))
    assert kd.item() == pytest.approx(hand, rel=1e-10)
    full_kd = linear_kd(h.detach(), w.detach(), full(u), y, KDConfig())[1]
    all_k = linear_kd(h.detach(), w.detach(), topk_fn(u, u.shape[1]), y, KDConfig())[1]
    assert all_k.item() == pytest.approx(full_kd.item(), rel=1e-12)


def _tiny_pair(dtype=torch.float64):
    torch.manual_seed(0)
    student, teacher = NanoForCausalLM(tiny_config()).to(dtype), NanoForCausalLM(tiny_config()).to(dtype)
    randomize(student, seed=1)
    randomize(teacher, seed=2)
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    return student, teacher, ids, labels


def test_kd_loss_through_models_matches_autograd_on_full_logits():
    student, teacher, ids, labels = _tiny_pair()
    loss, count, parts = kd_loss(student, teacher, ids, labels, temperature=2.0, kd_ratio=0.6, chunk=7)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    logits = lambda h, w: h @ w.t()  # noqa: E731  float64 logits (forward() returns float32 ones)
    with torch.no_grad():
        u = teacher(ids, head=logits).flatten(0, 1)
    z = student(ids, head=logits).flatten(0, 1)
    ref, rkd, rce = reference(z, u, labels.flatten(), T=2.0, ratio=0.6)
    rgrads = torch.autograd.grad(ref, list(student.parameters()))
    assert int(count) == 38
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    assert parts["kd"] == pytest.approx(rkd.item(), rel=1e-10) and parts["ce"] == pytest.approx(rce.item(), rel=1e-10)
    for a, b in zip(grads, rgrads):
        assert (a - b).abs().max() <= 1e-9 * max(b.abs().max().item(), 1e-6)
    assert all(p.grad is None for p in teacher.parameters())
    # the head= hook sees the normed hidden states and the lm_head weight: h @ w^T are the logits
    assert z.dtype == torch.float64 and torch.allclose(z.float(), student(ids).flatten(0, 1), atol=1e-5)


def test_student_equal_to_teacher_gives_zero_kd():
    student, _, ids, labels = _tiny_pair(torch.float32)
    for kind in ("forward", "reverse"):
        _, _, parts = kd_loss(student, student, ids, labels, kind=kind, temperature=1.7)
        assert abs(parts["kd"]) < 1e-4 and parts["ce"] > 1.0
    _, _, parts = kd_loss(student, student, ids, labels, top_k=96)  # k = vocabulary: the full distribution
    assert abs(parts["kd"]) < 1e-4


def test_precomputed_top_k_equals_top_k_on_the_fly():
    student, teacher, ids, labels = _tiny_pair()
    a, _, pa = kd_loss(student, teacher, ids, labels, top_k=6)
    top = teacher_topk(teacher, ids, 6, chunk=5)
    assert top.values.shape == (2, 20, 6) and top.indices.dtype == torch.int64
    b, _, pb = kd_loss(student, TeacherTopK(top.values, top.indices), ids, labels)
    assert a.item() == pytest.approx(b.item(), rel=1e-12) and pa == pytest.approx(pb, rel=1e-12)


def test_bf16_autocast_stays_close_to_fp32():
    student, teacher, ids, labels = _tiny_pair(torch.float32)
    exact = kd_loss(student, teacher, ids, labels)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = kd_loss(student, teacher, ids, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(exact.item(), rel=0.05)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())


@pytest.mark.parametrize("kw, message", [
    (dict(kind="sideways"), "forward, reverse"), (dict(temperature=0.0), "at least 0.01"),
    (dict(temperature=1.4e-45), "at least 0.01"), (dict(temperature=float("nan")), "at least 0.01"), (dict(kd_ratio=1.5), "[0, 1]"),
    (dict(top_k=4, kind="reverse"), "forward KL only"), (dict(top_k=0), "at least 1"),
    (dict(kd_ratio=0.5, labels=None), "needs labels"),
])
def test_bad_kd_arguments_are_config_errors(kw, message):
    student, teacher, ids, labels = _tiny_pair(torch.float32)
    kw = {"labels": labels, **kw}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        kd_loss(student, teacher, ids, **kw)


# ------------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="session")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(teacher, student, token cache): a tiny model pretrained briefly, and a student with layers 1-4 dropped.

    The teacher holds out the same windows (same seq_len and heldout_fraction) that distillation evaluates on."""
    root = tmp_path_factory.mktemp("distill")
    cache = root / "cache"
    pt.run(pt.PretrainOptions(profile="tiny", data=DATA, seq_len=64, global_batch=8, steps=150, lr=3e-3, warmup=1,
                              decay=37, precision="fp32", heldout_fraction=0.05, out=str(root / "teacher"),
                              cache_dir=str(cache)))
    teacher = root / "teacher" / "final"
    return teacher, drop_layers(teacher, root / "student", DROP), cache


def drop_layers(src: Path, dst: Path, drop: tuple[int, ...]) -> Path:
    """A smaller NemotronH: ``src`` without the layers ``drop`` (renumbered), same vocab and tokenizer."""
    from nanocli.train.session import side_files

    model = load_pretrained(src, dtype="fp32")
    c = model.config
    keep = [i for i in range(c.num_hidden_layers) if i not in drop]
    config = c.replace(hybrid_override_pattern="".join(c.hybrid_override_pattern[i] for i in keep))
    with torch.device("meta"):
        student = NanoForCausalLM(config)
    state = {}
    for name, t in model.state_dict().items():
        if name.startswith("backbone.layers."):
            i = int(name.split(".")[2])
            if i in drop:
                continue
            name = name.replace(f"backbone.layers.{i}.", f"backbone.layers.{keep.index(i)}.", 1)
        state[name] = t
    student.load_state_dict(state, assign=True)
    return save_pretrained(student, dst, extra_files=side_files(src))


def options(pair, out: Path, **kw) -> ds.DistillOptions:
    teacher, student, cache = pair
    base = dict(teacher=str(teacher), student=str(student), data=DATA, out=str(out), steps=15, seq_len=64,
                global_batch=4, lr=3e-3, warmup=0, precision="fp32", heldout_fraction=0.05, eval_batches=12,
                cache_dir=str(cache))
    return ds.DistillOptions(**{**base, **kw})


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanocli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_distillation_beats_plain_cross_entropy_on_a_pruned_student(pair, tmp_path):
    kd = ds.run(options(pair, tmp_path / "kd"))
    ce = ds.run(options(pair, tmp_path / "ce", kd_ratio=0.0))  # the same steps of plain cross-entropy
    print(f"\nheld-out KL to teacher: before {kd.before['eval_kl']:.4f}, KD {kd.eval['eval_kl']:.4f}, "
          f"CE {ce.eval['eval_kl']:.4f}; held-out CE: before {kd.before['eval_loss']:.4f}, "
          f"KD {kd.eval['eval_loss']:.4f}, CE {ce.eval['eval_loss']:.4f}")  # docs/BENCHMARKS.md (pytest -s)
    assert kd.before == ce.before and kd.before["eval_kl"] > 0.3  # pruning hurt: a gap to recover
    # the report's reason to distill: KL to the teacher and held-out loss both fall further than with CE
    assert kd.eval["eval_kl"] < 0.75 * ce.eval["eval_kl"] and kd.eval["eval_kl"] < 0.4 * kd.before["eval_kl"]
    assert kd.eval["eval_loss"] < ce.eval["eval_loss"] - 0.015
    assert kd.eval["eval_loss"] < kd.before["eval_loss"] - 0.2
    # KD and CE are logged separately; the optimised one is the loss
    rows = [m for m in metrics(tmp_path / "kd") if "loss" in m]
    assert len(rows) == 15 and all(m["loss"] == pytest.approx(m["kd"], rel=1e-6) for m in rows)
    assert all(m["loss"] == pytest.approx(m["ce"], rel=1e-6) for m in metrics(tmp_path / "ce") if "loss" in m)
    assert rows[-1]["kd"] < rows[0]["kd"] / 2
    final = tmp_path / "kd" / "final"
    assert ckpt.is_complete(final) and (final / "tokenizer.json").is_file()
    assert load_pretrained(final).config.hybrid_override_pattern == "M*-M-"
    assert (tmp_path / "kd" / "loss.png").is_file()


def test_resume_is_exact(pair, tmp_path):
    straight = ds.run(options(pair, tmp_path / "a", steps=6, heldout_fraction=0.0, kd_ratio=0.5, temperature=2.0))
    ds.run(options(pair, tmp_path / "b", steps=6, save_every=3, heldout_fraction=0.0, kd_ratio=0.5, temperature=2.0))
    shutil.rmtree(tmp_path / "b" / "final")  # as if killed after checkpoint-3
    resumed = ds.run(options(pair, tmp_path / "b", steps=6, save_every=3, heldout_fraction=0.0, kd_ratio=0.5,
                             temperature=2.0, resume="auto"))
    assert resumed.start_step == 3 and resumed.steps_done == 6
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(tmp_path / "a")] == [m["loss"] for m in metrics(tmp_path / "b")]
    assert straight.last_kd == pytest.approx(resumed.last_kd, rel=1e-12)
    with pytest.raises(ds.DistillError, match="--kd-ratio was 0.5"):
        ds.run(options(pair, tmp_path / "b", steps=6, heldout_fraction=0.0, kd_ratio=1.0, temperature=2.0,
                       resume=str(tmp_path / "b" / "checkpoint-00000003")))


def test_top_k_teacher_cache_is_reused_across_runs(pair, tmp_path):
    common = dict(steps=4, top_k=8, heldout_fraction=0.0, teacher_cache=str(tmp_path / "topk"))
    first = ds.run(options(pair, tmp_path / "one", **common))
    files = sorted((tmp_path / "topk").rglob("*.safetensors"))
    assert first.teacher_cache.misses == len(files) > 0 and first.teacher_cache.hits == 16 - len(files)
    stored = load_file(str(files[0]))
    assert stored["values"].shape == (64, 8) and stored["indices"].dtype == torch.int32
    second = ds.run(options(pair, tmp_path / "two", **common))
    assert second.teacher_cache == dataclasses.replace(first.teacher_cache, hits=16, misses=0)
    a, b = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)  # cached logits are exactly what the teacher gave
    plain = ds.run(options(pair, tmp_path / "three", **{**common, "teacher_cache": None}))
    assert plain.last_loss == pytest.approx(first.last_loss, rel=1e-4)


def test_default_bf16_run_keeps_fp32_master_weights_and_a_bf16_teacher(pair, tmp_path):
    r = ds.run(options(pair, tmp_path / "run", steps=2, precision="bf16", top_k=16, eval_batches=2))
    assert r.plan.teacher_dtype == "bf16" and ckpt.read_hparams(r.final)["teacher_dtype"] == "bf16"
    assert all(v.dtype == torch.float32 for v in weights(r.final).values())
    assert 0 < r.last_kd < r.before["eval_kl"] * 2 and r.eval["eval_kl"] < r.before["eval_kl"]


@pytest.mark.slow
def test_two_processes_match_one_process(pair, tmp_path):
    teacher, student, cache = pair
    one = ds.run(options(pair, tmp_path / "one", steps=3, heldout_fraction=0.0, kd_ratio=0.5))
    args = ["--teacher", str(teacher), "--student", str(student), "--data", DATA, "--steps", "3", "--seq-len", "64",
            "--global-batch", "4", "--lr", "3e-3", "--warmup", "0", "--precision", "fp32", "--kd-ratio", "0.5",
            "--heldout-fraction", "0", "--cache-dir", str(cache), "--out", str(tmp_path / "two")]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(port), "-m", "nanocli", "distill", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    m1 = [m for m in metrics(tmp_path / "one") if "loss" in m]
    m2 = [m for m in metrics(tmp_path / "two") if "loss" in m]
    for key in ("loss", "kd", "ce"):  # KD and CE are global per-token means, as the loss
        assert [m[key] for m in m1] == pytest.approx([m[key] for m in m2], rel=1e-5)
    a, b = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert one.steps_done == 3


# ------------------------------------------------------------------------------------------- checks + errors
def test_dry_run_prints_the_plan_and_writes_nothing(pair, tmp_path):
    teacher, student, _ = pair
    r = cli("distill", "--recipe", "distill-tiny", "--teacher", str(teacher), "--student", str(student),
            "--out", str(tmp_path / "x"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "forward KL at T=1" in r.stdout and "15 x 256 tokens" in r.stdout and "same tokenizer" in r.stdout
    assert not (tmp_path / "x").exists()


def _student_variant(pair, tmp_path, vocab=None, tokenizer=None) -> Path:
    _, student, _ = pair
    d = tmp_path / "variant"
    shutil.copytree(student, d)
    if vocab is not None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["vocab_size"] = vocab
        (d / "config.json").write_text(json.dumps(cfg))
    if tokenizer is not None:
        tok = json.loads((d / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        a, b = list(vocab)[300:302]
        vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two tokens swap ids
        (d / "tokenizer.json").write_text(json.dumps(tok))
    return d


@pytest.mark.parametrize("change, message", [
    (dict(vocab=1024), "vocab_size (512) differs from the student's (1024)"),
    (dict(tokenizer=True), "the tokenizers differ"),
])
def test_mismatched_pair_is_named_before_any_work(pair, tmp_path, change, message):
    student = _student_variant(pair, tmp_path, **change)
    with pytest.raises(ds.DistillError) as e:
        ds.run(options(pair, tmp_path / "out", student=str(student)))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_reformatted_tokenizer_json_is_the_same_tokenizer(pair, tmp_path):
    teacher, student, _ = pair
    d = tmp_path / "s"
    shutil.copytree(student, d)
    (d / "tokenizer.json").write_text(json.dumps(json.loads((d / "tokenizer.json").read_text()), indent=4))
    ds.plan(options(pair, tmp_path / "out", student=str(d)))  # no error


@pytest.mark.parametrize("kw, message", [
    (dict(teacher="nowhere"), "--teacher nowhere: unknown model profile, and no such model directory"),
    (dict(student=None), "--student DIR is required"),
    (dict(data=None), "--data is required"),
    (dict(steps=None), "--steps N or --tokens N"),
    (dict(teacher_cache="c"), "give --kd-top-k K with it"),
    (dict(top_k=4, kd_kind="reverse"), "forward KL only"),
    (dict(top_k=600), "exceeds the vocabulary"),
    (dict(kd_ratio=2.0), "--kd-ratio must be in [0, 1]"),
    (dict(teacher_dtype="int8"), "auto, fp32, bf16, fp16"),
    (dict(seq_len=5000), "max_position_embeddings"),
    (dict(global_batch=6, micro_batch=4), "not a multiple"),
    # pretrain's checks, which distill had drifted from (0 meant the default, -1 acted on every step, a negative
    # weight decay failed only after the lock, the tokenization and the teacher's load)
    (dict(micro_batch=0), "--micro-batch must be at least 1, got 0"),
    (dict(save_every=-1), "--save-every must be at least 0, got -1"),
    (dict(eval_every=-1), "--eval-every must be at least 0, got -1"),
    (dict(weight_decay=-1.0), "--weight-decay must be a finite number >= 0, got -1.0"),
])
def test_bad_options_are_named_before_any_work(pair, tmp_path, kw, message):
    from nanocli_model.errors import NanoError

    with pytest.raises(NanoError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ds.run(options(pair, tmp_path / "out", **kw))
    assert not (tmp_path / "out").exists()


def test_bad_data_is_one_line(pair, tmp_path):
    teacher, student, _ = pair
    r = cli("distill", "--teacher", str(teacher), "--student", str(student), "--data", "missing/*.jsonl",
            "--steps", "1", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "no files match" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()
