"""llama.cpp beside nano on the CPU (issue #20 item 3): same random NemotronH weights, same threads, prefill and
decode tokens/s of llama.cpp f32 vs nano fp32 and llama.cpp q8_0 vs nano ``--dtype int8``, and nano's greedy ids
against llama.cpp's at f32.

    bash benchmarks/llama_cpp_env.sh          # once, ~10 min: builds llama-cpp-python, prints its venv VENV
    PYTHONPATH=. .venv/bin/python benchmarks/llama_cpp_peer.py --llama-python VENV/bin/python \\
        --profile medium --settings 256:128 2048:512 --reps 5 --json out.json

The model: a nano profile built by nano's own code (``build_model``, ``init_weights``, seed 0), saved in HF NemotronH
format by ``save_pretrained`` with a byte-level BPE tokenizer trained on this repo's text (``build_test_tokenizer``;
only the converter reads it, both sides get the same random prompt ids), cached under --cache-dir. llama.cpp's own
converter (``convert_hf_to_gguf.py`` from llama-cpp-python's sdist, which llama_cpp_env.sh unpacks beside the
venv) writes it as GGUF at f32 and q8_0 (``llama_cpp_worker.py convert``, run with this python). nano loads the same
directory through ``load_pretrained`` as ``nano generate`` does (fp32; int8 = per-channel weight-only int8 of the
projections and lm_head), eager, and unless --no-compile also through the compiled step ``nano generate`` runs:
``AotDecode`` (compiled ahead of time, nano's CPU default; fp32, and int8 with nano's GEMVs, row_gemv.py),
else ``CompiledDecode``.
llama.cpp runs in a separate python (``llama_cpp_worker.py serve``, llama-cpp-python, n_threads = --threads, KV
cache in f32 by default, batch = the whole prompt, ubatch 512 as llama-bench), one JSON request a line over a pipe,
so llama.cpp is never imported here and its runs interleave with nano's: A B C ... A B C, --reps times after a
warm-up of each, medians. A run prefills the prompt (logits of the last position only) and decodes greedily one
token a step; prefill tok/s = prompt / prefill time (the first argmax included), decode tok/s = (output - 1) / the
time of the one-token steps. Greedy agreement at f32: how many generated tokens agree before the first divergence
(a divergence changes every later input), and in total. ``uptime`` is printed before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
WORKER = HERE / "llama_cpp_worker.py"
PROFILES = HERE.parent / "nanocli" / "profiles" / "models"
SDIST = "src/llama_cpp_python-0.3.36/vendor/llama.cpp"  # where llama_cpp_env.sh unpacks the converter, in the venv
DEFAULT_VENV = Path.home() / ".cache" / "nano-peers" / "llama-venv"
# transformers 5.x fills these MoE keys in; in config.json they make the converter write the MoE architecture
MOE_KEYS = ("num_experts_per_tok", "n_routed_experts", "n_shared_experts", "moe_intermediate_size",
            "moe_shared_expert_intermediate_size", "n_group", "topk_group", "norm_topk_prob",
            "routed_scaling_factor", "num_experts", "moe_latent_size")
PAIRS = {"f32": "fp32", "q8_0": "int8"}  # llama.cpp weights -> the nano dtype they are compared with


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def llama_python(arg: str | None) -> Path:
    """The llama venv's python, checked: a missing one is a one-line error saying how to build it."""
    path = Path(arg or os.environ.get("LLAMA_PYTHON") or DEFAULT_VENV / "bin" / "python")
    ok = path.is_file() and subprocess.run([str(path), "-c", "import llama_cpp, numpy"],
                                           capture_output=True).returncode == 0
    if not ok:
        raise SystemExit(f"llama_cpp_peer: no python with llama-cpp-python at {path} (--llama-python or "
                         "$LLAMA_PYTHON); build it once with `bash benchmarks/llama_cpp_env.sh` (~10 min, prints "
                         "the venv VENV) and pass --llama-python VENV/bin/python")
    return path


def converter_dir(python: Path, arg: str | None) -> Path:
    src = Path(arg) if arg else python.parent.parent / SDIST  # not resolved: bin/python is a symlink
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"llama_cpp_peer: no convert_hf_to_gguf.py in {src} (--llama-src); "
                         "`bash benchmarks/llama_cpp_env.sh` unpacks it beside the venv")
    return src


def load_profile(name: str):
    from nanocli_model import NanoConfig

    raw = yaml.safe_load((PROFILES / f"{name}.yaml").read_text())
    return NanoConfig.from_dict(raw["config"], source=name)


def checkpoint(profile: str, seed: int, root: Path, fresh: bool) -> Path:
    """The profile's random model as an HF NemotronH directory with a tokenizer (built once, cached)."""
    from nanocli_model.checkpoint import save_pretrained
    from nanocli_model.model import build_model
    from nanocli_model.tokenizer import build_test_tokenizer

    config = load_profile(profile)
    key = hashlib.sha256(f"{config.to_json_string()} seed={seed}".encode()).hexdigest()[:10]
    home = root / f"{profile}-seed{seed}-{key}"
    if fresh:
        shutil.rmtree(home, ignore_errors=True)
    hf = home / "hf"
    if not (hf / "tokenizer.json").is_file():
        print(f"building {profile} (seed {seed}) -> {hf}", flush=True)
        save_pretrained(build_model(config, seed=seed), hf)
        repo = HERE.parent
        texts = [p.read_text(encoding="utf-8") for pat in ("docs/*.md", "nanocli/**/*.py", "nanocli_model/*.py")
                 for p in sorted(repo.glob(pat))]
        build_test_tokenizer(hf, texts, vocab_size=min(config.vocab_size, 4096))  # the converter pads to vocab
    return hf


def gguf(hf: Path, outtype: str, src: Path) -> Path:
    """``hf`` converted by llama.cpp's converter at ``outtype`` (cached beside it)."""
    out = hf.parent / f"model-{outtype}.gguf"
    if out.is_file():
        return out
    view = hf.parent / "gguf-src"  # the checkpoint's files, config.json without MoE keys
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir()
    for f in hf.iterdir():
        if f.name != "config.json":
            (view / f.name).symlink_to(f.resolve())
    config = json.loads((hf / "config.json").read_text())
    (view / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in MOE_KEYS}, indent=2))
    tmp, log = out.with_suffix(".tmp"), out.with_suffix(".log")
    print(f"converting to GGUF {outtype} with {src / 'convert_hf_to_gguf.py'}", flush=True)
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, str(WORKER), "convert", str(view), "--outfile", str(tmp),
                             "--outtype", outtype], cwd=src, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"llama_cpp_peer: the GGUF conversion failed (exit {rc}):\n"
                         + "\n".join(log.read_text().splitlines()[-15:]))
    tmp.rename(out)
    return out


class LlamaPeer:
    """llama-cpp-python in its own python (llama_cpp_worker.py serve), one JSON request a line."""

    def __init__(self, python: Path, threads: int, n_ctx: int, kv_type: str):
        self.proc = subprocess.Popen([str(python), str(WORKER), "serve", str(threads), str(n_ctx), kv_type],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"llama_cpp_peer: the llama.cpp worker exited ({self.proc.wait()}); see its stderr above")
        answer = json.loads(line)
        if "error" in answer:
            raise SystemExit(f"llama_cpp_peer: llama.cpp worker: {answer['error']}")
        return answer

    def runner(self, name: str, path: Path, vocab: int):
        n_vocab = self.ask(op="load", name=name, path=str(path))["n_vocab"]
        if n_vocab != vocab:
            raise SystemExit(f"llama_cpp_peer: {path} has {n_vocab} tokens, the model {vocab}")
        return lambda prompt, gen, cache_len: self.ask(op="run", name=name, prompt=prompt, gen=gen)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def nano_runner(model, step=None):
    """A run as ``nano generate`` makes one: prefill (logits of the last position), then greedy one-token steps
    through ``step`` (a ``CompiledDecode``) or the eager model."""
    step = step or model

    @torch.inference_mode()
    def run(prompt: list[int], gen: int, cache_len: int) -> dict:
        cache = model.allocate_cache(1, cache_len)
        t0 = time.perf_counter()
        tok = model(torch.tensor([prompt]), cache, logits_to_keep=1)[:, -1].argmax(-1)
        out = [int(tok)]
        t1 = time.perf_counter()
        for _ in range(gen - 1):
            tok = step(tok[:, None], cache)[:, -1].argmax(-1)
            out.append(int(tok))
        return {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1, "ids": out}
    return run


def agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """(tokens equal before the first divergence, tokens equal in total)."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return prefix, sum(x == y for x, y in zip(a, b))


def measure(runners: dict, prompt: list[int], gen: int, reps: int) -> dict:
    """Each runner warmed up once (the prompt, 4 tokens, the timed runs' cache size), then ``reps`` rounds
    A B C ...; per runner the prefill and decode tokens/s of every run and the ids (of the last run, and whether
    every run gave the same)."""
    cache_len = len(prompt) + gen
    for run in runners.values():
        run(prompt, 4, cache_len)
    res = {k: {"prefill_tps": [], "decode_tps": [], "ids": None, "ids_stable": True} for k in runners}
    for _ in range(reps):
        for name, run in runners.items():
            out, r = run(prompt, gen, cache_len), res[name]
            r["prefill_tps"].append(len(prompt) / out["prefill_s"])
            r["decode_tps"].append((gen - 1) / out["decode_s"])
            r["ids_stable"] &= r["ids"] is None or r["ids"] == out["ids"]
            r["ids"] = out["ids"]
    for r in res.values():
        r["prefill"], r["decode"] = statistics.median(r["prefill_tps"]), statistics.median(r["decode_tps"])
    return res


STEP_KIND: dict[str, str] = {}  # nano weights -> how its compiled row decodes: "ahead of time" | "torch.compile"


def table(results: list[dict]) -> list[str]:
    """The markdown table: per setting and precision, llama.cpp's row, then nano's (ratios: nano / llama.cpp)."""
    rows = ["| prompt:output | engine | weights | prefill tok/s | nano / llama.cpp | decode tok/s | nano / llama.cpp "
            "| decode tok/s, every run | load avg before / after |",
            "|---|---|---|---:|---:|---:|---:|---|---|"]
    for s in results:
        v, load = s["variants"], f"{s['load_before']:.2f} / {s['load_after']:.2f}"
        for lw, nw in PAIRS.items():
            peer = v[f"llama.cpp {lw}"]
            compiled = f"nano compiled ({STEP_KIND.get(nw, 'torch.compile')})"
            for name, engine, weights in ((f"llama.cpp {lw}", "llama.cpp", lw), (f"nano {nw}", "nano eager", nw),
                                          (f"nano {nw} compiled", compiled, nw)):
                if name not in v:
                    continue
                r = v[name]
                ratios = ("-", "-") if engine == "llama.cpp" else \
                    (f"**{r['prefill'] / peer['prefill']:.2f}x**", f"**{r['decode'] / peer['decode']:.2f}x**")
                runs = " ".join(f"{x:.1f}" for x in r["decode_tps"])
                rows.append(f"| {s['prompt']}:{s['gen']} | {engine} | {weights} | {r['prefill']:.0f} | {ratios[0]} | "
                            f"{r['decode']:.1f} | {ratios[1]} | {runs} | {load} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-python", help="the llama venv's python (default $LLAMA_PYTHON, else "
                    f"{DEFAULT_VENV}/bin/python); built by benchmarks/llama_cpp_env.sh")
    ap.add_argument("--llama-src", help=f"llama.cpp's source with convert_hf_to_gguf.py (default VENV/{SDIST})")
    ap.add_argument("--profile", default="medium")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", nargs="+", default=["256:128", "2048:512"], help="prompt:output token pairs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="nano eager only (no compiled rows)")
    ap.add_argument("--kv-type", choices=("f32", "f16"), default="f32", help="llama.cpp's KV cache type "
                    "(f32 as nano's; llama.cpp's own default is f16)")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "nano-peers" / "llama-bench"))
    ap.add_argument("--fresh", action="store_true", help="rebuild the checkpoint and the GGUF files")
    ap.add_argument("--json", help="also write the results (every run, the ids) to this file")
    args = ap.parse_args()
    python = llama_python(args.llama_python)
    src = converter_dir(python, args.llama_src)
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings]
    torch.set_num_threads(args.threads)
    before = uptime()
    print("uptime before:", before, flush=True)

    from nanocli_model import load_pretrained

    hf = checkpoint(args.profile, args.seed, Path(args.cache_dir), args.fresh)
    ggufs = {t: gguf(hf, t, src) for t in PAIRS}
    nano = {f"nano {d}": load_pretrained(hf, dtype=d) for d in PAIRS.values()}
    vocab = nano["nano fp32"].config.vocab_size
    params = sum(p.numel() for p in nano["nano fp32"].parameters())
    peer = LlamaPeer(python, args.threads, max(p + g for p, g in settings) + 8, args.kv_type)
    runners = {}
    for lw, nw in PAIRS.items():  # A B A B: nano fp32, llama f32, nano int8, llama q8_0, then the compiled rows
        runners[f"nano {nw}"] = nano_runner(nano[f"nano {nw}"])
        runners[f"llama.cpp {lw}"] = peer.runner(lw, ggufs[lw], vocab)
    if not args.no_compile:  # the compiled steps nano generate runs (stages.generate.compile_decode's choice)
        import tempfile

        from nanocli_model.aot_decode import AotDecode, supported
        from nanocli_model.decode import CompiledDecode

        library_dir = tempfile.mkdtemp(prefix="nano-peer-decode-")
        for nw in PAIRS.values():
            model = load_pretrained(hf, dtype=nw)  # its own copy: the compiled step keeps the weights row-major
            aot = supported(model) is None
            STEP_KIND[nw] = "ahead of time" if aot else "torch.compile"
            runners[f"nano {nw} compiled"] = nano_runner(model, AotDecode(model, library_dir) if aot
                                                         else CompiledDecode(model))
    results = []
    for prompt_len, gen in settings:
        prompt = torch.randint(3, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        load_before = os.getloadavg()[0]
        res = measure(runners, prompt, gen, args.reps)
        ref = res["llama.cpp f32"]["ids"]
        agree = {k: agreement(r["ids"], ref) for k, r in res.items() if k.startswith("nano fp32")}
        agree["nano int8 vs llama.cpp q8_0"] = agreement(res["nano int8"]["ids"], res["llama.cpp q8_0"]["ids"])
        results.append({"prompt": prompt_len, "gen": gen, "load_before": load_before,
                        "load_after": os.getloadavg()[0], "variants": res, "agreement": agree})
        print(f"  {prompt_len}:{gen} done, load average {os.getloadavg()[0]:.2f}", flush=True)
    peer.close()
    after = uptime()
    commit = subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    print("uptime after: ", after)
    print(f"\nprofile {args.profile} ({params / 1e6:.1f}M params, random weights, seed {args.seed}), "
          f"{args.threads} thread(s), {args.reps} runs interleaved, medians; nano {commit}, torch {torch.__version__}; "
          f"llama.cpp KV cache {args.kv_type}; GGUF " + ", ".join(f"{t} {p.stat().st_size / 1e6:.0f} MB"
                                                                   for t, p in ggufs.items()) + "\n")
    print("\n".join(table(results)))
    print()
    for s in results:
        gen = s["gen"]
        for k, (prefix, total) in s["agreement"].items():
            vs = k if " vs " in k else f"{k} vs llama.cpp f32"
            print(f"{s['prompt']}:{gen} greedy ids, {vs}: first {prefix} of {gen} equal before the first "
                  f"divergence, {total} of {gen} equal in total")
        unstable = [k for k, r in s["variants"].items() if not r["ids_stable"]]
        if unstable:
            print(f"{s['prompt']}:{gen} note: ids differed between runs for {', '.join(unstable)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "profile": args.profile, "params": params, "seed": args.seed, "threads": args.threads,
            "reps": args.reps, "kv_type": args.kv_type, "nano_commit": commit, "torch": torch.__version__,
            "uptime_before": before, "uptime_after": after, "settings": results}, indent=1))


if __name__ == "__main__":
    main()
