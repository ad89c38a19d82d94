"""A run directory where a model is expected (``-m runs/x`` for ``runs/x/final``) is read as its final (else its
newest) checkpoint by every command that reads a model, with a note on stderr saying which (issue #19);
``resolve.model_target`` does it for all of them. In process, through ``nano``'s ``main``."""

from __future__ import annotations

import shutil

import pytest

from nanocli import resolve
from nanocli.cli import main

DATA = "synthetic:reasoning?docs=40&difficulty=1-2"


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(resolve, "_NOTED", set())  # each test sees its notes (they are once per process)


def nano(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


COMMANDS = {
    "info": lambda run, tmp: ["info", run],
    "fit-check": lambda run, tmp: ["fit-check", "--model", run, "--gpu", "a10g", "--context", "256"],
    "generate": lambda run, tmp: ["generate", "-m", run, "--max-new-tokens", "2", "--greedy", "2+2="],
    "eval": lambda run, tmp: ["eval", "-m", run, "--problems", "1", "--mode", "no_think", "--max-new-tokens", "4",
                              "--tasks", "add", "--difficulty", "1"],
    "bench": lambda run, tmp: ["bench", "-m", run, "--lengths", "8:2", "--repeats", "1", "--device", "cpu"],
    "prune": lambda run, tmp: ["prune", "-m", run, "--hidden-size", "48", "--dry-run"],
    "pretrain": lambda run, tmp: ["pretrain", "--model", run, "--data", DATA, "--steps", "1", "--dry-run"],
    "align": lambda run, tmp: ["align", "--model", run, "--data", DATA, "--steps", "1", "--seq-len", "128",
                               "--dry-run"],
    "distill": lambda run, tmp: ["distill", "--teacher", run, "--student", run, "--data", DATA, "--steps", "1",
                                 "--dry-run"],
    "align merge": lambda run, tmp: ["align", "merge", run, run, "--out", tmp / "merged"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_that_reads_a_model_takes_a_run_directory(command, tiny_base, tmp_path, capsys):
    run = tiny_base.parent  # the run directory of `nano pretrain --out RUN`: RUN/final is the model
    code, out, err = nano(capsys, *COMMANDS[command](run, tmp_path))
    assert code == 0, err
    note = f"is a run directory; reading its final checkpoint, {run / 'final'}"
    assert note in err, err
    flags = {"distill": ["--teacher", "--student"], "info": ["nano info"], "align merge": ["checkpoint"]}
    for flag in flags.get(command, ["--model"]):
        assert f"note: {flag} {run} {note}" in err
    assert err.count(note) == len(flags.get(command, ["--model"]))  # once per flag, however often it is resolved


def test_a_run_without_final_is_read_at_its_newest_checkpoint(tiny_base, tmp_path, capsys):
    run = tmp_path / "run"
    for step in (2, 10):  # by step number, not by name: 10 is newer than 2
        shutil.copytree(tiny_base, run / f"checkpoint-{step:08d}")
    code, out, err = nano(capsys, "info", run)
    assert code == 0, err
    assert f"reading its newest checkpoint (no final/ yet), {run / 'checkpoint-00000010'}" in err


def test_a_directory_that_is_neither_is_one_line(tmp_path, capsys):
    code, out, err = nano(capsys, "info", tmp_path)
    assert code == 2
    assert err.startswith("error: nano info ") and "no config.json" in err and err.count("\n") == 1


def test_model_target_resolves_a_run_to_its_model(tiny_base, capsys):
    target = resolve.model_target(str(tiny_base.parent))
    assert target.kind == "run" and target.directory == tiny_base
    assert target.config == resolve.read_config(tiny_base / "config.json")
    assert "is a run directory" in capsys.readouterr().err
