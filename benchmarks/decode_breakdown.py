"""Where a compiled CPU decode step's time goes, in one process: the step, the step's GEMVs alone over the same
weights, and a plain read of as many bytes, interleaved; then again in fresh processes.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/decode_breakdown.py --profile medium --processes 4

Each round times --tokens decode steps of ``AotDecode`` (what ``nano generate`` runs on CPU) after a prompt of
--prompt tokens, then --tokens passes of nano's float32 GEMV (``nano_row_gemv_f32``, batch 1, called through
ctypes) over every Linear weight of the same model in module order (where the step keeps them: one huge-page arena),
then a ``sum`` over a 256 MB huge-page buffer scaled to the weights' bytes: the read limit of
``decode_throughput.py``. Medians of --rounds (the first dropped). "rest" = step - GEMV pass: everything in the
step that is not the weight stream (the Mamba state update, attention, norms, the step's own call).
A decode step is bound by the weight stream, so the spread between processes (where the kernel put the pages)
shows up in all three columns; the step's share of the read limit is the issue-#20 figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve()


def measure(args) -> dict:
    from nanocli.profiles import load_model_profile
    from nanocli_model import NanoForCausalLM, row_gemv
    from nanocli_model.aot_decode import AotDecode
    from nanocli_model.decode import huge_page_arena

    torch.set_num_threads(args.threads)
    lib = row_gemv.library()
    if lib is None:
        raise SystemExit(f"nano's kernel library is unavailable here: {row_gemv.reason()}")
    torch.manual_seed(0)
    model = NanoForCausalLM(load_model_profile(args.profile).config).eval()
    step = AotDecode(model, args.library_dir)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model.allocate_cache(1, args.prompt + args.tokens * (args.rounds + 1) + 1)
        tok = model(prompt, cache, logits_to_keep=1)[:, -1].argmax(-1)
        tok = step(tok[:, None], cache)[:, -1].argmax(-1)  # compiles or loads, and lays the weights out
    if step.fallback_reason:
        raise SystemExit(f"ahead-of-time decode unavailable: {step.fallback_reason}")
    seen, calls, keep, nbytes = set(), [], [], 0
    for mod in model.modules():
        if not isinstance(mod, nn.Linear) or id(mod.weight) in seen:
            continue
        seen.add(id(mod.weight))
        W = mod.weight
        out, inn = W.shape
        if W.dtype != torch.float32 or W.stride() != (inn, 1):
            raise SystemExit(f"a {tuple(W.shape)} {W.dtype} weight is not row-major float32 after the step's layout")
        x, y = torch.randn(1, inn), torch.empty(1, out)
        keep += [x, y]
        calls.append(functools.partial(lib.nano_row_gemv_f32, x.data_ptr(), inn, 1, W.data_ptr(), out, inn,
                                       y.data_ptr()))
        nbytes += W.numel() * 4
    buf = huge_page_arena(256 << 20).view(torch.float32)
    buf.copy_(torch.randn(buf.numel()))
    times: dict[str, list[float]] = {"step": [], "gemv": [], "read": []}
    with torch.inference_mode():
        for _ in range(args.rounds + 1):
            t = time.perf_counter()
            for _ in range(args.tokens):
                tok = step(tok[:, None], cache)[:, -1].argmax(-1)
            times["step"].append((time.perf_counter() - t) / args.tokens)
            t = time.perf_counter()
            for _ in range(args.tokens):
                for f in calls:
                    f()
            times["gemv"].append((time.perf_counter() - t) / args.tokens)
            t = time.perf_counter()
            for _ in range(3):
                buf.sum()
            times["read"].append((time.perf_counter() - t) / 3 * nbytes / buf.nbytes)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"pid": os.getpid(), "weight_mb": nbytes / 1e6, **{f"{k}_ms": v * 1e3 for k, v in med.items()}}


def row(r: dict) -> str:
    mb = r["weight_mb"]
    return (f"| {r['pid']} | {r['step_ms']:.2f} | {1e3 / r['step_ms']:.1f} | {r['gemv_ms']:.2f} | "
            f"{mb / r['gemv_ms']:.1f} | {r['step_ms'] - r['gemv_ms']:.2f} | "
            f"{100 * (r['step_ms'] - r['gemv_ms']) / r['step_ms']:.0f}% | {mb / r['read_ms']:.1f} | "
            f"**{100 * r['read_ms'] / r['step_ms']:.0f}%** |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="medium")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=60, help="decode steps (and GEMV passes) a round")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--processes", type=int, default=1, help="fresh processes, one after another")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--library-dir", default=None, help="keep the compiled step here (default: a temporary one)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args)), flush=True)
        return
    if min(args.tokens, args.rounds, args.processes, args.prompt, args.threads) < 1:
        ap.error("--prompt, --tokens, --rounds, --processes and --threads take positive integers")
    args.library_dir = args.library_dir or tempfile.mkdtemp(prefix="nano-breakdown-")
    print(f"profile {args.profile}, {args.threads} thread(s), prompt {args.prompt}, {args.rounds} rounds of "
          f"{args.tokens} tokens a process, medians; uptime: {os.popen('uptime').read().strip()}")
    print("| process | step ms | tok/s | GEMV pass ms | GEMV GB/s | rest ms | rest % of step | read GB/s "
          "| **step % of read limit** |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    argv = [sys.executable, str(HERE), "--child", "--profile", args.profile, "--prompt", str(args.prompt),
            "--tokens", str(args.tokens), "--rounds", str(args.rounds), "--threads", str(args.threads),
            "--library-dir", args.library_dir]
    for _ in range(args.processes):
        out = subprocess.run(argv, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode or not lines:
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"a measuring process failed: {last}")
        print(row(json.loads(lines[-1])), flush=True)
    print(f"uptime after: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
