#!/usr/bin/env bash
# Build Horovod 0.28.1 against the venv's torch, once per machine, and install it.
#
# Why a custom build: 0.28.1 (the last release) sets C++14 in its CMakeLists, and torch >= 2.1
# headers need C++17. We patch the two CMakeLists, build with gloo (CPU collectives) and
# without MPI/TensorFlow/MXNet. NCCL GPU operations are enabled only when the installed torch
# is a CUDA build and NCCL headers are present. The wheel is cached outside the repository,
# keyed by horovod, torch and python versions, so the 10-15 min build happens once.
#
# Usage: scripts/build_horovod.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail
PY=${1:-.venv/bin/python}
HVD_VERSION=${HOROVOD_VERSION:-0.28.1}
CACHE=${BIGOPT_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bigopt/wheels}

read -r TORCH_V PY_V CUDA_V < <("$PY" -c 'import sys,torch;print(torch.__version__.split("+")[0].replace(".","_"), "%d%d"%sys.version_info[:2], torch.version.cuda or "cpu")')
KEY="horovod-${HVD_VERSION}-torch${TORCH_V}-py${PY_V}-${CUDA_V}"
DEST="$CACHE/$KEY"

if "$PY" - <<PYEOF 2>/dev/null
import horovod, horovod.torch as hvd
assert horovod.__version__ == "$HVD_VERSION"
PYEOF
then
  echo "horovod $HVD_VERSION already installed"; exit 0
fi

if ! ls "$DEST"/horovod-*.whl >/dev/null 2>&1; then
  echo "building horovod $HVD_VERSION for $KEY (10-15 min on 2 cores; cached in $DEST)"
  command -v cmake >/dev/null || "$PY" -m pip install -q cmake
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$WORK"
  tar -xzf "$WORK"/horovod-"$HVD_VERSION".tar.gz -C "$WORK"
  SRC="$WORK/horovod-$HVD_VERSION"
  sed -i -E 's/(CMAKE_CXX_STANDARD[[:space:]]+)14/\117/' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$SRC/CMakeLists.txt" || { echo "C++17 patch did not apply" >&2; exit 1; }
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
         HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO
  if [ "$CUDA_V" != "cpu" ] && { [ -f /usr/include/nccl.h ] || [ -n "${HOROVOD_NCCL_HOME:-}" ]; }; then
    export HOROVOD_GPU_OPERATIONS=NCCL
    echo "CUDA torch and NCCL found: building with NCCL GPU operations"
  fi
  export MAKEFLAGS="-j$(nproc)"
  "$PY" -m pip install -q psutil cloudpickle pyyaml packaging cffi wheel setuptools
  "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WORK/dist" "$SRC"
  mkdir -p "$DEST"
  cp "$WORK"/dist/horovod-*.whl "$DEST/"
fi
"$PY" -m pip install -q --no-deps "$DEST"/horovod-*.whl
"$PY" -m pip install -q psutil cloudpickle pyyaml packaging cffi
"$PY" -c 'import horovod.torch as hvd; print("horovod", __import__("horovod").__version__, "gloo built:", hvd.gloo_built(), "nccl built:", hvd.nccl_built())'
# the build is only done when a 2-process gloo allreduce works
SPARK_LOCAL_IP=127.0.0.1 "$PY" "$(dirname "$0")/check_horovod.py"
