"""NVML semantics, and the memory of nano's attention paths on CUDA (the 9B's attention shape).

    python gpu_check/misc_check.py --out misc.json
    python gpu_check/misc_check.py --smoke --out m.json    # CPU, toy shape: correctness only, no memory

NVML: ``nanocli.nvml.query_device(0)`` beside NVML's v1 / v2 memory structs and torch's ``mem_get_info``.

Attention: nano's own ``layers.Attention`` module (nemotron-nano-9b-v2's: 40 query heads, 8 KV heads,
head_dim 128, hidden 4480; bf16) on one prefill chunk of 2048 tokens for 4 rows, through the cache:
  * unpadded (one fused causal SDPA call for the batch),
  * left-padded (``Attention._padded_rows``: one fused causal call per row, from its first real token),
  * the chunk after a left-padded one (start > 0: bottom-right-aligned causal per row),
against the bare fused causal SDPA call on the same q/k/v, and (INFO) what one batched call with a boolean
padding mask would take (SDPA's math kernel under GQA). Peaks are torch.cuda.max_memory_allocated above
what was allocated before the call. The padded rows must also equal each row's real tokens alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="misc.json")
ap.add_argument("--smoke", action="store_true", help="CPU, toy shape: checks this script, not the GPU")
args = ap.parse_args()

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import Results, rel, verdict  # noqa: E402

R = Results("misc", args.out, tracebacks=args.smoke)
GIB = 2**30
DEV = torch.device("cpu" if args.smoke else "cuda")


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ NVML
@R.guarded("nvml.query_device(0)")
def check_nvml():
    if args.smoke:
        R.record("nvml.query_device(0)", "SKIP", detail="--smoke: no GPU")
        return
    import pynvml

    from nanocli import nvml

    d = nvml.query_device(0)
    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        v1 = pynvml.nvmlDeviceGetMemoryInfo(h)
        try:
            v2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
            v2s = (f"v2 total {v2.total / GIB:.2f} reserved {v2.reserved / GIB:.2f} used {v2.used / GIB:.2f} "
                   f"free {v2.free / GIB:.2f}")
        except Exception as e:  # noqa: BLE001
            v2s = f"v2 unavailable ({type(e).__name__})"
    finally:
        pynvml.nvmlShutdown()
    free_t, total_t = torch.cuda.mem_get_info()
    R.record("nvml.query_device(0)", "PASS", None,
             f"api {d.api}: total {d.total / GIB:.2f} free {d.free / GIB:.2f} used {d.used / GIB:.2f} GiB | "
             f"v1 total {v1.total / GIB:.2f} used {v1.used / GIB:.2f} free {v1.free / GIB:.2f} | {v2s} | "
             f"torch mem_get_info free {free_t / GIB:.2f} total {total_t / GIB:.2f}")


# ------------------------------------------------------------------------------------------ attention
def peak_of(fn):
    """(result, peak GiB above the memory allocated before, ms); the peak is None on CPU."""
    sync()
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    out = fn()
    sync()
    ms = (time.perf_counter() - t) * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / GIB if DEV.type == "cuda" else None
    return out, peak, ms


def gib(p) -> str:
    return "-" if p is None else f"{p:.3f} GiB"


@R.guarded("attention paths (nano's Attention module)")
def check_attention():
    from nanocli_model.cache import AttentionCache
    from nanocli_model.layers import Attention, padded_causal_mask

    if args.smoke:
        from nanocli_model import NanoConfig

        c = NanoConfig(vocab_size=64, hidden_size=64, intermediate_size=64, hybrid_override_pattern="M*",
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_num_heads=4,
                       mamba_head_dim=16, n_groups=1, ssm_state_size=8, chunk_size=8)
        b, T, pads, dtype = 3, 32, [0, 5, 30], torch.float32
    else:
        from nanocli.profiles import load_model_profile

        c = load_model_profile("nemotron-nano-9b-v2").config
        b, T, pads, dtype = 4, 2048, [0, 256, 1024, 2000], torch.bfloat16
    H, KV, d, hid = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    shape = f"{H} q / {KV} kv heads x {d}, hidden {hid}, batch {b}, chunk {T}"
    torch.manual_seed(0)
    with torch.device(DEV):
        attn = Attention(c).to(dtype).eval()
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(b, T, hid, device=DEV, generator=g).to(dtype)
    x2 = torch.randn(b, T, hid, device=DEV, generator=g).to(dtype)
    pad = torch.tensor(pads, device=DEV)

    def cache(rows=b, length=2 * T):
        z = torch.zeros(rows, KV, length, d, device=DEV, dtype=dtype)
        return AttentionCache(z, z.clone())

    with torch.inference_mode():
        for _ in range(2):  # warm-up: kernels chosen, workspaces allocated
            attn(x, cache(), 0, pad)
            attn(x, cache(), 0, None)
        c_plain, c_pad = cache(), cache()
        out_plain, p_plain, t_plain = peak_of(lambda: attn(x, c_plain, 0, None))
        out_pad, p_pad, t_pad = peak_of(lambda: attn(x, c_pad, 0, pad))
        _, p_next, t_next = peak_of(lambda: attn(x2, c_pad, T, pad))  # the next chunk of the padded batch
        # the bare fused call on q/k/v of this shape (the projections excluded)
        q = torch.randn(b, H, T, d, device=DEV, generator=g).to(dtype)
        k = torch.randn(b, KV, T, d, device=DEV, generator=g).to(dtype)
        v = torch.randn_like(k)
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        _, p_fused, t_fused = peak_of(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                              enable_gqa=True))

        # correctness: each padded row's real positions equal the row's real tokens alone
        worst = 0.0
        for i, p in enumerate(pads):
            alone = attn(x[i:i + 1, p:], cache(1, T), 0, None)  # (1, T - p, hid)
            worst = max(worst, rel(out_pad[i:i + 1, p:], alone))
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        R.record("left-padded chunk through Attention: rows == real tokens alone", verdict(worst < tol), worst,
                 f"pads {pads}; {shape}")

    R.record("Attention, unpadded prefill chunk: peak", "INFO", p_plain, f"{t_plain:.1f} ms; {shape}")
    R.record("bare fused causal SDPA (GQA) on the same q/k/v: peak", "INFO", p_fused, f"{t_fused:.1f} ms")
    if p_pad is None:
        R.record("Attention, left-padded chunk (one fused call per row): peak", "SKIP", None,
                 f"--smoke: no CUDA memory stats ({t_pad:.1f} ms, next chunk {t_next:.1f} ms)")
    else:
        ok = p_pad <= 1.25 * p_plain + 64 / 1024 and p_next <= 1.25 * p_plain + 64 / 1024
        R.record("Attention, left-padded chunk (one fused call per row): peak", verdict(ok), p_pad,
                 f"{t_pad:.1f} ms vs unpadded {gib(p_plain)} {t_plain:.1f} ms; next chunk (start {T}) "
                 f"{gib(p_next)} {t_next:.1f} ms; must stay near the unpadded path (no T x S scores)")

    if DEV.type == "cuda":  # what nano avoids: one batched call with a boolean mask (math kernel under GQA)
        try:
            mask = padded_causal_mask(pad, 0, T)
            with torch.inference_mode():
                _, p_bool, t_bool = peak_of(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                    enable_gqa=True))
            R.record("one batched SDPA call with a boolean padding mask: peak", "INFO", p_bool,
                     f"{t_bool:.1f} ms: what a (b, 1, T, S) mask under GQA costs (nano does not take this path)")
        except torch.cuda.OutOfMemoryError:
            R.record("one batched SDPA call with a boolean padding mask: peak", "INFO", None, "out of memory")


check_nvml()
check_attention()
bad = [r for r in R.rows if r["status"] in ("FAIL", "ERROR")]
print(f"[misc] done: {len(R.rows)} rows, {len(bad)} FAIL/ERROR", flush=True)
sys.exit(1 if bad else 0)
