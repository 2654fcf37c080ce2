// Interface between the CPU op (todi_cpu.cpp) and the CPU kernel, which is
// compiled once per instruction set (DEFAULT, AVX2, AVX512; see
// CMakeLists.txt) the way ATen compiles its own kernels, so one wheel runs
// everywhere and still uses the widest vectors the machine has.
#pragma once

#include "todi_ext/kernel_params.h"

namespace todi_ext::cpu {

using ForwardKernel = void (*)(const ForwardParams&);
using PhaseKernel = void (*)(const ForwardParams&, const VocabParallelParams&);
using ScaleGradKernel = void (*)(const ScaleGradParams&);

#define TODI_DECLARE_CPU_KERNELS(capability)                                            \
  namespace capability {                                                                \
  void distill_forward_kernel(const ForwardParams& params);                             \
  void vocab_parallel_kernel(const ForwardParams& params, const VocabParallelParams& phase); \
  void scale_grad_kernel(const ScaleGradParams& params);                                \
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
