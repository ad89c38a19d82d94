"""The Mamba-2 decode state update on the CPU: nano's one-pass kernel (``torch.ops.nano.ssm_step``,
csrc/ssm_step.cpp, what a compiled decode step runs) vs the same update compiled by inductor (what a compiled
step ran before: ``cpu_fastpath.ssd_step`` under ``torch.compile``) vs eager (``cpu_fastpath.ssd_step``, what eager
decode runs), float32.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/ssm_step.py
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/ssm_step.py --heads medium 9b --passes 15

One call = one token's update of one layer's state (b, H, P, N), y returned, with x, B and C views of one row as
the decode step's split leaves them. A decode step streams all its weights between two visits to a layer, so the
state comes from memory, not from a cache: each pass calls on enough separate states to fill ~256 MB (far beyond
the 32 MB L3). The three ways alternate pass by pass (A B C A B C); best and median of --passes, as microseconds
a call and GB/s of state read and written (2 x its bytes: the least any update moves).

Each way is called from Python here, which a compiled decode step does not do (it calls the kernels from C++):
nano's op pays the custom-op dispatch and ctypes, the inductor way torch.compile's guards, eager a few aten
calls. So the script first times each way on a one-row state (2 x 1 x 16, in cache: the call alone) and the
last column compares the medians less those call costs, the part a compiled step pays.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanocli_model import cpu_fastpath, row_gemv

# (heads H, groups G, head dim P, state N): the small and medium profiles, the released 9B-v2
SHAPES = {"small": (16, 2, 40, 64), "medium": (32, 2, 48, 128), "9b": (128, 8, 64, 128)}


def operands(batch: int, H: int, G: int, P: int, N: int, fill: int) -> list[tuple[torch.Tensor, ...]]:
    """(state, x, dt, A, B, C, D) tuples whose states together fill ~``fill`` bytes."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(max(1, fill // (batch * H * P * N * 4))):
        row = torch.randn(batch, H * P + 2 * G * N + H, generator=gen)  # x | B | C | dt, as in_proj's split
        x = row[:, :H * P].view(batch, H, P)
        B, C = (row[:, H * P + i * G * N:H * P + (i + 1) * G * N].view(batch, G, N) for i in (0, 1))
        dt = torch.rand(batch, H, generator=gen) * 0.1
        A, D = -torch.rand(H, generator=gen) - 0.1, torch.randn(H, generator=gen)
        out.append((torch.randn(batch, H, P, N, generator=gen) * 0.1, x, dt, A, B, C, D))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", nargs="+", default=["small", "medium", "9b"],
                    help="profile names or H:G:P:N (heads, groups, head dim, state size)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--passes", type=int, default=9)
    ap.add_argument("--fill-mb", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.batch < 1 or args.passes < 1 or args.fill_mb < 1:
        ap.error("--batch, --passes and --fill-mb take positive integers")
    torch.set_num_threads(args.threads)
    if row_gemv.reason():
        raise SystemExit(f"nano's kernel library is unavailable here: {row_gemv.reason()}")
    shapes = []
    for spec in args.heads:
        try:
            shapes.append(SHAPES[spec] if spec in SHAPES else tuple(int(v) for v in spec.split(":")))
            assert len(shapes[-1]) == 4 and min(shapes[-1]) > 0 and shapes[-1][0] % shapes[-1][1] == 0
        except (ValueError, AssertionError):
            ap.error(f"--heads {spec!r}: give {', '.join(SHAPES)} or H:G:P:N, positive integers, G dividing H")
    call = {w: statistics.median(ts) for w, ts in timed(args.batch, 2, 1, 1, 16, 1 << 20, args.passes)[1].items()}
    print(f"threads={args.threads}  batch={args.batch}  ~{args.fill_mb} MB of state a pass  best / median of "
          f"{args.passes} passes; the call alone (us): " + ", ".join(f"{w} {t * 1e6:.1f}" for w, t in call.items()))
    print("| H x P x N (G groups) | state KB | states | eager us/call | inductor us/call | nano us/call | "
          "eager GB/s | inductor GB/s | nano GB/s | nano vs inductor | nano vs eager | **nano vs inductor, less "
          "the calls** | max abs diff y |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for H, G, P, N in shapes:
        states, times, diff = timed(args.batch, H, G, P, N, args.fill_mb << 20, args.passes)
        nbytes = 2 * args.batch * H * P * N * 4
        cell = {w: (min(ts), statistics.median(ts)) for w, ts in times.items()}
        us = {w: f"{b * 1e6:.1f} / {m * 1e6:.1f}" for w, (b, m) in cell.items()}
        gbs = {w: f"{nbytes / b / 1e9:.1f} / {nbytes / m / 1e9:.1f}" for w, (b, m) in cell.items()}
        net = (cell["inductor"][1] - call["inductor"]) / max(cell["nano"][1] - call["nano"], 1e-9)
        print(f"| {H} x {P} x {N} ({G}) | {nbytes // 2 // 1024} | {states} | {us['eager']} | {us['inductor']} | "
              f"{us['nano']} | {gbs['eager']} | {gbs['inductor']} | {gbs['nano']} | "
              f"{cell['inductor'][1] / cell['nano'][1]:.2f}x | {cell['eager'][1] / cell['nano'][1]:.2f}x | "
              f"{net:.2f}x | {diff:.1e} |", flush=True)


def timed(batch: int, H: int, G: int, P: int, N: int, fill: int, passes: int):
    """(how many states, {way: seconds a call, one per pass}, the largest |y - eager's y|) for one shape."""
    calls = operands(batch, H, G, P, N, fill)
    if not row_gemv.ssm_usable(*calls[0]):
        raise SystemExit(f"ssm_step does not take H {H} G {G} P {P} N {N}")
    torch._dynamo.reset()
    ways = {"eager": cpu_fastpath.ssd_step,
            "inductor": torch.compile(cpu_fastpath.ssd_step, dynamic=False, fullgraph=True),
            "nano": torch.ops.nano.ssm_step}
    with torch.inference_mode():
        first = calls[0]
        ys = {w: f(first[0].clone(), *first[1:]) for w, f in ways.items()}
        diff = max((ys[w] - ys["eager"]).abs().max().item() for w in ways)
        for f in ways.values():  # warm-up (and the compile)
            for c in calls:
                f(*c)
        times: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(passes):
            for name, f in ways.items():
                t0 = time.perf_counter()
                for c in calls:
                    f(*c)
                times[name].append((time.perf_counter() - t0) / len(calls))
    return len(calls), times, diff


if __name__ == "__main__":
    main()
