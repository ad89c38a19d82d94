"""``nano bench``: generation throughput, and the hybrid-vs-Transformer comparison of the report (section 7).

The report's headline: Nemotron Nano 2 generates up to 6x faster than Qwen3-8B at 8k input / 16k output.
Why: 4 attention layers keep 16 KiB of KV per token where a dense GQA Transformer keeps ~144 KiB, and a
Mamba layer's state does not grow with the context, so each decode step reads less and far larger batches
fit. This module measures the same comparison for any NemotronH model:

1. **resolve**: the model (a checkpoint directory, or a profile built with random weights: throughput
   does not depend on weight values), the device, dtype, thread count and the (prompt, output) pairs;
2. **twin**: a pure-attention model built by nano itself: the same hidden size, vocabulary and attention
   shape, only attention + MLP layers (``*-`` repeated), with the layer count and FFN width chosen so its
   parameter count is within ``TWIN_TOLERANCE`` of the hybrid's (``memory.param_count``);
3. **measure**: for every pair, runs interleaved hybrid, twin, hybrid, twin (``repeats`` times, after an
   untimed warm-up of each model) through nano's cached generator (``generation.generate``, greedy, EOS
   ignored, random prompt ids): prefill, decode, overall tokens/s, the time of each decode step (as the
   context grows), the cache bytes predicted by ``memory.cache_bytes`` and those really allocated; with
   ``--max-batch`` each model at the largest batch a memory budget fits (``bench_memory.py``: CPU RAM or GPU);
4. **summarise**: medians over the repeats and the hybrid / Transformer ratios.

``run(options, reporter) -> BenchResult`` (``bench_results.py``); rendering lives in ``commands/bench.py``, the
plot in ``plot.plot_bench``. torch is imported only inside the functions that run models.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nanocli_model import memory
from nanocli_model.config import ATTENTION, MAMBA, MLP, NanoConfig
from nanocli_model.errors import NanoError

from . import settings
from .bench_memory import (
    MAX_AUTO_BATCH,
    Budget,
    batch_need,
    cpu_budget,
    gpu_budget,
    largest_batch,
    peak_rss_rise,
    reset_peak_rss,
)
from .bench_results import BenchResult, Measurement, ModelInfo, PairResult, Run
from .report import SILENT, Reporter
from .resolve import model_target, torch_dtype, visible_device
from .settings import flag

TWIN_TOLERANCE = 0.05  # the twin's total parameters are within 5% of the hybrid's (usually well under 1%)
FFN_MULTIPLE = 16  # the twin's FFN width is rounded to a multiple of this
CPU_LENGTHS = "512:1024,1024:2048,2048:4096"
GPU_LENGTHS = "1024:2048,8192:16384"  # the report's 8k in / 16k out
QUICK_LENGTHS = "64:128"
CURVE_POINTS = 8  # positions sampled on the time-per-output-token curve
_TOKENS = re.compile(r"(\d+)([kK]?)")


class BenchError(NanoError):
    """Bad input to ``nano bench`` (lengths, batch, device, model), or a twin that cannot be built."""


# ------------------------------------------------------------------------------------------ options
@dataclass
class BenchModel(settings.Group):
    """What runs, and on what."""

    panel = "Models"

    model: str | None = flag(None, aliases=("-m",))
    """A NemotronH checkpoint directory, or a model profile name (random weights: speed does not depend on their
    values)."""
    compare_transformer: bool = True
    """Also run a pure-attention model of the same hidden size and about the same parameters; report the ratio."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the models run (auto: CUDA when a GPU is visible, else the CPU)."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto (bf16 on CUDA; on CPU fp32, or bf16 if only bf16 fits the available memory), fp32, bf16 or fp16."""
    threads: int | None = None
    """torch threads (the house figures use 1; default: torch's)."""
    compile: bool = False
    """Decode through compiled steps (as nano generate compiles them), compiled or loaded before the timing."""

    def check(self) -> None:
        if self.model is None:
            raise settings.OptionError("--model is required: a NemotronH checkpoint directory or a model profile "
                                       "name (see `nano profiles`)")
        settings.at_least(self, 1, "threads")


@dataclass
class Workload(settings.Group):
    """What each model is asked to generate, and how often."""

    panel = "Workload"

    lengths: str | None = None
    """PROMPT:OUTPUT pairs, e.g. 512:1024,1024:2048 or 8k:16k (default: 512:1024,1024:2048,2048:4096 on CPU;
    1024:2048,8k:16k on CUDA)."""
    batch: int = 1
    """Sequences per run."""
    max_batch: bool = False
    """The largest batch that fits --memory, per model and pair, from nano's memory model (instead of --batch;
    at most 256)."""
    memory: float | None = None
    """GiB each model's batch may use with --max-batch: its cache and prefill activations, the weights aside
    (default: on CPU the available host memory less the two models' load and a 1 GiB margin; on CUDA 85% of the
    free GPU memory)."""
    repeats: int | None = None
    """Timed runs per model and pair, interleaved (default 3; 1 with --quick)."""
    quick: bool = False
    """Smoke run: 64:128, one repeat."""
    prefill_chunk: int = 2048
    """Prompt tokens per forward."""
    seed: int = 0
    """Random weights and prompt ids."""

    def check(self) -> None:
        settings.at_least(self, 1, "repeats", "prefill_chunk")
        if parse_batch(self.batch) != 1 and self.max_batch:
            raise settings.OptionError(f"give --batch {self.batch} or --max-batch, not both")
        settings.finite(self, "memory", positive=True)
        if self.memory is not None and not self.max_batch:
            raise settings.OptionError("--memory is the budget of --max-batch; give --max-batch too")
        if self.lengths is not None:
            parse_lengths(self.lengths)


@dataclass
class BenchOptions(Workload, BenchModel):
    """Everything ``nano bench`` can be told."""


# ------------------------------------------------------------------------------------- input parsing
def _tokens(text: str, what: str) -> int:
    m = _TOKENS.fullmatch(text.strip().replace("_", ""))
    if not m:
        raise BenchError(f"--lengths: {what} {text.strip()!r} is not a number of tokens (e.g. 512 or 8k)")
    value = int(m.group(1)) * (1024 if m.group(2) else 1)
    if value <= 0:
        raise BenchError(f"--lengths: {what} must be at least 1 token, got {text.strip()!r}")
    return value


def parse_lengths(text: str) -> list[tuple[int, int]]:
    """``"512:1024,8k:16k"`` -> ``[(512, 1024), (8192, 16384)]``; a one-line ``BenchError`` otherwise."""
    pairs = []
    for item in str(text).split(","):
        parts = item.strip().split(":")
        if len(parts) != 2:
            raise BenchError(f"--lengths: {item.strip()!r} is not PROMPT:OUTPUT; give pairs such as "
                             "512:1024,1024:2048")
        pairs.append((_tokens(parts[0], "prompt length"), _tokens(parts[1], "output length")))
    if len(set(pairs)) != len(pairs):
        raise BenchError(f"--lengths: {text!r} repeats a pair")
    return pairs


def parse_batch(value: str | int) -> int | str:
    """A whole number >= 1, or ``"max"``."""
    text = str(value).strip().lower()
    if text == "max":
        return "max"
    try:
        n = int(text)
    except ValueError:
        raise BenchError(f"--batch {value!r}: expected a whole number (or --max-batch)") from None
    if n < 1:
        raise BenchError(f"--batch must be at least 1, got {value!r}")
    return n


# -------------------------------------------------------------------------------------- the twin
def _attention_shape(c: NanoConfig) -> dict[str, int]:
    """The hybrid's own attention shape; for a model without attention, a GQA shape for its width."""
    if c.count(ATTENTION):
        return dict(num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                    head_dim=c.head_dim)
    head_dim = 128 if c.hidden_size >= 2048 else 64
    heads = max(1, c.hidden_size // head_dim)
    kv = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // 4))
    return dict(num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim)


def transformer_twin(c: NanoConfig, tolerance: float = TWIN_TOLERANCE) -> NanoConfig:
    """A pure-attention model (``*-`` blocks) with ``c``'s hidden size, vocabulary and attention shape,
    and about ``c``'s parameters: the layer count from the hybrid's per-layer parameters over one
    attention + MLP block at the hybrid's FFN width, then the FFN width solved for the rest."""
    twin = c.replace(hybrid_override_pattern="*-", **_attention_shape(c))
    target = sum(memory.param_count(c).per_layer)  # embeddings, lm_head and norm_f are the same in both
    attn = memory.attention_layer_params(twin)
    mlp_at = [memory.mlp_layer_params(twin.replace(intermediate_size=f)) for f in (1, 2)]
    per_f, mlp_fixed = mlp_at[1] - mlp_at[0], 2 * mlp_at[0] - mlp_at[1]  # mlp(f) = per_f * f + mlp_fixed
    blocks = max(1, round(target / (attn + memory.mlp_layer_params(twin.replace(intermediate_size=c.intermediate_size)))))
    ffn = (target / blocks - attn - mlp_fixed) / per_f
    ffn = max(FFN_MULTIPLE, FFN_MULTIPLE * round(ffn / FFN_MULTIPLE))
    twin = twin.replace(hybrid_override_pattern="*-" * blocks, intermediate_size=ffn)
    hybrid_total, twin_total = memory.param_count(c).total, memory.param_count(twin).total
    if abs(twin_total - hybrid_total) > tolerance * hybrid_total:
        raise BenchError(f"cannot build a pure-attention model within {tolerance:.0%} of the hybrid's "
                         f"{hybrid_total:,} parameters (best: {twin_total:,}, {blocks} attention + MLP blocks); "
                         "use --no-compare-transformer")
    return twin


def model_info(role: str, name: str, source: str, c: NanoConfig, dtype: str) -> ModelInfo:
    p = memory.param_count(c)
    one = memory.cache_bytes(c, batch=1, max_len=1, dtype=dtype)
    return ModelInfo(
        role=role, name=name, source=source, pattern=c.hybrid_override_pattern, hidden_size=c.hidden_size,
        vocab_size=c.vocab_size, layers={k: c.count(k) for k in (MAMBA, MLP, ATTENTION)},
        intermediate_size=c.intermediate_size,
        attention_shape=f"{c.num_attention_heads} / {c.num_key_value_heads} x {c.head_dim}",
        params=p.total, non_embedding_params=p.non_embedding, kv_bytes_per_token=one.kv,
        state_bytes_per_sequence=one.conv + one.ssm)


# ------------------------------------------------------------------------------------- resolving
@dataclass
class _Plan:
    config: NanoConfig
    name: str
    source: str
    path: Path | None  # checkpoint directory, or None for a profile
    lengths: list[tuple[int, int]]
    batch: int | str
    device: str
    dtype: str  # fp32 | bf16 | fp16
    repeats: int
    note: str | None = None  # why --dtype auto chose bf16 on this CPU (host_memory.plan_cpu_load)
    twin: NanoConfig | None = None  # the pure-attention twin, when compared
    budget: Budget | None = None  # --max-batch on CPU (on CUDA: known once the models are loaded)


def resolve(o: BenchOptions) -> _Plan:
    """Check every option (one-line ``BenchError``s) before anything heavy is loaded."""
    settings.validate(o, BenchError)
    batch = "max" if o.max_batch else parse_batch(o.batch)
    lengths = parse_lengths(o.lengths) if o.lengths is not None else None
    target = model_target(o.model, kinds=("profile", "checkpoint", "run"))
    config, name, path = target.config, target.name, target.directory
    source = "checkpoint" if path is not None else "profile (random weights)"
    device = visible_device(o.device)
    twin = transformer_twin(config) if o.compare_transformer else None
    dtype, note, budget = o.dtype if o.dtype != "auto" else ("bf16" if device == "cuda" else "fp32"), None, None
    if device == "cpu":  # before a weight is read or built: do both models fit this machine's memory?
        host = _cpu_plan(o, config, twin, name, path)
        dtype, note = host.dtype, host.note
        budget = cpu_budget(o.memory, host) if batch == "max" else None
    if lengths is None:
        lengths = parse_lengths(QUICK_LENGTHS if o.quick else GPU_LENGTHS if device == "cuda" else CPU_LENGTHS)
    repeats = o.repeats if o.repeats is not None else (1 if o.quick else 3)
    plan = _Plan(config, name, source, path, lengths, batch, device, dtype, repeats, note, twin, budget)
    if budget is not None:  # a budget too small for one sequence: said now, before anything is built
        for p_len, out_len in lengths:
            batches(plan, p_len, out_len, o.prefill_chunk, budget)
    return plan


def _cpu_plan(o: BenchOptions, config: NanoConfig, twin: NanoConfig | None, name: str, path: Path | None):
    """The dtype both models run in on the CPU (auto: fp32, else bf16), checked against the host's memory
    (``host_memory.plan_cpu_load``): the checkpoint as loaded (or the profile as built) plus the twin."""
    from nanocli_model.headers import read_checkpoint_tensors

    from . import host_memory

    tensors = read_checkpoint_tensors(path) if path is not None else None

    def need(dtype: str) -> host_memory.LoadNeed:
        own = host_memory.load_need(tensors, dtype) if tensors else host_memory.built_need(config, dtype)
        return own if twin is None else own + host_memory.built_need(twin, dtype)

    what = name if twin is None else f"{name} with its pure-attention twin"
    return host_memory.plan_cpu_load(what, need, o.dtype)


# ------------------------------------------------------------------------------------- measuring
def _build(config: NanoConfig, plan: _Plan, seed: int):
    """Random weights built straight in the run's dtype on its device (a profile, or the twin)."""
    import torch

    from .measure import build_on_device

    torch.manual_seed(seed)
    return build_on_device(config, torch_dtype(plan.dtype), torch.device(plan.device))


def _load(plan: _Plan, seed: int):
    if plan.path is None:
        return _build(plan.config, plan, seed)
    from nanocli_model import load_pretrained

    return load_pretrained(plan.path, dtype=plan.dtype, device=plan.device).eval()


def _prompt(vocab: int, length: int, seed: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


def _generate_once(model, prompt: list[int], batch: int, output: int, cache, chunk: int,
                   step=None) -> tuple[Run, Any]:
    """One greedy generation with EOS ignored, every decode step timed through the token callback."""
    from nanocli_model.generation import SamplingParams, generate

    stamps: list[float] = []

    def on_token(row: int, token: int, forced: bool) -> None:
        if row == 0:  # the callback runs after the step's ids reached the host (a sync on CUDA)
            stamps.append(time.perf_counter())

    params = SamplingParams(temperature=0.0, max_new_tokens=output, ignore_eos=True, seed=0)
    r = generate(model, [prompt] * batch, params, cache=cache, prefill_chunk=chunk,
                 max_context=len(prompt) + output, on_token=on_token, decode_step=step)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    run = Run(prefill_seconds=r.prefill_seconds, decode_seconds=r.decode_seconds, prefill_tokens=r.prompt_tokens,
              output_tokens=r.generated_tokens, decode_tokens=r.decode_tokens, step_seconds=steps)
    return run, r


def curve(prompt: int, step_seconds: list[float], points: int = CURVE_POINTS) -> list[tuple[int, float]]:
    """(context, ms per step) as the context grows: the decode steps cut into ``points`` equal consecutive
    segments, each summarised by its median step time (robust to a busy machine's stalls) at the context of
    its middle step. Step ``k`` (0-based) feeds token k and leaves ``prompt + k + 1`` tokens in the cache."""
    n = len(step_seconds)
    points = min(points, n)
    out = []
    for i in range(points):
        lo, hi = i * n // points, (i + 1) * n // points
        out.append((prompt + (lo + hi - 1) // 2 + 1, 1e3 * statistics.median(step_seconds[lo:hi])))
    return out


def _path(plan: _Plan) -> str:
    """Whose activations ``fit.estimate`` models: the CPU scan's, or the CUDA kernels'."""
    return "cpu" if plan.device == "cpu" else "cuda"


def _configs(plan: _Plan) -> dict[str, NanoConfig]:
    return {"hybrid": plan.config} | ({"transformer": plan.twin} if plan.twin is not None else {})


def batches(plan: _Plan, prompt: int, output: int, chunk: int, budget: Budget | None = None,
            notes: list[str] | None = None) -> dict[str, int]:
    """Each model's batch at one pair: ``--batch``, or with ``--max-batch`` the largest ``budget`` fits
    (``bench_memory.largest_batch``, prompts prefilled ``chunk`` tokens at a time: the activations grow with
    it); a batch held at ``MAX_AUTO_BATCH`` is said in ``notes``."""
    if plan.batch != "max":
        return {role: int(plan.batch) for role in _configs(plan)}
    out = {}
    for role, config in _configs(plan).items():
        what = "pure-attention twin" if role == "transformer" else "hybrid"
        out[role], fits = largest_batch(config, plan.dtype, prompt, prompt + output, budget, chunk, _path(plan),
                                        what)
        if notes is not None and out[role] != fits:
            notes.append(f"{prompt}:{output} {role}: the budget fits "
                         f"{'any batch' if fits is None else f'{fits:,} sequences'}; capped at {MAX_AUTO_BATCH}")
    return out


def _measure(model, plan: _Plan, prompt: list[int], output: int, batch: int, chunk: int, runs: list[Run],
             peaks: list[tuple[int, str]], step=None) -> int:
    """One timed run of ``model`` appended to ``runs``; returns the bytes its cache really holds. On a CPU the
    peak recorded is the rise of the process's peak RSS over the run (cache included), where Linux tells it."""
    import torch

    start = reset_peak_rss() if plan.device == "cpu" else None
    cache = model.allocate_cache(batch, len(prompt) + output)
    measured = cache.nbytes()
    if plan.device == "cuda":  # what the allocator really handed out for it
        measured = sum(t.untyped_storage().nbytes() for t in cache.tensors())
    try:
        run, r = _generate_once(model, prompt, batch, output, cache, chunk, step)
    except torch.cuda.OutOfMemoryError:
        raise BenchError(f"out of GPU memory at batch {batch} x {len(prompt) + output:,} tokens; give a smaller "
                         "--batch or shorter --lengths") from None
    runs.append(run)
    rise = peak_rss_rise(start)
    peaks.append((r.peak_memory_bytes, r.peak_memory_source) if rise is None else
                 (rise, "peak RSS rise over the run"))
    del cache
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    return measured


def _summarise(role: str, config: NanoConfig, plan: _Plan, prompt: int, output: int, batch: int, chunk: int,
               runs: list[Run], measured: int, peaks: list[tuple[int, str]]) -> Measurement:
    med = statistics.median
    curves = [curve(prompt, r.step_seconds) for r in runs]
    ms = [(ctx, med(c[i][1] for c in curves)) for i, (ctx, _) in enumerate(curves[0])]
    predicted = memory.cache_bytes(config, batch, prompt + output, dtype=plan.dtype)
    need = batch_need(config, plan.dtype, prompt, prompt + output, batch, chunk, _path(plan))
    return Measurement(
        role=role, prompt=prompt, output=output, batch=batch,
        prefill_tokens_per_s=med(r.prefill_tokens / r.prefill_seconds for r in runs),
        decode_tokens_per_s=med(r.decode_tokens / r.decode_seconds if r.decode_seconds > 0 else 0.0 for r in runs),
        output_tokens_per_s=med(r.output_tokens_per_s for r in runs),
        total_seconds=med(r.total_seconds for r in runs), ms_per_token=ms,
        cache_predicted=predicted, cache_measured=measured, peak_memory_bytes=max(p for p, _ in peaks),
        peak_memory_source=peaks[0][1], runs=runs, memory_predicted=need.total - need.weights)


def _warm_up(model, chunk: int, step=None) -> None:
    """Untimed: the first cached decode step re-lays the CPU weights out for decode (model.py), a compiled
    ``step`` compiles, and the first calls pay one-off allocator / kernel set-up costs."""
    from nanocli_model.generation import SamplingParams, generate

    prompt = _prompt(model.config.vocab_size, min(64, chunk), seed=1)
    generate(model, [prompt], SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, seed=0),
             prefill_chunk=chunk, max_context=len(prompt) + 8, decode_step=step)


def _load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except (OSError, AttributeError):
        return None


def run(o: BenchOptions, reporter: Reporter | None = None) -> BenchResult:
    """Measure the model (and its pure-attention twin) at every (prompt, output) pair; medians and ratios."""
    reporter = reporter or SILENT
    plan = resolve(o)
    import torch

    from nanocli_model import kernels

    if o.threads is not None:
        torch.set_num_threads(o.threads)
    started, load_before = time.perf_counter(), _load_average()
    configs = _configs(plan)
    infos = [model_info("hybrid", plan.name, plan.source, plan.config, plan.dtype)]
    if plan.twin is not None:
        infos.append(model_info("transformer", "pure-attention twin", "built by nano (random weights)",
                                plan.twin, plan.dtype))
    notes = [plan.note] if plan.note else []
    longest = max(p + n for p, n in plan.lengths)
    if longest > plan.config.max_position_embeddings:
        notes.append(f"{longest:,} tokens exceed the model's max_position_embeddings "
                     f"({plan.config.max_position_embeddings:,}); NemotronH has no positional encoding, so the "
                     "cost is measured anyway")

    reporter.status(f"loading {plan.name} ({plan.source}) on {plan.device}, {plan.dtype}")
    models = {"hybrid": _load(plan, o.seed)}
    if plan.twin is not None:
        reporter.status(f"building the pure-attention twin: {infos[1].pattern} ({infos[1].params:,} parameters vs "
                     f"{infos[0].params:,})")
        models["transformer"] = _build(configs["transformer"], plan, o.seed + 1)
    steps = {role: None for role in models}
    if o.compile:
        from .stages.generate import compile_decode

        reporter.status("compiling the decode steps (as nano generate does; kept for the next run)")
        steps = {role: compile_decode(model) for role, model in models.items()}
    with torch.inference_mode():
        for role, model in models.items():
            _warm_up(model, o.prefill_chunk, steps[role])
    for role, step in steps.items():
        if step is not None and step.fallback_reason:
            notes.append(f"{role}: --compile fell back to eager: {step.fallback_reason}")

    pairs = []
    for i, (p_len, out_len) in enumerate(plan.lengths):
        prompt = _prompt(plan.config.vocab_size, p_len, seed=o.seed + i)
        if plan.batch == "max" and plan.device == "cuda":  # what the loaded models left free
            plan.budget = gpu_budget(o.memory, torch.cuda.mem_get_info()[0])
        sizes = batches(plan, p_len, out_len, o.prefill_chunk, plan.budget, notes)
        runs: dict[str, list[Run]] = {role: [] for role in models}
        peaks: dict[str, list[tuple[int, str]]] = {role: [] for role in models}
        measured: dict[str, int] = {}
        for rep in range(plan.repeats):
            for role, model in models.items():  # A B A B: machine noise hits both alike
                measured[role] = _measure(model, plan, prompt, out_len, sizes[role], o.prefill_chunk,
                                          runs[role], peaks[role], steps[role])
                last = runs[role][-1]
                reporter.status(f"{p_len}:{out_len} {role} run {rep + 1}/{plan.repeats}: batch {sizes[role]}, "
                             f"{last.output_tokens_per_s:,.1f} output tok/s")
        m = {role: _summarise(role, configs[role], plan, p_len, out_len, sizes[role], o.prefill_chunk, runs[role],
                              measured[role], peaks[role]) for role in models}
        pairs.append(PairResult(p_len, out_len, m["hybrid"], m.get("transformer")))

    ran = kernels.status(models["hybrid"].lm_head.weight.device)
    return BenchResult(
        models=infos, pairs=pairs, device=plan.device if plan.device == "cpu" else torch.cuda.get_device_name(),
        dtype=plan.dtype, threads=torch.get_num_threads(), batch=str(plan.batch), repeats=plan.repeats,
        kernels=ran.label, kernels_detail=ran.describe(), load_before=load_before,
        load_after=_load_average(), seconds=time.perf_counter() - started, torch_version=torch.__version__,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs", notes=notes,
        memory_budget=None if plan.budget is None else plan.budget.bytes,
        memory_budget_source=None if plan.budget is None else plan.budget.source,
        decode="compiled" if o.compile and all(s and s.compiled for s in steps.values()) else "eager")
