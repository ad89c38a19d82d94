"""One error contract for every command (issue #19, item 5): a command-line mistake is one ``error:`` line on
stderr, exit code 2, no rich panel, ending with where to look (and a close name when there is one); messages
name the user's file and flag, never an internal tuple or a codec error. Run in this process (``main()``, the
console script's entry point), plus one real process for the panel-free stderr."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from nanocli.cli import main
from nanocli.profiles import load_model_profile

ROOT = Path(__file__).resolve().parent.parent


def run_main(*args: str) -> tuple[int, str, str]:
    """``nano ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", ["nano", *args]), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def one_error_line(code: int, stderr: str) -> str:
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and "╭" not in stderr and "Usage:" not in stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["pretrain", "--lr", "abc"], "error: --lr abc: not a number; see `nano pretrain --help`"),
    (["pretrain", "--lr=abc"], "error: --lr abc: not a number; see `nano pretrain --help`"),
    (["eval", "--problems", "1.5"], "error: --problems 1.5: not a whole number; see `nano eval --help`"),
    (["generate", "--device", "gpu"], "error: --device gpu: use one of auto, cpu, cuda; see `nano generate --help`"),
    (["pretrain", "--lrr", "1"],
     "error: no such option --lrr for nano pretrain (did you mean --lr?); see `nano pretrain --help`"),
    (["fit-check", "--bogus"], "error: no such option --bogus for nano fit-check; see `nano fit-check --help`"),
    (["align", "merge", "--wieghts", "1"],
     "error: no such option --wieghts for nano align merge (did you mean --weights?); see `nano align merge --help`"),
    (["generate", "-m"], "error: -m needs a value; see `nano generate --help`"),
    (["info", "a", "b"], "error: got unexpected extra argument(s) (b); see `nano info --help`"),
    (["generat"], "error: no such command 'generat' (did you mean generate?); see `nano --help`"),
    (["--bogus"], "error: no such option --bogus for nano; see `nano --help`"),
])
def test_usage_errors_are_one_line_with_a_hint(args, expected):
    code, _, stderr = run_main(*args)
    assert one_error_line(code, stderr) == expected


def test_usage_error_of_the_real_process_has_no_panel():
    result = subprocess.run([sys.executable, "-m", "nanocli.cli", "pretrain", "--lr", "abc"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT, env={"PATH": "", "PYTHONPATH": str(ROOT), "COLUMNS": "80"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: --lr abc: not a number; see `nano pretrain --help`\n"


def test_eval_difficulty_names_the_flag_and_the_range():
    line = one_error_line(*run_main("eval", "-m", "x", "--difficulty", "7")[::2])
    assert line == "error: --difficulty 7: must be 1..5 or a range lo-hi within it"
    assert "(7, 7)" not in line
    assert "--tasks foo: unknown task 'foo'" in one_error_line(*run_main("eval", "-m", "x", "--tasks", "foo")[::2])


def model_dir(path: Path, weights: bool = True) -> Path:
    """A directory with the tiny profile's config.json (and, with ``weights``, a stand-in model.safetensors)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(load_model_profile("tiny").config.to_json_string())
    if weights:
        header = json.dumps({"__metadata__": {}}).encode()
        (path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return path


@pytest.mark.parametrize("command", [["generate", "hi"], ["eval"], ["fit-check"], ["info"]])
def test_a_weights_file_given_as_the_model_says_pass_its_directory(tmp_path, command):
    weights = model_dir(tmp_path / "model") / "model.safetensors"
    args = [command[0], "-m", str(weights), *command[1:]]
    line = one_error_line(*run_main(*args)[::2])
    assert "codec" not in line and "utf-8" not in line
    assert f"{weights}: this is a weights file, not a model; pass its directory ({weights.parent})" in line


def test_a_checkpoint_without_weights_says_so_not_pickle(tmp_path):
    ckpt = model_dir(tmp_path / "ckpt", weights=False)
    (ckpt / "trainer_state.pt").write_bytes(b"\x80\x04 nano's optimizer state")
    line = one_error_line(*run_main("generate", "-m", str(ckpt), "hi")[::2])
    assert f"no safetensors weights in {ckpt}" in line and "pickle" not in line


def test_a_run_whose_newest_checkpoint_has_no_weights_points_at_those_that_do(tmp_path):
    run = tmp_path / "run"
    model_dir(run / "checkpoint-2")
    newest = model_dir(run / "checkpoint-4", weights=False)
    (newest / "trainer_state.pt").write_bytes(b"\x80\x04")
    for target in (run, newest):
        line = one_error_line(*run_main("eval", "-m", str(target))[::2])
        assert f"no safetensors weights in {newest}" in line
        assert f"checkpoints of this run with weights: {run / 'checkpoint-2'}" in line
    (run / "checkpoint-2" / "model.safetensors").unlink()
    line = one_error_line(*run_main("eval", "-m", str(run))[::2])
    assert f"none of {run} has weights" in line


def test_the_library_does_not_take_trainer_state_for_pickle_weights(tmp_path):
    from nanocli_model.checkpoint import weight_files
    from nanocli_model.errors import CheckpointError

    (tmp_path / "trainer_state.pt").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match=f"no safetensors weights in {tmp_path}"):
        weight_files(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        weight_files(tmp_path)


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_an_empty_data_file_is_named(tmp_path, name):
    data = tmp_path / name
    data.write_text("\n\n")
    code, _, stderr = run_main("pretrain", "--profile", "tiny", "--data", str(data), "--out", str(tmp_path / "run"),
                               "--steps", "1", "--seq-len", "16", "--global-batch", "2", "--precision", "fp32",
                               "--cache-dir", str(tmp_path / "cache"))
    line = stderr.strip().splitlines()[-1]  # after the progress widget's status lines
    assert code == 2 and line.startswith("error: ") and str(data) in line and "has no documents" in line
    assert not (tmp_path / "run").exists()


def test_a_renamed_flag_still_works_and_warns_once():
    code, _, stderr = run_main("prune", "-m", "tiny", "--dry-run", "--target-params", "200000", "--top-k", "0",
                               "--top-k", "0")
    lines = stderr.strip().splitlines()
    assert code == 2 and lines == ["warning: --top-k is deprecated in nano prune; use --distill-candidates",
                                   "error: --distill-candidates must be at least 1, got 0"], stderr
    code, _, stderr = run_main("eval", "-m", "x", "--out", "x.json", "--problems", "0")
    assert stderr.splitlines()[0] == "warning: --out is deprecated in nano eval; use --output"
