# nano: set-up, tests, lint, demo. Everything lives in .venv/ in the repo root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that this machine has on disk; pinning it first keeps pip away from CUDA builds.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
# make demo DEMO=demo-smoke: every stage at toy size in a minute or so
DEMO ?= demo

.PHONY: install test lint demo clean bench soak

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

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

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
