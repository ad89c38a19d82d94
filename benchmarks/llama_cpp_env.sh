#!/usr/bin/env bash
# The llama.cpp peer's environment for benchmarks/llama_cpp_peer.py (a copy of the shared peers' `llama-env`):
# builds, once, a venv with llama-cpp-python 0.3.36 compiled from source for this CPU (-DGGML_NATIVE=ON, about
# 10 minutes on 2 cores) and unpacks its sdist beside it, whose vendor/llama.cpp/ holds llama.cpp's own HF->GGUF
# converter. Prints the venv path; its bin/python is what --llama-python wants. Needs PyPI (or a mirror) once.
# A benchmark-only dependency: nothing in nanocli/, nanocli_model/ or tests/ uses it.
set -eu
C=${PEER_CACHE:-$HOME/.cache/nano-peers}; V=$C/llama-venv
if [ ! -x "$V/bin/python" ] || ! "$V/bin/python" -c "import llama_cpp, tokenizers" 2>/dev/null; then
  mkdir -p "$C"; python3 -m venv "$V"
  "$V/bin/pip" install -q scikit-build-core tokenizers numpy >/dev/null 2>&1
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" MAKEFLAGS=-j2 "$V/bin/pip" install -q --no-cache-dir \
    "llama-cpp-python==0.3.36" >"$C/llama-build.log" 2>&1 || { echo "build failed: see $C/llama-build.log" >&2; exit 1; }
fi
if [ ! -f "$V/src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
  mkdir -p "$V/src"
  "$V/bin/pip" download -q --no-deps --no-binary :all: --no-build-isolation -d "$V/src" "llama-cpp-python==0.3.36" \
    >/dev/null 2>&1
  tar xzf "$V/src/llama_cpp_python-0.3.36.tar.gz" -C "$V/src"
fi
echo "$V"
