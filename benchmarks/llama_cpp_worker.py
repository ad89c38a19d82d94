"""The llama.cpp side of ``benchmarks/llama_cpp_peer.py``: a helper that script runs in a subprocess, never imported
by nano (llama.cpp is a benchmark-only dependency). Two modes, each in its own python:

``convert CKPT_DIR --outfile M.gguf --outtype f32|q8_0`` (nano's python: the converter needs torch and
transformers; the working directory must be llama-cpp-python's ``vendor/llama.cpp``): llama.cpp's own HF->GGUF
converter (``convert_hf_to_gguf.py``) with two shims for random test checkpoints, carried over from the shared
peers' ``llama_conv.py``: an unknown BPE pre-tokenizer maps to gpt-2 (nano's test tokenizer is not in the
converter's list of known hashes), and config.json is read raw (transformers 5.x's AutoConfig fills in MoE
defaults, which make the converter write the MoE architecture). The caller also drops MoE keys from config.json.

``serve THREADS N_CTX KV_TYPE`` (the llama venv's python: llama-cpp-python and numpy only): reads JSON requests from
stdin, one a line, and answers each with one JSON line on stdout, so that the caller can interleave llama.cpp's
runs with nano's (A B A B) while the GGUF models stay loaded:
  {"op": "load", "name": N, "path": GGUF}                -> {"ok": true, "n_vocab": V}
  {"op": "run", "name": N, "prompt": [ids], "gen": G}    -> {"prefill_s": s, "decode_s": s, "ids": [G ids]}
A run clears the context's memory (KV cache and Mamba state), evaluates the prompt in one call (logits of the last
position only), takes the argmax, then evaluates one token a step for G - 1 steps, greedy; decode_s times those
steps (the argmax included), as nano's side does.
"""

import json
import sys
import time


def convert(argv: list[str]) -> None:
    import runpy

    sys.path.insert(0, "gguf-py")
    sys.path.insert(0, ".")
    import conversion.base as base

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"

    class _NoAutoConfig:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise OSError("read config.json directly")

    base.AutoConfig = _NoAutoConfig
    sys.argv = ["convert_hf_to_gguf.py", *argv]
    runpy.run_path("convert_hf_to_gguf.py", run_name="__main__")


def serve(threads: int, n_ctx: int, kv_type: str) -> None:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    ggml_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv_type]
    models: dict[str, Llama] = {}

    def last_logits(llm: Llama) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))

    def run(llm: Llama, prompt: list[int], gen: int) -> dict:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        out = [int(np.argmax(last_logits(llm)))]
        t1 = time.perf_counter()
        for _ in range(gen - 1):
            llm.eval([out[-1]])
            out.append(int(np.argmax(last_logits(llm))))
        return {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1, "ids": out}

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "load":
            llm = Llama(model_path=req["path"], n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                        n_batch=n_ctx, n_ubatch=512, type_k=ggml_type, type_v=ggml_type, logits_all=False,
                        verbose=False)
            models[req["name"]] = llm
            answer = {"ok": True, "n_vocab": llm.n_vocab()}
        elif req["op"] == "run":
            answer = run(models[req["name"]], req["prompt"], req["gen"])
        else:
            answer = {"error": f"unknown op {req['op']!r}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "convert":
        convert(sys.argv[2:])
    elif len(sys.argv) == 5 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        raise SystemExit(__doc__)
