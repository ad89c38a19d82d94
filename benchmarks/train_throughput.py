"""Training-step throughput: nano vs a plain transformers NemotronH training loop, same weights, same threads.

    .venv/bin/python benchmarks/train_throughput.py --profiles small --batch 4 --seq 256 1024 --threads 1 --reps 7
    .venv/bin/python benchmarks/train_throughput.py --batch 4 --seq 256 --precision bf16

One step = forward, loss, backward, AdamW step, zero_grad, as each is used:

    nano:          loss, n = causal_lm_loss(model, ids, labels); (loss / n).backward()   # labels aligned
                   + the optimizer ``nano pretrain`` builds (nanocli.train.optim: fused AdamW)
    transformers:  model(input_ids=ids, labels=ids).loss.backward()                      # shifts labels itself
                   + ``torch.optim.AdamW(model.parameters())`` as a plain loop writes it (foreach)

Both models start from the identical random checkpoint (fp32 weights, train mode) and the two losses (and a
few gradients) are checked to agree before timing. ``--precision bf16`` runs the forward and the loss of both
under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (fp32 master weights, as a mixed-precision loop does).
Runs alternate A B A B so machine noise hits both alike; the table gives medians, the ratio of medians
("speed-up"), the median of the per-rep ratios ("paired": each rep's transformers step over the nano step
just before it; less sensitive to drift) and each side's model FLOPs utilisation: training FLOPs
(3 x ``memory.forward_flops``: the forward plus the two backward matmuls per forward matmul) per second over
this machine's matmul peak in the same precision, measured here at the same thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_throughput import build_pair, load_profile, matmul_peak_gflops  # noqa: E402

from nanocli.train.optim import OptimConfig, build_optimizer  # noqa: E402
from nanocli_model import memory  # noqa: E402
from nanocli_model.losses import IGNORE_INDEX, causal_lm_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=DTYPES[precision])


def nano_step(model, opt, ids: torch.Tensor, precision: str):
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)  # (B, T) aligned targets

    def step() -> float:
        with autocast(precision):
            loss_sum, n = causal_lm_loss(model, ids, labels)
            loss = loss_sum / n
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()
    return step


def hf_step(model, opt, ids: torch.Tensor, precision: str):
    def step() -> float:
        with autocast(precision):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()
    return step


def check_losses(nano, hf, ids: torch.Tensor, precision: str) -> tuple[float, float]:
    """The two models' losses (and a few gradients) on the same batch at the same weights, before any step."""
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
    with autocast(precision):
        s, n = causal_lm_loss(nano, ids, labels)
        ln = s / n
        lh = hf(input_ids=ids, labels=ids, use_cache=False).loss
    ln.backward()
    lh.backward()
    tol = 1e-4 if precision == "fp32" else 2e-2
    assert abs(ln.item() - lh.item()) <= tol * abs(lh.item()), (ln.item(), lh.item())
    gn, gh = nano.lm_head.weight.grad, hf.lm_head.weight.grad
    assert (gn - gh).abs().max() <= 20 * tol * gh.abs().max(), "lm_head gradients differ"
    gn, gh = nano.backbone.layers[0].mixer.in_proj.weight.grad, hf.model.layers[0].mixer.in_proj.weight.grad
    assert (gn - gh).abs().max() <= 20 * tol * gh.abs().max(), "layer-0 in_proj gradients differ"
    nano.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    return ln.item(), lh.item()


def time_pair(steps: dict, reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for f in steps.values():  # warm-up (also allocates the AdamW state)
        f()
        f()
    for _ in range(reps):
        for name, f in steps.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", nargs="+", default=["small"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", nargs="+", type=int, default=[256, 1024])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops(args.threads, dtype=DTYPES[args.precision])
    load = os.getloadavg()[0]
    print(f"threads={args.threads}  precision={args.precision}  {args.precision} matmul peak={peak:.1f} GFLOP/s  "
          f"load average={load:.2f}  torch={torch.__version__}")
    print("| profile | batch x seq | nano tok/s | transformers tok/s | speed-up | paired | nano MFU |"
          " transformers MFU | loss nano / transformers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.profiles:
        config = load_profile(name)
        for T in args.seq:
            nano, hf = build_pair(config)  # fresh identical weights for every length
            nano.train()
            hf.train()
            ids = torch.randint(0, config.vocab_size, (args.batch, T), generator=torch.Generator().manual_seed(T))
            ln, lh = check_losses(nano, hf, ids, args.precision)
            opt_n = build_optimizer(nano, OptimConfig(weight_decay=0.01, betas=(0.9, 0.999)), args.lr)
            opt_h = torch.optim.AdamW(hf.parameters(), lr=args.lr)
            times = time_pair({"nano": nano_step(nano, opt_n, ids, args.precision),
                               "hf": hf_step(hf, opt_h, ids, args.precision)}, args.reps)
            mn, mh = statistics.median(times["nano"]), statistics.median(times["hf"])
            tokens = args.batch * T
            flops = 3 * memory.forward_flops(config, T, batch=args.batch)
            paired = statistics.median(h / n for n, h in zip(times["nano"], times["hf"]))
            row = dict(profile=name, batch=args.batch, seq=T, precision=args.precision,
                       nano_tok_s=tokens / mn, hf_tok_s=tokens / mh, speedup=mh / mn, paired_speedup=paired,
                       nano_mfu=flops / mn / 1e9 / peak, hf_mfu=flops / mh / 1e9 / peak,
                       loss_nano=ln, loss_hf=lh, nano_s=times["nano"], hf_s=times["hf"])
            rows.append(row)
            print(f"| {name} | {args.batch} x {T} | {row['nano_tok_s']:.0f} | {row['hf_tok_s']:.0f} | "
                  f"{row['speedup']:.2f}x | {paired:.2f}x | {100 * row['nano_mfu']:.0f}% | "
                  f"{100 * row['hf_mfu']:.0f}% | "
                  f"{ln:.4f} / {lh:.4f} |", flush=True)
            del nano, hf, opt_n, opt_h
    if args.json:
        args.json.write_text(json.dumps(dict(threads=args.threads, precision=args.precision, peak_gflops=peak,
                                             load_average=load, rows=rows), indent=2))


if __name__ == "__main__":
    main()
