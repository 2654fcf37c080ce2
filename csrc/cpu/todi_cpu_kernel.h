// Interface between the CPU op (todi_cpu.cpp) and the CPU kernel, which is
// compiled once per instruction set (DEFAULT, AVX2, AVX512; see
// CMakeLists.txt) the way ATen compiles its own kernels, so one wheel runs
// everywhere and still uses the widest vectors the machine has.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "todi_ext/row_layout.h"

namespace todi_ext::cpu {

// A (..., vocab) input whose rows are contiguous but may sit anywhere.
struct RowMatrix {
  const void* data = nullptr;
  c10::ScalarType dtype = c10::ScalarType::Float;
  RowLayout layout;
};

// An output (rows, vocab) matrix, contiguous; data == nullptr: not wanted.
struct OutMatrix {
  void* data = nullptr;
  c10::ScalarType dtype = c10::ScalarType::Float;
};

struct ForwardParams {
  RowMatrix student;
  RowMatrix teacher;
  int64_t rows = 0;
  int64_t vocab = 0;
  const int64_t* labels = nullptr;  // (rows,) or nullptr for "no labels"
  int64_t ignore_index = -100;
  double beta = 1.0;
  double inv_temperature = 1.0;
  bool double_math = false;  // accumulate in float64 (float64 inputs)
  void* loss = nullptr;      // (rows,), float32, or float64 with double_math
  const void* grad_scale = nullptr;  // one value (loss dtype) multiplying the gradients, or nullptr
  OutMatrix grad_student;    // dD/dz per row
  OutMatrix grad_teacher;    // dD/ds per row
};

// out = grad * scale (rows of out contiguous). In place when out == grad,
// and then rows whose scale is exactly 1 are skipped.
struct ScaleGradParams {
  const void* grad = nullptr;
  void* out = nullptr;
  c10::ScalarType dtype = c10::ScalarType::Float;
  RowLayout layout;
  int64_t rows = 0;
  int64_t vocab = 0;
  const void* scale = nullptr;  // one value, or one per row
  c10::ScalarType scale_dtype = c10::ScalarType::Float;
  bool scale_per_row = false;
};

using ForwardKernel = void (*)(const ForwardParams&);
using ScaleGradKernel = void (*)(const ScaleGradParams&);

#define TODI_DECLARE_CPU_KERNELS(capability)                 \
  namespace capability {                                     \
  void todi_forward_kernel(const ForwardParams& params);     \
  void scale_grad_kernel(const ScaleGradParams& params);     \
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
