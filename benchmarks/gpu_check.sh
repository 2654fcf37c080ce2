#!/usr/bin/env bash
# GPU verification in one call, for a CUDA machine that already has torch,
# nvcc, CMake, ninja, scikit-build-core and pytest (the device
# tool's machines; nothing is downloaded). In order of importance, each stage
# under its own time limit so that one slow stage cannot eat the others:
#   1. build todi_ext from source against the installed torch (CUDA required),
#   2. the CUDA tests and the build tests,
#   3. the benchmark: N = 8192, V in {32000, 128256, 262144}, bf16 and fp32,
#      todi_ext vs eager, torch.compile, Liger's JSD and the HBM floor,
#   4. compute-sanitizer memcheck, then racecheck, on small cases of every
#      kernel (after 5),
#   5. the register-row kernel against the streamed kernel and the floor
#      (benchmarks/bench_kernels.py),
#   6. vocab-parallel phases on one NCCL rank vs the fused kernel (ToDi, AKL),
#   7. fused linear + distillation vs the materialised path and Liger,
#   8. every divergence against eager (GPU_CHECK_DIVERGENCES=0 skips it).
# Logs and results are packed after every stage into $OUT/gpu-check.tar.gz
# (the device tool brings back few files), with a one-page $OUT/summary.txt.
#
#   OUT=/tmp/gpu benchmarks/gpu_check.sh         # device tool: run with $OUT set
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} TODI_EXT_CUDA=ON PYTHONUNBUFFERED=1
failed=()
start=$(date +%s)

pack() {
  tar -czf "$OUT/gpu-check.tar.gz" -C "$WORK" . 2>/dev/null
  { echo "elapsed $(( $(date +%s) - start )) s; failed: ${failed[*]:-none}"; cat "$WORK/summary.txt" 2>/dev/null; } > "$OUT/summary.txt"
}
note() { echo "$*" | tee -a "$WORK/summary.txt"; }
# stage NAME SECONDS COMMAND...: runs with a time limit, logs to $WORK/NAME.log
stage() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  tail -25 "$WORK/$name.log"
  note "$name: rc=$rc in $(( $(date +%s) - t0 )) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
  pack
  return $rc
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -2
  nproc
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt" | tee -a "$WORK/summary.txt"

# Liger-Kernel (pure Python over Triton) is not on the GPU machines: carry its
# wheel in .whl/ (git-ignored), e.g. fetched here with
#   pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5
if ls .whl/liger_kernel-*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/liger_kernel-*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if ! stage build 240 "$PY" -m pip install -v --no-build-isolation --no-deps .; then
  echo "BUILD FAILED"
  exit 1
fi
"$PY" -c "import todi_ext; print(todi_ext.build_info())" | tee -a "$WORK/summary.txt"

stage tests "${GPU_CHECK_TESTS_S:-180}" "$PY" -m pytest -q -p no:cacheprovider -rf tests/test_cuda.py tests/test_build.py \
  tests/test_fused_linear_cuda.py
grep -E "passed|failed" "$WORK/tests.log" | tail -1 >> "$WORK/summary.txt"; pack

# The issue's grid: N = 8192, three vocabularies, bf16 and fp32; forward alone
# and forward+backward are both in the tables.
stage bench "${GPU_CHECK_BENCH_S:-240}" "$PY" benchmarks/bench.py --device cuda --dtype bfloat16 float32 \
  --out "$WORK/bench" --repeats "${GPU_CHECK_REPEATS:-10}" --impl todi_ext eager compile liger_jsd \
  --shapes 8192x32000 8192x128256 8192x262144
[ -f "$WORK/bench/bench-cuda.md" ] && cp "$WORK/bench/bench-cuda.md" "$OUT/" && cat "$WORK/bench/bench-cuda.md" >> "$WORK/summary.txt"
pack

# A/B: the register-row kernel (aligned rows) against the streamed kernel (rows one element off) and the floor.
stage bench-kernels "${GPU_CHECK_BENCH_S:-240}" "$PY" benchmarks/bench_kernels.py --out "$WORK/bench-kernels" \
  --repeats "${GPU_CHECK_REPEATS:-10}"
[ -f "$WORK/bench-kernels/kernels-cuda.md" ] && cp "$WORK/bench-kernels/kernels-cuda.md" "$OUT/" && \
  cat "$WORK/bench-kernels/kernels-cuda.md" >> "$WORK/summary.txt"
pack

# Small cases of every kernel: register rows in one CTA (V=1000, fp32 and bf16 V=3001 with a partial last
# word), over a cluster of 16 (bf16 V=70001), streamed (the same rows one element off, the teacher's gradient
# too), the generic mixed-dtype kernel, scale_grad (reduction "none"); ToDi and AKL (extra passes).
cat > "$WORK/sanitize_cases.py" <<'PYEOF'
import sys, torch, todi_ext
cases = [((7, 1000), torch.float32, torch.float32), ((5, 3001), torch.bfloat16, torch.bfloat16),
         ((5, 70001), torch.bfloat16, torch.bfloat16)]
if sys.argv[1] == "memcheck":
    cases += [((3, 4097), torch.bfloat16, torch.float32)]
for shape, dt_s, dt_t in cases:
    for offset, teacher_grad in ((0, False), (1, True)):
        n, v = shape
        z = (torch.randn(n, v + 8, device="cuda") * 3).to(dt_s)[:, offset:offset + v].detach().requires_grad_()
        s = (torch.randn(n, v + 8, device="cuda") * 3).to(dt_t)[:, offset:offset + v].detach().requires_grad_(teacher_grad)
        labels = torch.randint(0, 10, (n,), device="cuda"); labels[0] = -100
        for divergence in ("todi", "akl"):
            todi_ext.distill_loss(z, s, labels, divergence=divergence, temperature=2.0, reduction="none",
                                  hard_label_weight=0.5, soft_label_weight=0.5).sum().backward()
torch.cuda.synchronize()
print("sanitizer cases ran")
PYEOF
stage memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" "$WORK/sanitize_cases.py" memcheck
stage racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" "$WORK/sanitize_cases.py" racecheck

# Fused linear + distillation (issue 15's GPU target): N = 8192, H = 4096,
# V = 128256, bf16, against the materialised path and Liger's chunked
# LigerFusedLinearJSDLoss.
# Vocabulary-parallel phases on the GPU (issue 16): one NCCL rank, the phased
# path against the fused kernel on the same rows (its overhead; scaling needs
# more GPUs). Its correctness tests are in tests/test_cuda.py above.
# GPU_CHECK_VOCAB_PARALLEL=0 skips it.
if [ "${GPU_CHECK_VOCAB_PARALLEL:-1}" = 1 ]; then
  for div in todi akl; do
    stage "vocab-parallel-$div" "${GPU_CHECK_VOCAB_PARALLEL_S:-90}" "$PY" benchmarks/bench_vocab_parallel.py \
      --device cuda --divergence "$div" --rows 8192 --vocab 128256 --repeats 5 --out "$WORK/vocab-parallel"
  done
  cat "$WORK"/vocab-parallel/*.md >> "$WORK/summary.txt" 2>/dev/null; pack
fi

stage fused-linear "${GPU_CHECK_FUSED_LINEAR_S:-180}" "$PY" benchmarks/bench_fused_linear.py --device cuda \
  --out "$WORK/fused-linear" --repeats 5
[ -f "$WORK/fused-linear/fused-linear-cuda.md" ] && cat "$WORK/fused-linear/fused-linear-cuda.md" >> "$WORK/summary.txt"
pack

if [ "${GPU_CHECK_DIVERGENCES:-1}" = 1 ]; then
  stage divergences "${GPU_CHECK_DIVERGENCES_S:-150}" "$PY" benchmarks/bench.py --device cuda --dtype bfloat16 --out "$WORK/divergences" --no-plots \
    --repeats 5 --impl todi_ext eager --shapes 8192x32000 8192x128256 --divergence todi fkl rkl js tvd skl srkl akl gjsd
fi

note "elapsed $(( $(date +%s) - start )) s"
pack
if [ "${#failed[@]}" -gt 0 ]; then
  echo "GPU CHECK FAILED: ${failed[*]}"
  exit 1
fi
echo "GPU CHECK PASSED"
