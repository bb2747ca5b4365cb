#!/usr/bin/env bash
# Create/refresh the project's one virtualenv (.venv). Idempotent and fast when nothing changed:
#   1. Java 17+ and Python 3.11 checks;
#   2. torch 2.13.0 first (pip takes the machine's local CPU wheel; a CUDA machine its CUDA build);
#   3. the locked dependencies with uv (requirements.lock, skipped when its hash is unchanged);
#   4. bigopt itself, editable;
#   5. Horovod 0.28.1 built from source once per machine (scripts/build_horovod.sh, cached wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BIGOPT_VENV:-.venv}
PY_BOOT=${PYTHON:-python3.11}
command -v "$PY_BOOT" >/dev/null 2>&1 || PY_BOOT=python3

# --- Java -----------------------------------------------------------------------------------
if ! command -v java >/dev/null 2>&1; then
  echo "error: Java 17+ is required by Spark 4 but 'java' is not on PATH (install openjdk-17-jre-headless, or set JAVA_HOME and PATH)" >&2
  exit 1
fi
JAVA_MAJOR=$(java -version 2>&1 | awk -F'"' '/version/ {print $2}' | awk -F. '{print ($1=="1")?$2:$1}')
if [ -z "$JAVA_MAJOR" ] || [ "$JAVA_MAJOR" -lt 17 ]; then
  echo "error: Spark 4 needs Java 17+, found '$(java -version 2>&1 | head -1)'" >&2
  exit 1
fi

# --- venv + torch ---------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  "$PY_BOOT" -c 'import sys; assert sys.version_info[:2] >= (3, 11), sys.version' \
    || { echo "error: Python 3.11+ is required" >&2; exit 1; }
  "$PY_BOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"
TORCH_WANT=$(grep -E '^torch==' requirements.torch.txt | cut -d= -f3)
if ! "$PY" -c "import torch,sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_WANT')" 2>/dev/null; then
  echo "installing torch==$TORCH_WANT (local wheel first)"
  "$PY" -m pip install -q --disable-pip-version-check "torch==$TORCH_WANT"
fi
"$PY" -c 'import uv' 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check uv

# --- locked dependencies (uv) ---------------------------------------------------------------
# the stamp covers this step's own version: a venv set up by an older one is done again
STAMP="$VENV/.bigopt-lock.sha256"
LOCK_SUM=$( (cat requirements.lock pyproject.toml; echo "bytecode-1") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$LOCK_SUM" ]; then
  echo "installing locked dependencies (uv)"
  "$VENV/bin/uv" pip install -q --python "$PY" -r requirements.lock
  "$VENV/bin/uv" pip install -q --python "$PY" --no-deps -e .
  # pyspark is an sdist only: uv builds it and, with this index, keeps every build as a new
  # cache revision (0.5-1.4 GB each). 64 fresh-clone set-ups left 58 GB of them in
  # ~/.cache/uv and filled this machine's disk; prune drops the ones nothing refers to
  "$VENV/bin/uv" cache prune -q || true
  # Bytecode for all of site-packages, once (~30 s on 2 cores): uv writes none, and where
  # PYTHONDONTWRITEBYTECODE is set (this machine, CI) Python never caches it either, so every
  # process compiled pandas, scipy, pyspark.ml... from source on each import (pyspark.ml:
  # 3.3 s instead of 1.1, in every Horovod rank). A few test files of dependencies do not
  # compile (Python 2 syntax): compileall's exit code is not an error here.
  echo "compiling dependencies' bytecode"
  "$PY" -m compileall -q -j 0 "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
  echo "$LOCK_SUM" > "$STAMP"
fi

# --- horovod ----------------------------------------------------------------------------------
scripts/build_horovod.sh "$PY"
