#!/usr/bin/env bash
# nano: one-shot check of the CUDA paths on ONE H100/H200-class GPU (about 8 minutes). From the repository root:
#
#     bash gpu_check/run.sh        # or: make gpu-check; results in $OUT (a temporary folder when unset)
#
# Never edits the repository. Every step is time-boxed (BUDGET_S, default 480 s in all); a step that cannot run
# is recorded and the next one goes on. The summary table comes last (also in $OUT/summary.txt).
#
# Parts: 0 environment (a python with CUDA torch; nano's deps; mamba-ssm from gpu_check/vendor when missing;
# causal-conv1d from gpu_check/wheels, or built for this GPU only in the background when nvcc exists, else
# nano's PyTorch conv) -> 1 NVML + nano's attention module memory -> 2 FP8 (GEMM probe, GEMM forms, block-wise
# training vs bf16) -> 3 pytest -m gpu -> 4 kernel-vs-reference parity -> 5 fit-check --measure on the 9B at
# 8k/32k/128k -> 6 nano bench decode tok/s, hybrid vs Transformer twin (batch 1, batch max) -> 7 a training
# step through the kernels -> 8 int32 offsets: nano's scan at batch 48 (PASS expected), then the raw upstream
# call (INFO; last: a CUDA fault poisons the process) -> summary.
#
# Knobs: BUDGET_S (480), OUT, WORK, PYTHON, NANO_REPO, CONV_BUILD_S, REST_S (330: seconds kept for the steps
# after the causal-conv1d build), BUILD_ONLY=1 (only build the causal-conv1d wheel into $OUT/wheels; put it in
# gpu_check/wheels/ for later runs), NO_CONV_BUILD=1 (never build causal-conv1d), RUN_COMPILE=1 (also bench
# the torch.compile'd decode).
set -u -o pipefail

CHECK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "${NANO_REPO:-$CHECK/..}" && pwd)
OUT=${OUT:-$(mktemp -d -t nano-gpu-check-out.XXXX)}
WORK=${WORK:-$(mktemp -d -t nano-gpu-check-work.XXXX)}
BUDGET=${BUDGET_S:-480}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/steps.tsv"
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE_PID=$!
trap 'exec 1>&- 2>&-; wait "$TEE_PID" 2> /dev/null' EXIT  # the log's last lines reach the terminal too
START=$(date +%s)
DEADLINE=$((START + BUDGET))

left() { echo $((DEADLINE - $(date +%s))); }
cap() { local want=$1 l; l=$(left); [ "$l" -lt 10 ] && l=10; [ "$want" -gt "$l" ] && want=$l; echo "$want"; }
log() { echo "[gpu-check +$(($(date +%s) - START))s] $*"; }
step() { printf '%s\t%s\t%s\n' "$1" "$2" "${3:-}" >> "$OUT/steps.tsv"; log "$1: $2 ${3:-}"; }
lastline() { grep -v '^\s*$' "$1" 2> /dev/null | grep -iE 'error|exception|failed|refused|killed' | tail -1 | cut -c1-200; }
PY=""
finish() {  # the summary with whichever python there is (summarize.py needs the standard library only)
  local sp; sp=${PY:-$(command -v python3 || command -v python)}
  log "done in $(($(date +%s) - START)) s; results in $OUT"
  "$sp" "$CHECK/summarize.py" "$OUT" | tee "$OUT/summary.txt"
}
# a python step: name, seconds, log file, command...; rc 1 = rows FAILed (they are in the table), worse = crash
pystep() {
  local name=$1 secs=$2 logf=$3 rc box; shift 3
  if [ "$(left)" -lt 15 ]; then step "$name" SKIP "deadline"; return; fi
  box=$(cap "$secs")
  timeout "$box" "$@" > "$OUT/$logf" 2>&1
  rc=$?
  case $rc in
    0|1) log "$name: exit $rc" ;;
    124|137) step "$name" FAIL "timed out at its time box (${box} s); see $logf" ;;
    *) step "$name" FAIL "exit $rc: $(lastline "$OUT/$logf") (see $logf)" ;;
  esac
}

if [ ! -f "$REPO/nanocli_model/kernels.py" ]; then
  echo "not a nano checkout: $REPO (run from the repository root, or set NANO_REPO)"; exit 2
fi
cd "$REPO"

# ----------------------------------------------------------------------------------------- 0. environment
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2> /dev/null | head -1)
if [ -n "$GPU" ]; then step gpu INFO "$GPU"; else step gpu FAIL "no CUDA GPU: nvidia-smi is missing or lists none"; fi

for c in "${PYTHON:-}" python3 python /usr/bin/python3 /opt/conda/bin/python /usr/local/bin/python3 "$REPO/.venv/bin/python"; do
  [ -n "$c" ] && command -v "$c" > /dev/null 2>&1 || continue
  if timeout 90 "$c" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" > /dev/null 2>&1; then
    PY=$(command -v "$c"); break
  fi
done
PIP_FLAGS="--disable-pip-version-check --no-input --timeout 20 --retries 1"
export PIP_BREAK_SYSTEM_PACKAGES=1  # a throwaway machine: pip may install into a system python
if [ -z "$PY" ] && [ -z "$GPU" ]; then
  step torch SKIP "no CUDA GPU on this machine: nothing to check (run it where nvidia-smi lists a GPU)"
  finish; exit 1
fi
if [ -z "$PY" ]; then
  log "a GPU but no python with CUDA torch: trying pip install torch (needs the package registry)"
  BASEPY=$(command -v python3 || command -v python)
  if [ -n "$BASEPY" ] && "$BASEPY" -m venv "$WORK/venv" > /dev/null 2>&1 \
     && timeout "$(cap 240)" "$WORK/venv/bin/python" -m pip install $PIP_FLAGS "torch>=2.5,<2.14" > "$OUT/pip_torch.log" 2>&1 \
     && "$WORK/venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    PY="$WORK/venv/bin/python"
  else
    step torch FAIL "no python with CUDA torch, and pip could not install one (see pip_torch.log)"
    PY=""; finish; exit 1
  fi
fi
TORCH=$("$PY" -c "import torch, triton; print(torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tail -1)
step torch INFO "$PY: $TORCH"
CC=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")

# nano's runtime deps (nano itself runs from the checkout: PYTHONPATH, python -m nanocli) and mamba-ssm's
missing() {  # the distributions whose module does not import, space-separated (one python start)
  "$PY" - 2> /dev/null << 'EOF'
import importlib
DIST = {"typer": "typer", "rich": "rich", "yaml": "pyyaml", "safetensors": "safetensors", "pynvml": "nvidia-ml-py",
        "tokenizers": "tokenizers", "jinja2": "jinja2", "numpy": "numpy", "einops": "einops", "pytest": "pytest",
        "packaging": "packaging"}
gone = []
for mod, dist in DIST.items():
    try:
        importlib.import_module(mod)
    except Exception:  # noqa: BLE001
        gone.append(dist)
print(" ".join(gone))
EOF
}
MISSING=$(missing)
if [ -n "$MISSING" ]; then
  timeout "$(cap 90)" "$PY" -m pip install $PIP_FLAGS $MISSING > "$OUT/pip_deps.log" 2>&1
  STILL=$(missing)
  step deps "$([ -z "$STILL" ] && echo PASS || echo FAIL)" "missing:$MISSING${STILL:+; still missing (no registry?):$STILL}"
else
  step deps PASS "all present"
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1 TOKENIZERS_PARALLELISM=false

# mamba-ssm: nano imports only its Triton ops (kernels.py, without running mamba_ssm/__init__.py), so the
# sdist installed with its CUDA build skipped is enough (seconds, no compiler)
has_mamba() { "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('mamba_ssm') else 1)" 2> /dev/null; }
if has_mamba; then
  step mamba-ssm INFO "installed: $("$PY" -c "from importlib.metadata import version; print(version('mamba_ssm'))" 2>&1 | tail -1)"
else
  TGZ=$(ls "$CHECK"/vendor/mamba_ssm-*.tar.gz 2> /dev/null | tail -1)
  SRC_ARG=${TGZ:-mamba-ssm==2.3.2.post1}
  INDEX=$([ -n "$TGZ" ] && echo --no-index)
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE timeout "$(cap 90)" "$PY" -m pip install $PIP_FLAGS $INDEX \
    --no-build-isolation --no-deps "$SRC_ARG" > "$OUT/pip_mamba.log" 2>&1
  if has_mamba; then
    step mamba-ssm PASS "installed from ${TGZ:+gpu_check/vendor/}$(basename "$SRC_ARG") (CUDA build skipped)"
  elif [ -n "$TGZ" ] && tar xzf "$TGZ" -C "$WORK" && MSRC=$(ls -d "$WORK"/mamba_ssm-*/ | tail -1) && [ -n "$MSRC" ]; then
    export PYTHONPATH="$PYTHONPATH:${MSRC%/}"  # the unpacked sdist: its Triton ops are pure Python
    step mamba-ssm INFO "pip install failed ($(lastline "$OUT/pip_mamba.log")); using the unpacked sdist on PYTHONPATH"
  else
    step mamba-ssm FAIL "not installed, no sdist in gpu_check/vendor (make gpu-vendor), and pip could not fetch it"
  fi
fi
kstatus() { "$PY" -c "from nanocli_model import kernels; s = kernels.status('cuda'); print(s.label + ' | ' + s.describe())" 2>&1 | tail -1; }
KST=$(kstatus)
step "kernels.status" "$(case "$KST" in mamba-ssm*) echo PASS;; *) echo FAIL;; esac)" "$KST"

# causal-conv1d: installed, or a wheel in gpu_check/wheels, or built for sm_$CC only (in the background, when
# nvcc matches torch's CUDA major), else nano runs its own PyTorch conv on the GPU (kernels.status says so).
CONV=pytorch; CONV_PID=""
if ! "$PY" -c "import causal_conv1d" > /dev/null 2>&1 && ls "$CHECK"/wheels/causal_conv1d-*.whl > /dev/null 2>&1; then
  timeout "$(cap 60)" "$PY" -m pip install $PIP_FLAGS --no-index --no-deps "$(ls "$CHECK"/wheels/causal_conv1d-*.whl | tail -1)" \
    > "$OUT/pip_conv.log" 2>&1
fi
if "$PY" -c "import causal_conv1d" > /dev/null 2>&1; then
  CONV=extension; step causal-conv1d PASS "installed"
elif [ "${NO_CONV_BUILD:-0}" = 1 ]; then
  step causal-conv1d SKIP "not installed; NO_CONV_BUILD=1: nano's PyTorch conv"
else
  NVCC=$(command -v nvcc || ls "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" 2> /dev/null || ls /usr/local/cuda*/bin/nvcc 2> /dev/null | tail -1)
  TGZ=$(ls "$CHECK"/vendor/causal_conv1d-*.tar.gz 2> /dev/null | tail -1)
  TMAJ=$("$PY" -c "import torch; print((torch.version.cuda or '?').split('.')[0])" 2> /dev/null)
  NMAJ=$([ -n "$NVCC" ] && "$NVCC" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  if [ -n "$NVCC" ] && [ -n "$TGZ" ] && [ "$NMAJ" = "$TMAJ" ] && "$PY" -c "import setuptools" > /dev/null 2>&1; then
    tar xzf "$TGZ" -C "$WORK"; SRC=$(ls -d "$WORK"/causal_conv1d-*/ | tail -1)
    # setup.py hard-codes -gencode flags for sm75..sm121: keep this GPU's only (minutes instead of tens)
    "$PY" - "$SRC/setup.py" "$CC" << 'EOF'
import sys
path, cc = sys.argv[1], sys.argv[2]
s = open(path).read()
anchor = "    if FORCE_CXX11_ABI:"
assert anchor in s, "causal-conv1d setup.py layout changed"
s = s.replace(anchor, '    cc_flag = [f for f in cc_flag if not f.startswith(("-gencode", "arch="))]'
              f' + ["-gencode", "arch=compute_{cc},code=sm_{cc}"]\n' + anchor, 1)
open(path, "w").write(s)
EOF
    export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
    BUILD_S=${CONV_BUILD_S:-$([ "${BUILD_ONLY:-0}" = 1 ] && echo 540 || echo 330)}
    cat > "$WORK/build_conv.sh" << EOF
cd "$SRC" && CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=12 NVCC_THREADS=2 timeout $(cap "$BUILD_S") \\
  "$PY" -m pip wheel $PIP_FLAGS --no-index --no-build-isolation --no-deps -w "$WORK/wheels" . > "$OUT/conv_build.log" 2>&1 \\
  && "$PY" -m pip install $PIP_FLAGS --no-index --no-deps "\$(ls "$WORK"/wheels/causal_conv1d-*.whl | tail -1)" >> "$OUT/conv_build.log" 2>&1
echo \$? > "$WORK/conv_build.rc"
EOF
    if command -v setsid > /dev/null; then setsid bash "$WORK/build_conv.sh" & else bash "$WORK/build_conv.sh" & fi
    CONV_PID=$!
    step causal-conv1d INFO "building for sm_$CC with $NVCC in the background (time box ${BUILD_S}s)"
  else
    step causal-conv1d SKIP "not installed, no build (nvcc '${NVCC:-none}' CUDA ${NMAJ:-?} vs torch's ${TMAJ}; sdist '${TGZ:-none}'): nano's PyTorch conv on the GPU"
  fi
fi
if [ "${BUILD_ONLY:-0}" = 1 ]; then
  [ -n "$CONV_PID" ] && wait "$CONV_PID"
  mkdir -p "$OUT/wheels"; cp "$WORK"/wheels/causal_conv1d-*.whl "$OUT/wheels/" 2> /dev/null
  step "causal-conv1d wheel" "$(ls "$OUT"/wheels/*.whl > /dev/null 2>&1 && echo PASS || echo FAIL)" \
    "$(ls "$OUT"/wheels/ 2> /dev/null | tr '\n' ' ')-> copy into gpu_check/wheels/ for later runs"
  finish; exit 0
fi

# ----------------------------------------------------------------------------------------- 1-2. no kernels needed
pystep misc 60 misc.log "$PY" "$CHECK/misc_check.py" --out "$OUT/misc.json"
pystep fp8 100 fp8.log "$PY" "$CHECK/fp8_check.py" --out "$OUT/fp8.json" --steps 24 --deadline $((DEADLINE - 330))

if [ -n "$CONV_PID" ]; then
  WAIT=$(( $(left) - ${REST_S:-330} )); [ "$WAIT" -lt 0 ] && WAIT=0
  for _ in $(seq 1 "$WAIT"); do kill -0 "$CONV_PID" 2> /dev/null || break; sleep 1; done
  if kill -0 "$CONV_PID" 2> /dev/null; then
    kill -- "-$CONV_PID" 2> /dev/null || kill "$CONV_PID" 2> /dev/null  # setsid: its own process group
    step causal-conv1d FAIL "build still running at its time box: nano's PyTorch conv"
  elif [ "$(cat "$WORK/conv_build.rc" 2> /dev/null)" = 0 ] && "$PY" -c "import causal_conv1d" > /dev/null 2>&1; then
    CONV=extension; step causal-conv1d PASS "built for sm_$CC (the wheel is in $OUT/wheels for gpu_check/wheels/)"
    mkdir -p "$OUT/wheels"; cp "$WORK"/wheels/causal_conv1d-*.whl "$OUT/wheels/" 2> /dev/null
  else
    step causal-conv1d FAIL "build failed: $(lastline "$OUT/conv_build.log")"
  fi
  KST=$(kstatus)
  step "kernels.status" "$(case "$KST" in mamba-ssm*) echo PASS;; *) echo FAIL;; esac)" "$KST"
fi
log "conv: $CONV"

# ----------------------------------------------------------------------------------------- 3. pytest -m gpu
if [ "$(left)" -gt 30 ]; then
  TESTS="tests/test_kernels.py"; [ -f tests/test_fp8.py ] && TESTS="$TESTS tests/test_fp8.py"
  timeout "$(cap 150)" "$PY" -m pytest -q -m gpu -p no:cacheprovider $TESTS > "$OUT/pytest_gpu.log" 2>&1
  RC=$?
  SUMMARY=$(grep -E "passed|failed|error|skipped|deselected" "$OUT/pytest_gpu.log" | tail -1)
  STATUS=$([ $RC = 0 ] && echo PASS || echo FAIL)
  case "$SUMMARY" in *passed*) ;; *) STATUS=FAIL; SUMMARY="nothing passed (kernels missing?): $SUMMARY";; esac
  step "pytest -m gpu" "$STATUS" "rc=$RC $SUMMARY"
  grep -E "^(FAILED|ERROR) " "$OUT/pytest_gpu.log" | head -6 | while read -r l; do step "  pytest" FAIL "$(echo "$l" | cut -c1-180)"; done
else
  step "pytest -m gpu" SKIP deadline
fi

# ----------------------------------------------------------------------------------------- 4. parity
pystep parity 150 parity.log "$PY" "$CHECK/parity.py" --out "$OUT/parity.json" --deadline $((DEADLINE - 200))

# ----------------------------------------------------------------------------------------- 5. fit-check --measure, 9B
GPUFLAG="--gpu auto"
"$PY" -c "from nanocli import nvml; nvml.query_device(0)" > /dev/null 2>&1 \
  || GPUFLAG="--gpu $(case "$GPU" in *H200*) echo h200;; *) echo h100-80gb;; esac)"
fitcheck() {  # name, extra args...
  local name=$1 rc; shift
  [ "$(left)" -lt 30 ] && { step "fit-check $name" SKIP deadline; return; }
  timeout "$(cap 90)" "$PY" -m nanocli fit-check --model nemotron-nano-9b-v2 $GPUFLAG --measure --json "$@" \
    > "$OUT/fitcheck_$name.json" 2> "$OUT/fitcheck_$name.err"
  rc=$?
  if "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if d.get('measured') else 1)" "$OUT/fitcheck_$name.json" 2> /dev/null; then
    step "fit-check $name" PASS "rc=$rc ($GPUFLAG; rc 1 = the estimate says it does not fit)"
  else
    mv "$OUT/fitcheck_$name.json" "$OUT/fitcheck_$name.out" 2> /dev/null
    step "fit-check $name" FAIL "rc=$rc $(grep -v '^\s*$' "$OUT/fitcheck_$name.err" | tail -1 | cut -c1-200)"
  fi
}
for ctx in 8192 32768 131072; do fitcheck "$ctx" --context "$ctx"; done

# ----------------------------------------------------------------------------------------- 6. nano bench, 9B vs its twin
bench() {  # name, seconds, args...
  local name=$1 secs=$2 rc; shift 2
  [ "$(left)" -lt 45 ] && { step "bench $name" SKIP deadline; return; }
  timeout "$(cap "$secs")" "$PY" -m nanocli bench --model nemotron-nano-9b-v2 --device cuda --repeats 1 --json \
    --prefill-chunk 2048 "$@" > "$OUT/bench_$name.json" 2> "$OUT/bench_$name.err"
  rc=$?
  if [ $rc = 0 ]; then step "bench $name" PASS "$*"; else
    mv "$OUT/bench_$name.json" "$OUT/bench_$name.out" 2> /dev/null
    step "bench $name" FAIL "rc=$rc $(grep -v '^\s*$' "$OUT/bench_$name.err" | tail -1 | cut -c1-200)"; fi
}
bench b1 100 --lengths 1024:256 --batch 1
bench bmax 130 --lengths 2048:64 --batch max
[ "${RUN_COMPILE:-0}" = 1 ] && [ "$(left)" -gt 110 ] && bench b1_compiled 100 --lengths 512:128 --batch 1 --compile

# ----------------------------------------------------------------------------------------- 7. a training step through the kernels
pystep "parity backward" 90 parity_backward.log "$PY" "$CHECK/parity.py" --only backward \
  --out "$OUT/parity_backward.json" --deadline $((DEADLINE - 20))

# ----------------------------------------------------------------------------------------- 8. int32 offsets (last)
pystep "overflow (nano)" 60 parity_overflow.log "$PY" "$CHECK/parity.py" --only overflow --out "$OUT/parity_overflow.json"
if [ "$(left)" -ge 15 ]; then  # upstream's own behaviour: INFO; a CUDA fault here is the overflow itself
  timeout "$(cap 45)" "$PY" "$CHECK/parity.py" --only upstream-overflow --out "$OUT/parity_upstream.json" \
    > "$OUT/parity_upstream.log" 2>&1
  RC=$?
  [ $RC -gt 1 ] && step "overflow (upstream)" INFO "the raw mamba-ssm call ended the process (rc=$RC: $(lastline "$OUT/parity_upstream.log")): the overflow itself"
else
  step "overflow (upstream)" SKIP deadline
fi

finish
grep -q ", 0 FAIL/ERROR;" "$OUT/summary.txt"  # exit status: 0 when nothing FAILed
