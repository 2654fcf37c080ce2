// Argument checks and tensor plumbing shared by the CPU and CUDA ops.
//
// The Python API validates arguments first with friendlier messages; these
// checks are what keeps a direct torch.ops.todi_ext.* call with bad
// arguments from reaching a kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "todi_ext/row_layout.h"

namespace todi_ext {

struct RowsView {
  at::Tensor student;  // (..., vocab) with unit stride along vocab (see with_unit_vocab_stride)
  at::Tensor teacher;  // (..., vocab) with unit stride along vocab
  at::Tensor labels;   // (rows,) int64 contiguous, or undefined
  int64_t rows = 0;
  int64_t vocab = 0;
};

// Checks the forward's arguments; the logits keep their leading strides.
RowsView check_forward_args(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                            const std::optional<at::Tensor>& labels, double beta, double temperature);

// x itself when its last dimension has unit stride and it has at most
// RowLayout::kMaxDims leading dimensions (any strides), else a contiguous
// (rows, V) copy.
at::Tensor with_unit_vocab_stride(const at::Tensor& x);

// The leading sizes and strides of x (..., V), for RowLayout::row_offset.
RowLayout row_layout(const at::Tensor& x);

// float64 when either input is float64, else float32: the dtype the math is
// accumulated in and the loss is returned in.
at::ScalarType math_dtype(const at::Tensor& student, const at::Tensor& teacher);

// Checks scale_rows' arguments.
void check_scale_rows_args(const at::Tensor& grad, const at::Tensor& row_scale);

}  // namespace todi_ext
