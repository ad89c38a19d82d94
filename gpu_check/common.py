"""Shared by the GPU check's scripts: one JSON list of results per script, written after every row.

Each row is {"check", "status", "value", "detail"}; status is PASS, FAIL, ERROR, SKIP or INFO. The file is
rewritten after every row, so a process that dies (a CUDA fault, a timeout) leaves what it had measured.
"""

from __future__ import annotations

import functools
import json
import os
import time
import traceback


class Results:
    def __init__(self, tag: str, out: str, deadline: float = 0.0, tracebacks: bool = False):
        self.tag, self.out, self.deadline, self.tracebacks = tag, out, deadline, tracebacks
        self.rows: list[dict] = []
        if os.path.dirname(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)

    def record(self, check: str, status: str, value=None, detail="") -> None:
        self.rows.append({"check": check, "status": status, "value": value, "detail": str(detail)[:400]})
        v = "" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value))
        print(f"[{self.tag}] {status:5s} {check:62s} {v:>10s}  {str(detail)[:170]}", flush=True)
        with open(self.out, "w") as f:
            json.dump(self.rows, f, indent=1)

    def late(self) -> bool:
        return bool(self.deadline) and time.time() > self.deadline

    def guarded(self, name: str, on_error=None):
        """Runs the check unless past the deadline; an exception becomes one ERROR row (and the next check
        goes on). ``on_error`` runs after the row is written (e.g. a CUDA synchronize)."""

        def wrap(fn):
            @functools.wraps(fn)
            def run(*a, **k):
                if self.late():
                    self.record(name, "SKIP", detail="deadline")
                    return None
                try:
                    return fn(*a, **k)
                except Exception as e:  # noqa: BLE001  (one row per failure; the rest of the check goes on)
                    tb = traceback.extract_tb(e.__traceback__)[-1]
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    self.record(name, "ERROR", detail=f"{type(e).__name__}: {first[:200]} @ "
                                                      f"{os.path.basename(tb.filename)}:{tb.lineno}")
                    if self.tracebacks or os.environ.get("GPU_CHECK_TRACEBACK"):
                        traceback.print_exc()
                    if on_error is not None:
                        try:
                            on_error()
                        except Exception:  # noqa: BLE001
                            pass
                    return None

            return run

        return wrap


def rel(a, b) -> float:
    """max |a - b| / max |b| in float64 (the repository tests' rel_err)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
