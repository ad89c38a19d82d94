"""``nano pretrain`` says how big each data source is and how many epochs the run reads of it (issue #19), and
warns in one line when a small source repeats more than 10 times. Through the command line, in process."""

from __future__ import annotations

import re

import pytest

from nanocli.cli import main
from nanocli.train.tokens import MANY_EPOCHS
from nanocli.ui import human_count


def pretrain(capsys, tiny_base, out, data, steps) -> tuple[str, str]:
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--profile", "tiny", "--data", str(data), "--tokenizer", str(tiny_base.parent / "tokenizer"),
              "--cache-dir", str(out.parent / "cache"), "--seq-len", "64", "--global-batch", "8", "--precision", "fp32",
              "--steps", str(steps), "--heldout-fraction", "0", "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert e.value.code == 0, stderr
    return stdout, stderr


def test_a_small_file_read_many_times_is_counted_and_warned_about(tiny_base, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("The cat sat on the mat. The dog ran in the park. A bird sang a song.\n" * 20)
    out, err = pretrain(capsys, tiny_base, tmp_path / "run", small, 20)
    line = re.search(r"^data: small: ([\d,]+) tokens in ([\d,]+) training windows of 64; the run's 20 steps read "
                     r"160 windows = ([\d.]+) epochs$", err, re.M)
    assert line, err
    tokens, windows, epochs = int(line[1].replace(",", "")), int(line[2].replace(",", "")), float(line[3])
    assert windows == (tokens - 1) // 64 and epochs == pytest.approx(160 / windows, abs=0.005)
    assert epochs > MANY_EPOCHS
    warning = [ln for ln in err.splitlines() if ln.startswith("warning: small repeats")]
    assert len(warning) == 1 and f"repeats {epochs:.1f} times" in warning[0], err
    assert re.search(rf"data: small\s+{human_count(tokens)} tokens, {epochs:.2f} epochs over the run \(more than 10: repeated\)", out), out


def test_a_source_read_less_than_ten_times_gets_no_warning(tiny_base, tmp_path, capsys):
    out, err = pretrain(capsys, tiny_base, tmp_path / "run", "synthetic:reasoning?docs=300&difficulty=1-2", 4)
    assert re.search(r"^data: synthetic: [\d,]+ tokens in [\d,]+ training windows of 64; the run's 4 steps read 32 "
                     r"windows = 0\.\d\d epochs$", err, re.M), err
    assert "warning:" not in err
    assert re.search(r"data: synthetic\s+[\d.]+K tokens, 0\.\d\d epochs over the run *\n", out), out
