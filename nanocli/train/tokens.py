"""The token-stream side of a training run, shared by ``nano pretrain`` and ``nano distill``.

``--data`` (a spec string, or a recipe's named sources and curriculum phases) becomes a :class:`TokenPlan`
before any work: sources, phases, steps (``--steps`` or ``--tokens``), the batch geometry (micro-batch,
accumulation, processes) and the schedule. Once the run directory is locked, ``prepare`` tokenizes each
source once into cached shards (rank 0 first, the others then find them) and opens the stateless batch
plan; :func:`job` gives the skeleton (``run.py``) the batches, the token count, where a step reads (for a
non-finite step's report) and the data position every checkpoint records. ``heldout`` scores held-out
windows. No torch at import.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from nanocli_model.errors import ConfigError, NanoError

from ..report import Reporter
from .options import TokenTraining
from .run import Job, Plan, schedule


@dataclass
class TokenPlan(Plan):
    """A token-stream run: its data, steps, batch geometry and schedule."""

    TRAJECTORY: ClassVar[tuple[str, ...]] = (*Plan.TRAJECTORY, "heldout_fraction")

    options: TokenTraining
    sources: dict  # name -> SourceSpec
    phases: list  # [Phase]
    world: int  # processes
    micro_batch: int  # sequences per forward per process
    accumulation: int  # micro-batches per optimizer step per process

    @property
    def tokens_per_step(self) -> int:
        return self.options.global_batch * self.options.seq_len

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def phase_ranges(self) -> list[tuple[int, int]]:
        """[start, end) steps of each phase."""
        from ..data import phase_bounds

        b = phase_bounds(self.phases, self.steps)
        return list(zip(b[:-1], b[1:]))

    @property
    def flops_per_token(self) -> float:
        from nanocli_model import memory

        return 3.0 * memory.forward_flops(self.config, self.options.seq_len) / self.options.seq_len

    @property
    def peak_tflops(self) -> float | None:
        return self.options.peak_tflops

    @property
    def eval_every(self) -> int:
        return self.options.eval_every

    def hparams(self) -> dict:
        return {**super().hparams(), "micro_batch": self.micro_batch}


def token_plan(cls: type, o: TokenTraining, config, error: type[NanoError], world: int | None = None,
               **fields: Any) -> Any:
    """``cls`` (a TokenPlan) for options ``o`` and the trained model's ``config``; ``fields``: the stage's own."""
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    micro = o.micro_batch if o.micro_batch is not None else max(o.global_batch // world, 1)
    if o.global_batch % (world * micro):
        raise error(f"--global-batch {o.global_batch} is not a multiple of processes ({world}) x --micro-batch "
                    f"({micro}); adjust one of them")
    steps = o.steps if o.steps is not None else math.ceil(o.tokens / (o.global_batch * o.seq_len))
    sources, phases = data_plan(o.data)
    return cls(options=o, config=config, steps=steps, schedule=schedule(o, steps), sources=sources, phases=phases,
               world=world, micro_batch=micro, accumulation=o.global_batch // (world * micro), **fields)


def data_plan(data: Any) -> tuple[dict, list]:
    """A spec string -> one phase with its weights; a mapping -> named sources and curriculum phases."""
    from ..data import Phase, SourceSpec, parse_data_spec

    if isinstance(data, str):
        specs = parse_data_spec(data)
        sources = {s.name: s for s in specs}
        total = sum(s.weight for s in specs)
        return sources, [Phase(weights={s.name: s.weight / total for s in specs}, fraction=1.0)]
    if not isinstance(data, dict) or not isinstance(data.get("sources"), dict):
        raise ConfigError("data: give a spec string or a mapping with 'sources' (name: spec) and optional "
                          "'phases' ([{blend: {name: weight}, fraction: f}])")
    unknown = set(data) - {"sources", "phases"}
    if unknown:
        raise ConfigError(f"data: unknown key {sorted(unknown)[0]!r}; use 'sources' and 'phases'")
    sources = {}
    for name, spec in data["sources"].items():
        if isinstance(spec, str):
            parsed = parse_data_spec(spec)
            if len(parsed) != 1:
                raise ConfigError(f"data.sources.{name}: one source per name, got {len(parsed)}")
            sources[name] = dataclasses.replace(parsed[0], name=name)
        elif isinstance(spec, dict):
            sources[name] = SourceSpec.from_mapping(name, spec)
        else:
            raise ConfigError(f"data.sources.{name}: a spec string or a mapping, got {spec!r}")
    return sources, _phases(data.get("phases") or [{"blend": {n: 1.0 for n in sources}, "fraction": 1.0}], sources)


def _phases(raw: list, sources: dict) -> list:
    from ..data import Phase

    phases = []
    for i, p in enumerate(raw):
        if not isinstance(p, dict) or not isinstance(p.get("blend"), dict):
            raise ConfigError(f"data.phases[{i}]: expected {{blend: {{source: weight}}, fraction: f}}")
        blend = p["blend"]
        missing = [n for n in blend if n not in sources]
        if missing:
            raise ConfigError(f"data.phases[{i}]: blend names unknown source {missing[0]!r}; "
                              f"sources: {', '.join(sources)}")
        total = sum(float(w) for w in blend.values())
        if total <= 0:
            raise ConfigError(f"data.phases[{i}]: blend weights must sum to more than 0")
        phases.append(Phase(weights={n: float(w) / total for n, w in blend.items()},
                            fraction=float(p.get("fraction", 1.0))))
    if abs(sum(p.fraction for p in phases) - 1.0) > 1e-6:
        raise ConfigError(f"data.phases: fractions sum to {sum(p.fraction for p in phases):g}, they must sum to 1")
    return phases


# ------------------------------------------------------------------------------------------ after the lock
def prepare(plan: TokenPlan, tokenizer, dist, reporter: Reporter):
    """Each source tokenized once into cached shards (rank 0 first), then the stateless batch plan."""
    from ..data import BatchPlan, prepare_source
    from ..resolve import cache_dir

    o = plan.options
    cache = cache_dir(o.cache_dir)
    tokens = {}
    for rank_turn in (True, False):  # rank 0 tokenizes first; the others then find the shards cached
        if dist.main == rank_turn:
            for name, spec in plan.sources.items():
                reporter.status(f"data: {name}")
                # vocab_size: a pre-tokenized shard with ids outside the model's vocabulary is a DataError
                tokens[name] = prepare_source(spec, tokenizer, cache, progress=reporter.progress if dist.main else None,
                                              vocab_size=plan.config.vocab_size)
        dist.barrier()
    return BatchPlan(tokens, plan.phases, seq_len=o.seq_len, global_batch=o.global_batch, total_steps=plan.steps,
                     seed=o.seed, heldout_fraction=o.heldout_fraction)


MANY_EPOCHS = 10  # a source this run reads more often than this many times gets a warning


def report_data(batches, reporter: Reporter) -> dict[str, dict]:
    """Each source's size and how often this run reads it, as status lines, with a one-line warning for a source
    read more than ``MANY_EPOCHS`` times; returns the figures per source (``BatchPlan.describe``'s: tokens,
    train_windows, sequences, epochs...) for the run's summary."""
    d = batches.describe()
    for name, s in d["sources"].items():
        reporter.status(f"data: {name}: {s['tokens']:,} tokens in {s['train_windows']:,} training windows of "
                        f"{d['seq_len']}; the run's {d['total_steps']:,} steps read {s['sequences']:,} windows = "
                        f"{s['epochs']:.2f} epochs")
        if s["epochs"] > MANY_EPOCHS:
            reporter.status(f"warning: {name} repeats {s['epochs']:.1f} times in this run ({s['tokens']:,} tokens "
                            f"for {s['sequences'] * d['seq_len']:,} read): a model learns such a small source by "
                            "heart; add data or lower --steps / --tokens")
    return d["sources"]


def data_position(batches, step: int) -> str:
    """Where in the batch plan step ``step`` (0-based) reads: phase, global rows, first (source, window)s."""
    ids = batches.global_batch_ids(step)
    head = ", ".join(f"{name} window {w}" for name, w in ids[:3])
    return (f"batch plan step {step} (phase {batches.phase_at(step)}, sequences {step * batches.global_batch}-"
            f"{(step + 1) * batches.global_batch - 1} of the run): {head}{', ...' if len(ids) > 3 else ''}")


def micro_batches(plan: TokenPlan, batches, step: int, dist) -> list[dict]:
    """This process's rows of ``step`` in micro-batches: ``{"input_ids": (micro, T + 1)}``."""
    rows = batches.batch(step, dist.rank, dist.world).to(dist.device)  # (B_local, T + 1)
    return [{"input_ids": rows[i:i + plan.micro_batch]} for i in range(0, rows.shape[0], plan.micro_batch)]


def job(plan: TokenPlan, batch_plan, dist, model, loss: Callable, side_files: list, **kw: Any) -> Job:
    """The skeleton's :class:`Job` for a token stream: the batches of ``batch_plan``, their count, the data a
    step reads and the data position every checkpoint records; ``kw`` the stage's own (evaluate, metrics, ...,
    or other ``batches``)."""
    o = plan.options
    kw.setdefault("batches", lambda step, wrapped: micro_batches(plan, batch_plan, step, dist))
    return Job(model=model, loss=loss, count=lambda b: b["input_ids"][:, 1:].numel(), side_files=side_files,
               where=lambda step: data_position(batch_plan, step),
               state=lambda step: {"data": {"step": step, "seq_len": o.seq_len, "global_batch": o.global_batch}},
               **kw)


def heldout(plan: TokenPlan, batches, dist, model, score: Callable) -> dict:
    """Per-token held-out metrics over ``--eval-batches`` batches of held-out windows (the same every time):
    ``score(model, rows)`` gives (summed CE, token count, {name: summed value}); returns ``eval_loss``,
    ``eval_ppl`` and ``eval_<name>`` per token. Called under no_grad."""
    ce, count, sums = 0.0, 0, {}
    for rows in batches.eval_batches(plan.options.eval_batches, plan.micro_batch):
        loss, n, extra = score(model, rows.to(dist.device))
        ce, count = ce + float(loss), count + int(n)
        for k, v in extra.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if count == 0:
        return {}
    return {"eval_loss": ce / count, "eval_ppl": math.exp(min(ce / count, 50.0)),
            **{f"eval_{k}": v / count for k, v in sums.items()}}
