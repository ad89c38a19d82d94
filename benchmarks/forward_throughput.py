"""Full-forward (prefill) throughput: nano vs transformers' NemotronH, same weights, same threads.

    .venv/bin/python benchmarks/forward_throughput.py --profiles small medium --lengths 256 1024 2048 --threads 1

Both models get the identical random checkpoint (fp32). Runs alternate A B A B so machine noise hits
both alike; the table gives medians, the ratio of medians, and the share of this machine's fp32 matmul
peak (measured here, same thread count) that each reaches, counting FLOPs with ``memory.forward_flops``.
transformers runs its pure-PyTorch fallback on CPU (mamba-ssm needs CUDA), as every CPU user gets it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanocli_model import NanoConfig, NanoForCausalLM, memory  # noqa: E402


def matmul_peak_gflops(threads: int, n: int = 2048, reps: int = 7, dtype: torch.dtype = torch.float32) -> float:
    """Best-of GEMM rate on square n x n matrices in ``dtype`` at the current thread count (``threads``
    is for the record): the machine's practical matmul peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def load_profile(name: str) -> NanoConfig:
    from nanocli.profiles import load_model_profile  # the shipped profiles (nanocli/profiles/models/)

    return load_model_profile(name).config


def build_pair(config: NanoConfig):
    from transformers import NemotronHConfig, NemotronHForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    d = config.to_dict()
    for k in ("architectures", "model_type", "layers_block_type", "num_hidden_layers", "mamba_n_groups", "rms_norm_eps"):
        d.pop(k)
    torch.manual_seed(0)
    hf = NemotronHForCausalLM(NemotronHConfig(**d)).eval()
    nano = NanoForCausalLM(config).eval()
    state = {("backbone." + k[6:] if k.startswith("model.") else k): v for k, v in hf.state_dict().items()}
    nano.load_state_dict(state)
    return nano, hf


def time_pair(nano, hf, ids, reps: int) -> tuple[list[float], list[float]]:
    runs = {"nano": lambda: nano(ids), "hf": lambda: hf(ids, use_cache=False)}
    times: dict[str, list[float]] = {"nano": [], "hf": []}
    with torch.inference_mode():
        for f in runs.values():  # warm-up
            f()
        for _ in range(reps):
            for name, f in runs.items():
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
    return times["nano"], times["hf"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", nargs="+", default=["small", "medium"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 2048])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops(args.threads)
    load = os.getloadavg()[0]
    print(f"threads={args.threads}  fp32 matmul peak={peak:.1f} GFLOP/s  load average={load:.2f}  torch={torch.__version__}")
    print("| profile | tokens | nano tok/s | transformers tok/s | speed-up | nano % of peak | transformers % of peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.profiles:
        config = load_profile(name)
        nano, hf = build_pair(config)
        for T in args.lengths:
            ids = torch.randint(0, config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
            tn, th = time_pair(nano, hf, ids, args.reps)
            mn, mh = statistics.median(tn), statistics.median(th)
            flops = memory.forward_flops(config, T)
            row = dict(profile=name, tokens=T, nano_tok_s=T / mn, hf_tok_s=T / mh, speedup=mh / mn,
                       nano_peak=flops / mn / 1e9 / peak, hf_peak=flops / mh / 1e9 / peak)
            rows.append(row)
            print(f"| {name} | {T} | {row['nano_tok_s']:.0f} | {row['hf_tok_s']:.0f} | {row['speedup']:.2f}x | "
                  f"{100 * row['nano_peak']:.0f}% | {100 * row['hf_peak']:.0f}% |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(threads=args.threads, peak_gflops=peak, rows=rows), indent=2))


if __name__ == "__main__":
    main()
