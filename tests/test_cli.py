"""The ``nano`` command, run as a real process: help, profiles, info, the library check, one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

# The shipped profiles, a fixed terminal width (rich wraps tables at the width it finds).
ENV = {**{k: v for k, v in os.environ.items() if k != "NANO_PROFILES_DIR"}, "COLUMNS": "100"}
STAGE_COMMANDS = ["pretrain", "align", "prune", "distill", "fit-check", "generate"]  # the pipeline's stages


def nano(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m nanocli.cli ARGS`` (the same ``main()`` as the ``nano`` console script)."""
    return subprocess.run([sys.executable, "-m", "nanocli.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**ENV, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_help_lists_the_six_stage_commands():
    result = nano("--help")
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"^│ ([a-z][a-z-]*) ", result.stdout, flags=re.M)  # the names in the Commands panel
    assert sorted(listed) == sorted([*STAGE_COMMANDS, "profiles", "info", "demo", "eval", "bench"])


def test_version():
    result = nano("--version")
    assert result.returncode == 0 and result.stdout.startswith("nano 0.")


def test_stage_command_help_works():
    for command in STAGE_COMMANDS:
        result = nano(command, "--help")
        assert result.returncode == 0 and "Usage: nano " + command in result.stdout, result.stderr
    assert "Minitron" in nano("prune", "--help").stdout


def test_profiles_table():
    result = nano("profiles")
    assert result.returncode == 0, result.stderr
    for text in ["nemotron-nano-9b-v2", "nemotron-nano-12b-v2-base", "tiny", "27/25/4", "8.89B", "16.56 GiB",
                 "a10g", "19.66", "rtx-4090", "24 GB", "65 fp16"]:
        assert text in result.stdout


def test_profiles_without_the_profiles_folder_is_an_error_not_empty_tables(tmp_path):
    """An install without its package data once listed nothing, with exit 0: now one error line."""
    missing = assert_one_line_error(nano("profiles", env={"NANO_PROFILES_DIR": str(tmp_path / "nowhere")}))
    assert f"no model profiles: {tmp_path / 'nowhere' / 'models'} is missing" in missing
    assert "NANO_PROFILES_DIR" in missing
    (tmp_path / "models").mkdir()
    (tmp_path / "gpus").mkdir()
    empty = assert_one_line_error(nano("profiles", env={"NANO_PROFILES_DIR": str(tmp_path)}))
    assert "holds no .yaml files" in empty


def test_info_profile_shows_exact_params():
    result = nano("info", "nemotron-nano-9b-v2")
    assert result.returncode == 0, result.stderr
    assert "8,888,227,328" in result.stdout
    assert "147,450,624" in result.stdout  # one Mamba layer (docs/REFERENCE.md)
    assert "2.00 GiB" in result.stdout  # KV cache at 128k


def test_info_model_directory(tmp_path):
    from nanocli.profiles import load_model_profile

    (tmp_path / "config.json").write_text(load_model_profile("tiny").config.to_json_string())
    result = nano("info", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "330,720" in result.stdout


def test_info_kernels_says_what_runs_and_why():
    # `make install` puts mamba-ssm's Triton ops in the venv; causal-conv1d needs CUDA to build and is absent
    result = nano("info", "--kernels")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "scan/step mamba-ssm 2.3.2.post1 (Triton)" in text
    assert "conv pure PyTorch (causal-conv1d not importable" in text
    assert "no CUDA GPU is visible here" in text
    assert "give a model" in assert_one_line_error(nano("info"))


def test_info_missing_path_is_one_line_error():
    line = assert_one_line_error(nano("info", "/nonexistent"))
    assert "/nonexistent" in line


def test_info_unknown_profile_lists_profiles():
    assert "nemotron-nano-9b-v2" in assert_one_line_error(nano("info", "no-such-model"))


def test_info_malformed_config_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64,\n  oops }\n')
    line = assert_one_line_error(nano("info", str(tmp_path)))
    assert "config.json" in line and "not valid JSON" in line


def test_info_invalid_config_value_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": -1, "hybrid_override_pattern": "M-*"}')
    assert "hidden_size" in assert_one_line_error(nano("info", str(tmp_path)))


def test_demo_library_check_runs_the_model_library_on_every_profile(tmp_path):
    out = tmp_path / "demo-model"
    result = nano("demo", "--library-check", "--profile", "tiny", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "tiny" in result.stdout
    for text in ["330,720", "bit-exact", "max rel err", "tok/s", "= memory.cache_bytes"]:
        assert text in result.stdout
    assert "FAILED" not in result.stdout
    assert (out / "config.json").is_file()
    for text in ["nemotron-nano-9b-v2", "nemotron-nano-12b-v2-base", "a10g", "19.66", "t4"]:  # every profile loaded
        assert text in result.stdout
    assert "not built yet" not in result.stdout and "stages to come" not in result.stdout
