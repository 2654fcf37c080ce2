#!/usr/bin/env bash
# Run here before a GPU round: puts into .whl/ (git-ignored; name it in the
# device call's carry) what the GPU machines lack, since they reach nothing
# outside:
#   - todi_ext's own wheel, built here as CI builds it: gpu_check.sh installs
#     it (the one-wheel claim, under the GPU machine's torch) and builds from
#     source only when it does not load there;
#   - Liger-Kernel, the benchmarks' baseline (pure Python over Triton);
#   - transformers and accelerate at the versions of .venv, with every
#     dependency that torch does not already bring, for the trainer's tests.
# The GPU machines run Python 3.12 (../shared/BUILD-NOTES.md): the binary
# wheels are fetched for it. Needs the set-up of scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PIP=("$PY" -m pip -q --disable-pip-version-check)
GPU_PYTHON=${GPU_PYTHON:-3.12}
PLATFORM=(--python-version "$GPU_PYTHON" --only-binary=:all: --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
rm -rf .whl
mkdir -p .whl/deps

TODI_EXT_CUDA=ON TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  "${PIP[@]}" wheel --no-build-isolation --no-deps -w .whl .
"${PIP[@]}" download --no-deps --only-binary=:all: -d .whl liger-kernel

# The dependency closure, resolved for the GPU machine's Python without
# installing anything; torch, its own dependencies and numpy are there already.
wanted=$("$PY" -c "from importlib.metadata import version as v
print(' '.join(f'{p}=={v(p)}' for p in ('transformers', 'accelerate')))")
report=$(mktemp -d)
"${PIP[@]}" install --dry-run --ignore-installed --report "$report/resolved.json" --target "$report/target" \
  "${PLATFORM[@]}" $wanted
pins=$("$PY" - "$report/resolved.json" <<'EOF'
import json, re, sys
present = {"torch", "triton", "numpy", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "setuptools"}
for item in json.load(open(sys.argv[1]))["install"]:
    name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
    if name not in present and not name.startswith("nvidia-"):
        print(f"{name}=={item['metadata']['version']}")
EOF
)
"${PIP[@]}" download --no-deps -d .whl/deps "${PLATFORM[@]}" $pins
ls .whl .whl/deps
du -sh .whl
