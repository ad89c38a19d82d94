"""nano demo's pipeline: the recipe is validated section by section, the stages chain their checkpoints,
every model is measured, a rerun skips finished stages, and a failing stage stops with its own error."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nanocli import demo
from nanocli.report import Silent
from nanocli_model import NanoConfig
from nanocli_model.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "nanocli" / "profiles" / "recipes" / "demo-smoke.yaml"
TINY = yaml.safe_load(SMOKE.read_text())  # the shipped smoke recipe: every stage at toy size


def write(tmp: Path, recipe: dict, name: str = "r.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("change, words", [
    (lambda r: r.pop("prune"), "needs a `prune:` section"),
    (lambda r: r["sft"].update(model="x"), "sft.model is set by the pipeline"),
    (lambda r: r.update(quantize={}), "unknown section 'quantize'"),
    (lambda r: r.update(stage="pretrain"), "not a demo recipe"),
    (lambda r: r["distill"].update(stepz=3), "unknown setting 'stepz'"),
    (lambda r: r["pretrain"].update(steps="many"), "steps"),
    (lambda r: r["eval"].update(problemz=3), "unknown setting eval.problemz"),
    (lambda r: r["eval"].update(budgets="8,16"), "eval.budgets"),
    (lambda r: r["fit_check"].update(models="nemotron-nano-9b-v2"), "fit_check.models"),
    (lambda r: r["generate"].update(temperature="hot"), "generate.temperature"),
])
def test_recipe_errors_name_the_section_and_key(tmp_path, change, words):
    recipe = json.loads(json.dumps(TINY))
    change(recipe)
    with pytest.raises(ConfigError, match=words):
        demo.read(str(write(tmp_path, recipe)))


def test_shipped_demo_recipe_reads_in_stage_order():
    r = demo.read("demo")
    assert [s.name for s in r.sections] == ["pretrain", "sft", "grpo", "prune", "distill"]
    assert r.sections[0].settings["profile"] == "demo" and r.out == Path("runs/demo")


class Recorder(Silent):
    """A reporter that keeps the sections and status lines of a run."""

    def __init__(self):
        self.sections, self.said = [], []

    def section(self, title: str) -> None:
        self.sections.append(title)

    def status(self, message: str) -> None:
        self.said.append(message)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    recipe = demo.read("demo-smoke", out=str(tmp / "runs"))
    told = Recorder()
    return recipe, demo.run(recipe, reporter=told), told


def test_stages_chain_their_checkpoints_and_every_model_is_measured(demo_run):
    recipe, r, told = demo_run
    assert [s.name for s in r.stages] == ["pretrain", "sft", "grpo", "prune", "distill"]
    assert told.sections[:5] == [f"stage {i}/5: {name} (nano {kind})" for i, (name, kind) in enumerate(
        [("pretrain", "pretrain"), ("sft", "align"), ("grpo", "align"), ("prune", "prune"), ("distill", "distill")], 1)]
    assert any(m.startswith("importance:") for m in told.said)  # the prune stage reports through the same reporter
    assert all(s.status == "ran" for s in r.stages)
    for s in r.stages:
        assert (s.model / "config.json").is_file() and (s.model / "tokenizer.json").is_file(), s.name
    for stage, parent in (("sft", "pretrain"), ("grpo", "sft")):  # each aligned the previous stage's model
        hp = yaml.safe_load((recipe.out / stage / "final" / "hyperparameters.yaml").read_text())
        assert Path(hp["model"]) == recipe.out / parent / "final"
    hp = yaml.safe_load((recipe.out / "distill" / "final" / "hyperparameters.yaml").read_text())
    assert (Path(hp["teacher"]), Path(hp["student"])) == (recipe.out / "grpo" / "final", recipe.out / "prune")
    pruned = NanoConfig.from_json_file(recipe.out / "prune" / "config.json")
    assert (pruned.hidden_size, pruned.intermediate_size, pruned.num_hidden_layers) == (48, 192, 7)
    assert json.loads((recipe.out / "prune" / "pruning.json").read_text())
    assert [row.label for row in r.rows] == ["base", "SFT", "GRPO (teacher)", "pruned", "distilled"]
    assert r.rows[0].text_accuracy.n == 2 and all(row.text_accuracy is None for row in r.rows[1:])
    assert r.rows[3].params < r.rows[2].params and r.rows[3].memory < r.rows[2].memory
    assert r.rows[4].params == r.rows[3].params
    for row in r.rows:
        assert set(row.accuracy) == {"think", "no_think"} and row.accuracy["think"].n == 2
        assert all(0.0 <= a.accuracy <= 1.0 for a in row.accuracy.values()) and row.tokens_per_s > 0
    assert [a.budget for a in r.sweep] == [4]
    assert r.fits and r.fits[0].model.name == "nemotron-nano-9b-v2" and r.fits[0].fits
    assert r.sample is not None and r.sample.outputs[0].generated_ids


def test_rerun_skips_finished_stages_and_reuses_the_evaluations(demo_run):
    recipe, first, _ = demo_run
    before = {p: p.stat().st_mtime_ns for p in recipe.out.rglob("*.safetensors")}
    told = Recorder()
    again = demo.run(recipe, reporter=told)
    assert [s.status for s in again.stages] == ["done before"] * 5
    assert sum(m.startswith("finished in an earlier run") for m in told.said) == 5
    assert {p: p.stat().st_mtime_ns for p in recipe.out.rglob("*.safetensors")} == before
    assert [row.accuracy for row in again.rows] == [row.accuracy for row in first.rows]


def test_a_failing_stage_stops_the_demo_with_its_own_error(demo_run, tmp_path):
    import shutil

    done, _, _ = demo_run
    for stage in ("pretrain", "sft", "grpo"):  # finished stages are found and skipped
        shutil.copytree(done.out / stage, tmp_path / "runs" / stage)
    recipe = json.loads(json.dumps(TINY))
    recipe["prune"]["hidden_size"] = 4096  # larger than the model
    path = write(tmp_path, recipe)
    p = subprocess.run([sys.executable, "-m", "nanocli.cli", "demo", "--recipe", str(path), "--out",
                        str(tmp_path / "runs")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: demo stage prune failed:") and "Traceback" not in p.stderr
    assert (tmp_path / "runs" / "grpo" / "final" / "config.json").is_file()  # earlier stages are kept
    assert not (tmp_path / "runs" / "prune").exists() or not any((tmp_path / "runs" / "prune").iterdir())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_stage_exits_128_plus_its_signal(sig, tmp_path, monkeypatch, capsys):
    """A stage stopped by a signal (its result says which) ends ``nano demo`` with 128 + that signal, as the
    training commands do: 130 for SIGINT, 143 for SIGTERM; one error line, and no later stage runs."""
    from nanocli import cli
    from nanocli.stages import align, pretrain

    def stopped(options, reporter=None, plan=None):
        return pretrain.PretrainResult(plan=None, interrupted=True, signal=int(sig))

    def not_reached(*args, **kwargs):
        raise AssertionError("the stage after the interrupted one ran")

    monkeypatch.setattr(pretrain, "run", stopped)
    monkeypatch.setattr(align, "run", not_reached)
    monkeypatch.setattr("sys.argv", ["nano", "demo", "--recipe", str(SMOKE), "--out", str(tmp_path / "runs")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 128 + sig, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: demo stage pretrain was interrupted") and "Traceback" not in err
