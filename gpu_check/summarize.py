"""The GPU check's summary table, from OUT/steps.tsv and OUT/*.json (standard library only: any python3 runs it).

    python3 gpu_check/summarize.py OUT

Rows: the steps run.sh recorded, then every row of parity*.json, fp8.json and misc.json; then the
fit-check table (estimate vs measured peak, their ratio) and the bench table (hybrid and Transformer-twin
decode tokens/s, their ratio), with the kernels each ran on ("kernels", "kernels_detail" where the JSON has
them). Exit status 0 always: the table is the result.
"""

from __future__ import annotations

import glob
import json
import os
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "."
GIB = 2**30
W = 110


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception:  # noqa: BLE001  (missing, empty or cut short by a timeout)
        return None


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def num(v, spec: str, empty: str = "-") -> str:
    return empty if v is None else format(v, spec)


rows: list[tuple[str, str, str, str]] = []
steps = os.path.join(out, "steps.tsv")
if os.path.exists(steps):
    for line in open(steps):
        parts = line.rstrip("\n").split("\t")
        if len(parts) >= 2:
            rows.append(("step", parts[0], parts[1], "\t".join(parts[2:])))

names = ["misc", "fp8", "parity", "parity_backward", "parity_overflow", "parity_upstream"]
for name in names:
    data = load(os.path.join(out, f"{name}.json"))
    if data is None:
        continue
    for r in data if isinstance(data, list) else []:
        detail = (fmt(r.get("value")) + "  " + str(r.get("detail", ""))).strip()
        rows.append((name, str(r.get("check", "?")), str(r.get("status", "?")), detail))


def kernels_of(d: dict, measured: dict | None = None) -> tuple[str, str]:
    """(label, one sentence): top level first, then inside "measured"; absent keys give ""."""
    measured = measured or {}
    label = d.get("kernels") or measured.get("kernels") or ""
    detail = d.get("kernels_detail") or measured.get("kernels_detail") or ""
    return str(label), str(detail)


details: dict[str, str] = {}  # kernels_detail sentences, printed once each under their table

fit_rows = []
for path in sorted(glob.glob(os.path.join(out, "fitcheck_*.json")), key=lambda p: (len(p), p)):
    d = load(path)
    if not isinstance(d, dict):
        rows.append(("fit-check", os.path.basename(path), "ERROR", "no JSON (see the .err file)"))
        continue
    m = d.get("measured") or {}
    est, needed, peak = d.get("model_bytes"), d.get("needed_bytes"), m.get("peak_allocated")
    label, detail = kernels_of(d, m)
    if detail:
        details.setdefault(detail, label)
    fit_rows.append((d.get("context"), d.get("batch"), est, peak, m.get("peak_reserved"), needed,
                     m.get("nvml_used"), m.get("seconds"), label,
                     f"{peak / est:.3f}" if peak and est else "-", d.get("verdict", "")))

bench_rows = []
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    d = load(path)
    if not isinstance(d, dict):
        rows.append(("bench", os.path.basename(path), "ERROR", "no JSON (see the .err file)"))
        continue
    label, detail = kernels_of(d)
    if detail:
        details.setdefault(detail, label)
    for p in d.get("pairs", []):
        h, t = p.get("hybrid") or {}, p.get("transformer") or {}
        ratio = p.get("decode_ratio")
        bench_rows.append((os.path.basename(path)[6:-5], f"{p.get('prompt')}:{p.get('output')}", h.get("batch"),
                           h.get("decode_tokens_per_s"), t.get("batch"), t.get("decode_tokens_per_s"), ratio,
                           h.get("prefill_tokens_per_s"), (h.get("peak_memory_bytes") or 0) / GIB, label,
                           d.get("decode", "")))

print("=" * W)
print("nano GPU check: summary")
print("=" * W)
cw = min(max([len(r[1]) for r in rows] + [20]), 72)
for group, check, status, detail in rows:
    print(f"{group:15s} {check[:cw]:{cw}s} {status:5s} {detail[:W]}")
if fit_rows:
    print("-" * W)
    print("fit-check --measure, nemotron-nano-9b-v2 (random weights), GiB: estimate = model_bytes (weights + cache + "
          "activations);\nneeded adds the framework overhead; alloc/est = measured peak_allocated / estimate")
    print(f"{'context':>8} {'batch':>5} {'estimate':>9} {'peak_alloc':>10} {'alloc/est':>9} {'peak_resv':>9} "
          f"{'needed':>8} {'nvml_used':>9} {'sec':>6} {'verdict':>9}  kernels")
    for c, b, e, p, r, n, nv, s, k, ratio, v in fit_rows:
        g = lambda x: num(None if x is None else x / GIB, ".2f")  # noqa: E731
        print(f"{fmt(c):>8} {fmt(b):>5} {g(e):>9} {g(p):>10} {ratio:>9} {g(r):>9} {g(n):>8} {g(nv):>9} "
              f"{num(s, '.1f'):>6} {str(v):>9}  {k}")
if bench_rows:
    print("-" * W)
    print("nano bench, nemotron-nano-9b-v2 vs its pure-attention twin: decode tokens/s (hybrid/twin = decode ratio)")
    print(f"{'run':>6} {'pair':>10} {'batch':>5} {'hybrid tok/s':>12} {'twin batch':>10} {'twin tok/s':>10} "
          f"{'hybrid/twin':>11} {'prefill tok/s':>13} {'peak GiB':>8}  kernels (decode)")
    for run, pair, b, dec, tb, tdec, ratio, pre, peak, k, mode in bench_rows:
        print(f"{run:>6} {pair:>10} {fmt(b):>5} {num(dec, '.1f'):>12} {fmt(tb) or '-':>10} {num(tdec, '.1f'):>10} "
              f"{num(ratio, '.2f'):>11} {num(pre, '.0f'):>13} {peak:>8.2f}  {k} ({mode})")
for sentence, label in details.items():
    print(f"[{label}] {sentence}")
bad = sum(1 for r in rows if r[2] in ("FAIL", "ERROR"))
print("=" * W)
print(f"{len(rows)} rows, {bad} FAIL/ERROR; {len(fit_rows)} fit-check and {len(bench_rows)} bench results")
