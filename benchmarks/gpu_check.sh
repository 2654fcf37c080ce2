#!/usr/bin/env bash
# The GPU round in one call, for a CUDA machine that already has torch, nvcc,
# CMake, ninja, scikit-build-core and pytest (the device tool's machines;
# nothing can be downloaded there: benchmarks/gpu_wheels.sh, run here first,
# puts into .whl/ what they lack, and the call carries it). Stages in the order
# of issue 22, each under its own time limit so that one slow stage cannot eat
# the others, the results packed after each (the call's own limit may end the
# run at any stage):
#   1. install todi_ext's wheel from .whl/ (built here; the one-wheel claim
#      under the GPU machine's torch), or build from source when there is
#      none or it does not load; the CUDA and build tests; compute-sanitizer
#      memcheck on small cases of every kernel,
#   2. the benchmark: N = 8192, V in {32000, 128256, 262144}, bf16 and fp32,
#      todi_ext vs eager, torch.compile, Liger's JSD and the floor; the
#      register-row kernel (v2) vs the streamed kernel (bench_kernels.py);
#      every divergence at bf16 V = 128256 (GPU_CHECK_DIVERGENCES=0 skips it),
#   3. fused linear + distillation vs the materialised path and Liger,
#   4. vocab-parallel phases on one NCCL rank vs the fused kernel (ToDi, AKL;
#      GPU_CHECK_VOCAB_PARALLEL=0 skips it); the Hugging Face trainer on the GPU
#      (a bf16 tiny Llama, fused_linear=True against False),
#   5. ncu metrics of one launch of each kernel (where ncu is installed),
# then racecheck. Logs and results go into $OUT/gpu-check.tar.gz (the device
# tool brings back few files), with a one-page $OUT/summary.txt.
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
# tables FILE...: each table a stage wrote that exists goes to $OUT and into the summary.
tables() { local f; for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUT/" && cat "$f" >> "$WORK/summary.txt"; done; pack; }
# tally NAME: a pytest stage's last count line into the summary.
tally() { grep -E "passed|failed|skipped" "$WORK/$1.log" | tail -1 >> "$WORK/summary.txt"; pack; }
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

# What .whl/ brings (benchmarks/gpu_wheels.sh): Liger-Kernel, in a folder of
# its own on every stage's path; transformers and its dependencies in another,
# on the trainer stage's path only (they would shadow the machine's packages).
if ls .whl/liger_kernel-*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site-liger .whl/liger_kernel-*.whl \
    && export PYTHONPATH=/tmp/site-liger${PYTHONPATH:+:$PYTHONPATH}
fi
if ls .whl/deps/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site-trainer .whl/deps/*.whl
fi

# The CUDA module must load (import todi_ext refuses a broken one) and register the op's CUDA kernel.
# Its last line in the stage's log is todi_ext.build_info().
loads() {
  "$PY" -c 'import torch, todi_ext; assert torch.cuda.is_available(), "no GPU"
assert torch._C._dispatch_has_kernel_for_dispatch_key("todi_ext::distill_forward", "CUDA"), "no CUDA kernel"
print(todi_ext.build_info())' \
    >> "$WORK/$1.log" 2>&1 || { note "$1: todi_ext does not load, see $1.log"; failed+=("$1-load"); return 1; }
}
installed=
if ls .whl/todi_ext-*.whl > /dev/null 2>&1; then
  stage install 120 "$PY" -m pip install --no-index --no-deps --force-reinstall .whl/todi_ext-*.whl \
    && loads install && installed="the wheel built elsewhere" && log=install
fi
if [ -z "$installed" ]; then
  stage build 300 "$PY" -m pip install -v --no-build-isolation --no-deps . && loads build && installed="source" \
    && log=build
fi
if [ -z "$installed" ]; then
  pack
  echo "BUILD FAILED"
  exit 1
fi
note "todi_ext from $installed: $(tail -1 "$WORK/$log.log")"
pack

# 1. The CUDA tests (the vocab-parallel and fused-linear ones included) and the build tests, then
# compute-sanitizer on small cases of every kernel: register rows in one CTA (V=1000, fp32 and bf16 V=3001
# with a partial last word), over a cluster of 16 (bf16 V=70001), streamed (the same rows one element off,
# the teacher's gradient too), the generic mixed-dtype kernel, scale_grad (reduction "none"); ToDi and AKL
# (extra passes).
stage tests "${GPU_CHECK_TESTS_S:-180}" "$PY" -m pytest -q -p no:cacheprovider -rf tests/test_cuda.py tests/test_build.py \
  tests/test_fused_linear_cuda.py
tally tests
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

# 2. The issue's grid: N = 8192, three vocabularies, bf16 and fp32; forward alone and forward+backward
# are both in the tables. Then kernel v2 against the streamed kernel (aligned rows against rows one
# element off) and the floor, every divergence included; then every divergence against eager.
stage bench "${GPU_CHECK_BENCH_S:-240}" "$PY" benchmarks/bench.py --device cuda --dtype bfloat16 float32 \
  --out "$WORK/bench" --repeats "${GPU_CHECK_REPEATS:-10}" --impl todi_ext eager compile liger_jsd \
  --shapes 8192x32000 8192x128256 8192x262144
tables "$WORK/bench/bench-cuda.md"
stage bench-kernels "${GPU_CHECK_BENCH_S:-240}" "$PY" benchmarks/bench_kernels.py --out "$WORK/bench-kernels" \
  --repeats "${GPU_CHECK_REPEATS:-10}"
tables "$WORK/bench-kernels/kernels-cuda.md"
if [ "${GPU_CHECK_DIVERGENCES:-1}" = 1 ]; then
  stage divergences "${GPU_CHECK_DIVERGENCES_S:-120}" "$PY" benchmarks/bench.py --device cuda --dtype bfloat16 \
    --out "$WORK/divergences" --no-plots --repeats 5 --impl todi_ext eager --shapes 8192x128256 \
    --divergence todi fkl rkl js tvd skl srkl akl gjsd
fi

# 3. Fused linear + distillation: N = 8192, student H = 2048, teacher H = 4096, V = 128256, bf16, against
# the materialised path and Liger's chunked LigerFusedLinearJSDLoss.
stage fused-linear "${GPU_CHECK_FUSED_LINEAR_S:-180}" "$PY" benchmarks/bench_fused_linear.py --device cuda \
  --out "$WORK/fused-linear" --repeats 5
tables "$WORK/fused-linear/fused-linear-cuda.md"

# 4. Vocabulary-parallel phases on one NCCL rank, the phased path against the fused kernel on the same
# rows (its overhead; scaling needs more GPUs; its correctness tests ran in stage 1). Then the trainer
# on the GPU, with the transformers that .whl/deps brought.
if [ "${GPU_CHECK_VOCAB_PARALLEL:-1}" = 1 ]; then
  for div in todi akl; do
    stage "vocab-parallel-$div" "${GPU_CHECK_VOCAB_PARALLEL_S:-90}" "$PY" benchmarks/bench_vocab_parallel.py \
      --device cuda --divergence "$div" --rows 8192 --vocab 128256 --repeats 5 --out "$WORK/vocab-parallel"
  done
  tables "$WORK"/vocab-parallel/*.md
fi
PYTHONPATH=/tmp/site-trainer${PYTHONPATH:+:$PYTHONPATH} stage trainer "${GPU_CHECK_TRAINER_S:-120}" \
  "$PY" -m pytest -q -p no:cacheprovider -rfs tests/test_transformers_trainer.py -k bf16
tally trainer

# 5. ncu: one launch of each kernel at N = 2048, bf16 V = 128256 (register rows: aligned rows; streamed:
# rows one element off). benchmarks/NOTES.md's time model predicts, per entry, ~4 B of DRAM reads (both
# bf16 inputs once) and ~70-80 instructions (register rows) against more reads and ~120 (streamed).
if command -v ncu > /dev/null; then
  cat > "$WORK/ncu_case.py" <<'PYEOF'
import sys, torch, todi_ext
offset = int(sys.argv[1])
z = torch.randn(2048, 128264, device="cuda").bfloat16()[:, offset:offset + 128256].detach().requires_grad_()
s = torch.randn(2048, 128264, device="cuda").bfloat16()[:, offset:offset + 128256]
for _ in range(2):
    todi_ext.distill_loss(z, s, divergence="todi", temperature=2.0).backward()
torch.cuda.synchronize()
PYEOF
  metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__inst_executed.sum
  metrics+=,sm__inst_executed_pipe_xu.sum,sm__warps_active.avg.pct_of_peak_sustained_active,lts__t_sector_hit_rate.pct
  for offset in 0 1; do
    stage "ncu-offset$offset" 90 ncu --clock-control none --launch-skip 1 --launch-count 1 \
      -k regex:"register_rows|distill_forward" --metrics "$metrics" "$PY" "$WORK/ncu_case.py" "$offset"
    grep -E "register_rows|distill_forward|gpu__time|dram__|sm__inst|sm__warps|lts__" "$WORK/ncu-offset$offset.log" \
      >> "$WORK/summary.txt"
  done
  pack
else
  note "ncu: not installed"
fi

stage racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" "$WORK/sanitize_cases.py" racecheck

note "elapsed $(( $(date +%s) - start )) s"
pack
if [ "${#failed[@]}" -gt 0 ]; then
  echo "GPU CHECK FAILED: ${failed[*]}"
  exit 1
fi
echo "GPU CHECK PASSED"
