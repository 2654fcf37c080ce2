// Argument checks and tensor plumbing shared by the CPU and CUDA ops, on the
// LibTorch stable ABI (torch::stable::Tensor; built with TORCH_TARGET_VERSION
// 2.10, so one build loads under every torch from 2.10 on).
//
// The Python API validates arguments first with friendlier messages and
// Python's exception types; these checks are what keeps a direct
// torch.ops.todi_ext.* call with bad arguments from reaching a kernel. They
// throw std::invalid_argument, which reaches Python as a ValueError (the
// stable ABI has no TypeError: a wrong dtype is a ValueError here too).
#pragma once

#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <optional>
#include <sstream>
#include <tuple>
#include <stdexcept>
#include <string>
#include <string_view>

#include "todi_ext/kernel_params.h"
#include "todi_ext/row_layout.h"

namespace todi_ext {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

namespace detail {
template <class... Args>
[[noreturn]] void throw_invalid_argument(const Args&... args) {
  std::ostringstream message;
  (message << ... << args);
  throw std::invalid_argument(message.str());
}
}  // namespace detail

// Refuses a bad argument: ValueError(message) in Python. The message names
// the argument and what was expected.
#define TODI_CHECK(cond, ...)                                         \
  do {                                                                \
    if (!(cond)) ::todi_ext::detail::throw_invalid_argument(__VA_ARGS__); \
  } while (0)

// Checks a call into torch's C shim. With headers that have it, the
// exception carries torch's own message (on torch >= 2.13; e.g. "CUDA out of
// memory ..."); else only where the call failed.
#ifdef STABLE_TORCH_ERROR_CODE_CHECK
#define TODI_SHIM_CHECK(call) STABLE_TORCH_ERROR_CODE_CHECK(call)
#else
#define TODI_SHIM_CHECK(call) TORCH_ERROR_CODE_CHECK(call)
#endif

// For messages: "[3, 8]", "cuda:0".
std::string shape_str(torch::headeronly::IntHeaderOnlyArrayRef sizes);
std::string device_str(const torch::stable::Device& device);

// The size of the last dimension (the stable Tensor indexes from 0 only).
inline int64_t last_size(const Tensor& x) { return x.size(x.dim() - 1); }

struct RowsView {
  Tensor student;  // (..., vocab) with unit stride along vocab (see with_unit_vocab_stride)
  Tensor teacher;  // (..., vocab) with unit stride along vocab
  std::optional<Tensor> labels;  // (rows,) int64 contiguous
  int64_t rows = 0;
  int64_t vocab = 0;
};

// Checks the forward's arguments; the logits keep their leading strides.
RowsView check_forward_args(const Tensor& student_logits, const Tensor& teacher_logits,
                            const std::optional<Tensor>& labels);

// A 0-dim float64 tensor on `device` (the op's beta and inv_temperature).
void check_scalar_tensor(const char* name, const Tensor& t, const torch::stable::Device& device);

// beta finite and 1/T finite and > 0, checked where the values are in CPU memory.
void check_scalar_values(const Tensor& beta, const Tensor& inv_temperature);

// Checks the divergence's name and parameters: "todi", "fkl", "rkl", "tvd",
// "skl", "srkl", "akl", "gjsd" ("js" is gjsd with jsd_beta 0.5, set by the caller).
math::Divergence parse_divergence(std::string_view name, double skew_lambda, double akl_mu, double jsd_beta,
                                  math::DivergenceParams& params);

// x itself when its last dimension has unit stride and it has at most
// RowLayout::kMaxDims leading dimensions (any strides), else a contiguous
// (rows, V) copy.
Tensor with_unit_vocab_stride(const Tensor& x);

// The leading sizes and strides of x (..., V), for RowLayout::row_offset.
RowLayout row_layout(const Tensor& x);

// float64 when either input is float64, else float32: the dtype the math is
// accumulated in and the loss is returned in.
ScalarType math_dtype(const Tensor& student, const Tensor& teacher);

// A new tensor of `sizes` and `dtype` on `device` (uninitialised).
Tensor new_empty(torch::headeronly::IntHeaderOnlyArrayRef sizes, ScalarType dtype,
                 const torch::stable::Device& device);

enum class Reduction { kNone, kSum, kMean };

// How the per-position losses are reduced, and the factor the kernels apply
// to the gradients they write so that those are the reduced loss's.
struct ReductionPlan {
  Reduction kind = Reduction::kMean;
  std::optional<Tensor> count;       // mean: counted positions, at least 1 (0-dim, math dtype, on the device)
  std::optional<Tensor> grad_scale;  // mean: 1 / count
};

// The mean's divisor for labels in device memory: the positions whose label
// is not ignore_index, at least 1 (0-dim, math dtype, on the labels' device),
// from ATen ops queued on the device (no host synchronisation).
Tensor count_positions_with_ops(const Tensor& labels, int64_t ignore_index, ScalarType math);

// "none", "sum" or "mean" (else the op's ValueError).
Reduction parse_reduction(std::string_view reduction);

// Checks `reduction` and plans it; only device ops, no host synchronisation.
ReductionPlan plan_reduction(std::string_view reduction, const RowsView& view, int64_t ignore_index,
                             ScalarType math, const torch::stable::Device& device);

// Reduces the per-position losses (shape: the logits' leading dimensions).
Tensor reduce_loss(const Tensor& per_position, const ReductionPlan& plan);

// Everything a backend needs before launching the forward kernel: checked
// inputs, the reduction plan, and the outputs, allocated (the gradients
// only when asked for; else empty).
struct ForwardSetup {
  RowsView view;
  ReductionPlan plan;
  math::Divergence divergence = math::Divergence::kToDi;
  math::DivergenceParams divergence_params;
  Tensor per_position;  // the logits' leading shape, math dtype
  Tensor grad_student;
  Tensor grad_teacher;
  Tensor beta;             // 0-dim float64, read by the kernels
  Tensor inv_temperature;  // likewise
  double soft_label_weight = 1.0;
  double hard_label_weight = 0.0;
};

ForwardSetup prepare_forward(const Tensor& student_logits, const Tensor& teacher_logits,
                             const std::optional<Tensor>& labels, std::string_view divergence, const Tensor& beta,
                             double skew_lambda, double akl_mu, double jsd_beta, const Tensor& inv_temperature,
                             int64_t ignore_index, std::string_view reduction, bool student_grad, bool teacher_grad,
                             double soft_label_weight, double hard_label_weight);

// soft/hard_label_weight finite; hard != 0 needs labels.
void check_label_weights(const RowsView& view, double soft_label_weight, double hard_label_weight);

// Labels (an integer tensor) in [0, vocab) or ignore_index, checked where
// they are in CPU memory (elsewhere that would sync: the kernels make such a
// row NaN).
void check_label_range(const Tensor& labels, int64_t vocab, int64_t ignore_index);

// distill_forward's rules on its arguments, for every caller (the op itself,
// and the check_distill_args op through which the Python paths that have no
// kernel call, e.g. the eager reference): the logits, the labels' dtype,
// shape and device, the divergence and its parameters, the reduction and the
// label weights. Not the labels' range (check_label_range, whose vocabulary
// a caller may give) nor beta and 1/T, which only the kernel op takes.
// kind and params, when given, receive the parsed divergence.
RowsView check_distill_args(const Tensor& student_logits, const Tensor& teacher_logits,
                            const std::optional<Tensor>& labels, std::string_view divergence, double skew_lambda,
                            double akl_mu, double jsd_beta, std::string_view reduction, double soft_label_weight,
                            double hard_label_weight, math::Divergence* kind = nullptr,
                            math::DivergenceParams* params = nullptr);

// The forward kernel's parameters for a prepared call.
ForwardParams forward_params(const ForwardSetup& setup, int64_t ignore_index);

// Checks scale_grad(_)'s arguments and builds the kernel's parameters; out
// is nullptr (in place) or a contiguous tensor of grad's shape. `keep_alive`
// holds the tensors the parameters point into until the kernel has been
// launched.
struct ScaleGradCall {
  ScaleGradParams params;
  Tensor keep_alive[2];
};
ScaleGradCall scale_grad_call(const Tensor& grad, const Tensor& scale, const Tensor* out);

// The ops every backend implements the same way around its kernel launch,
// written once: a backend registers e.g. distill_forward<run_forward_kernel>,
// where Run launches the kernel on the tensor's device (the CPU kernel copy
// for this machine, or the CUDA launch on the current stream).
using ForwardRunner = void (*)(const ForwardParams&, const Tensor& logits);
using ScaleGradRunner = void (*)(const ScaleGradParams&, const Tensor& grad);

template <ForwardRunner Run>
std::tuple<Tensor, Tensor, Tensor> distill_forward(
    const Tensor& student_logits, const Tensor& teacher_logits, const std::optional<Tensor>& labels,
    std::string_view divergence, const Tensor& beta, double skew_lambda, double akl_mu, double jsd_beta,
    const Tensor& inv_temperature, int64_t ignore_index, std::string_view reduction, bool student_grad,
    bool teacher_grad, double soft_label_weight, double hard_label_weight) {
  // Checks first: with inputs on mixed devices this backend may be the one
  // dispatched, and the error must name the argument.
  const ForwardSetup setup = prepare_forward(student_logits, teacher_logits, labels, divergence, beta, skew_lambda,
                                             akl_mu, jsd_beta, inv_temperature, ignore_index, reduction,
                                             student_grad, teacher_grad, soft_label_weight, hard_label_weight);
  if (setup.view.rows > 0) Run(forward_params(setup, ignore_index), student_logits);
  return {reduce_loss(setup.per_position, setup.plan), setup.grad_student, setup.grad_teacher};
}

template <ScaleGradRunner Run>
void scale_grad_(const Tensor& grad, const Tensor& scale) {
  const ScaleGradCall call = scale_grad_call(grad, scale, nullptr);
  if (grad.numel() > 0) Run(call.params, grad);
}

template <ScaleGradRunner Run>
Tensor scale_grad(const Tensor& grad, const Tensor& scale) {
  const Tensor out = new_empty(grad.sizes(), grad.scalar_type(), grad.device());
  const ScaleGradCall call = scale_grad_call(grad, scale, &out);
  if (grad.numel() > 0) Run(call.params, grad);
  return out;
}

}  // namespace todi_ext
