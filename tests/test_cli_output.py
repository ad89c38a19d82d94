"""What the commands print (issue #19, item 7): ``--json`` is one line and ``--json-indent N`` indents it with
flat lists on one line, for every command that prints JSON; plots count steps and tokens in whole numbers with
a y range set by the data; ``nano bench``'s tables show every number whole at 80 columns."""

from __future__ import annotations

import json
import math
import sys

import pytest

from nanocli import cli, plot
from nanocli.commands.output import dumps


def main_in_process(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["nano", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dumps_is_one_line_or_indented_with_flat_lists_on_one_line():
    value = {"ids": [[1, 2, 3], [4, 5]], "terms": {"kv": 2, "layers": {"mamba": [1, 2]}}, "notes": [], 7: None}
    assert dumps(value) == json.dumps(value)
    text = dumps(value, 2)
    assert json.loads(text) == json.loads(json.dumps(value))
    assert "    [1, 2, 3],\n    [4, 5]\n" in text and '"mamba": [1, 2]' in text and '"notes": []' in text
    assert text.splitlines()[1] == '  "ids": ['


@pytest.mark.parametrize("indent", [None, 0, 4])
def test_fit_check_json_is_one_line_and_json_indent_is_for_people(capsys, monkeypatch, indent):
    flags = ["--json"] if indent is None else ["--json-indent", str(indent)]  # --json-indent implies --json
    code, out, err = main_in_process(capsys, monkeypatch, "fit-check", "-m", "tiny", "--gpu", "a10g", *flags)
    assert code == 0, err
    data = json.loads(out)
    assert data["verdict"] == "FITS"
    lines = out.strip().splitlines()
    if indent is None:
        assert len(lines) == 1
    else:
        assert len(lines) > 10 and lines[1].startswith(" " * indent + '"model"')
        assert any(line.strip().startswith('"notes": [') for line in lines)


def test_json_indent_must_not_be_negative(capsys, monkeypatch):
    code, _, err = main_in_process(capsys, monkeypatch, "fit-check", "-m", "tiny", "--gpu", "a10g", "--json-indent",
                                   "-1")
    assert code == 2 and err.strip() == "error: --json-indent must be at least 0, got -1"


def test_loss_range_ignores_a_spike_and_non_finite_losses_but_keeps_the_curves():
    losses = [5.0, 4.0, 3.5, 3.0] + [2.5] * 60 + [90.0, math.nan, math.inf]
    lo, hi = plot.loss_range(losses, keep=[4.5, 2.6])
    assert 2.3 < lo < 2.5 and 4.5 < hi < 5.0  # 90 does not flatten the curve; 4.5 (a kept curve) is in range
    assert plot.loss_range([], keep=[]) == (0.0, 1.0)
    assert plot.loss_range([3.0], keep=[]) == (2.5, 3.5)


def test_loss_plot_counts_steps_in_whole_numbers(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its axes
    metrics = [{"step": s, "loss": 4.0 - 0.3 * s, "lr": 1e-3} for s in range(1, 8)] + [{"step": 7, "eval_loss": 2.5}]
    path = plot.plot_loss(metrics, tmp_path / "loss.png", title="nano pretrain: runs/x")
    assert path.read_bytes()[:4] == b"\x89PNG"
    ax = figures[0].axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert ax.get_title() == "nano pretrain: runs/x: steps 1-7"
    assert ax.get_ylim()[0] >= 0 and ax.get_ylim()[1] < 4.5


def test_bench_tables_show_every_number_whole_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = main_in_process(capsys, monkeypatch, "bench", "-m", "tiny", "--quick", "--lengths", "2k:4,8:8",
                                     "--threads", "1")
    assert code == 0, err
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    for header in ("prefill", "decode", "output", "ratio", "cache", "transformer"):
        assert header in out
    rows = [line.split() for line in out.splitlines() if line.split()[:2] in (["2048:4", "hybrid"],
                                                                              ["transformer", "1"])]
    assert rows and all(len(r) >= 6 for r in rows), out
