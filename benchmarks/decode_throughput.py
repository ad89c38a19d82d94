"""Single-token decode throughput: nano (eager, and its default: the ahead-of-time compiled step, with nano's own
GEMVs and, for comparison, with inductor's / MKL's) vs transformers' NemotronH, same weights, same threads, fp32.

    .venv/bin/python benchmarks/decode_throughput.py --threads 1
    .venv/bin/python benchmarks/decode_throughput.py --settings small:256:128 --reps 5 --no-curve

Each run prefills the prompt through the model's own cache, then decodes greedily one token at a time
(``model(tok[:, None], cache)`` for nano eager; an ``AotDecode`` (what ``nano generate`` runs by default on CPU)
and one built under ``row_gemv.use(False)``, each on a copy of the same weights;
``hf(tok[:, None], cache=out.cache, use_cache=True)`` for transformers) and times the decode steps only. Runs
alternate A B C A B C (the bandwidth probes too) so machine noise hits all alike; the table gives medians.
Compiles are timed apart, in the last columns: each ahead-of-time library's build (its first step, into a fresh
directory unless --library-dir) and the default's load by a second copy.

Decode on a CPU streams every weight once per token, so the table also gives the weight-streaming limit:
the fp32 weight bytes a token reads (every matrix; the embedding table is a row lookup, so it counts
unless it is tied to lm_head) over this machine's bandwidth, measured here at the same thread count, on
2 MiB pages as nano keeps its decode weights. Two bandwidths: MKL's fp32 GEMV on a 4096 x 16384 matrix
(issue #3's "GEMV limit") and a plain streaming read (``sum`` of 256 MB), which on this CPU is faster
than any GEMV measured here. With --batch the limit columns compare decode steps/s (a step reads the
weights once for the whole batch). The curve shows decode ms/token at growing context: flat for the
Mamba layers, growing for attention (it reads the whole KV cache every token).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_throughput import build_pair, load_profile  # noqa: E402

from nanocli_model import NanoForCausalLM, row_gemv  # noqa: E402
from nanocli_model.aot_decode import AotDecode  # noqa: E402
from nanocli_model.decode import huge_page_arena  # noqa: E402
from nanocli_model.layers import Attention, Mamba2Mixer  # noqa: E402


def _huge(numel: int) -> torch.Tensor:
    """float32 random numbers on 2 MiB pages, as nano's decode keeps its weights (the fastest this machine reads)."""
    t = huge_page_arena(numel * 4).view(torch.float32)
    return t.copy_(torch.randn(numel))


def bandwidth_runner(kind: str, burst: int = 5):
    """A runner for ``alternate`` returning seconds per byte streamed (the best of a short burst): ``"gemv"``,
    MKL's fp32 ``W @ x`` with a 4096 x 16384 W; ``"read"``, ``sum`` of 256 MB. Both far larger than the caches,
    on huge pages. Timed between the decode runs, so the limit sees the same machine the decode does."""
    if kind == "gemv":
        W, x = _huge(4096 * 16384).view(4096, 16384), torch.randn(16384)
        op, nbytes = (lambda: W @ x), W.numel() * 4
    else:
        a = _huge(64 << 20)
        op, nbytes = a.sum, a.numel() * 4
    op()

    def run() -> float:
        best = float("inf")
        for _ in range(burst):
            t = time.perf_counter()
            op()
            best = min(best, time.perf_counter() - t)
        return best / nbytes
    return run


def weight_bytes_per_token(model: NanoForCausalLM) -> int:
    """Bytes of parameters a decode step reads: everything but an untied embedding table (a row lookup)."""
    emb = model.backbone.embeddings.weight
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (p is emb and model.lm_head.weight is not emb):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def nano_decoder(model, prompt: torch.Tensor, gen: int, step=None):
    """``step`` (default: the model itself) runs the decode steps: an ``AotDecode`` for the compiled rows."""
    step = step or model

    def run() -> float:
        cache = model.allocate_cache(prompt.shape[0], prompt.shape[1] + gen)
        tok = model(prompt, cache, logits_to_keep=1)[:, -1].argmax(-1)
        t = time.perf_counter()
        for _ in range(gen - 1):
            tok = step(tok[:, None], cache)[:, -1].argmax(-1)
        return (time.perf_counter() - t) / (gen - 1)
    return run


def aot_copy(model, directory: str, batch: int):
    """(copy of ``model``, its ``AotDecode`` (nano generate's default decode on CPU), seconds its first
    step took: the compile, seconds the first step of a second copy took: loading the kept library)."""
    def first_step(twin, step) -> float:
        cache = twin.allocate_cache(batch, 8)
        ids = torch.zeros(batch, 1, dtype=torch.long)
        with torch.inference_mode():
            twin(ids, cache)
            t = time.perf_counter()
            step(ids, cache)
        if step.fallback_reason:
            raise SystemExit(f"ahead-of-time decode unavailable: {step.fallback_reason}")
        return time.perf_counter() - t

    twin = copy.deepcopy(model)
    step = AotDecode(twin, directory)
    build = first_step(twin, step)
    other = copy.deepcopy(model)
    load = first_step(other, AotDecode(other, directory))
    return twin, step, build, load


def hf_decoder(hf, prompt: torch.Tensor, gen: int):
    def run() -> float:
        out = hf(prompt, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1)
        t = time.perf_counter()
        for _ in range(gen - 1):
            out = hf(tok[:, None], cache=out.cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
        return (time.perf_counter() - t) / (gen - 1)
    return run


def alternate(runs: dict, reps: int) -> dict[str, float]:
    """Median seconds/token of each runner, runs interleaved A B A B after one warm-up each."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for f in runs.values():
            f()
        for _ in range(reps):
            for name, f in runs.items():
                times[name].append(f())
    return {k: statistics.median(v) for k, v in times.items()}


def compiled_ms(model, step, context: int, steps: int = 32, reps: int = 5) -> float:
    """Whole-model decode ms/token of a compiled step with ``context`` tokens in the cache (zeros)."""
    cache = model.allocate_cache(1, context + steps + 1)
    best = float("inf")
    with torch.inference_mode():
        for r in range(reps + 1):
            cache.seq_len = context
            tok = torch.zeros(1, dtype=torch.long)
            t = time.perf_counter()
            for _ in range(steps):
                tok = step(tok[:, None], cache)[:, -1].argmax(-1)
            if r:  # the first pass may compile for a new length
                best = min(best, (time.perf_counter() - t) / steps)
    return 1e3 * best


def context_curve_ms(model, context: int, steps: int = 32, reps: int = 5) -> tuple[float, float, float]:
    """(Mamba mixers, attention mixers, whole model) decode ms/token with ``context`` tokens in the cache.

    The cache position is set directly (its contents stay zeros: the cost does not depend on them), so a
    16k context needs no 16k-token prefill. Mixer times sum their forward calls (timed through hooks, in a
    separate pass from the whole-model time, which runs without hooks)."""
    kinds = {"mamba": Mamba2Mixer, "attention": Attention}
    spent = {k: 0.0 for k in kinds}
    starts: dict[int, float] = {}

    def pre(mod, args):
        starts[id(mod)] = time.perf_counter()

    def post_for(kind):
        def post(mod, args, out):
            spent[kind] += time.perf_counter() - starts[id(mod)]
        return post

    def run(n: int) -> float:
        cache.seq_len = context
        tok = torch.zeros(1, dtype=torch.long)
        t = time.perf_counter()
        for _ in range(n):
            tok = model(tok[:, None], cache)[:, -1].argmax(-1)
        return (time.perf_counter() - t) / n

    cache = model.allocate_cache(1, context + steps + 1)
    best = {"mamba": float("inf"), "attention": float("inf"), "all": float("inf")}
    with torch.inference_mode():
        run(4)
        for _ in range(reps):
            best["all"] = min(best["all"], run(steps))
        hooks = [h for m in model.modules() for kind, cls in kinds.items() if isinstance(m, cls)
                 for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post_for(kind)))]
        try:
            for _ in range(reps):
                spent.update(mamba=0.0, attention=0.0)
                run(steps)
                for kind in kinds:
                    best[kind] = min(best[kind], spent[kind] / steps)
        finally:
            for h in hooks:
                h.remove()
    return 1e3 * best["mamba"], 1e3 * best["attention"], 1e3 * best["all"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["small:256:128", "small:2048:512", "medium:256:128"],
                    help="profile:prompt:generate triples")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="alternating timed runs per setting (medians)")
    ap.add_argument("--curve-profile", default="small")
    ap.add_argument("--contexts", nargs="+", type=int, default=[256, 1024, 4096, 16384])
    ap.add_argument("--no-curve", action="store_true")
    ap.add_argument("--no-hf", action="store_true", help="time nano only")
    ap.add_argument("--no-compile", action="store_true", help="time the eager nano decode only")
    ap.add_argument("--library-dir", default=None,
                    help="where the ahead-of-time decode keeps its libraries (default: a fresh temporary "
                         "directory, so the build column is a first run's compile)")
    args = ap.parse_args()
    library_dir = args.library_dir or tempfile.mkdtemp(prefix="nano-bench-decode-")
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}  batch={args.batch}  load average={os.getloadavg()[0]:.2f}  "
          f"torch={torch.__version__}")
    print("GEMV limit = GEMV bandwidth (MKL fp32 W @ x, W 4096 x 16384) / weight bytes per token: issue #3's limit; "
          "read limit = the same with a plain streaming read (sum of 256 MB). Both measured between the decode "
          "runs, huge pages, medians.")
    print("nano default = nano generate's decode on CPU (the ahead-of-time compiled step, AotDecode, calling nano's "
          "own GEMVs, row_gemv.py); inductor GEMV = the same step built with row_gemv.use(False) (row-dot loops / "
          f"MKL, what the default ran before: {row_gemv.reason() or 'row_gemv available'}). Build s: the first "
          "compile; load s: a second run loading the kept library.")
    print("| profile | prompt | generate | transformers tok/s | nano eager tok/s | eager vs transformers "
          "| nano default, inductor GEMV tok/s | nano default tok/s | default vs transformers | default vs eager "
          "| weight MB/token | GEMV GB/s | GEMV limit tok/s | eager % | default % | read GB/s "
          "| default % of read limit | inductor-GEMV build s | build s | load s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    bandwidth = {kind: bandwidth_runner(kind) for kind in ("gemv", "read")}
    pairs: dict[str, tuple] = {}
    for setting in args.settings:
        name, prompt_len, gen = setting.split(":")
        prompt_len, gen = int(prompt_len), int(gen)
        if name not in pairs:
            nano, hf = build_pair(load_profile(name))
            if args.no_compile:
                compiled = (None, None, float("nan"))
            else:  # the same ahead-of-time step with inductor's / MKL's GEMVs instead of nano's own
                with row_gemv.use(False):
                    compiled = aot_copy(nano, library_dir, args.batch)[:3]
            aot = (None, None, float("nan"), float("nan")) if args.no_compile else aot_copy(nano, library_dir,
                                                                                             args.batch)
            pairs[name] = (nano, hf, *compiled, *aot)
        nano, hf, twin, step, compile_s, aot_twin, aot_step, build_s, load_s = pairs[name]
        prompt = torch.randint(0, nano.config.vocab_size, (args.batch, prompt_len),
                               generator=torch.Generator().manual_seed(0))
        runs = {"nano": nano_decoder(nano, prompt, gen)}
        if step is not None:
            runs["compiled"] = nano_decoder(twin, prompt, gen, step)
            runs["default"] = nano_decoder(aot_twin, prompt, gen, aot_step)
        if not args.no_hf:
            runs["hf"] = hf_decoder(hf, prompt, gen)
        med = alternate({**runs, **bandwidth}, args.reps)  # the warm-up also sets the eager decode layout
        wbytes = weight_bytes_per_token(nano)
        gemv_bw, read_bw = 1e-9 / med.pop("gemv"), 1e-9 / med.pop("read")  # GB/s
        limit, read_limit = gemv_bw * 1e9 / wbytes, read_bw * 1e9 / wbytes
        tps = {k: args.batch / v for k, v in med.items()}
        nan = float("nan")
        hf_tps, nano_tps = tps.get("hf", nan), tps["nano"]
        comp_tps, aot_tps = tps.get("compiled", nan), tps.get("default", nan)
        print(f"| {name} | {prompt_len} | {gen} | {hf_tps:.0f} | {nano_tps:.0f} | {nano_tps / hf_tps:.2f}x | "
              f"{comp_tps:.0f} | {aot_tps:.0f} | {aot_tps / hf_tps:.2f}x | {aot_tps / nano_tps:.2f}x | "
              f"{wbytes / 1e6:.1f} | {gemv_bw:.1f} | {limit:.0f} | {100 * nano_tps / limit:.0f}% | "
              f"{100 * aot_tps / limit:.0f}% | {read_bw:.1f} | {100 * aot_tps / read_limit:.0f}% | "
              f"{compile_s:.0f} | {build_s:.0f} | {load_s:.2f} |", flush=True)
    if args.no_curve:
        return
    name = args.curve_profile
    if name not in pairs:
        nano = build_pair(load_profile(name))[0]
        with row_gemv.use(False):
            compiled = (None, None, 0.0) if args.no_compile else aot_copy(nano, library_dir, 1)[:3]
        pairs[name] = (nano, None, *compiled,
                       *((None, None, 0.0, 0.0) if args.no_compile else aot_copy(nano, library_dir, 1)))
    nano, _, twin, step, _, aot_twin, aot_step, _, _ = pairs[name]
    print(f"\ncontext curve ({name}, batch 1): decode ms/token with the context already cached "
          "(eager layer split through hooks)")
    print("| context | Mamba layers ms/token | attention layers ms/token | whole model ms/token "
          "| default, inductor GEMV ms/token | default ms/token |")
    print("|---:|---:|---:|---:|---:|---:|")
    for ctx in args.contexts:
        m, a, w = context_curve_ms(nano, ctx)
        c = compiled_ms(twin, step, ctx) if step is not None else float("nan")
        d = compiled_ms(aot_twin, aot_step, ctx) if aot_step is not None else float("nan")
        print(f"| {ctx} | {m:.2f} | {a:.2f} | {w:.2f} | {c:.2f} | {d:.2f} |", flush=True)


if __name__ == "__main__":
    main()
