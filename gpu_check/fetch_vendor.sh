#!/usr/bin/env bash
# Downloads the upstream sdists the GPU check installs offline into gpu_check/vendor/ (git-ignored):
#
#     bash gpu_check/fetch_vendor.sh      # or: make gpu-vendor   (needs the package registry)
#
#   mamba_ssm-2.3.2.post1.tar.gz   nano imports only its Triton ops; installed with the CUDA build skipped
#   causal_conv1d-1.7.0.tar.gz     built by run.sh for the GPU at hand when nvcc is there (else PyTorch conv)
#
# A file already there is kept (after its sha256 is checked). First `pip download` (no build: the CUDA builds
# are skipped while pip reads the metadata), then, if pip fails, the index's JSON simple API (PEP 691) through
# python's urllib. Every file is checked against the sha256 PyPI publishes for it (pinned below).
# Knobs: PYTHON (default: the repository's .venv, else python3), VENDOR (default gpu_check/vendor).
set -u -o pipefail

CHECK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENDOR=${VENDOR:-$CHECK/vendor}
PY=${PYTHON:-$([ -x "$CHECK/../.venv/bin/python" ] && echo "$CHECK/../.venv/bin/python" || command -v python3)}
mkdir -p "$VENDOR"

# file  requirement  sha256 (PyPI's)
FILES="mamba_ssm-2.3.2.post1.tar.gz mamba-ssm==2.3.2.post1 104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028
causal_conv1d-1.7.0.tar.gz causal-conv1d==1.7.0 3202758494eaa7b597ce1c282dfa188889506bfcb92cad3c407d26736bfcd32b"

sha_ok() { [ "$("$PY" -c "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())" "$1")" = "$2" ]; }

rc=0
while read -r file req sha; do
  path="$VENDOR/$file"
  if [ -f "$path" ]; then
    if sha_ok "$path" "$sha"; then echo "have $file"; continue; fi
    echo "$file: sha256 mismatch, fetching it again"; rm -f "$path"
  fi
  tmp=$(mktemp -d)
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    "$PY" -m pip download --disable-pip-version-check --no-input --quiet --no-deps --no-binary :all: \
    --no-build-isolation -d "$tmp" "$req" > "$tmp/pip.log" 2>&1
  if [ ! -f "$tmp/$file" ]; then
    echo "$file: pip download failed ($(grep -iE 'error' "$tmp/pip.log" | tail -1 | cut -c1-160)); trying the simple API"
    "$PY" - "$req" "$file" "$tmp" << 'EOF'
import json, os, sys, urllib.request

req, file, tmp = sys.argv[1:4]
name = req.split("==")[0]
index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
r = urllib.request.Request(f"{index}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(r, timeout=30) as f:
    files = json.load(f)["files"]
url = next(f["url"] for f in files if f["filename"] == file)
with urllib.request.urlopen(url, timeout=120) as f, open(os.path.join(tmp, file), "wb") as out:
    out.write(f.read())
EOF
  fi
  if [ -f "$tmp/$file" ] && sha_ok "$tmp/$file" "$sha"; then
    mv "$tmp/$file" "$path"; echo "fetched $file"
  else
    echo "FAILED: $file (not downloaded, or its sha256 is not PyPI's)"; rc=1
  fi
  rm -rf "$tmp"
done <<< "$FILES"
ls -l "$VENDOR"
exit $rc
