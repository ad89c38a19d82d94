"""Issue #20 item 1, an experiment (not a nano feature): can the decode step compile in a background thread
while the first tokens decode eagerly, and what does that cost the eager tokens?

    PYTHONPATH=. .venv/bin/python benchmarks/background_compile.py CHECKPOINT_DIR --tokens 1500

Loads the checkpoint in fp32 at 1 thread, prefills 64 random ids and decodes ``--tokens`` greedy tokens two
ways, one after the other: eager only (as ``nano generate``), and with a ``CompiledDecode`` compiling on a
scratch cache of the same shape in a daemon thread (three steps: the static compile, then the recompile with the
position symbolic), the loop switching to the compiled step once the thread is done. Prints the median eager
step before / during the compile, the compiled step after, the compile's wall time, dynamo's frame count at the
switch and at the end (equal: the switch recompiled nothing), and the tokens/s over the whole run. Run it twice:
the first run compiles with a cold inductor cache, the second finds its artefacts on disk.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch

from nanocli_model import load_pretrained
from nanocli_model.decode import CompiledDecode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--switch-interval", type=float, default=sys.getswitchinterval(),
                    help="the GIL switch interval while the compile runs (seconds)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.tokens
    model = load_pretrained(args.model, dtype="fp32")  # outside inference mode: the decode layout copies weights
    with torch.inference_mode():
        prompt = torch.randint(3, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))

        cache = model.allocate_cache(1, 64 + n + 1)
        tok, times, t0 = model(prompt, cache)[:, -1].argmax(-1), [], time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            tok = model(tok[:, None], cache)[:, -1].argmax(-1)
            times.append(time.perf_counter() - t)
        eager_total = time.perf_counter() - t0
        print(f"eager only: median step {statistics.median(times) * 1e3:.1f} ms, {n / eager_total:.1f} tok/s")

        step = CompiledDecode(model)  # row-major weights from here on (the compiled layout)
        cache = model.allocate_cache(1, 64 + n + 1)
        tok = model(prompt, cache)[:, -1].argmax(-1)
        ready, took = threading.Event(), {}

        def compile_in_background() -> None:
            t = time.perf_counter()
            with torch.inference_mode():
                scratch = model.allocate_cache(1, 64 + n + 1)
                model(prompt, scratch)
                x = torch.zeros(1, 1, dtype=torch.long)
                for _ in range(3):
                    step(x, scratch)
            took["s"] = time.perf_counter() - t
            ready.set()

        from torch._dynamo.utils import counters

        old = sys.getswitchinterval()
        sys.setswitchinterval(args.switch_interval)
        threading.Thread(target=compile_in_background, daemon=True).start()
        during, after, frames, t0 = [], [], None, time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            if ready.is_set():
                if frames is None:
                    frames = counters["frames"]["total"]
                    sys.setswitchinterval(old)
                tok = step(tok[:, None], cache)[:, -1].argmax(-1)
                after.append(time.perf_counter() - t)
            else:
                tok = model(tok[:, None], cache)[:, -1].argmax(-1)
                during.append(time.perf_counter() - t)
        total = time.perf_counter() - t0

    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1e3:.1f} ms" if xs else "-"
    print(f"background compile: {took.get('s', float('nan')):.1f} s; {len(during)} eager steps during it, median "
          f"{med(during)}; {len(after)} compiled steps, median {med(after)}; {n / total:.1f} tok/s over the run "
          f"({n / eager_total:.1f} eager only); dynamo frames at the switch {frames}, at the end "
          f"{counters['frames']['total']}")


if __name__ == "__main__":
    main()
