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
                   of the ``--top-k`` best, the best kept.
  5. ``write``     the pruned model (exact slices of the parent) as a NemotronH checkpoint, the
                   tokenizer, and ``pruning.json`` (kept indices, depth order, scores summary, search
                   table), into a temporary directory renamed into place.

Rendering lives in ``ui.py``; this module reports through the ``PruneHooks`` it is given.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nanocli_model.config import ATTENTION, NanoConfig
from nanocli_model.errors import NanoError

from ..prune.search import Axes, Budget, Candidate, Space, default_axes, heaviest_pattern, search
from ..prune.slicing import SHAPE_KEYS, PruneError, Shape, check_shape

STAGE = "prune"
GIB = 2**30
HELDOUT_FRACTION = 0.1
TARGET_KEYS = (*SHAPE_KEYS, "num_layers", "keep_attention")
DEPTH_METRICS = ("mse", "cosine")


@dataclass
class PruneOptions:
    """Everything ``nano prune`` can be told (defaults < recipe < flags)."""

    model: str | None = None  # a NemotronH checkpoint directory (or a model profile, with --dry-run)
    out: str | None = None  # where the pruned checkpoint goes (must not exist or be empty)
    target: str | None = None  # a YAML export config (ModelOpt names); flags override its keys
    hidden_size: int | None = None  # ModelOpt export names: the pruned widths
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    mamba_num_heads: int | None = None
    mamba_head_dim: int | None = None
    num_layers: int | None = None
    keep_attention: int | None = None  # attention layers kept (the 9B kept 4)
    target_memory: float | None = None  # budget in GiB for weights + KV + Mamba state + activations
    target_params: float | None = None  # or a parameter budget
    gpu: str | None = None  # a GPU profile: its usable memory is the budget when --target-memory is absent
    context: int = 131072  # tokens per sequence the budget is judged at
    batch: int = 1  # sequences served at once
    dtype: str = "bf16"  # weight dtype of the budget
    calib_data: str = "synthetic:reasoning"  # calibration data spec (as --data of pretrain)
    calib_samples: int = 256  # calibration sequences for the importance scores
    calib_seq_len: int = 256  # tokens per calibration sequence
    calib_batch: int = 8  # sequences per forward
    heldout_samples: int = 32  # held-out sequences for the proxy score
    depth_metric: str = "mse"  # mse (greedy, logits) | cosine (1 - cos(x_in, x_out), one pass)
    depth_samples: int = 32  # calibration sequences the greedy MSE rule runs on
    scores: str | None = None  # cache file for the importance scores (reused when it exists)
    proxy_candidates: int = 8  # largest fitting candidates scored by the proxy
    top_k: int = 3  # candidates given the short distillation
    candidate_steps: int = 20  # distillation steps per top-k candidate (0: rank by the proxy only)
    candidate_lr: float = 1e-4
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    cache_dir: str | None = None  # token shards (default $NANO_CACHE or ~/.cache/nano)
    dry_run: bool = False


@dataclass
class PruneHooks:
    """How the stage reports; the CLI wires these to ``ui.py``. All optional."""

    status: Callable[[str], None] = lambda msg: None
    progress: Callable[[str, int, int], None] = lambda desc, done, total: None


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
    seconds: dict[str, float] = field(default_factory=dict)
    dry_run: bool = False


# ------------------------------------------------------------------------------------------ 1. resolve
def make_options(recipe: str | None, flags: dict[str, Any]) -> PruneOptions:
    from ..train.recipe import make_options as merge

    return merge(PruneOptions, STAGE, recipe, flags)


def _parent(o: PruneOptions) -> tuple[str, NanoConfig, Path | None]:
    """(name, config, directory or None for a profile)."""
    from ..profiles import load_model_profile, profile_names

    if not o.model:
        raise PruneError("--model is required: a NemotronH checkpoint directory (or a model profile with --dry-run)")
    path = Path(o.model).expanduser()
    if path.is_dir():
        return str(path), NanoConfig.from_json_file(path / "config.json"), path
    if o.model in profile_names("models") or path.suffix in (".yaml", ".yml"):
        if not o.dry_run:
            raise PruneError(f"{o.model} is a model profile: it has no weights to score; add --dry-run to see the "
                             "search space, or pass a checkpoint directory")
        p = load_model_profile(o.model)
        return p.name, p.config, None
    raise PruneError(f"{o.model}: no such model directory or model profile")


def _target(o: PruneOptions) -> dict[str, int | None]:
    """The fixed axes: the --target YAML, then the flags over it."""
    fixed: dict[str, int | None] = {k: None for k in TARGET_KEYS}
    if o.target is not None:
        import yaml

        path = Path(o.target)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise PruneError(f"--target {path}: cannot be read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise PruneError(f"--target {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise PruneError(f"--target {path}: expected a mapping such as hidden_size: 4480")
        for key, value in raw.items():
            if key not in TARGET_KEYS:
                raise PruneError(f"--target {path}: unknown key {key!r}; use {', '.join(TARGET_KEYS)}")
            if isinstance(value, bool) or not isinstance(value, int):
                raise PruneError(f"--target {path}: {key} must be a whole number, got {value!r}")
            fixed[key] = value
    for key in TARGET_KEYS:
        if getattr(o, key) is not None:
            fixed[key] = getattr(o, key)
    return fixed


def _budget(o: PruneOptions) -> Budget | None:
    from nanocli_model import fit

    if o.target_memory is not None and o.target_params is not None:
        raise PruneError("give one budget: --target-memory GiB or --target-params N, not both")
    if o.context < 1 or o.batch < 1:
        raise PruneError(f"--context and --batch must be at least 1, got {o.context} and {o.batch}")
    try:
        dtype = fit.weight_dtype(o.dtype)
    except NanoError as e:
        raise PruneError(f"--dtype: {e}") from None
    if o.target_params is not None:
        if not o.target_params > 0:
            raise PruneError(f"--target-params must be > 0, got {o.target_params}")
        return Budget("params", float(o.target_params), o.context, o.batch, dtype, "--target-params")
    if o.target_memory is not None:
        if not (o.target_memory > 0 and math.isfinite(o.target_memory)):
            raise PruneError(f"--target-memory must be a positive number of GiB, got {o.target_memory}")
        return Budget("memory", o.target_memory * GIB, o.context, o.batch, dtype, f"--target-memory {o.target_memory} GiB")
    if o.gpu is not None:
        from ..profiles import load_gpu_profile
        from .fit_check import profile_limit

        gpu = load_gpu_profile(o.gpu)
        limit = profile_limit(gpu)
        return Budget("memory", float(limit.budget), o.context, o.batch, dtype,
                      f"{gpu.name}: {gpu.memory_gib} GiB - {100 * gpu.framework_overhead:g}% - {gpu.reserved_gib} GiB "
                      f"= {limit.budget / GIB:.2f} GiB")
    return None


def _explicit_shape(parent: NanoConfig, fixed: dict[str, int | None], depth_pin: int | None = None) -> Shape:
    p = Shape.of(parent)
    n = fixed["num_layers"] if fixed["num_layers"] is not None else p.num_layers
    att = fixed["keep_attention"]
    if att is None:
        att = depth_pin if depth_pin is not None else min(p.num_attention_layers, n)
    q = fixed["num_attention_heads"] or p.num_attention_heads
    kv = fixed["num_query_groups"] or (p.num_query_groups if q % p.num_query_groups == 0 else 0)
    if kv == 0:
        raise PruneError(f"--num-attention-heads {q} is not a multiple of the model's {p.num_query_groups} KV "
                         "groups; give --num-query-groups too")
    shape = Shape(num_layers=n, num_attention_layers=att,
                  hidden_size=fixed["hidden_size"] or p.hidden_size,
                  ffn_hidden_size=fixed["ffn_hidden_size"] or p.ffn_hidden_size,
                  num_attention_heads=q, num_query_groups=kv,
                  mamba_num_heads=fixed["mamba_num_heads"] or p.mamba_num_heads,
                  mamba_head_dim=fixed["mamba_head_dim"] or p.mamba_head_dim)
    check_shape(parent, shape)
    return shape


def _check_options(o: PruneOptions) -> None:
    if o.depth_metric not in DEPTH_METRICS:
        raise PruneError(f"--depth-metric {o.depth_metric!r} is unknown; use mse or cosine")
    for name in ("calib_samples", "calib_seq_len", "calib_batch", "heldout_samples", "depth_samples",
                 "proxy_candidates", "top_k"):
        if getattr(o, name) < 1:
            raise PruneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(o, name)}")
    if o.candidate_steps < 0:
        raise PruneError(f"--candidate-steps must be >= 0, got {o.candidate_steps}")
    if o.device not in ("auto", "cpu", "cuda"):
        raise PruneError(f"--device {o.device!r} is unknown; use auto, cpu or cuda")


def _no_fit(space: Space) -> PruneError:
    s = space.smallest
    return PruneError(f"no candidate meets the budget of {space.budget.describe(space.budget.limit)}; the smallest "
                      f"reachable is {space.budget.describe(s.value)} ({s.shape.label()}); raise the budget, lower "
                      "--context / --batch, or unpin fixed widths")


def _check_out(o: PruneOptions) -> Path:
    if o.out is None:
        raise PruneError("--out DIR is required: where the pruned checkpoint goes")
    out = Path(o.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PruneError(f"{out} already exists and is not empty; choose another --out")
    return out


# ------------------------------------------------------------------------------------------ run
def run(o: PruneOptions, hooks: PruneHooks | None = None) -> PruneResult:
    """Resolve, calibrate, depth, search, write; ``dry_run`` stops after resolving (no weights needed)."""
    hooks = hooks or PruneHooks()
    _check_options(o)
    name, parent, path = _parent(o)
    fixed, budget = _target(o), _budget(o)
    result = PruneResult(o, name, parent, "search" if budget else "explicit", budget, dry_run=o.dry_run)
    t0 = time.perf_counter()
    if budget is None:
        result.shape = _explicit_shape(parent, fixed)
    else:
        axes = default_axes(parent, fixed)
        if fixed["num_layers"] is not None or fixed["keep_attention"] is not None:
            _explicit_shape(parent, fixed)  # validates the pinned axes with one-line errors
        if not axes.depth:
            raise PruneError("no valid depth: --num-layers / --keep-attention remove more layers than allowed")
    if o.dry_run:
        if budget is not None:
            result.space = search(parent, axes, budget)
            if result.space.fitting == 0:
                raise _no_fit(result.space)
        else:
            c = result.shape
            pattern = heaviest_pattern(parent, c, o.dtype if o.dtype else "bf16")
            measure = Budget("memory", math.inf, o.context, o.batch, o.dtype)
            cfg = c.config(parent, pattern)
            from nanocli_model.memory import param_count

            result.chosen = Candidate(c, pattern, param_count(cfg).total, measure.measure(cfg), True)
        result.seconds["resolve"] = time.perf_counter() - t0
        return result
    out = _check_out(o)
    _check_device(o)
    from ..train.lock import DirLock

    # .OUT.nano.lock beside OUT (OUT itself appears whole, by one rename, at the end)
    with DirLock(out, "nano prune", hooks.status, beside=True):
        _check_out(o)  # again, now that no other run can write there
        for stale in out.parent.glob(f".{out.name}.prune-*"):  # staging of a killed run: never an output
            shutil.rmtree(stale, ignore_errors=True)
        return _run_with_weights(o, hooks, result, path, fixed, axes if budget else None, out)


def _check_device(o: PruneOptions) -> None:
    import torch

    if o.device == "cuda" and not torch.cuda.is_available():
        raise PruneError("--device cuda: no CUDA GPU is visible; use --device cpu")


def _run_with_weights(o: PruneOptions, hooks: PruneHooks, result: PruneResult, path: Path,
                      fixed: dict, axes: Axes | None, out: Path) -> PruneResult:
    import torch

    from nanocli_model import load_pretrained

    from ..prune import depth as dp
    from ..prune.evaluate import proxy, short_distill
    from ..prune.slicing import make_plan, prune_model

    parent = result.parent
    torch.manual_seed(o.seed)
    device = torch.device("cuda" if o.device == "cuda" or (o.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    hooks.status(f"loading {path} (fp32) on {device}")
    model = load_pretrained(path, dtype="fp32", device=device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    t = time.perf_counter()
    rows, heldout = _calibration(o, path, parent, hooks)
    result.seconds["data"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = _scores(o, model, rows, hooks, result)
    result.seconds["importance"] = time.perf_counter() - t

    # depth: one removal order per attention pin, cached in the scores file
    t = time.perf_counter()
    L = parent.num_hidden_layers
    depth_rows = rows[:o.depth_samples]
    depth_batches = [depth_rows[i:i + o.calib_batch, :-1] for i in range(0, depth_rows.shape[0], o.calib_batch)]
    orders: dict[int | None, dp.DepthOrder] = {}

    def order_for(pin: int | None, remove: int) -> dp.DepthOrder:
        key = f"{o.depth_metric}:{pin}"
        if pin in orders and len(orders[pin].order) >= remove:
            return orders[pin]
        cached = scores.depth.get(key)
        if cached is not None and len(cached) >= remove:  # an earlier run's order (from --scores)
            orders[pin] = dp.DepthOrder(o.depth_metric, pin, list(cached))
            return orders[pin]
        if o.depth_metric == "cosine":
            orders[pin] = dp.cosine_order(scores.block, parent.layer_types, remove, pin)
        else:
            hooks.status(f"depth: greedy logit-MSE order of {remove} layers (attention pin {pin})")
            orders[pin] = dp.greedy_order(model, depth_batches, remove, pin, hooks.progress)
        scores.depth[key] = orders[pin].order
        if result.scores_path is not None:
            scores.save(result.scores_path)
        return orders[pin]

    def kept_for(shape: Shape, pin: int | None) -> list[int]:
        return order_for(pin, L - shape.num_layers).kept(L, shape.num_layers)

    if axes is None:  # explicit target
        pin = fixed["keep_attention"]
        layers = kept_for(result.shape, pin) if result.shape.num_layers < L else list(range(L))
        n_att = sum(parent.layer_types[i] == ATTENTION for i in layers)
        shape = Shape(**{**result.shape.to_dict(), "num_attention_layers": n_att})
        check_shape(parent, shape)
        plan = make_plan(parent, scores, shape, layers)
        from nanocli_model.memory import param_count

        value = result.budget.measure(plan.config) if result.budget else 0
        result.chosen = Candidate(shape, plan.config.hybrid_override_pattern, param_count(plan.config).total, value, True)
        result.shape = shape
        result.seconds["depth"] = time.perf_counter() - t
    else:
        min_depth = min(n for n, _ in axes.depth)
        for _, a in axes.depth:
            order_for(a, L - min_depth)

        def pattern_for(s: Shape) -> str:
            return "".join(parent.hybrid_override_pattern[i] for i in kept_for(s, s.num_attention_layers))

        space = search(parent, axes, result.budget, pattern_for, pattern_source=f"depth order ({o.depth_metric})")
        result.space = space
        if space.fitting == 0:
            raise _no_fit(space)
        result.seconds["depth"] = time.perf_counter() - t
        t = time.perf_counter()
        pool = space.frontier[:o.proxy_candidates]
        held = [heldout[i:i + o.calib_batch] for i in range(0, heldout.shape[0], o.calib_batch)]
        train = [rows[i:i + o.calib_batch] for i in range(0, rows.shape[0], o.calib_batch)]
        for n, cand in enumerate(pool):
            plan = make_plan(parent, scores, cand.shape, kept_for(cand.shape, cand.shape.num_attention_layers))
            cand.proxy, cand.lm_loss = proxy(model, prune_model(model, plan), held)
            hooks.progress("proxy (KL to parent)", n + 1, len(pool))
        result.candidates = sorted(pool, key=lambda c: c.proxy)
        best = result.candidates[:o.top_k]
        result.seconds["proxy"] = time.perf_counter() - t
        t = time.perf_counter()
        if o.candidate_steps > 0:
            for n, cand in enumerate(best):
                hooks.status(f"distilling candidate {n + 1}/{len(best)}: {cand.shape.label()}")
                plan = make_plan(parent, scores, cand.shape, kept_for(cand.shape, cand.shape.num_attention_layers))
                student = prune_model(model, plan)
                label = f"distill {n + 1}/{len(best)}"
                short_distill(student, model, train, o.candidate_steps, o.candidate_lr,
                              lambda d, total, label=label: hooks.progress(label, d, total))
                cand.distilled, _ = proxy(model, student, held)
                del student
        result.chosen = min(best, key=lambda c: (c.distilled if c.distilled is not None else c.proxy))
        result.chosen.chosen = True
        result.shape = result.chosen.shape
        result.seconds["distill"] = time.perf_counter() - t
        plan = make_plan(parent, scores, result.shape, kept_for(result.shape, result.shape.num_attention_layers))
    t = time.perf_counter()
    pruned = prune_model(model, plan)
    pin = result.shape.num_attention_layers if axes is not None else fixed["keep_attention"]
    depth_info = asdict(orders[pin]) if pin in orders else None
    result.out = _write(o, result, path, pruned, plan, scores, depth_info, out)
    result.seconds["write"] = time.perf_counter() - t
    return result


def _calibration(o: PruneOptions, path: Path, parent: NanoConfig, hooks: PruneHooks):
    """(calibration rows (N, T + 1), held-out rows (M, T + 1)) from --calib-data, with the parent's tokenizer."""
    from nanocli_model.tokenizer import Tokenizer

    from ..data import BatchPlan, blend_phase, parse_data_spec, prepare_source

    if not (path / "tokenizer.json").is_file():
        raise PruneError(f"{path}: no tokenizer.json; the calibration data is tokenized with the model's tokenizer")
    if o.calib_seq_len > parent.max_position_embeddings:
        raise PruneError(f"--calib-seq-len {o.calib_seq_len} exceeds the model's max_position_embeddings "
                         f"({parent.max_position_embeddings})")
    specs = parse_data_spec(o.calib_data)
    tokenizer = Tokenizer.from_dir(path)
    cache = Path(o.cache_dir or os.environ.get("NANO_CACHE") or Path.home() / ".cache" / "nano")
    hooks.status(f"calibration data: {o.calib_data}")
    tokens = {s.name: prepare_source(s, tokenizer, cache, progress=hooks.progress, vocab_size=parent.vocab_size)
              for s in specs}
    plan = BatchPlan(tokens, [blend_phase(specs)], seq_len=o.calib_seq_len, global_batch=o.calib_samples,
                     total_steps=1, seed=o.seed, heldout_fraction=HELDOUT_FRACTION)
    return plan.batch(0), next(plan.eval_batches(1, o.heldout_samples))


def _scores(o: PruneOptions, model, rows, hooks: PruneHooks, result: PruneResult):
    from ..prune.importance import Scores, compute_scores

    path = Path(o.scores).expanduser() if o.scores else None
    result.scores_path = path
    if path is not None and path.is_file():
        hooks.status(f"importance scores: reusing {path}")
        result.scores_reused = True
        return Scores.load(path, model.config)
    ids = rows[:, :-1]  # (N, T)
    batches = (ids[i:i + o.calib_batch] for i in range(0, ids.shape[0], o.calib_batch))
    hooks.status(f"importance: {ids.shape[0]} sequences x {ids.shape[1]} tokens, one pass with hooks")
    meta = {"model": result.parent_name, "calib_data": o.calib_data, "calib_samples": ids.shape[0],
            "calib_seq_len": ids.shape[1], "seed": o.seed}
    scores = compute_scores(model, batches, ids.shape[0], hooks.progress, meta)
    if path is not None:
        scores.save(path)
    return scores


def _write(o: PruneOptions, result: PruneResult, path: Path, pruned, plan, scores, depth_info, out: Path) -> Path:
    from nanocli_model import save_pretrained
    from nanocli_model.checkpoint import resolve_dtype
    from nanocli_model.memory import param_count

    from ..train.checkpoints import hold_write_open
    from ..train.session import side_files
    from .fit_check import _default_dtype, resolve_model

    stored = _default_dtype(resolve_model(str(path)))
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
        hold_write_open(0.5)  # NANO_TEST_SLOW_SAVE: the kill trials' window into this write
        ckpt = save_pretrained(pruned, staging / "model", extra_files=side_files(path))
        (ckpt / "pruning.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        hold_write_open(0.5)
        if out.exists():
            out.rmdir()  # checked empty up front
        os.rename(ckpt, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
