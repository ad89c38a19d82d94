"""nano pretrain end to end on the tiny profile: loss falls, checkpoints load (nano and transformers),
exact resume after a real SIGKILL, SIGTERM writes a checkpoint (exit 143), 2-process DDP equals 1 process, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanocli.stages import pretrain as pt
from nanocli.train import checkpoints as ckpt
from nanocli.train.recipe import make_options

ROOT = Path(__file__).resolve().parent.parent
DATA = "synthetic:reasoning?docs=1500&difficulty=1-2"
BASE = dict(profile="tiny", data=DATA, seq_len=64, global_batch=8, lr=3e-3, warmup=1, decay=2,
            precision="fp32", heldout_fraction=0.02, eval_batches=2, seed=3)


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, cache) -> Path:
    """One BPE tokenizer trained by a real run, shared by the other tests (``--tokenizer``)."""
    out = tmp_path_factory.mktemp("tok-run")
    pt.run(pt.PretrainOptions(**{**BASE, "steps": 1, "warmup": 0, "decay": 0}, out=str(out), cache_dir=str(cache)))
    return out / pt.TOKENIZER_DIR


def options(out: Path, cache: Path, tokenizer: Path | None = None, **kw) -> pt.PretrainOptions:
    return pt.PretrainOptions(**{**BASE, **kw}, out=str(out), cache_dir=str(cache),
                              tokenizer=None if tokenizer is None else str(tokenizer))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    """Weights from two runs that computed the same gradients up to float rounding. AdamW moves a weight by
    about lr * sign(g) whatever |g|, so where a gradient is ~0 (a rare token's embedding) rounding can flip
    its sign and that one weight differs by up to 2 lr per step: allow at most 1 element in 10,000 beyond
    ``tol``, and the whole model within ``tol`` in relative L2."""
    beyond = sum(int(((a[k] - b[k]).abs() > tol).sum()) for k in a)
    total = sum(a[k].numel() for k in a)
    assert beyond <= total // 10_000, f"{beyond} of {total} weights differ by more than {tol}"
    diff = sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in a) ** 0.5
    norm = sum(float((a[k].double() ** 2).sum()) for k in a) ** 0.5
    assert diff / norm < tol, diff / norm


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanocli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300, **kw)


def cli_args(out: Path, cache: Path, tokenizer: Path, steps: int, **extra) -> list[str]:
    args = ["pretrain", "--profile", "tiny", "--data", DATA, "--seq-len", "64", "--global-batch", "8",
            "--lr", "3e-3", "--warmup", "1", "--decay", "2", "--precision", "fp32", "--seed", "3",
            "--steps", str(steps), "--out", str(out), "--cache-dir", str(cache), "--tokenizer", str(tokenizer)]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


# ------------------------------------------------------------------------------------------- training
def test_loss_falls_and_checkpoint_is_complete(tmp_path, cache, tokenizer_dir):
    r = pt.run(options(tmp_path, cache, tokenizer_dir, steps=40, save_every=20, eval_every=20))
    assert r.steps_done == 40 and not r.interrupted
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in rows if "loss" in m]
    assert len(losses) == 40
    # ln(512) = 6.24 at the start; the formulaic corpus is learned fast
    assert losses[0] > 5.5 and sum(losses[-5:]) / 5 < losses[0] - 2.0, losses
    assert r.eval["eval_loss"] < losses[0] - 2.0
    final = tmp_path / "final"
    assert ckpt.is_complete(final) and (final / "tokenizer.json").is_file()
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert ckpt.read_step(final) == 40 and ckpt.read_hparams(final)["steps"] == 40
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-00000020", "final"]


def test_checkpoint_loads_in_transformers_with_identical_logits(tmp_path, cache, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    from nanocli_model import load_pretrained

    pt.run(options(tmp_path, cache, tokenizer_dir, steps=5))
    final = tmp_path / "final"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    nano = load_pretrained(final)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = nano(ids)
        b = hf(ids, use_cache=False).logits.float()
    assert (a - b).abs().max().item() < 1e-4 * b.abs().max().item()


def test_wsd_lr_is_logged_per_step(tmp_path, cache, tokenizer_dir):
    pt.run(options(tmp_path, cache, tokenizer_dir, steps=10, lr=1e-3, min_lr=1e-5, warmup=2, decay=4))
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if "lr" in json.loads(x)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[2:6] == [pytest.approx(1e-3)] * 4
    assert lrs[9] == pytest.approx(1e-5)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, cache, tokenizer_dir):
    whole = pt.run(options(tmp_path / "a", cache, tokenizer_dir, steps=4, heldout_fraction=0.0))
    accum = pt.run(options(tmp_path / "b", cache, tokenizer_dir, steps=4, heldout_fraction=0.0, micro_batch=2))
    assert accum.plan.accumulation == 4 and whole.plan.accumulation == 1
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert_same_training(a, b, 1e-4)
    ma, mb = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab")
    ga, gb = ([m["grad_norm"] for m in ms if "grad_norm" in m] for ms in (ma, mb))
    assert len(ga) == 4 and ga == pytest.approx(gb, rel=1e-5)  # the same gradients, step by step
    assert accum.last_loss == pytest.approx(whole.last_loss, rel=1e-5)


# ------------------------------------------------------------------------------------------- resume
def test_sigkill_then_resume_is_bit_identical(tmp_path, cache, tokenizer_dir):
    steps = 12
    ref = tmp_path / "ref"  # same process conditions as the killed run (1 thread): CPU math is then deterministic
    r = cli(*cli_args(ref, cache, tokenizer_dir, steps, save_every=3))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "nanocli", *cli_args(run, cache, tokenizer_dir, steps,
                                                                          save_every=3)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and not any(s >= 6 for s, _ in ckpt.list_checkpoints(run)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = ckpt.list_checkpoints(run)
    assert done and max(s for s, _ in done) < steps, "the run finished before it could be killed"
    r = cli(*cli_args(run, cache, tokenizer_dir, steps, save_every=3, resume="auto"))
    assert r.returncode == 0, r.stderr
    a, b = weights(ref / "final"), weights(run / "final")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the metrics file reads as one run: each step once
    steps_logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(x)]
    assert steps_logged == list(range(1, steps + 1))
    # --keep-last 2 (the default): the newest two checkpoint-* directories and final, nothing else
    # and no temporary directory of the killed write is left behind
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint-00000006", "checkpoint-00000009",
                                                                   "final"]


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path, cache, tokenizer_dir):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nanocli", *cli_args(out, cache, tokenizer_dir, 100000)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    (step, path), = ckpt.list_checkpoints(out)
    assert 0 < step < 100000 and path.name == ckpt.checkpoint_name(step)


def test_existing_run_needs_resume_flag_and_same_settings(tmp_path, cache, tokenizer_dir):
    pt.run(options(tmp_path, cache, tokenizer_dir, steps=3))
    before = weights(tmp_path / "final")
    with pytest.raises(pt.PretrainError, match="--resume auto"):
        pt.run(options(tmp_path, cache, tokenizer_dir, steps=3))
    with pytest.raises(pt.PretrainError, match="seq-len"):
        pt.run(options(tmp_path, cache, tokenizer_dir, steps=3, seq_len=32, resume="auto"))
    r = pt.run(options(tmp_path, cache, tokenizer_dir, steps=3, resume="auto"))
    assert r.already_done
    after = weights(tmp_path / "final")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_rejects_a_different_architecture(tmp_path, cache, tokenizer_dir):
    pt.run(options(tmp_path, cache, tokenizer_dir, steps=3, save_every=1))
    cfg = json.loads((tmp_path / "final" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "final" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(pt.PretrainError, match="architecture"):
        pt.run(options(tmp_path, cache, tokenizer_dir, steps=3, resume=str(tmp_path / "final")))


def test_continue_from_model_at_longer_sequence(tmp_path, cache, tokenizer_dir):
    pt.run(options(tmp_path / "base", cache, tokenizer_dir, steps=4))
    r = pt.run(pt.PretrainOptions(model=str(tmp_path / "base" / "final"), data=DATA, seq_len=128, global_batch=4,
                                  steps=3, lr=1e-3, warmup=0, decay=1, precision="fp32",
                                  out=str(tmp_path / "long"), cache_dir=str(cache), heldout_fraction=0.0))
    assert r.steps_done == 3 and ckpt.read_hparams(tmp_path / "long" / "final")["seq_len"] == 128
    assert (tmp_path / "long" / "final" / "tokenizer.json").is_file()


# ------------------------------------------------------------------------------------------- precision
def test_fp8_loss_curve_tracks_bf16(tmp_path, cache, tokenizer_dir):
    """The report (and Nemotron-H) found FP8 on par with BF16; on tiny, within 2% after 30 steps."""
    kw = dict(steps=30, fp8_keep=0, heldout_fraction=0.0)
    bf16 = pt.run(options(tmp_path / "bf16", cache, tokenizer_dir, precision="bf16", **kw))
    fp8 = pt.run(options(tmp_path / "fp8", cache, tokenizer_dir, precision="fp8", **kw))
    assert fp8.fp8 and len(fp8.fp8.fp8) > 0

    def tail(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return sum(m["loss"] for m in rows[-5:]) / 5

    a, b = tail(tmp_path / "bf16"), tail(tmp_path / "fp8")
    assert abs(a - b) / a < 0.02, (a, b)
    assert bf16.first_loss - a > 1.5  # both actually learned


# ------------------------------------------------------------------------------------------- processes
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, cache, tokenizer_dir, parallel):
    steps = 4
    one = tmp_path / "one"
    pt.run(options(one, cache, tokenizer_dir, steps=steps, heldout_fraction=0.0))
    two = tmp_path / "two"
    for attempt in range(2):
        shutil.rmtree(two, ignore_errors=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "nanocli",
               *cli_args(two, cache, tokenizer_dir, steps, save_every=2, heldout_fraction=0.0, parallel=parallel)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        # Once (in ~15 CI runs) a gloo worker died of SIGABRT (exitcode -6) here; not reproduced in 9 reruns.
        # A process killed by a signal gets one more try; any other failure, or a second crash, fails.
        if r.returncode == 0 or "(exitcode: -" not in r.stderr or attempt == 1:
            break
    assert r.returncode == 0, "\n".join(ln for ln in r.stderr.splitlines() if "rank" in ln or "Error" in ln)[-3000:]

    def losses(out):
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(x)]

    assert losses(one) == pytest.approx(losses(two), rel=1e-5)
    a, b = weights(one / "final"), weights(two / "final")
    assert_same_training(a, b, 1e-4)
    # a checkpoint written by 2 processes resumes in 1 and ends where the 1-process run ends
    shutil.rmtree(two / "final")
    r = cli(*cli_args(two, cache, tokenizer_dir, steps, save_every=2, heldout_fraction=0.0, resume="auto"))
    assert r.returncode == 0, r.stderr
    b = weights(two / "final")
    assert_same_training(a, b, 1e-4)


# ------------------------------------------------------------------------------------------- plan + errors
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    r = cli("pretrain", "--recipe", "pretrain-tiny", "--out", str(tmp_path / "x"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "400 x 4,096 tokens" in r.stdout and "wsd" in r.stdout and "synthetic" in r.stdout
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("recipe", ["pretrain-12b", "pretrain-12b-long-context"])
def test_gpu_recipes_validate(tmp_path, recipe):
    for d in ("web", "code", "math", "multilingual", "academic", "sft_style", "phase3", "long_doc_qa"):
        (tmp_path / "data" / d).mkdir(parents=True)
        (tmp_path / "data" / d / "part-0.parquet").write_bytes(b"")
    extra = ["--model", str(tmp_path / "m")] if "long" in recipe else []
    if extra:  # the base to continue: a 12B directory whose weights are sparse (headers only; never read here)
        from model_utils import write_header_only_checkpoint
        from nanocli.profiles import load_model_profile

        write_header_only_checkpoint(tmp_path / "m", load_model_profile("nemotron-nano-12b-v2-base").config)
    r = subprocess.run([sys.executable, "-m", "nanocli", "pretrain", "--recipe", recipe, "--out", "runs/x",
                        "--dry-run", *extra], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr
    if recipe == "pretrain-12b":
        assert "3,317,129 x 6,029,312 tokens" in r.stdout
        assert "steps 1990278..2985417" in r.stdout  # phase 2 spans 60%..90%


@pytest.mark.parametrize("args, message", [
    (["--profile", "nope", "--data", DATA, "--steps", "1"], "unknown model profile"),
    (["--profile", "tiny", "--steps", "1"], "--data is required"),
    (["--profile", "tiny", "--data", "missing/*.jsonl", "--steps", "1"], "no files match"),
    (["--profile", "tiny", "--data", DATA, "--steps", "1", "--seq-len", "5000"], "max_position_embeddings"),
    (["--profile", "tiny", "--data", DATA], "--steps N or --tokens N"),
    (["--profile", "tiny", "--data", DATA, "--steps", "1", "--precision", "fp4"],
     "--precision fp4: use one of fp32, bf16, fp8"),
    (["--profile", "tiny", "--data", DATA, "--steps", "1", "--global-batch", "6", "--micro-batch", "4"],
     "not a multiple"),
    (["--model", "nowhere", "--data", DATA, "--steps", "1"], "--model nowhere: unknown model profile, and no such model directory"),
    (["--profile", "tiny", "--data", DATA, "--steps", "1", "--recipe", "nope.yaml"], "no such recipe"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    r = cli("pretrain", *args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_empty_data_file_is_an_error_and_nothing_is_written(tmp_path, cache, tokenizer_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    from nanocli.data import DataError

    with pytest.raises(DataError):
        pt.run(options(tmp_path / "out", cache, tokenizer_dir, steps=3, data=str(data)))
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not (tmp_path / "out" / "final").exists()


@pytest.mark.parametrize("text, message", [
    ("stage: pretrain\nsteps: 10\nlearning_rate: 0.1\n", "unknown setting 'learning_rate'"),
    ("stage: pretrain\nsteps: ten\n", "steps"),
    ("stage: align\nsteps: 10\n", "recipe for `nano align`"),
    ("stage: pretrain\nsteps: [10\n", "not valid YAML"),
    ("stage: pretrain\nprecision: fp4\n", "precision: 'fp4' is not one of fp32, bf16, fp8"),
    ("- 1\n- 2\n", "mapping"),
])
def test_recipe_mistakes_are_named(tmp_path, text, message):
    from nanocli_model.errors import ConfigError

    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("`", "`")):
        make_options(pt.PretrainOptions, pt.STAGE, str(f), {})


def test_help_shows_the_real_defaults_in_one_panel_per_group():
    r = cli("pretrain", "--help", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    for flag, default in (("--lr", "0.0003"), ("--seq-len", "256"), ("--save-every", "0"), ("--precision", "bf16"),
                          ("--schedule", "wsd"), ("--heldout-fraction", "0.005")):
        line = next(ln for ln in r.stdout.splitlines() if f" {flag} " in ln)
        assert f"[default: {default}]" in line, line
    for panel in ("Model", "Data", "Batch", "Schedule", "Optimizer", "Precision", "Checkpoints", "Run"):
        assert f"─ {panel} ─" in r.stdout, panel


def test_flags_override_recipe_over_defaults(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("stage: pretrain\nsteps: 10\nlr: 0.01\nseq_len: 32\n")
    o = make_options(pt.PretrainOptions, pt.STAGE, str(f), {"lr": 0.5, "seq_len": None})
    assert (o.steps, o.lr, o.seq_len, o.global_batch) == (10, 0.5, 32, pt.PretrainOptions().global_batch)


def test_rotation_removes_leftovers_of_killed_writes(tmp_path, cache, tokenizer_dir):
    for name in (".checkpoint-00000002.tmp-abc", ".checkpoint-00000002.state-xyz", ".final.tmp-q"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    pt.run(options(tmp_path, cache, tokenizer_dir, steps=4, save_every=1, keep_last=1, resume="auto"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000003", "final", "loss.png",
                                                          "metrics.jsonl"]
