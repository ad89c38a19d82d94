"""``nano prune``: Minitron structured pruning of a NemotronH model, to an explicit shape or under a budget.

Steps, top to bottom (``run``):
  1. ``resolve``   the parent (a checkpoint directory, or a model profile for ``--dry-run``), the target
                   (explicit widths with ModelOpt's names, flags over a ``--target`` YAML; or a budget:
                   ``--target-memory`` GiB / ``--gpu`` profile at ``--context`` and ``--batch``, judged by
                   fit-check's memory model, or ``--target-params``), and with a budget the search space.
                   ``--dry-run`` stops here and prints the space, without weights or scores.
  2. ``calibrate`` the calibration rows (``--calib-data``, tokenized with the parent's tokenizer) and the
                   importance scores: one forward pass with hooks, cached in ``--scores`` (safetensors).
  3. ``depth``     the removal order of layers (greedy logit MSE, or ``1 - cos``), the attention pin.
  4. ``search``    (budget) the frontier of fitting candidates by memory, proxy KL to the parent on
                   held-out rows for the largest ``--proxy-candidates``, a ``--candidate-steps`` distillation
                   of the ``--distill-candidates`` best, the best kept.
  5. ``write``     the pruned model (exact slices of the parent) as a NemotronH checkpoint, the
                   tokenizer, and ``pruning.json`` (kept indices, depth order, scores summary, search
                   table), into a temporary directory renamed into place.

The options are checked once, before any work (``settings.validate``); the stage reports through the
``report.Reporter`` it is given and never prints (``commands/prune.py`` renders). Importing this module does
not import torch; the steps that need the weights do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from nanocli_model.config import ATTENTION, NanoConfig
from nanocli_model.errors import NanoError

from .. import settings
from ..prune import PruneError
from ..prune.search import Axes, Budget, Candidate, Space, default_axes, heaviest_pattern, search
from ..prune.shape import SHAPE_KEYS, TARGET_KEYS, Shape, check_shape, explicit_shape, read_target
from ..report import SILENT, Reporter
from ..settings import OptionError, flag
from .fit_check import DEFAULT_CONTEXT, parse_tokens

__all__ = ["PruneError", "PruneOptions", "PruneResult", "make_options", "run"]

STAGE = "prune"
GIB = 2**30
HELDOUT_FRACTION = 0.1


# ------------------------------------------------------------------------------------------ options
@dataclass
class PruneModel(settings.Group):
    panel = "Model"

    model: str | None = flag(None, aliases=("-m",))
    """A NemotronH checkpoint directory (or a model profile, with --dry-run)."""
    out: str | None = None
    """Where the pruned checkpoint goes (a new or empty directory)."""

    def check(self) -> None:
        if not self.model:
            raise OptionError("--model is required: a NemotronH checkpoint directory (or a model profile with "
                              "--dry-run)")


@dataclass
class TargetShape(settings.Group):
    panel = "Target shape (ModelOpt names)"

    target: str | None = None
    """YAML export config (ModelOpt names: hidden_size, ffn_hidden_size, ...); the flags below override it."""
    hidden_size: int | None = None
    """Embedding channels kept."""
    ffn_hidden_size: int | None = None
    """MLP neurons kept."""
    num_attention_heads: int | None = None
    """Query heads kept."""
    num_query_groups: int | None = None
    """KV groups kept."""
    mamba_num_heads: int | None = None
    """Mamba heads kept (a multiple of n_groups)."""
    mamba_head_dim: int | None = None
    """Mamba head dim kept."""
    num_layers: int | None = None
    """Layers kept."""
    keep_attention: int | None = None
    """Attention layers kept (the 9B kept 4)."""

    def check(self) -> None:
        settings.at_least(self, 1, *SHAPE_KEYS, "num_layers")
        settings.at_least(self, 0, "keep_attention")


@dataclass
class TargetBudget(settings.Group):
    panel = "Budget (the widths are searched)"

    target_memory: float | None = None
    """Budget in GiB: weights + KV + Mamba state + activations (fit-check's model)."""
    target_params: float | None = None
    """Budget in parameters."""
    gpu: str | None = None
    """GPU profile whose usable memory is the budget when --target-memory is absent (a10g: 19.66 GiB)."""
    context: int | str = DEFAULT_CONTEXT
    """Tokens per sequence the budget is judged at, e.g. 131072 or 128k."""
    batch: int = 1
    """Sequences served at once."""
    dtype: Literal["bf16", "fp16", "fp8", "fp32"] = "bf16"
    """Weight dtype of the budget."""

    def check(self) -> None:
        if self.target_memory is not None and self.target_params is not None:
            raise OptionError("give one budget: --target-memory GiB or --target-params N, not both")
        settings.finite(self, "target_memory", "target_params", positive=True)
        settings.at_least(self, 1, "batch")
        try:
            parse_tokens(self.context, "--context")
        except NanoError as e:
            raise OptionError(str(e)) from None


@dataclass
class Calibration(settings.Group):
    panel = "Calibration"

    calib_data: str = "synthetic:reasoning"
    """Calibration data spec (as nano pretrain's --data)."""
    calib_samples: int = 256
    """Calibration sequences for the importance scores."""
    calib_seq_len: int = 256
    """Tokens per calibration sequence."""
    calib_batch: int = 8
    """Calibration sequences per forward pass."""
    heldout_samples: int = 32
    """Held-out sequences the candidates' proxy score runs on."""
    scores: str | None = None
    """Importance scores file (safetensors): reused when it exists, written otherwise."""
    cache_dir: str | None = None
    """Token shard cache (default $NANO_CACHE, else $XDG_CACHE_HOME/nano, else ~/.cache/nano)."""

    def check(self) -> None:
        settings.at_least(self, 1, "calib_samples", "calib_seq_len", "calib_batch", "heldout_samples")


@dataclass
class CandidateSearch(settings.Group):
    panel = "Depth and search"

    depth_metric: Literal["mse", "cosine"] = "mse"
    """Depth rule: mse (greedy logit MSE, the report's) or cosine (1 - cos(x_in, x_out), one pass)."""
    depth_samples: int = 32
    """Calibration sequences the greedy MSE rule runs on."""
    proxy_candidates: int = 8
    """Largest fitting candidates scored by the proxy (KL to the parent)."""
    top_k: int = settings.flag(3, name="distill-candidates", deprecated=("--top-k",))
    """Candidates given the short distillation."""
    candidate_steps: int = 20
    """Distillation steps per distilled candidate (0: rank by the proxy only)."""
    candidate_lr: float = 1e-4
    """Learning rate of the candidates' short distillation."""

    def check(self) -> None:
        settings.at_least(self, 1, "depth_samples", "proxy_candidates", "top_k")
        settings.at_least(self, 0, "candidate_steps")
        settings.finite(self, "candidate_lr", positive=True)


@dataclass
class PruneRun(settings.Group):
    panel = "Run"

    seed: int = 0
    """Seed of the calibration rows and the held-out split."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model is scored (auto: a CUDA GPU when one is visible)."""
    dry_run: bool = False
    """Print the target or the search space and exit (no weights needed)."""


@dataclass
class PruneOptions(PruneRun, CandidateSearch, Calibration, TargetBudget, TargetShape, PruneModel):
    """Everything ``nano prune`` can be told (defaults < recipe < flags)."""

    def check(self) -> None:
        if self.out is None and not self.dry_run:
            raise OptionError("--out DIR is required: where the pruned checkpoint goes")


@dataclass
class PruneResult:
    options: PruneOptions
    parent_name: str
    parent: NanoConfig
    mode: str  # "explicit" | "search"
    budget: Budget | None
    space: Space | None = None
    shape: Shape | None = None  # the chosen (or explicit) target
    candidates: list[Candidate] = field(default_factory=list)  # scored candidates (the search table)
    chosen: Candidate | None = None
    out: Path | None = None
    scores_path: Path | None = None
    scores_reused: bool = False
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    dry_run: bool = False


# ------------------------------------------------------------------------------------------ 1. resolve
def make_options(recipe: str | None, given: dict[str, Any]) -> PruneOptions:
    """Defaults < the recipe < the flags ``given`` on the command line."""
    from ..train.recipe import make_options as merge

    return merge(PruneOptions, STAGE, recipe, given)


def _parent(o: PruneOptions) -> tuple[str, NanoConfig, Path | None]:
    """(name, config, directory or None for a profile)."""
    from .. import resolve

    target = resolve.model_target(o.model, kinds=("profile", "checkpoint", "run"))
    if target.kind == "profile" and not o.dry_run:
        raise PruneError(f"{o.model} is a model profile: it has no weights to score; add --dry-run to see the "
                         "search space, or pass a checkpoint directory")
    return target.name, target.config, target.directory


def _budget(o: PruneOptions) -> Budget | None:
    if o.target_params is not None:
        return Budget("params", float(o.target_params), o.context, o.batch, o.dtype, "--target-params")
    if o.target_memory is not None:
        return Budget("memory", o.target_memory * GIB, o.context, o.batch, o.dtype, f"--target-memory {o.target_memory} GiB")
    if o.gpu is not None:
        from ..profiles import load_gpu_profile
        from .fit_gpu import profile_limit

        gpu = load_gpu_profile(o.gpu)
        limit = profile_limit(gpu)
        return Budget("memory", float(limit.budget), o.context, o.batch, o.dtype,
                      f"{gpu.name}: {gpu.memory_gib} GiB - {100 * gpu.framework_overhead:g}% - {gpu.reserved_gib} GiB "
                      f"= {limit.budget / GIB:.2f} GiB")
    return None


def _no_fit(space: Space) -> PruneError:
    s = space.smallest
    return PruneError(f"no candidate meets the budget of {space.budget.describe(space.budget.limit)}; the smallest "
                      f"reachable is {space.budget.describe(s.value)} ({s.shape.label()}); raise the budget, lower "
                      "--context / --batch, or unpin fixed widths")


def _check_out(o: PruneOptions) -> Path:
    out = Path(o.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PruneError(f"{out} already exists and is not empty; choose another --out")
    return out


# ------------------------------------------------------------------------------------------ run
def run(o: PruneOptions, reporter: Reporter | None = None) -> PruneResult:
    """Resolve, calibrate, depth, search, write; ``dry_run`` stops after resolving (no weights needed)."""
    reporter = reporter or SILENT
    settings.validate(o, PruneError)
    o = dataclasses.replace(o, context=parse_tokens(o.context, "--context"))
    name, parent, path = _parent(o)
    fixed, budget = read_target(o.target, {k: getattr(o, k) for k in TARGET_KEYS}), _budget(o)
    result = PruneResult(o, name, parent, "search" if budget else "explicit", budget, dry_run=o.dry_run)
    t0 = time.perf_counter()
    if budget is None:
        result.shape = explicit_shape(parent, fixed)
    else:
        axes = default_axes(parent, fixed)
        if fixed["num_layers"] is not None or fixed["keep_attention"] is not None:
            explicit_shape(parent, fixed)  # validates the pinned axes with one-line errors
        if not axes.depth:
            raise PruneError("no valid depth: --num-layers / --keep-attention remove more layers than allowed")
    if o.dry_run:
        if budget is not None:
            result.space = search(parent, axes, budget)
            if result.space.fitting == 0:
                raise _no_fit(result.space)
        else:
            from nanocli_model.memory import param_count

            c = result.shape
            cfg = c.config(parent, heaviest_pattern(parent, c, o.dtype))
            value = Budget("memory", math.inf, o.context, o.batch, o.dtype).measure(cfg)
            result.chosen = Candidate(c, cfg.hybrid_override_pattern, param_count(cfg).total, value, True)
        result.seconds["resolve"] = time.perf_counter() - t0
        return result
    out = _check_out(o)
    _check_device(o, path)
    from ..train.lock import DirLock

    # .OUT.nano.lock beside OUT (OUT itself appears whole, by one rename, at the end)
    with DirLock(out, "nano prune", reporter.status, beside=True):
        _check_out(o)  # again, now that no other run can write there
        for stale in out.parent.glob(f".{out.name}.prune-*"):  # staging of a killed run: never an output
            shutil.rmtree(stale, ignore_errors=True)
        return _run_with_weights(o, reporter, result, path, fixed, axes if budget else None, out)


def _check_device(o: PruneOptions, parent: Path) -> None:
    """Before any work: --device cuda without a GPU is one line; on the CPU, the parent loaded in fp32 must fit
    the host's memory (``host_memory.check_cpu``: a ``HostMemoryError`` line, not the OOM killer later)."""
    from .. import host_memory, resolve

    if resolve.visible_device(o.device) == "cpu":
        host_memory.check_cpu("nano prune", [("the parent's fp32 weights", host_memory.loaded(parent, "fp32"))])


def _run_with_weights(o: PruneOptions, reporter: Reporter, result: PruneResult, path: Path,
                      fixed: dict, axes: Axes | None, out: Path) -> PruneResult:
    import torch

    from nanocli_model import load_pretrained
    from nanocli_model.memory import param_count

    from ..prune.depth import DepthOrders
    from ..prune.evaluate import score_candidates
    from ..prune.slicing import make_plan, prune_model

    parent = result.parent
    torch.manual_seed(o.seed)
    from .. import resolve

    device = torch.device(resolve.visible_device(o.device))
    reporter.status(f"loading {path} (fp32) on {device}")
    model = load_pretrained(path, dtype="fp32", device=device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    t = time.perf_counter()
    rows, heldout = _calibration(o, path, parent, reporter)
    result.seconds["data"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = _scores(o, model, rows, reporter, result)
    result.seconds["importance"] = time.perf_counter() - t

    # depth: one removal order per attention pin, cached in the scores file
    t = time.perf_counter()
    L = parent.num_hidden_layers
    depth_rows = rows[:o.depth_samples]
    depth_batches = [depth_rows[i:i + o.calib_batch, :-1] for i in range(0, depth_rows.shape[0], o.calib_batch)]
    save = None if result.scores_path is None else lambda: scores.save(result.scores_path)
    orders = DepthOrders(model, depth_batches, o.depth_metric, scores, reporter, save)

    def plan_for(shape: Shape):
        return make_plan(parent, scores, shape, orders.kept(shape.num_layers, shape.num_attention_layers))

    if axes is None:  # explicit target
        pin = fixed["keep_attention"]
        layers = orders.kept(result.shape.num_layers, pin) if result.shape.num_layers < L else list(range(L))
        shape = dataclasses.replace(result.shape, num_attention_layers=sum(parent.layer_types[i] == ATTENTION
                                                                           for i in layers))
        check_shape(parent, shape)
        plan = make_plan(parent, scores, shape, layers)
        value = result.budget.measure(plan.config) if result.budget else 0
        result.chosen = Candidate(shape, plan.config.hybrid_override_pattern, param_count(plan.config).total, value, True)
        result.shape = shape
        result.seconds["depth"] = time.perf_counter() - t
    else:
        min_depth = min(n for n, _ in axes.depth)
        for _, a in axes.depth:
            orders.order(a, L - min_depth)

        def pattern_for(s: Shape) -> str:
            return "".join(parent.hybrid_override_pattern[i] for i in orders.kept(s.num_layers, s.num_attention_layers))

        space = search(parent, axes, result.budget, pattern_for, pattern_source=f"depth order ({o.depth_metric})")
        result.space = space
        if space.fitting == 0:
            raise _no_fit(space)
        result.seconds["depth"] = time.perf_counter() - t
        t = time.perf_counter()
        batch = o.calib_batch
        result.candidates = score_candidates(
            model, space.frontier[:o.proxy_candidates], plan_for,
            [heldout[i:i + batch] for i in range(0, heldout.shape[0], batch)],
            [rows[i:i + batch] for i in range(0, rows.shape[0], batch)],
            o.top_k, o.candidate_steps, o.candidate_lr, reporter)
        result.chosen = next(c for c in result.candidates if c.chosen)
        result.shape = result.chosen.shape
        result.seconds["search"] = time.perf_counter() - t
        plan = plan_for(result.shape)
    t = time.perf_counter()
    pruned = prune_model(model, plan)
    pin = result.shape.num_attention_layers if axes is not None else fixed["keep_attention"]
    depth_info = asdict(orders.orders[pin]) if pin in orders.orders else None
    result.out = _write(o, result, path, pruned, plan, scores, depth_info, out)
    result.seconds["write"] = time.perf_counter() - t
    return result


def _calibration(o: PruneOptions, path: Path, parent: NanoConfig, reporter: Reporter):
    """(calibration rows (N, T + 1), held-out rows (M, T + 1)) from --calib-data, with the parent's tokenizer."""
    from nanocli_model.tokenizer import Tokenizer

    from .. import resolve
    from ..data import BatchPlan, blend_phase, parse_data_spec, prepare_source

    if not (path / "tokenizer.json").is_file():
        raise PruneError(f"{path}: no tokenizer.json; the calibration data is tokenized with the model's tokenizer")
    if o.calib_seq_len > parent.max_position_embeddings:
        raise PruneError(f"--calib-seq-len {o.calib_seq_len} exceeds the model's max_position_embeddings "
                         f"({parent.max_position_embeddings})")
    specs = parse_data_spec(o.calib_data)
    tokenizer = Tokenizer.from_dir(path)
    cache = resolve.cache_dir(o.cache_dir)
    reporter.status(f"calibration data: {o.calib_data}")
    tokens = {s.name: prepare_source(s, tokenizer, cache, progress=reporter.progress, vocab_size=parent.vocab_size)
              for s in specs}
    plan = BatchPlan(tokens, [blend_phase(specs)], seq_len=o.calib_seq_len, global_batch=o.calib_samples,
                     total_steps=1, seed=o.seed, heldout_fraction=HELDOUT_FRACTION)
    return plan.batch(0), next(plan.eval_batches(1, o.heldout_samples))


def _scores(o: PruneOptions, model, rows, reporter: Reporter, result: PruneResult):
    from ..prune.importance import Scores, compute_scores

    path = Path(o.scores).expanduser() if o.scores else None
    result.scores_path = path
    if path is not None and path.is_file():
        reporter.status(f"importance scores: reusing {path}")
        result.scores_reused = True
        return Scores.load(path, model.config)
    ids = rows[:, :-1]  # (N, T)
    batches = (ids[i:i + o.calib_batch] for i in range(0, ids.shape[0], o.calib_batch))
    reporter.status(f"importance: {ids.shape[0]} sequences x {ids.shape[1]} tokens, one pass with hooks")
    meta = {"model": result.parent_name, "calib_data": o.calib_data, "calib_samples": ids.shape[0],
            "calib_seq_len": ids.shape[1], "seed": o.seed}
    scores = compute_scores(model, batches, ids.shape[0], reporter.progress, meta)
    if path is not None:
        scores.save(path)
    return scores


def _write(o: PruneOptions, result: PruneResult, path: Path, pruned, plan, scores, depth_info, out: Path) -> Path:
    from nanocli_model import save_pretrained
    from nanocli_model.checkpoint import resolve_dtype
    from nanocli_model.memory import param_count

    from ..train.checkpoints import hold_write_open
    from ..train.session import side_files
    from .fit_check import default_dtype, resolve_model

    stored = default_dtype(resolve_model(str(path)))
    pruned = pruned.to(resolve_dtype(stored if stored != "fp8" else "bf16"))
    parent = result.parent
    record = {
        "format": "nano-pruning", "parent": result.parent_name, "mode": result.mode,
        "parent_shape": Shape.of(parent).to_dict(), "shape": result.shape.to_dict(),
        "pattern": plan.config.hybrid_override_pattern, "parent_pattern": parent.hybrid_override_pattern,
        "params": param_count(plan.config).total, "parent_params": param_count(parent).total,
        "budget": None if result.budget is None else {**asdict(result.budget), "value": result.chosen.value},
        "weights": "exact slices of the parent (index_select with the kept indices below); the short distillation "
                   "only ranked the candidates",
        "kept": plan.to_json(parent),
        "depth": depth_info,
        "importance": {"aggregation": scores.meta.get("aggregation"), "file": str(result.scores_path or ""),
                       "reused": result.scores_reused, "calibration": {k: scores.meta.get(k) for k in
                                                                       ("calib_data", "calib_samples", "calib_seq_len", "seed")},
                       "summary": scores.summary()},
        "search": None if result.space is None else {
            "total": result.space.total, "fitting": result.space.fitting, "frontier": len(result.space.frontier),
            "pattern_source": result.space.pattern_source,
            "table": [c.to_json() for c in result.candidates]},
        "options": asdict(o),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.prune-", dir=out.parent))
    try:
        hold_write_open(0.5)  # a point inside the write (checkpoints.write_hold: the kill trials hold it open)
        ckpt = save_pretrained(pruned, staging / "model", extra_files=side_files(path))
        (ckpt / "pruning.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        hold_write_open(0.5)
        if out.exists():
            out.rmdir()  # checked empty up front
        os.rename(ckpt, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
