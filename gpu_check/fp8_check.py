"""FP8 on the GPU: nano's GEMM probe, its torch._scaled_mm GEMMs, and block-wise FP8 training vs bf16.

    python gpu_check/fp8_check.py --out fp8.json [--steps 24] [--deadline EPOCH_SECONDS] [--ssd reference|auto]
    python gpu_check/fp8_check.py --smoke --out f.json      # CPU, toy sizes: checks this script, not a GPU

1. ``fp8.gemm_probe(device)``: the form nano's FP8 GEMMs take here ("blockwise": one block-wise
   ``_scaled_mm`` per GEMM, cuBLASLt on sm90; "per-block": one call per 128-wide contraction block;
   "emulate") and the reason when it is not the best one; ``describe_gemm`` for the default recipe.
2. GEMMs on the same E4M3 operands: nano's ``_gemm(a, b, "scaled_mm")`` (the single call where the probe
   found it right), the per-block loop (forced), and the emulation; the forward pair (1x128 x 128x128) and the
   wgrad pair (1x128 x 1x128). They should agree to float32 summation order; timings beside.
3. Training: one small NemotronH from the same init on the same synthetic Markov data, bf16 autocast vs FP8
   block-wise (backend scaled_mm, then emulate): losses step by step, ms per step, and the form
   ``convert_to_fp8`` reports ("gemm_form", "gemm").
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="fp8.json")
ap.add_argument("--steps", type=int, default=None, help="training steps (default 24; 6 with --smoke)")
ap.add_argument("--deadline", type=float, default=0.0)
ap.add_argument("--ssd", default="reference", choices=["reference", "auto"],
                help="the Mamba scan in the training runs (not what this check is about; reference compiles nothing)")
ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes: checks this script, not the GPU")
args = ap.parse_args()
STEPS = args.steps if args.steps is not None else (6 if args.smoke else 24)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from common import Results, rel, verdict  # noqa: E402

from nanocli.train import fp8, fp8_gemm  # noqa: E402

DEV = torch.device("cpu" if args.smoke else "cuda")
R = Results("fp8", args.out, args.deadline, tracebacks=args.smoke)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps=10):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps * 1e3


@contextlib.contextmanager
def per_block_loop():
    """nano's _gemm_scaled_mm as it runs where the probe did not vouch for the single call: the loop."""
    real = fp8_gemm.gemm_probe
    fp8_gemm.gemm_probe = lambda device: fp8.GemmProbe("per-block", "forced by the GPU check", None)
    try:
        yield
    finally:
        fp8_gemm.gemm_probe = real


# ------------------------------------------------------------------------------------- 1. the probe
@R.guarded("fp8.gemm_probe")
def check_probe():
    if DEV.type == "cuda":
        cap = torch.cuda.get_device_capability()
        R.record("device", "INFO", None, f"{torch.cuda.get_device_name()} sm{cap[0]}{cap[1]} torch "
                                         f"{torch.__version__} cuda {torch.version.cuda}")
    t = time.perf_counter()
    probe = fp8.gemm_probe(DEV)
    ms = (time.perf_counter() - t) * 1e3
    best = "blockwise" if DEV.type == "cuda" and torch.cuda.get_device_capability() == (9, 0) else None
    status = "INFO" if best is None else verdict(probe.form == best)
    R.record(f"fp8.gemm_probe('{DEV.type}').form", status, probe.form,
             f"reason: {probe.reason or '-'}; layout {probe.layout}; probe {ms:.0f} ms"
             + ("; sm90 with CUDA >= 12.9 should run the single block-wise call" if best else ""))
    ok = fp8.fp8_available(DEV)
    R.record("fp8.fp8_available", verdict(ok) if DEV.type == "cuda" else "INFO", ok,
             "real _scaled_mm GEMMs run" if ok else f"backend 'auto' emulates here: {probe.reason}")
    for recipe in (fp8.FP8Recipe(), fp8.FP8Recipe(scaling="tensorwise")):
        R.record(f"describe_gemm ({recipe.scaling}, {recipe.backend})", "INFO", fp8.gemm_form(DEV, recipe),
                 fp8.describe_gemm(DEV, recipe))
    return probe


# ------------------------------------------------------------------------------------- 2. GEMMs
@R.guarded("FP8 GEMMs: single call / per-block loop / emulation")
def check_gemms(probe):
    M, K, N = (200, 512, 384) if args.smoke else (4096, 4096, 4096)
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(M, K, device=DEV, generator=g).to(torch.bfloat16)
    w = torch.randn(N, K, device=DEV, generator=g) * 0.02
    gy = torch.randn(M, N, device=DEV, generator=g).to(torch.bfloat16)
    act, blk = (1, 128), (128, 128)
    pairs = {"forward 1x128 x 128x128": (fp8.quantize(x, act), fp8.quantize(w, blk)),
             "wgrad 1x128 x 1x128": (fp8.quantize(gy.t(), act), fp8.quantize(x.t(), act))}
    for name, (a, b) in pairs.items():
        pair = fp8_gemm._blockwise_pair(a, b)
        ref = fp8.gemm(a, b, "emulate")
        nano = fp8.gemm(a, b, "scaled_mm")
        with per_block_loop():
            loop = fp8.gemm(a, b, "scaled_mm")
        single = probe.layout is not None and pair is not None
        R.record(f"{name}: nano _gemm(scaled_mm) vs emulate", verdict(rel(nano, ref) < 1e-3), rel(nano, ref),
                 f"ran the {'single block-wise call' if single else 'per-block loop'} (pair {pair})")
        R.record(f"{name}: per-block loop vs emulate", verdict(rel(loop, ref) < 1e-3), rel(loop, ref))
    a, b = pairs["forward 1x128 x 128x128"]
    R.record("fp8 forward GEMM vs bf16 x @ w.T (quantization error)", "INFO", rel(fp8.gemm(a, b, "scaled_mm"),
                                                                               x.float() @ w.t()))
    reps = 2 if args.smoke else 10
    t_nano = timed(lambda: fp8.gemm(a, b, "scaled_mm"), reps)
    with per_block_loop():
        t_loop = timed(lambda: fp8.gemm(a, b, "scaled_mm"), reps)
    t_emu = timed(lambda: fp8.gemm(a, b, "emulate"), reps)
    wb = w.to(torch.bfloat16)
    t_bf16 = timed(lambda: x @ wb.t(), reps)
    t_q = timed(lambda: (fp8.quantize(x, act), fp8.quantize(w, blk)), reps)
    R.record(f"ms per {M}x{K}x{N} GEMM: nano _gemm(scaled_mm) [{probe.form}]", "INFO", t_nano,
             f"per-block loop {t_loop:.2f} ms, emulate {t_emu:.2f} ms, bf16 matmul {t_bf16:.2f} ms, "
             f"quantizing both operands {t_q:.2f} ms")
    if probe.layout is not None:
        R.record("single call faster than the per-block loop", verdict(t_nano < t_loop), t_loop / t_nano,
                 "loop ms / single-call ms")


# ------------------------------------------------------------------------------------- 3. training
def markov_batches(vocab, steps, batch, T, seed=0):
    """Token streams from a fixed sparse random bigram table (learnable: the loss falls well below ln V)."""
    gg = torch.Generator(device=DEV).manual_seed(seed)
    nxt = torch.randint(0, vocab, (vocab, 4), device=DEV, generator=gg)
    out = []
    for _ in range(steps):
        seq = torch.empty(batch, T + 1, dtype=torch.long, device=DEV)
        seq[:, 0] = torch.randint(0, vocab, (batch,), device=DEV, generator=gg)
        choice = torch.randint(0, 4, (batch, T), device=DEV, generator=gg)
        for t in range(T):
            seq[:, t + 1] = nxt[seq[:, t], choice[:, t]]
        out.append(seq)
    return out


def train(mode, batches, steps):
    from nanocli_model import NanoConfig
    from nanocli_model.model import NanoForCausalLM

    torch.manual_seed(0)
    if args.smoke:
        c = NanoConfig(vocab_size=512, hidden_size=256, intermediate_size=512, hybrid_override_pattern="M-M*-M-",
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, mamba_num_heads=8, mamba_head_dim=32,
                       n_groups=2, ssm_state_size=32, chunk_size=64, max_position_embeddings=4096)
    else:
        c = NanoConfig(vocab_size=8192, hidden_size=1024, intermediate_size=4096, hybrid_override_pattern="M-M*-M-",
                       num_attention_heads=8, num_key_value_heads=2, head_dim=128, mamba_num_heads=32,
                       mamba_head_dim=64, n_groups=8, ssm_state_size=128, chunk_size=128,
                       max_position_embeddings=4096)
    m = NanoForCausalLM(c).init_weights(torch.Generator().manual_seed(0)).to(DEV).train()
    info = None
    if mode != "bf16":
        info = fp8.convert_to_fp8(m, fp8.FP8Recipe(scaling="blockwise", backend=mode, keep_high_precision=1))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
    losses, times = [], []
    for i in range(steps):
        seq = batches[i]
        sync()
        t = time.perf_counter()
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            loss, count = m(seq[:, :-1], labels=seq[:, 1:])
        (loss / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
        losses.append((loss / count).item())
    warm = times[2:] or times
    return losses, 1e3 * sorted(warm)[len(warm) // 2], info


@R.guarded("FP8 block-wise training vs bf16")
def check_training():
    from nanocli_model import kernels

    vocab = 512 if args.smoke else 8192
    batches = markov_batches(vocab, STEPS, 2 if args.smoke else 8, 64 if args.smoke else 512)
    with kernels.use(args.ssd):
        base, t_base, _ = train("bf16", batches, STEPS)
        R.record("train bf16 autocast: last loss", "INFO", base[-1],
                 f"{base[0]:.3f} -> {base[-1]:.3f} in {STEPS} steps, {t_base:.0f} ms/step (ssd: {args.ssd})")
        for mode in ("scaled_mm", "emulate"):
            if R.late():
                R.record(f"train fp8 blockwise ({mode})", "SKIP", detail="deadline")
                continue
            if mode == "scaled_mm" and not fp8.fp8_available(DEV):
                R.record("train fp8 blockwise (scaled_mm)", "SKIP", detail=fp8.gemm_reason(DEV))
                continue
            n = STEPS if mode == "scaled_mm" else min(STEPS, 8)
            losses, t_ms, info = train(mode, batches, n)
            finite = all(math.isfinite(v) for v in losses)
            gap = max(abs(a - b) / b for a, b in zip(losses, base))
            final = abs(losses[-1] - base[n - 1]) / base[n - 1]
            ok = finite and final < 0.03 and gap < 0.08
            R.record(f"train fp8 blockwise ({mode}) vs bf16: final rel loss gap", verdict(ok), final,
                     f"max gap {gap:.3f}; {losses[0]:.3f} -> {losses[-1]:.3f} in {n} steps; {t_ms:.0f} ms/step vs "
                     f"bf16 {t_base:.0f}; {len(info['fp8'])} FP8 Linears; gemm_form {info['gemm_form']}: "
                     f"{info['gemm']}; finite={finite}")


probe = check_probe()
if probe is not None:
    check_gemms(probe)
check_training()
bad = [r for r in R.rows if r["status"] in ("FAIL", "ERROR")]
print(f"[fp8] done: {len(R.rows)} rows, {len(bad)} FAIL/ERROR", flush=True)
sys.exit(1 if bad else 0)
