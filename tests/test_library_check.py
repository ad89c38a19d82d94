"""``nano demo --library-check``: build, save/reload, prefill + greedy decode on the ``tiny`` profile, its checks."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from nanocli import cli, library_check
from nanocli.profiles import load_model_profile
from nanocli_model import memory


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> library_check.ModelRun:
    return library_check.run_model("tiny", tmp_path_factory.mktemp("library-check") / "model")


def test_tiny_run_passes_every_check(tiny_run):
    config = load_model_profile("tiny").config
    r = tiny_run
    assert r.passed and r.failures == []
    assert r.params == r.expected_params == memory.param_count(config).total == 330_720
    assert r.bit_exact is True
    assert 0.0 <= r.max_rel_err < 1e-4
    assert r.max_len == r.prompt_len + r.new_tokens == 256 + 64
    assert r.cache_bytes == r.expected_cache_bytes == memory.cache_bytes(config, 1, r.max_len, "fp32").total
    assert len(r.generated) == r.new_tokens and all(0 <= t < config.vocab_size for t in r.generated)
    assert r.prefill_seconds > 0 and r.decode_seconds > 0 and r.prefill_tok_s > 0 and r.decode_tok_s > 0
    assert (r.out_dir / "config.json").is_file() and (r.out_dir / "model.safetensors").is_file()
    library_check.check(r)  # does not raise


@pytest.mark.parametrize("change, words", [
    (dict(bit_exact=False), "not bit-exact"),
    (dict(max_rel_err=3e-3), "3.00e-03"),
    (dict(max_rel_err=float("nan")), "nan"),
    (dict(cache_bytes=1), "memory.cache_bytes"),
    (dict(params=7), "memory.param_count"),
])
def test_failed_check_raises_one_line(tiny_run, change, words):
    bad = dataclasses.replace(tiny_run, **change)
    assert not bad.passed
    with pytest.raises(library_check.LibraryCheckError, match="library check failed on profile tiny") as info:
        library_check.check(bad)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code != 0


def test_cli_exits_non_zero_with_one_line_when_a_check_fails(tiny_run, monkeypatch, capsys):
    bad = dataclasses.replace(tiny_run, bit_exact=False)
    monkeypatch.setattr(library_check, "run_model", lambda profile, out: bad)
    monkeypatch.setattr(sys, "argv", ["nano", "demo", "--library-check", "--profile", "tiny", "--out", str(tiny_run.out_dir)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == library_check.LibraryCheckError.exit_code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: library check failed") and "bit-exact" in err[0]


def test_unknown_profile_is_a_nano_error(tmp_path):
    with pytest.raises(library_check.NanoError, match="no-such-profile"):
        library_check.run_model("no-such-profile", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_default_out_is_relative_runs_dir():
    assert library_check.DEFAULT_OUT == Path("runs/demo-model") and library_check.DEFAULT_PROFILE == "small"
