"""``--resume`` reads the run's saved settings (issue #19): ``nano pretrain --out DIR --resume auto`` alone resumes;
a trajectory setting given again must match (one line naming the flag, saved vs given); ``--steps`` /
``--tokens`` / ``--epochs`` beyond the checkpoint extend the run, with the LR schedule re-derived over the new
total; align and distill the same. Through the command line, in process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nanocli.cli import main
from nanocli.stages.pretrain import PretrainOptions
from nanocli.train import checkpoints as ckpt
from nanocli.train import resume
from nanocli.train.schedule import Schedule

DATA = "synthetic:reasoning?docs=300&difficulty=1-2"
STEPS = 8


def nano(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def pretrain_args(tiny_base: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--profile", "tiny", "--data", DATA, "--tokenizer", tiny_base.parent / "tokenizer",
            "--cache-dir", tiny_base.parent / "cache", "--seq-len", "64", "--global-batch", "8", "--precision", "fp32",
            "--lr", "3e-3", "--warmup", "1", "--decay", "2", "--heldout-fraction", "0", "--out", out, *extra]


def logged(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def finished(tiny_base, tmp_path_factory) -> Path:
    """A finished 8-step WSD pretrain run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in pretrain_args(tiny_base, out, "--steps", STEPS)])
    assert e.value.code == 0
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------------------------------ the saved settings
def test_resume_auto_alone_takes_the_saved_settings(run, capsys):
    code, out, err = nano(capsys, "pretrain", "--out", run, "--resume", "auto", "--dry-run")
    assert code == 0, err
    assert "profile tiny" in out and f"{STEPS} x 512 tokens" in out and "lr 3.00e-03" in out
    code, out, err = nano(capsys, "pretrain", "--out", run, "--resume", "auto")
    assert code == 0, err
    assert f"already holds step {STEPS} of {STEPS}" in out


@pytest.mark.parametrize("given, message", [
    (["--lr", "1e-3"], "--lr 0.001 differs from the run's saved 0.003"),
    (["--seq-len", "32"], "--seq-len 32 differs from the run's saved 64"),
    (["--schedule", "cosine"], "--schedule 'cosine' differs from the run's saved 'wsd'"),
    (["--data", "synthetic:reasoning?docs=100"], "--data 'synthetic:reasoning?docs=100' differs from the run's saved"),
    (["--steps", "4"], "--steps gives 4 steps, but"),
])
def test_a_setting_given_again_must_match(run, capsys, given, message):
    code, out, err = nano(capsys, "pretrain", "--out", run, "--resume", "auto", *given)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert ckpt.read_step(run / "final") == STEPS  # nothing written


def test_settings_that_do_not_steer_the_run_may_change(run, capsys):
    same = ["--lr", "3e-3", "--seq-len", "64"]  # given again, equal: fine
    code, out, err = nano(capsys, "pretrain", "--out", run, "--resume", "auto", "--keep-last", "5", "--save-every", "2",
                          "--device", "cpu", *same)
    assert code == 0, err


# ------------------------------------------------------------------------------------------ extension
def test_extending_a_finished_run_rederives_the_schedule_over_the_new_total(run, capsys):
    code, out, err = nano(capsys, "pretrain", "--out", run, "--resume", "auto", "--steps", 12)
    assert code == 0, err
    assert "the run is extended from 8 to 12 steps: the LR schedule is re-derived over 12 steps" in err
    assert "the LR was 3.00e-05 at step 8 and is 3.00e-03 at step 9" in err  # a re-warm from --min-lr
    rows = logged(run)
    assert sorted(rows) == list(range(1, 13))
    old = Schedule(kind="wsd", lr=3e-3, min_lr=3e-5, warmup=1, decay=2, total=STEPS)
    new = Schedule(kind="wsd", lr=3e-3, min_lr=3e-5, warmup=1, decay=2, total=12)
    assert [rows[s]["lr"] for s in range(1, 9)] == pytest.approx([old.lr_at(s - 1) for s in range(1, 9)])
    assert [rows[s]["lr"] for s in range(9, 13)] == pytest.approx([new.lr_at(s - 1) for s in range(9, 13)])
    assert rows[9]["lr"] == pytest.approx(3e-3) and rows[12]["lr"] == pytest.approx(3e-5)
    assert ckpt.read_step(run / "final") == 12
    assert yaml.safe_load((run / "final" / ckpt.HPARAMS).read_text())["steps"] == 12
    assert "8 -> 12 of 12" in out


def test_extending_a_constant_schedule_is_the_longer_run_bit_for_bit(tiny_base, tmp_path, capsys):
    """With a constant LR the re-derived schedule is the same at every step, and the data a step reads does not
    depend on the total: 4 steps given as --tokens, extended to 8, end where a straight 8-step run ends."""
    flat = ["--schedule", "constant", "--warmup", "0"]
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    assert nano(capsys, *pretrain_args(tiny_base, straight, "--steps", 8, *flat))[0] == 0
    assert nano(capsys, *pretrain_args(tiny_base, extended, "--tokens", 4 * 512, *flat))[0] == 0
    assert ckpt.read_step(extended / "final") == 4
    code, out, err = nano(capsys, "pretrain", "--out", extended, "--resume", "auto", "--tokens", 8 * 512)
    assert code == 0, err
    assert "extended from 4 to 8 steps" in err
    a, b = weights(straight / "final"), weights(extended / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in logged(straight).values()] == [r["loss"] for r in logged(extended).values()]


def test_align_and_distill_resume_from_their_saved_settings(tiny_base, tmp_path, capsys):
    base = ["--seq-len", "64", "--global-batch", "4", "--precision", "fp32", "--steps", "2"]
    runs = {
        "align": ["align", "--method", "sft", "--model", tiny_base, "--data", "synthetic:reasoning?docs=40",
                  "--eval-problems", "0", *base],
        "distill": ["distill", "--teacher", tiny_base, "--student", tiny_base, "--data", DATA, "--cache-dir",
                    tiny_base.parent / "cache", "--heldout-fraction", "0", *base],
    }
    for stage, args in runs.items():
        out = tmp_path / stage
        assert nano(capsys, *args, "--out", out)[0] == 0
        code, _, err = nano(capsys, stage, "--out", out, "--resume", "auto", "--steps", 3)
        assert code == 0, err
        assert "extended from 2 to 3 steps" in err
        assert sorted(logged(out)) == [1, 2, 3]
        assert ckpt.read_step(out / "final") == 3
        code, _, err = nano(capsys, stage, "--out", out, "--resume", "auto", "--lr", "0.5")
        assert code == 2 and "--lr 0.5 differs from the run's saved" in err


# ------------------------------------------------------------------------------------------ the layering
def saved(**settings) -> resume.Saved:
    return resume.Saved(Path("run/final"), 4, settings)


def test_a_length_given_again_replaces_the_saved_one_in_its_own_unit():
    s = saved(profile="tiny", tokens=2048, steps=4, out="elsewhere", resume=None, dry_run=False)
    assert resume.layer(PretrainOptions, s, {"out": "run"}, 1) == {"profile": "tiny", "tokens": 2048, "out": "run"}
    assert resume.layer(PretrainOptions, s, {"steps": 9}, 1) == {"profile": "tiny", "steps": 9}
    s = saved(profile="tiny", tokens=None, steps=4)
    assert resume.layer(PretrainOptions, s, {"tokens": 4096}, 1) == {"profile": "tiny", "tokens": 4096}


def test_a_saved_micro_batch_that_no_longer_divides_the_batch_falls_back_to_the_default():
    s = saved(global_batch=8, micro_batch=8, steps=4)
    assert resume.layer(PretrainOptions, s, {}, 1)["micro_batch"] == 8
    assert "micro_batch" not in resume.layer(PretrainOptions, s, {}, 2)  # 2 processes: 8 / 2 per process
