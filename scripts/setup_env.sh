#!/usr/bin/env bash
# Create/refresh the project's one virtualenv (.venv). Idempotent and fast when nothing changed:
#   1. Java 17+ and Python 3.11 checks;
#   2. torch 2.13.0 first (pip takes the machine's local CPU wheel; a CUDA machine its CUDA build);
#   3. the locked dependencies with uv (requirements.lock, skipped when its hash is unchanged),
#      and their bytecode;
#   4. Horovod 0.28.1 built from source once per machine (scripts/build_horovod.sh, cached wheel);
#   5. bigopt itself, editable.
# A new .venv (a fresh clone, CI) is not built that way each time: steps 2-4 are done once per
# machine and dependency set into a template venv in the cache (~/.cache/bigopt/venvs/<key>),
# and .venv is a hard-linked copy of it (seconds instead of ~3 min). BIGOPT_VENV_TEMPLATE=0
# builds .venv in place instead.
set -euo pipefail
# one compound command: bash parses it whole before running it, so a checkout updated while
# this runs (git pull, an edit) cannot make it run half of each version
{
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

# --- dependencies: torch, uv, the lock, bytecode, horovod -------------------------------------
# the stamp covers this step's own version: a venv set up by an older one is done again
LOCK_SUM=$( (cat requirements.lock pyproject.toml; echo "bytecode-1") | sha256sum | cut -d' ' -f1)
TORCH_WANT=$(grep -E '^torch==' requirements.torch.txt | cut -d= -f3)

write_file() {  # $1 path, $2 content: a new file, never an in-place write (files may be hard links)
  printf '%s\n' "$2" > "$1.tmp.$$" && mv -f "$1.tmp.$$" "$1"
}

install_deps() {  # $1 venv dir: everything but bigopt itself; idempotent
  local venv=$1 py=$1/bin/python stamp=$1/.bigopt-lock.sha256
  if [ ! -x "$py" ]; then
    "$PY_BOOT" -c 'import sys; assert sys.version_info[:2] >= (3, 11), sys.version' \
      || { echo "error: Python 3.11+ is required" >&2; exit 1; }
    "$PY_BOOT" -m venv "$venv"
  fi
  if ! "$py" -c "import torch,sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_WANT')" 2>/dev/null; then
    echo "installing torch==$TORCH_WANT (local wheel first)"
    "$py" -m pip install -q --disable-pip-version-check "torch==$TORCH_WANT"
  fi
  "$py" -c 'import uv' 2>/dev/null || "$py" -m pip install -q --disable-pip-version-check uv
  if [ "$(cat "$stamp" 2>/dev/null)" != "$LOCK_SUM" ]; then
    echo "installing locked dependencies (uv)"
    "$venv/bin/uv" pip install -q --python "$py" -r requirements.lock
    # pyspark is an sdist only: uv builds it and, with this index, keeps every build as a new
    # cache revision (0.5-1.4 GB each). 64 fresh-clone set-ups left 58 GB of them in
    # ~/.cache/uv and filled this machine's disk; prune drops the ones nothing refers to
    "$venv/bin/uv" cache prune -q || true
    # Bytecode for all of site-packages, once (~30-60 s on 2 cores): uv writes none, and where
    # PYTHONDONTWRITEBYTECODE is set (this machine, CI) Python never caches it either, so every
    # process compiled pandas, scipy, pyspark.ml... from source on each import (pyspark.ml:
    # 3.3 s instead of 1.1, in every Horovod rank). A few test files of dependencies do not
    # compile (Python 2 syntax): compileall's exit code is not an error here.
    echo "compiling dependencies' bytecode"
    "$py" -m compileall -q -j 0 "$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
    write_file "$stamp" "$LOCK_SUM"
  fi
  scripts/build_horovod.sh "$py"
}

# --- a new .venv: a hard-linked copy of this machine's template for the same dependencies ------
TEMPLATES=${BIGOPT_VENV_TEMPLATES:-${XDG_CACHE_HOME:-$HOME/.cache}/bigopt/venvs}
if [ ! -e "$VENV" ] && [ "${BIGOPT_VENV_TEMPLATE:-1}" != 0 ]; then
  PY_ID=$("$PY_BOOT" -c 'import sys, platform; print(sys.version, sys.executable, platform.machine())')
  KEY=$(printf '%s\n' "$LOCK_SUM" "$(cat requirements.torch.txt scripts/build_horovod.sh)" "$PY_ID" "template-1" \
        | sha256sum | cut -c1-16)
  TEMPLATE="$TEMPLATES/$KEY"
  if [ ! -f "$TEMPLATE/.bigopt-template" ]; then
    echo "building this machine's venv template for these dependencies ($TEMPLATE, once)"
    mkdir -p "$TEMPLATES"
    PARTIAL="$TEMPLATE.partial.$$"
    rm -rf "$PARTIAL"
    trap 'rm -rf "$PARTIAL"' EXIT
    install_deps "$PARTIAL"
    # the path its scripts and activate files were written with, replaced in each copy
    write_file "$PARTIAL/.bigopt-template" "$(cd "$PARTIAL" && pwd -P)"
    # a concurrent set-up may have finished the same template first: keep one, drop ours
    mv -T "$PARTIAL" "$TEMPLATE" 2>/dev/null || rm -rf "$PARTIAL"
    trap - EXIT
    # keep the two newest templates (each .venv copied from an older one keeps its own links)
    ls -1dt "$TEMPLATES"/*/ 2>/dev/null | grep -v '\.partial\.' | tail -n +3 | xargs -r rm -rf
  fi
  echo "creating $VENV from $TEMPLATE"
  BUILT_AT=$(cat "$TEMPLATE/.bigopt-template")
  mkdir -p "$(dirname "$VENV")"
  NEW="$VENV.partial.$$"
  trap 'rm -rf "$NEW"' EXIT
  # hard links cost no space and a few seconds; another filesystem gets a full copy
  cp -al "$TEMPLATE" "$NEW" 2>/dev/null || { rm -rf "$NEW"; cp -a "$TEMPLATE" "$NEW"; }
  rm -f "$NEW/.bigopt-template"
  DEST=$(cd "$(dirname "$VENV")" && pwd -P)/$(basename "$VENV")
  # scripts' #! lines, activate*, pyvenv.cfg name the template; sed -i writes new files, so the
  # template's own (linked) files are untouched
  grep -rlIZ --fixed-strings "$BUILT_AT" "$NEW/bin" "$NEW/pyvenv.cfg" 2>/dev/null \
    | xargs -0 -r sed -i "s|$BUILT_AT|$DEST|g"
  mv -T "$NEW" "$VENV"
  trap - EXIT
fi

install_deps "$VENV"
PY="$VENV/bin/python"
# --- bigopt itself, editable (its console script and a .pth naming this checkout) ---------------
EDITABLE="$VENV/.bigopt-editable"
HERE=$(pwd -P)
if [ "$(cat "$EDITABLE" 2>/dev/null)" != "$HERE $LOCK_SUM" ] || [ ! -x "$VENV/bin/bigopt" ]; then
  "$VENV/bin/uv" pip install -q --python "$PY" --no-deps -e .
  write_file "$EDITABLE" "$HERE $LOCK_SUM"
fi
exit 0
}
