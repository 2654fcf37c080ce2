#!/usr/bin/env bash
# A/B of the CUDA launch configurations in one call (device tool, $OUT set):
# build, the CUDA tests, then todi_ext alone at N = 8192 under each setting of
# the A/B switches (TODI_EXT_CUDA_ROW_CACHE, TODI_EXT_CUDA_MAX_THREADS,
# TODI_EXT_CUDA_SPLIT_ROWS). Tables land in $OUT/ab-summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu-ab}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} TODI_EXT_CUDA=ON PYTHONUNBUFFERED=1
SHAPES=${GPU_AB_SHAPES:-8192x32000 8192x128256}
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/ab-summary.md" 2>&1
timeout 240 "$PY" -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
timeout "${GPU_AB_TESTS_S:-120}" "$PY" -m pytest -q -p no:cacheprovider -x tests/test_cuda.py > "$OUT/tests.log" 2>&1
echo "tests rc=$?: $(tail -1 "$OUT/tests.log")" | tee -a "$OUT/ab-summary.md"
for setting in "default" "TODI_EXT_CUDA_ROW_CACHE=0" "TODI_EXT_CUDA_MAX_THREADS=1024" \
               "TODI_EXT_CUDA_MAX_THREADS=1024 TODI_EXT_CUDA_ROW_CACHE=0" "TODI_EXT_CUDA_SPLIT_ROWS=1"; do
  vars=(); [ "$setting" != default ] && read -ra vars <<< "$setting"
  echo "## $setting" >> "$OUT/ab-summary.md"
  env "${vars[@]}" timeout 90 "$PY" benchmarks/bench.py --device cuda --dtype bfloat16 float32 --impl todi_ext \
    --no-plots --repeats 10 --out "/tmp/ab" --shapes $SHAPES > /dev/null 2>&1
  grep -E "todi_ext|floor" /tmp/ab/bench-cuda.md >> "$OUT/ab-summary.md"
  rm -f /tmp/ab/bench-cuda.md
done
cat "$OUT/ab-summary.md"
