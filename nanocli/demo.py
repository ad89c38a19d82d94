"""``nano demo`` (``make demo``): the report's pipeline in miniature, from one recipe, on a laptop CPU.

``nanocli/profiles/recipes/demo.yaml`` names the output folder and one section per stage, in order::

    pretrain -> sft -> grpo (or dpo) -> prune -> distill

Each section holds the settings of that stage's options dataclass (validated as any recipe is); the
pipeline fills in the links: the aligned stages read the previous stage's ``final``, prune cuts the
aligned model (the teacher) to the recipe's memory budget, distill trains the pruned student from that
teacher. Every stage writes ordinary checkpoints under ``OUT/<stage>/``; a rerun resumes an interrupted
stage (``--resume auto``) and skips a finished one; ``fresh=True`` starts over.

After the stages: every model is evaluated the same way (``nano eval``'s held-out accuracy with reasoning
on and off, and a thinking-budget sweep on the final model), ``nano fit-check`` runs on the released
Nemotron-Nano profiles against the recipe's GPU, and the final model answers one question with
``nano generate``. ``run`` returns all of it (``DemoResult``); ``commands/demo.py`` renders it. The run reports
through the ``report.Reporter`` it is given: a ``section`` per stage, the same reporter passed into the stage.

``nano demo --library-check`` (the model library alone, on one profile) is ``library_check.py``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanocli_model.errors import ConfigError, NanoError

from .report import SILENT, Reporter

DEFAULT_RECIPE = "demo"
ALIGN_METHODS = ("sft", "dpo", "grpo")
ORDER = ("pretrain", "sft", "grpo", "dpo", "prune", "distill")  # the sections a demo recipe may hold, in order
TOP_LEVEL = ("stage", "description", "out", "eval", "fit_check", "generate")


class DemoError(NanoError):
    """A demo stage failed or the demo recipe is wrong."""


class DemoInterrupted(DemoError):
    """A stage stopped on Ctrl-C / SIGTERM after writing its checkpoint: a rerun resumes it. ``exit_code`` is
    128 + the signal that stopped the stage (130 / 143), as for the training commands."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


# ------------------------------------------------------------------------------------------ the recipe
@dataclass
class Section:
    name: str  # pretrain | sft | grpo | dpo | prune | distill
    kind: str  # pretrain | align | prune | distill
    settings: dict[str, Any]  # validated fields of the stage's options (links not included)


@dataclass
class DemoRecipe:
    path: Path
    description: str
    out: Path
    sections: list[Section]
    eval: dict[str, Any]  # EvalOptions fields (model excluded); budgets as a list
    fit_check: dict[str, Any]  # {gpu, context, models: [...]}
    generate: dict[str, Any]  # {prompt, ...GenerateOptions fields}


def _kind(name: str) -> str:
    return "align" if name in ALIGN_METHODS else name


def options_class(kind: str) -> type:
    """The options dataclass of a stage kind (pretrain, align, prune, distill)."""
    if kind == "pretrain":
        from .stages.pretrain import PretrainOptions as cls
    elif kind == "align":
        from .stages.align import AlignOptions as cls
    elif kind == "prune":
        from .stages.prune import PruneOptions as cls
    else:
        from .stages.distill import DistillOptions as cls
    return cls


LINKS = {"pretrain": ("out", "resume"), "align": ("model", "out", "resume", "method"),
         "prune": ("model", "out"), "distill": ("teacher", "student", "out", "resume")}


def read(name_or_path: str = DEFAULT_RECIPE, out: str | None = None) -> DemoRecipe:
    """Read and validate a demo recipe (every section against its stage's options)."""
    from .train.recipe import apply_recipe, read_recipe

    path, raw = read_recipe(name_or_path)
    if raw.get("stage") != "demo":
        raise ConfigError(f"{path}: not a demo recipe (it needs `stage: demo`)")
    unknown = [k for k in raw if k not in TOP_LEVEL and k not in ORDER]
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r}; a demo recipe has {', '.join(ORDER)} "
                          f"and {', '.join(TOP_LEVEL[2:])}")
    names = [n for n in ORDER if n in raw]
    for required in ("pretrain", "sft", "prune", "distill"):
        if required not in names:
            raise ConfigError(f"{path}: the demo needs a `{required}:` section")
    sections = []
    for name in names:
        body = raw[name] or {}
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: `{name}:` must be a mapping of settings")
        kind = _kind(name)
        linked = [k for k in body if k in LINKS[kind]]
        if linked:
            raise ConfigError(f"{path}: {name}.{linked[0]} is set by the pipeline; remove it")
        settings = apply_recipe(options_class(kind), body, path, kind)
        if kind == "align":
            settings["method"] = name
        sections.append(Section(name, kind, settings))
    return DemoRecipe(path=path, description=str(raw.get("description", "")), out=Path(out or raw.get("out", "runs/demo")),
                      sections=sections, eval=_checked(raw, "eval", path), fit_check=_checked(raw, "fit_check", path),
                      generate=_checked(raw, "generate", path))


def _checked(raw: dict, name: str, path: Path) -> dict:
    """The eval / fit_check / generate section, its keys and types checked like a stage's settings."""
    from .stages.evaluate import EvalOptions
    from .stages.generate import GenerateOptions
    from .train.recipe import check_type

    body = raw.get(name) or {}
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: `{name}:` must be a mapping of settings")
    own = {"eval": {"context": int}, "fit_check": {"gpu": str, "context": int, "models": list[str]},
           "generate": {"prompt": str}}[name]
    options = {"eval": EvalOptions, "fit_check": None, "generate": GenerateOptions}[name]
    hints = typing.get_type_hints(options) if options else {}
    allowed = {**{k: v for k, v in hints.items() if k != "model"}, **own}
    for key, value in body.items():
        if key not in allowed:
            raise ConfigError(f"{path}: unknown setting {name}.{key}; valid: {', '.join(sorted(allowed))}")
        body[key] = check_type(value, allowed[key], f"{path}: {name}.{key}")
    return dict(body)


# ------------------------------------------------------------------------------------------ results
@dataclass
class StageRun:
    name: str
    kind: str
    out: Path
    model: Path  # the checkpoint this stage produced
    status: str  # ran | resumed | done before
    seconds: float
    result: Any = None  # the stage's own result (None when skipped)


@dataclass(frozen=True)
class Score:
    """One accuracy of ``nano eval`` as the summary shows it (read from the evaluation's JSON record)."""

    accuracy: float  # share of exact answers
    n: int  # held-out problems asked
    tokens_per_s: float = 0.0  # generated tokens / s (batched, greedy)
    budget: int | None = None  # the thinking budget (a point of the sweep)

    @classmethod
    def of(cls, record: dict) -> Score:
        return cls(float(record["accuracy"]), int(record["n"]), float(record.get("tokens_per_s", 0.0)),
                   record.get("budget"))


@dataclass
class ModelRow:
    """One line of the summary table: a model the pipeline produced, measured the same way as the others."""

    label: str  # e.g. "base"
    path: Path
    params: int
    memory: int  # bytes at the recipe's context (fit-check's model: weights + KV + state + activations)
    accuracy: dict[str, Score]  # mode (think, no_think) -> its score
    text_accuracy: Score | None = None  # the base model asked in its pretraining format (nano eval --prompt-format text)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens / s over the reasoning-on evaluation (batched, greedy)."""
        think = self.accuracy.get("think") or next(iter(self.accuracy.values()), None)
        return think.tokens_per_s if think else 0.0


@dataclass
class DemoResult:
    recipe: DemoRecipe
    stages: list[StageRun] = field(default_factory=list)
    rows: list[ModelRow] = field(default_factory=list)
    sweep: list[Score] = field(default_factory=list)  # final model: accuracy vs thinking budget
    fits: list = field(default_factory=list)  # FitCheckResult per released profile
    sample: Any = None  # GenerateResult of the closing example
    sample_prompt: str = ""
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------ run
def run(recipe: DemoRecipe, fresh: bool = False, reporter: Reporter | None = None) -> DemoResult:
    """Every stage in order (a ``reporter.section`` each), then the measurements and the closing answer."""
    reporter = reporter or SILENT
    t0 = time.perf_counter()
    if fresh and recipe.out.exists():
        reporter.status(f"--fresh: removing {recipe.out}")
        shutil.rmtree(recipe.out)
    recipe.out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(recipe=recipe)
    done: dict[str, Path] = {}
    for i, section in enumerate(recipe.sections, 1):
        reporter.section(f"stage {i}/{len(recipe.sections)}: {section.name} (nano {section.kind})")
        result.stages.append(_run_stage(section, recipe.out, done, reporter))
        done[section.name] = result.stages[-1].model
    reporter.section("measuring every model")
    _evaluate(recipe, result, done, reporter)
    result.fits = _fit_checks(recipe, reporter)
    result.sample_prompt, result.sample = _sample(recipe, done["distill"], reporter)
    result.seconds = time.perf_counter() - t0
    return result


def _teacher(done: dict[str, Path]) -> Path:
    """The aligned model: the last alignment stage that ran."""
    return [p for n, p in done.items() if n in ALIGN_METHODS][-1]


def _run_stage(section: Section, root: Path, done: dict[str, Path], reporter: Reporter) -> StageRun:
    out = root / section.name
    t0 = time.perf_counter()
    try:
        run_ = {"pretrain": _pretrain, "align": _align, "prune": _prune, "distill": _distill}[section.kind]
        status, model, res = run_(section, out, done, reporter)
        if status == "done before":
            reporter.status(f"finished in an earlier run: {model} (rerun from scratch with --fresh)")
    except DemoInterrupted:
        raise
    except NanoError as e:
        raise DemoError(f"demo stage {section.name} failed: {e}") from None
    return StageRun(section.name, section.kind, out, model, status, time.perf_counter() - t0, res)


def _status(res, resumed: bool) -> str:
    if getattr(res, "already_done", False):
        return "done before"
    return "resumed" if resumed else "ran"


def _pretrain(section: Section, out: Path, done: dict, reporter: Reporter):
    from .stages import pretrain as pt

    resumed = any(out.glob("checkpoint-*"))
    res = pt.run(pt.PretrainOptions(**section.settings, out=str(out), resume="auto"), reporter)
    _check_finished(res, section.name)
    return _status(res, resumed), out / "final", res


def _align(section: Section, out: Path, done: dict, reporter: Reporter):
    from .stages import align as al

    model = list(done.values())[-1]
    resumed = any(out.glob("checkpoint-*"))
    res = al.run(al.AlignOptions(**section.settings, model=str(model), out=str(out), resume="auto"),
                 reporter)
    _check_finished(res, section.name)
    return _status(res, resumed), out / "final", res


def _prune(section: Section, out: Path, done: dict, reporter: Reporter):
    from .stages import prune as pr

    if (out / "pruning.json").is_file() and (out / "config.json").is_file():
        return "done before", out, None
    res = pr.run(pr.PruneOptions(**section.settings, model=str(_teacher(done)), out=str(out)), reporter)
    return "ran", out, res


def _distill(section: Section, out: Path, done: dict, reporter: Reporter):
    from .stages import distill as ds

    resumed = any(out.glob("checkpoint-*"))
    res = ds.run(ds.DistillOptions(**section.settings, teacher=str(_teacher(done)), student=str(done["prune"]),
                                   out=str(out), resume="auto"), reporter)
    _check_finished(res, section.name)
    return _status(res, resumed), out / "final", res


def _check_finished(res, name: str) -> None:
    if getattr(res, "interrupted", False):
        raise DemoInterrupted(f"demo stage {name} was interrupted; its checkpoint is kept: run `make demo` "
                              "again to resume", getattr(res, "signal", None) or signal.SIGINT)


# ------------------------------------------------------------------------------------------ measure
LABELS = {"pretrain": "base", "sft": "SFT", "grpo": "GRPO (teacher)", "dpo": "DPO (teacher)", "prune": "pruned",
          "distill": "distilled"}


def _evaluate(recipe: DemoRecipe, result: DemoResult, done: dict[str, Path], reporter: Reporter) -> None:
    """Every model, measured the same way; cached beside the model (``demo-eval.json``) for reruns."""
    from nanocli_model import NanoConfig, fit

    from .stages import evaluate as ev

    settings = {k: v for k, v in recipe.eval.items() if k not in ("budgets", "context")}
    budgets = tuple(recipe.eval.get("budgets", ()))
    context = int(recipe.eval.get("context", 131072))
    rows = [(LABELS[st.name], st.model) for st in result.stages]
    for i, (label, path) in enumerate(rows):
        last = i == len(rows) - 1
        base = i == 0 and result.stages[0].kind == "pretrain"
        key = {**settings, "budgets": list(budgets) if last else [], "text_format": base}
        cache = path / "demo-eval.json"
        record = json.loads(cache.read_text()) if cache.is_file() else None
        if record is None or record.get("settings") != key:
            reporter.status(f"evaluating {label}: {path}")
            options = ev.EvalOptions(model=str(path), budgets=budgets if last else (), **settings)
            t0 = time.perf_counter()
            r = ev.run(options)
            record = {"settings": key, "result": r.to_json(), "seconds": time.perf_counter() - t0}
            if base:  # a base model does not know the chat template yet: also ask it the way it was trained
                text = ev.run(dataclasses.replace(options, prompt_format="text"))
                record["text"] = text.accuracy["text"].to_json()
            tmp = cache.with_name(".demo-eval.json.tmp")
            tmp.write_text(json.dumps(record, indent=2))
            tmp.replace(cache)
        r = record["result"]
        config = NanoConfig.from_json_file(path / "config.json")
        text = record.get("text")
        result.rows.append(ModelRow(label, path, r["params"], fit.estimate(config, context=context).total,
                                    {mode: Score.of(a) for mode, a in r["accuracy"].items()},
                                    None if text is None else Score.of(text)))
        if last:
            result.sweep = [Score.of(a) for a in r["budget_sweep"]]


def _fit_checks(recipe: DemoRecipe, reporter: Reporter) -> list:
    from .stages import fit_check as fc

    f = recipe.fit_check
    if not f:
        return []
    reporter.status("fit-check on the released models")
    return [fc.run(fc.FitCheckOptions(model=m, gpu=f.get("gpu", "a10g"), context=int(f.get("context", 131072))))
            for m in f.get("models", [])]


def _sample(recipe: DemoRecipe, model: Path, reporter: Reporter):
    from .stages import generate as gen

    g = dict(recipe.generate)
    prompt = str(g.pop("prompt", "What is 38 + 47?"))
    options = gen.GenerateOptions(model=str(model), **{"temperature": 0.0, "max_new_tokens": 200, **g})
    reporter.status(f"nano generate --model {model} --think {prompt!r}")
    return prompt, gen.run(options, [prompt])
