#!/usr/bin/env bash
# GPU verification in one call, for a CUDA machine that already has torch,
# nvcc, CMake, ninja, pybind11, scikit-build-core and pytest (the device
# tool's machines; nothing is downloaded):
#   1. build todi_ext from source against the installed torch (CUDA required),
#   2. the CUDA tests and the build tests,
#   3. compute-sanitizer memcheck on small cases of every kernel variant,
#   4. the benchmark on the GPU (bf16, the CUDA issue's shapes), then every
#      divergence at two shapes (row-cached and streamed) against eager.
# Everything lands under $OUT (default benchmarks/out/gpu): env.txt,
# build.log, tests.log, memcheck.log, bench.log, bench-cuda.json, bench-cuda.md.
#
#   OUT=/tmp/gpu benchmarks/gpu_check.sh         # device tool: run with $OUT set
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} TODI_EXT_CUDA=ON PYTHONUNBUFFERED=1
failed=()

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -2
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Liger-Kernel (pure Python over Triton) is not on the GPU machines: carry its
# wheel in .whl/ (git-ignored) to include it, e.g. here:
#   pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5
if ls .whl/liger_kernel-*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/liger_kernel-*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

echo "== build"
if ! "$PY" -m pip install -v --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
"$PY" -c "import todi_ext; print(todi_ext.build_info())" | tee -a "$OUT/build.log"

echo "== tests"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_build.py 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(tests)

echo "== memcheck"
# Row-cached (V=1000), streamed (bf16 V=70000, odd offsets), generic mixed-dtype path, and scale_grad_ (reduction "none");
# ToDi and AKL (the one divergence with extra passes).
compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" - > "$OUT/memcheck.log" 2>&1 <<'PYEOF'
import torch, todi_ext
for shape, dt_s, dt_t, sl in [((7, 1000), torch.bfloat16, torch.bfloat16, slice(None)),
                               ((5, 70001), torch.bfloat16, torch.bfloat16, slice(1, None)),
                               ((3, 4097), torch.bfloat16, torch.float32, slice(None))]:
    z = (torch.randn(shape, device="cuda") * 3).to(dt_s)[:, sl].requires_grad_()
    s = (torch.randn(shape, device="cuda") * 3).to(dt_t)[:, sl].requires_grad_()
    labels = torch.randint(0, 10, shape[:1], device="cuda"); labels[0] = -100
    for divergence in ("todi", "akl"):
        todi_ext.distill_loss(z, s, labels, divergence=divergence, temperature=2.0, reduction="none").sum().backward()
torch.cuda.synchronize()
print("memcheck cases ran")
PYEOF
rc=$?
tail -5 "$OUT/memcheck.log"
[ "$rc" -eq 0 ] || failed+=(memcheck)

echo "== benchmark"
# The CUDA issue's target shape (N=8192, V=128256, bf16) and the vocabularies
# around it; the full grid is `benchmarks/bench.py --device cuda` (longer).
"$PY" benchmarks/bench.py --device cuda --dtype bfloat16 --out "$OUT" \
  --shapes 4096x32000 8192x32000 8192x50257 8192x128256 8192x151936 8192x262144 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(benchmark)
"$PY" benchmarks/bench.py --device cuda --dtype bfloat16 --out "$OUT/divergences" --no-plots --repeats 5 \
  --impl todi_ext eager --shapes 2048x32000 2048x128256 \
  --divergence todi fkl rkl js tvd skl srkl akl gjsd 2>&1 | tee "$OUT/bench-divergences.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(benchmark-divergences)

if [ "${#failed[@]}" -gt 0 ]; then
  echo "GPU CHECK FAILED: ${failed[*]}"
  exit 1
fi
echo "GPU CHECK PASSED"
