#!/usr/bin/env bash
# Sets up everything on a fresh machine, idempotently: a virtual environment
# in .venv with torch and the build tools, then builds and installs todi_ext
# from this checkout (incremental: the CMake build folder is kept in build/).
#
# Environment:
#   TODI_TORCH_SPEC   torch requirement (default torch==2.14.1, the CUDA 13.0
#                     build; torch==2.13.0 is a smaller CPU-only build)
#   TODI_EXT_CUDA     AUTO (default), ON or OFF: build the CUDA kernels
#   TORCH_CUDA_ARCH_LIST  CUDA architectures (default 9.0)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${TODI_VENV:-.venv}
TORCH_SPEC=${TODI_TORCH_SPEC:-torch==2.14.1}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, pytest, numpy, matplotlib, scikit_build_core, ninja, cmake" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC and the build/test tools"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "$TORCH_SPEC" numpy pytest matplotlib "scikit-build-core>=0.10" ninja "cmake>=3.26"
fi
# The Hugging Face integration's tests and the distillation study (optional
# dependencies of the package, needed here so that the tests run them).
if ! "$VENV/bin/python" -c "import transformers, accelerate, tokenizers" 2>/dev/null; then
  echo "[setup] installing transformers, accelerate, tokenizers"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "transformers>=4.46" "accelerate>=1.0" \
    "tokenizers>=0.20"
fi

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# The minimal CUDA toolkit here is found through its real path (BUILD-NOTES).
if [ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
echo "[setup] building and installing todi_ext"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps . \
  || { echo "[setup] build failed" >&2; exit 1; }
"$VENV/bin/python" -c "import todi_ext, json; print('[setup] todi_ext', json.dumps(todi_ext.build_info()))"
