"""Resuming a run from its own settings: ``nano pretrain --out DIR --resume auto`` (align, distill) alone.

A checkpoint carries the run's resolved settings (``hyperparameters.yaml``). With ``--resume`` they are the
bottom layer: saved settings < the recipe and flags given again. Of what is given again,

* a setting that fixes the trajectory (the plan's ``TRAJECTORY``: data, batch, seed, precision, optimizer,
  schedule, a stage's loss...) must equal the saved one: a one-line error names the flag, the saved value
  and the given one (to change one, start a new run from the checkpoint with ``--model``);
* the run's length (``--steps``, ``--tokens``, align's ``--epochs``) may change, to a total beyond the
  checkpoint's step: the run is *extended*. The LR schedule is a pure function of (step, total), so it is
  re-derived over the new total (fractional ``--warmup`` / ``--decay`` scale with it, step counts stay) and
  the steps from the checkpoint on take the new schedule's LR: for a run that had finished its decay (WSD,
  cosine) the LR jumps back up from ``--min-lr`` to the new schedule's value at that step (a re-warm; a
  line says from what to what). The steps already taken are not redone;
* everything else (checkpointing, evaluation, device, micro-batch, token cache) may change freely.

No torch at import (``saved_run`` imports it to read the checkpoint's step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanocli_model.errors import NanoError

from ..settings import flag_name

LENGTH = ("steps", "tokens", "epochs")  # the run's length: may change on resume (an extension)
NOT_CARRIED = ("out", "resume", "dry_run")  # given on the command line of the resume itself


class ResumeError(NanoError):
    """A resume whose settings disagree with the run's saved ones."""


@dataclass
class Saved:
    """The checkpoint a resume starts from: where, its step and the settings its run saved."""

    path: Path
    step: int
    settings: dict

    @property
    def file(self) -> Path:
        from .checkpoints import HPARAMS

        return self.path / HPARAMS


def saved_run(out: str | None, resume: str | None) -> Saved | None:
    """The checkpoint ``--resume`` names (``auto``: the newest in ``out``) with its saved settings; None for a
    fresh start (``auto`` and no checkpoint yet), or where there is nothing to read (the run then says why)."""
    if resume is None or (resume == "auto" and out is None):
        return None
    import yaml

    from . import checkpoints as ckpt

    if resume == "auto":
        found = ckpt.list_checkpoints(Path(out))
        if not found:
            return None
        step, path = found[-1]
    else:
        path = Path(resume)
        if not ckpt.is_complete(path):
            return None
        step = ckpt.read_step(path)
    try:
        settings = ckpt.read_hparams(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ResumeError(f"{path / ckpt.HPARAMS}: cannot be read ({type(e).__name__}); resume from another "
                          "checkpoint, or give every setting again") from None
    return Saved(path, step, settings) if settings else None


def layer(options_cls: type, saved: Saved, given: dict[str, Any], world: int) -> dict[str, Any]:
    """The settings of a resumed run: the saved ones (the fields of ``options_cls``) under ``given`` (what the
    recipe and the flags of this command say; ``world``: its processes)."""
    fields = {f.name for f in dataclasses.fields(options_cls)}
    base = {k: v for k, v in saved.settings.items() if k in fields and k not in NOT_CARRIED}
    if any(base.get(k) is not None for k in ("tokens", "epochs")):
        base.pop("steps", None)  # the run was given its length as tokens / epochs: its steps follow from them
    if any(given.get(k) is not None for k in LENGTH):
        for k in LENGTH:  # a length given again replaces the saved one, in whichever unit it is given
            base.pop(k, None)
    micro, batch = base.get("micro_batch"), given.get("global_batch", base.get("global_batch"))
    if micro is not None and isinstance(batch, int) and batch % (world * micro):
        base.pop("micro_batch")  # saved resolved for another process count: the default for this one
    return {**base, **given}


def check_given(plan: Any, saved: Saved, given: set[str]) -> str | None:
    """The settings given again against the saved ones (module docstring); returns the line that describes a
    change of the run's length (None when it keeps its length)."""
    hp, old = plan.hparams(), saved.settings
    names = {f.name: flag_name(f) for f in dataclasses.fields(plan.options)}
    for k in plan.TRAJECTORY:
        if k in given and k in old and hp.get(k) != old[k]:
            flag = names.get(k, "--" + k.replace("_", "-"))
            raise ResumeError(f"{flag} {_show(hp.get(k))} differs from the run's saved {_show(old[k])} ({saved.file}): "
                              f"a resume keeps the settings that fix the trajectory; drop {flag}, or start a new run "
                              f"from the checkpoint with --model {saved.path}")
    length = next((names.get(k, k) for k in LENGTH if k in given), "--steps")
    if plan.steps < saved.step:
        raise ResumeError(f"{length} gives {plan.steps} steps, but {saved.path} is at step {saved.step}: a run can be "
                          f"extended, not cut back; give a length beyond step {saved.step}")
    before = old.get("steps")
    if not isinstance(before, int) or before == plan.steps or plan.steps == saved.step:
        return None
    return extension_note(plan.schedule, before, saved.step)


def extension_note(schedule: Any, before: int, step: int) -> str:
    """What a change of the run's length from ``before`` to ``schedule.total`` steps does to the LR at ``step``."""
    old = dataclasses.replace(schedule, total=before)
    phases = ", ".join(f"{k} {a}..{b}" for k, (a, b) in schedule.phases().items())
    last = f"{old.lr_at(step - 1):.2e} at step {step}" if step else "none yet"
    verb = "extended" if schedule.total > before else "shortened"
    return (f"the run is {verb} from {before} to {schedule.total} steps: the LR schedule is re-derived over "
            f"{schedule.total} steps ({schedule.kind}: {phases}); the LR was {last} and is "
            f"{schedule.lr_at(step):.2e} at step {step + 1}")


def _show(value: Any) -> str:
    return "(not set)" if value is None else repr(value)
