// Interface between the CPU op (cpu_ops.cpp) and the CPU kernel, which is
// compiled once per instruction set (DEFAULT, AVX2, AVX512; see
// CMakeLists.txt) the way ATen compiles its own kernels, so one wheel runs
// everywhere and still uses the widest vectors the machine has.
#pragma once

#include "todi_ext/kernel_params.h"

namespace todi_ext::cpu {

// The thread pool the kernels spread their rows over, handed in by the op
// (cpu_ops.cpp: torch's intra-op pool): run(begin, end, grain, body, context)
// calls body(context, b, e) over [begin, end) in chunks of >= grain. With it
// the kernel files use nothing of libtorch at run time but the Sleef vector
// math that at::vec inlines calls to (issue 25: they stay outside the stable
// ABI, compiled once per instruction set).
using RowsBody = void (*)(void* context, int64_t begin, int64_t end);
using ParallelFor = void (*)(int64_t begin, int64_t end, int64_t grain, RowsBody body, void* context);

using ForwardKernel = void (*)(const ForwardParams&, ParallelFor);
using PhaseKernel = void (*)(const ForwardParams&, const VocabParallelParams&, ParallelFor);
using ScaleGradKernel = void (*)(const ScaleGradParams&, ParallelFor);

#define TODI_DECLARE_CPU_KERNELS(capability)                                                                      \
  namespace capability {                                                                                          \
  void distill_forward_kernel(const ForwardParams& params, ParallelFor parallel_for);                             \
  void vocab_parallel_kernel(const ForwardParams& params, const VocabParallelParams& phase, ParallelFor parallel_for); \
  void scale_grad_kernel(const ScaleGradParams& params, ParallelFor parallel_for);                                \
  }

TODI_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(TODI_EXT_HAVE_AVX2)
TODI_DECLARE_CPU_KERNELS(AVX2)
#endif
#if defined(TODI_EXT_HAVE_AVX512)
TODI_DECLARE_CPU_KERNELS(AVX512)
#endif
#undef TODI_DECLARE_CPU_KERNELS

}  // namespace todi_ext::cpu
