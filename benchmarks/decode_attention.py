"""Decode attention on the CPU: nano's one-pass kernel (``torch.ops.nano.decode_attention``, csrc/decode_attention.cpp,
what a compiled decode step runs) vs ``F.scaled_dot_product_attention`` (what eager decode runs), float32.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/decode_attention.py
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/decode_attention.py --lengths 2304 16384 --heads 8:5:128
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/decode_attention.py --batch 4   # left-padded rows

One call = one new token's attention in one layer: q (1, kv, R, d) against the layer's cache narrowed to L tokens,
(1, kv, L, d) views of a cache allocated for the longest length, as ``Attention._decode`` passes them. A decode
step streams all its weights between two visits to a layer, so the cache is read from memory, not from a cache:
each pass calls on enough separate caches to fill ~256 MB (far beyond the 32 MB L3). The two ways alternate
pass by pass (A B A B); best and median of --passes, as microseconds a call and GB/s of K and V read. With
--batch B > 1 the rows are left-padded as a batch of prompts of different lengths is (row i's first i L / (2 B)
keys are padding): nano's ``decode_attention_padded`` against SDPA under the decode step's padding mask
(``layers.padded_causal_mask``); GB/s counts the bytes of the real keys only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nanocli_model import row_gemv
from nanocli_model.layers import padded_causal_mask

# (kv heads, query heads per kv head, head dim): small, medium, the released 9B-v2
HEADS = {"small": (1, 5, 64), "medium": (4, 3, 64), "9b": (8, 5, 128)}


def caches(batch: int, kv: int, R: int, d: int, length: int, fill: int) -> list[tuple[torch.Tensor, ...]]:
    """(q, k, v) triples whose K and V together fill ~``fill`` bytes; k, v narrowed views of longer caches."""
    per = 2 * batch * kv * length * d * 4
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(max(1, fill // per)):
        kc, vc = (torch.randn(batch, kv, length + 64, d, generator=gen) for _ in range(2))
        q = torch.randn(batch, kv, R, d, generator=gen)
        out.append((q, kc.narrow(2, 0, length), vc.narrow(2, 0, length)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 2304, 8192, 16384])
    ap.add_argument("--heads", nargs="+", default=["small", "medium", "9b"],
                    help="profile names or kv:R:d (kv heads, query heads per kv head, head dim)")
    ap.add_argument("--passes", type=int, default=9)
    ap.add_argument("--fill-mb", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1, help="rows; above 1 they are left-padded")
    args = ap.parse_args()
    if args.batch < 1 or args.passes < 1 or args.fill_mb < 1 or min(args.lengths) < 1:
        ap.error("--batch, --passes, --fill-mb and --lengths take positive integers")
    torch.set_num_threads(args.threads)
    if row_gemv.reason():
        raise SystemExit(f"nano's kernel library is unavailable here: {row_gemv.reason()}")
    print(f"threads={args.threads}  batch={args.batch}{' (left-padded)' if args.batch > 1 else ''}  "
          f"~{args.fill_mb} MB of K and V a pass  best / median of {args.passes} passes")
    print("| heads (kv x R x d) | cached tokens | caches | SDPA us/call | nano us/call | SDPA GB/s | nano GB/s | "
          "nano / SDPA (medians) | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    shapes = []
    for spec in args.heads:
        try:
            shapes.append(HEADS[spec] if spec in HEADS else tuple(int(x) for x in spec.split(":")))
            assert len(shapes[-1]) == 3 and min(shapes[-1]) > 0
        except (ValueError, AssertionError):
            ap.error(f"--heads {spec!r}: give {', '.join(HEADS)} or kv:R:d, three positive integers")
    for kv, R, d in shapes:
        for length in args.lengths:
            triples = caches(args.batch, kv, R, d, length, args.fill_mb << 20)
            q, k, v = triples[0]
            if not row_gemv.attention_usable(q, k, v):
                raise SystemExit(f"decode_attention does not take kv {kv} R {R} d {d}")
            if args.batch == 1:
                ways = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                        "nano": torch.ops.nano.decode_attention}
                real = length
            else:
                pad = torch.arange(args.batch) * length // (2 * args.batch)
                mask = padded_causal_mask(pad, length - 1, 1)
                ways = {"sdpa": lambda q, k, v, m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                        "nano": lambda q, k, v, p=pad: torch.ops.nano.decode_attention_padded(q, k, v, p)}
                real = (length * args.batch - int(pad.sum())) / args.batch  # real keys a row, on average
            diff = (ways["sdpa"](q, k, v) - ways["nano"](q, k, v)).abs().max().item()
            times: dict[str, list[float]] = {w: [] for w in ways}
            with torch.inference_mode():
                for f in ways.values():  # warm-up
                    for t in triples:
                        f(*t)
                for _ in range(args.passes):
                    for name, f in ways.items():
                        t0 = time.perf_counter()
                        for t in triples:
                            f(*t)
                        times[name].append((time.perf_counter() - t0) / len(triples))
            nbytes = 2 * args.batch * kv * real * d * 4
            cell = {w: (min(ts), statistics.median(ts)) for w, ts in times.items()}
            us = {w: f"{b * 1e6:.1f} / {m * 1e6:.1f}" for w, (b, m) in cell.items()}
            gbs = {w: f"{nbytes / b / 1e9:.1f} / {nbytes / m / 1e9:.1f}" for w, (b, m) in cell.items()}
            print(f"| {kv} x {R} x {d} | {length} | {len(triples)} | {us['sdpa']} | {us['nano']} | {gbs['sdpa']} | "
                  f"{gbs['nano']} | {cell['sdpa'][1] / cell['nano'][1]:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
