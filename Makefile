# nano: set-up, tests, lint, demo. Everything lives in .venv/ in the repo root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that this machine has on disk; pinning it first keeps pip away from CUDA builds.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
# mamba-ssm's Triton SSD kernels: pure Python once its CUDA build is skipped (README "GPU"). The tests run
# them on the CPU through Triton's interpreter; on a GPU nano calls them for real.
MAMBA_SSM_PIN ?= mamba-ssm==2.3.2.post1
CAUSAL_CONV1D_PIN ?= causal-conv1d==1.7.0
# make demo DEMO=demo-smoke: every stage at toy size in a minute or so
DEMO ?= demo
# make test runs the suite in this many pytest-xdist processes (2: this project's 2-core machines; 0: serially)
TEST_WORKERS ?= 2

.PHONY: install install-gpu test lint demo clean bench bench-llama soak gpu-check gpu-vendor

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(BIN)/python -m pip install --quiet --no-build-isolation \
		--no-deps "$(MAMBA_SSM_PIN)"
	touch $(STAMP)

# On a CUDA machine: causal-conv1d's conv kernels (a prebuilt wheel where one matches this torch and CUDA,
# else a source build for every architecture, which takes long; gpu_check/run.sh builds for this GPU only).
# Without it nano runs its own PyTorch conv on the GPU and says so (nano info, the generate stats line).
install-gpu: install
	$(BIN)/python -m pip install --no-build-isolation "$(CAUSAL_CONV1D_PIN)"
	$(BIN)/nano info --kernels

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# The reliability soak (docs/RELIABILITY.md): ~10x the fuzz cases of CI with fresh random draws, and 8 kill
# chains per stage with 3 SIGKILLs each (about 25 minutes on 2 cores).
soak: install
	NANO_FUZZ_SCALE=10 $(BIN)/python -m pytest -q tests/test_fuzz_inputs.py
	NANO_KILL_TRIALS=8 NANO_KILLS_PER_TRIAL=3 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -s tests/test_interrupt.py

lint: install
	$(BIN)/ruff check .

demo: install
	$(BIN)/nano demo --recipe $(DEMO)

bench: install
	$(BIN)/python benchmarks/forward_throughput.py
	$(BIN)/nano bench --model small --threads 1 --lengths 512:1024,1024:2048,2048:4096 \
		--plot docs/img/bench-hybrid-vs-transformer.png

# llama.cpp beside nano on the CPU, 1 thread (docs/BENCHMARKS.md, "llama.cpp as the CPU peer"; ~20 minutes on
# medium). Needs the venv that benchmarks/llama_cpp_env.sh builds once (~10 min, prints its path): found in
# ~/.cache/nano-peers/llama-venv or LLAMA_PYTHON=VENV/bin/python; without it the script says how to build it.
bench-llama: install
	$(BIN)/python benchmarks/llama_cpp_peer.py --profile medium --settings 256:128 2048:512 --reps 5

# One CUDA GPU, offline, ~8 minutes: kernels vs reference, fit-check --measure on the 9B, FP8, bench decode
# (gpu_check/README.md). Uses whichever python on the machine has CUDA torch; results in $$OUT.
gpu-check:
	bash gpu_check/run.sh

# The upstream sdists gpu-check installs offline, into the git-ignored gpu_check/vendor/ (needs PyPI).
gpu-vendor:
	bash gpu_check/fetch_vendor.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
