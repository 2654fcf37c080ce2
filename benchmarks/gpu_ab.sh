#!/usr/bin/env bash
# CUDA kernel v2 on a GPU in one call (device tool, $OUT set): build, the CUDA
# tests, the A/B of benchmarks/bench_kernels.py (register-row kernel, streamed
# kernel and the memory floor side by side), then ncu metrics of one launch of
# each kernel where ncu is installed. Each stage has its own time limit; the
# summary ($OUT/ab-summary.md) is rewritten after every stage.
#
#   OUT=/tmp/ab benchmarks/gpu_ab.sh        (~6 minutes on an H100/H200)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu-ab}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} TODI_EXT_CUDA=ON PYTHONUNBUFFERED=1
summary="$OUT/ab-summary.md"
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$summary" 2>&1

# stage NAME SECONDS COMMAND...: logs to $OUT/NAME.log, one line in the summary
stage() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "- $name: rc=$rc in $(( $(date +%s) - t0 )) s; $(tail -1 "$OUT/$name.log")" >> "$summary"
  return $rc
}

stage build 240 "$PY" -m pip install -q --no-build-isolation --no-deps . || { cat "$summary"; tail -30 "$OUT/build.log"; exit 1; }
stage tests "${GPU_AB_TESTS_S:-180}" "$PY" -m pytest -q -p no:cacheprovider -rf tests/test_cuda.py
stage kernels "${GPU_AB_BENCH_S:-240}" "$PY" benchmarks/bench_kernels.py --out "$OUT" --repeats "${GPU_AB_REPEATS:-10}"
cat "$OUT/kernels-cuda.md" >> "$summary" 2>/dev/null

# ncu: one launch of each kernel at N = 2048, bf16 V = 128256 (registers:
# aligned rows; streamed: rows one element off). Per entry, the model in
# benchmarks/NOTES.md predicts ~4 B of DRAM reads (both bf16 inputs once)
# and ~70-80 instructions (registers) against more reads and ~120 (streamed).
if command -v ncu > /dev/null; then
  cat > "$OUT/ncu_case.py" <<'PYEOF'
import sys, torch, todi_ext
offset = int(sys.argv[1])
z = torch.randn(2048, 128264, device="cuda").bfloat16()[:, offset:offset + 128256].detach().requires_grad_()
s = torch.randn(2048, 128264, device="cuda").bfloat16()[:, offset:offset + 128256]
for _ in range(2):
    todi_ext.distill_loss(z, s, divergence="todi", temperature=2.0).backward()
torch.cuda.synchronize()
PYEOF
  metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__inst_executed.sum,sm__inst_executed_pipe_xu.sum,sm__warps_active.avg.pct_of_peak_sustained_active,lts__t_sector_hit_rate.pct
  for offset in 0 1; do
    stage "ncu-offset$offset" 120 ncu --clock-control none --launch-skip 1 --launch-count 1 \
      -k regex:"register_rows|distill_forward" --metrics "$metrics" "$PY" "$OUT/ncu_case.py" "$offset"
    grep -E "register_rows|distill_forward|gpu__time|dram__|sm__inst|sm__warps|lts__" "$OUT/ncu-offset$offset.log" >> "$summary"
  done
else
  echo "- ncu: not installed" >> "$summary"
fi
cat "$summary"
