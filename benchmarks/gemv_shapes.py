"""fp32 matrix-vector rate (GB/s of weight streamed) on the decode shapes: MKL vs the compiled row-dot GEMV.

    .venv/bin/python benchmarks/gemv_shapes.py               # 1 thread, huge pages, the medium profile's shapes
    .venv/bin/python benchmarks/gemv_shapes.py --shapes 9b   # the released 9B-v2's shapes

For each (out, in) shape it makes enough copies of the matrix to fill ~300 MB (far beyond the 32 MB L3) and
streams through them in turn, as a decode step does: each matrix is read from memory, not from a cache.
Four ways to compute ``W @ x``: MKL on the row-major weight (``F.linear``), MKL on a column-major copy (what
nano's eager decode stores for tall weights), ``(x * W).sum(-1)`` compiled by inductor (what nano's compiled
decode step ran before nano's own GEMV, and still runs for rows shorter than ``layers.ROW_GEMV_MIN_IN``), and
nano's own GEMV (``row_gemv``, what the compiled step runs now); then two int8 GEMVs on int8 copies of four times
as many matrices (the same bytes): nano's (``row_gemv_q8``) and fbgemm's dynamic int8 linear (``--dtype int8``
without nano's library). Best and median of 9 passes.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from nanocli_model import row_gemv
from nanocli_model.decode import huge_page_arena

# medium profile: in_proj, out_proj, up_proj, down_proj, q/o_proj, k/v_proj, lm_head; then a long-row GEMV
SHAPES = {
    "medium": [(3616, 768), (768, 1536), (3072, 768), (768, 3072), (768, 768), (256, 768), (16384, 768),
               (4096, 16384)],
    # the released 9B-v2 (hidden 4480): in_proj, out_proj, up_proj, down_proj, q_proj, k/v_proj, o_proj, lm_head
    "9b": [(22656, 4480), (4480, 10240), (15680, 4480), (4480, 15680), (5120, 4480), (1024, 4480), (4480, 5120),
           (131072, 4480)],
}


def _huge(shape: tuple[int, int], huge: bool) -> torch.Tensor:
    n = shape[0] * shape[1]
    t = huge_page_arena(n * 4).view(torch.float32) if huge else torch.empty(n)
    return t.copy_(torch.randn(n)).view(shape)


def _huge_int8(shape: tuple[int, int], huge: bool) -> torch.Tensor:
    n = shape[0] * shape[1]
    t = huge_page_arena(n).view(torch.int8)[:n] if huge else torch.empty(n, dtype=torch.int8)
    return t.copy_(torch.randint(-127, 128, (n,), dtype=torch.int8)).view(shape)


def _timed(calls, reps: int) -> tuple[float, float]:
    for f in calls:
        f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for f in calls:
            f()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--no-huge-pages", action="store_true", help="ordinary 4 KiB pages")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="medium", help="whose decode shapes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    row_dot = torch.compile(lambda x, W: (x * W).sum(-1), dynamic=False)
    print(f"threads={args.threads}  huge pages={not args.no_huge_pages}  GB/s best / median of {args.reps} passes")
    lib = row_gemv.library()  # nano's own GEMVs, called through ctypes (~1 us a call)
    if lib is None:
        raise SystemExit(f"nano's GEMV library is not available: {row_gemv.reason()}")
    print("int8 columns: GB/s of int8 weights (a quarter of the bytes of fp32), the same copies' count x 4")
    print("| out x in | copies | MKL row-major | MKL column-major | compiled row-dot | nano row_gemv f32 "
          "| nano row_gemv int8 | fbgemm int8 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for out, inn in SHAPES[args.shapes]:
            nbytes = out * inn * 4
            copies = max(1, int(300e6 // nbytes))
            Ws = [_huge((out, inn), not args.no_huge_pages) for _ in range(copies)]
            x = torch.randn(1, inn)
            torch._dynamo.reset()  # one compile per shape, not a recompile limit
            assert torch.allclose(row_dot(x, Ws[0]), F.linear(x, Ws[0])[0], rtol=1e-3, atol=1e-3)
            rates = [_timed([lambda W=W, x=x: F.linear(x, W) for W in Ws], args.reps)]
            cols = [_huge((inn, out), not args.no_huge_pages).copy_(W.t()).t() for W in Ws]  # column-major
            rates.append(_timed([lambda W=W, x=x: F.linear(x, W) for W in cols], args.reps))
            del cols
            rates.append(_timed([lambda W=W, x=x: row_dot(x, W) for W in Ws], args.reps))
            y = torch.empty(1, out)
            assert torch.allclose(torch.ops.nano.row_gemv_f32(x, Ws[0]), F.linear(x, Ws[0]), rtol=1e-3, atol=1e-3)
            xp, yp, f32, q8 = x.data_ptr(), y.data_ptr(), lib.nano_row_gemv_f32, lib.nano_row_gemv_q8
            rates.append(_timed([functools.partial(f32, xp, inn, 1, W.data_ptr(), out, inn, yp) for W in Ws],
                                args.reps))
            del Ws
            Qs = [_huge_int8((out, inn), not args.no_huge_pages) for _ in range(4 * copies)]
            scale = torch.rand(out) / 100
            rates.append(_timed([functools.partial(q8, xp, inn, 1, q.data_ptr(), scale.data_ptr(), out, inn, yp)
                                 for q in Qs], args.reps))
            zero = torch.zeros(out, dtype=torch.long)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                packed = [torch.ops.quantized.linear_prepack(
                    torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0), None) for q in Qs]
            del Qs
            rates.append(_timed([functools.partial(torch.ops.quantized.linear_dynamic, x, p, True) for p in packed],
                                args.reps))
            total = nbytes * copies / 1e9
            cells = " | ".join(f"{total / best:.1f} / {total / med:.1f}" for best, med in rates)
            print(f"| {out} x {inn} | {copies} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
