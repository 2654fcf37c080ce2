#!/usr/bin/env bash
# The one-wheel claim (every torch >= 2.10) under the torch releases CI does
# not run: CI tests the wheel under 2.14.1 and 2.13.0+cpu only, as each
# release from PyPI is a ~1 GB download with several GB of CUDA wheels.
# For each version given: a venv under .venv-releases/ with that torch from
# PyPI, the wheel installed into it with --no-deps, and the fast tier run
# there (as CI runs it under 2.13.0+cpu).
#
#   scripts/check_torch_releases.sh 2.10.0 2.11.0 2.12.1
#
# The wheel is CI's (TODI_EXT_CUDA and TORCH_CUDA_ARCH_LIST as set here).
# A torch of another CUDA major version cannot load its CUDA module and gets
# a CPU-only wheel instead (TODI_EXT_CUDA=OFF, built in build/cpu-only):
# PyPI's torch 2.10.0 is a CUDA 12.8 build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 TORCH_VERSION [TORCH_VERSION ...]" >&2; exit 2; }

./scripts/setup.sh >/dev/null
wheel_of() {  # wheel_of DIR: the one wheel in DIR
  ls "$1"/todi_ext-*.whl
}
build_wheel() {  # build_wheel DIR [pip wheel options]
  local dir=$1; shift
  rm -rf "$dir"
  .venv/bin/python -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w "$dir" "$@" .
}
build_wheel dist/releases/default
wheel_cuda=$(.venv/bin/python - "$(wheel_of dist/releases/default)" <<'EOF'
import ast, re, sys, zipfile
config = zipfile.ZipFile(sys.argv[1]).read("todi_ext/_build_config.py").decode()
version = ast.literal_eval(re.search(r"^CUDA_VERSION = (.*)$", config, re.M).group(1))  # "13.0.88" or None
print(version.split(".")[0] if version else "")
EOF
)

cpu_only_wheel=""  # built when a version needs it
for version in "$@"; do
  venv=$PWD/.venv-releases/torch-$version
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$version" numpy pytest
  torch_cuda=$("$venv/bin/python" -c "import torch; print((torch.version.cuda or '').split('.')[0])")
  wheel=$(wheel_of dist/releases/default)
  if [ -n "$wheel_cuda" ] && [ -n "$torch_cuda" ] && [ "$torch_cuda" != "$wheel_cuda" ]; then
    # The CUDA wheel must refuse this torch with the message that says why.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$wheel"
    refusal=$(cd /tmp && "$venv/bin/python" -c "import todi_ext" 2>&1 || true)
    grep -q "install the todi_ext build for CUDA $torch_cuda" <<<"$refusal" ||
      { echo "[releases] torch $version: the CUDA $wheel_cuda wheel did not refuse CUDA $torch_cuda clearly: $refusal" >&2; exit 1; }
    if [ -z "$cpu_only_wheel" ]; then
      TODI_EXT_CUDA=OFF build_wheel dist/releases/cpu-only -C build-dir=build/cpu-only
      cpu_only_wheel=$(wheel_of dist/releases/cpu-only)
    fi
    wheel=$cpu_only_wheel
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$wheel"
  "$venv/bin/python" -c "import torch, todi_ext; print('[releases] torch', torch.__version__, 'runs', todi_ext.build_info())"
  "$venv/bin/python" -m pytest -q tests -m "not slow" --ignore=tests/test_cuda_host.py -p no:cacheprovider
done
