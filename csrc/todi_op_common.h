// Argument checks and tensor plumbing shared by the CPU and CUDA ops.
//
// The Python API validates arguments first with friendlier messages; these
// checks are what keeps a direct torch.ops.todi_ext.* call with bad
// arguments from reaching a kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace todi_ext {

struct RowsView {
  at::Tensor student;  // (rows, vocab), last dim contiguous
  at::Tensor teacher;  // (rows, vocab), last dim contiguous
  at::Tensor labels;   // (rows,) int64 contiguous, or undefined
  int64_t rows = 0;
  int64_t vocab = 0;
};

// Checks the forward's arguments and views the logits as (rows, vocab).
RowsView check_forward_args(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                            const std::optional<at::Tensor>& labels, double beta, double temperature);

// Views x (..., vocab) as (rows, vocab) with unit stride along vocab, copying
// only when the leading dimensions cannot be collapsed into one stride.
at::Tensor as_rows(const at::Tensor& x, int64_t vocab);

// float64 when either input is float64, else float32: the dtype the math is
// accumulated in and the loss is returned in.
at::ScalarType math_dtype(const at::Tensor& student, const at::Tensor& teacher);

// Checks scale_rows' arguments.
void check_scale_rows_args(const at::Tensor& grad, const at::Tensor& row_scale);

}  // namespace todi_ext
