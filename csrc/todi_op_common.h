// Argument checks and tensor plumbing shared by the CPU and CUDA ops.
//
// The Python API validates arguments first with friendlier messages; these
// checks are what keeps a direct torch.ops.todi_ext.* call with bad
// arguments from reaching a kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "todi_ext/kernel_params.h"
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
                            const std::optional<at::Tensor>& labels);

// A 0-dim float64 tensor on `device` (the op's beta and inv_temperature).
void check_scalar_tensor(const char* name, const at::Tensor& t, const c10::Device& device);

// beta finite and 1/T finite and > 0, checked where the values are in CPU memory.
void check_scalar_values(const at::Tensor& beta, const at::Tensor& inv_temperature);

// Checks the divergence's name and parameters: "todi", "fkl", "rkl", "tvd",
// "skl", "srkl", "akl", "gjsd" ("js" is gjsd with jsd_beta 0.5, set by the caller).
math::Divergence parse_divergence(c10::string_view name, double skew_lambda, double akl_mu,
                                  double jsd_beta, math::DivergenceParams& params);

// x itself when its last dimension has unit stride and it has at most
// RowLayout::kMaxDims leading dimensions (any strides), else a contiguous
// (rows, V) copy.
at::Tensor with_unit_vocab_stride(const at::Tensor& x);

// The leading sizes and strides of x (..., V), for RowLayout::row_offset.
RowLayout row_layout(const at::Tensor& x);

// float64 when either input is float64, else float32: the dtype the math is
// accumulated in and the loss is returned in.
at::ScalarType math_dtype(const at::Tensor& student, const at::Tensor& teacher);

enum class Reduction { kNone, kSum, kMean };

// How the per-position losses are reduced, and the factor the kernels apply
// to the gradients they write so that those are the reduced loss's.
struct ReductionPlan {
  Reduction kind = Reduction::kMean;
  at::Tensor count;       // mean: counted positions, at least 1 (0-dim, math dtype, on the device)
  at::Tensor grad_scale;  // mean: 1 / count; undefined otherwise
};

// Checks `reduction` and plans it; only device ops, no host synchronisation.
ReductionPlan plan_reduction(c10::string_view reduction, const RowsView& view, int64_t ignore_index,
                             const at::TensorOptions& math_options);

// Reduces the per-position losses (shape: the logits' leading dimensions).
at::Tensor reduce_loss(const at::Tensor& per_position, const ReductionPlan& plan);

// Everything a backend needs before launching the forward kernel: checked
// inputs, the reduction plan, and the outputs, allocated (the gradients
// only when asked for; else empty).
struct ForwardSetup {
  RowsView view;
  ReductionPlan plan;
  math::Divergence divergence = math::Divergence::kToDi;
  math::DivergenceParams divergence_params;
  at::Tensor per_position;  // the logits' leading shape, math dtype
  at::Tensor grad_student;
  at::Tensor grad_teacher;
  at::Tensor beta;             // 0-dim float64, read by the kernels
  at::Tensor inv_temperature;  // likewise
  double soft_label_weight = 1.0;
  double hard_label_weight = 0.0;
};

ForwardSetup prepare_forward(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                             const std::optional<at::Tensor>& labels, c10::string_view divergence,
                             const at::Tensor& beta, double skew_lambda, double akl_mu, double jsd_beta,
                             const at::Tensor& inv_temperature,
                             int64_t ignore_index, c10::string_view reduction, bool student_grad,
                             bool teacher_grad, double soft_label_weight, double hard_label_weight);

// soft/hard_label_weight finite; hard != 0 needs labels in [0, V) (checked where they are in CPU memory).
void check_label_weights(const RowsView& view, int64_t ignore_index, double soft_label_weight,
                         double hard_label_weight);

// The forward kernel's parameters for a prepared call.
ForwardParams forward_params(const ForwardSetup& setup, int64_t ignore_index);

// Checks scale_grad(_)'s arguments and builds the kernel's parameters; out
// is grad (in place) or a contiguous tensor of its shape. `keep_alive` holds
// the tensors the parameters point into until the kernel has been launched.
struct ScaleGradCall {
  ScaleGradParams params;
  at::Tensor keep_alive[2];
};
ScaleGradCall scale_grad_call(const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& out);

}  // namespace todi_ext
