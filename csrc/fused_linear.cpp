// fused_linear_distill_forward: the distillation loss from hidden states and
// lm_head weights, over row chunks, so no (N, V) logits tensor ever exists.
// Device-generic: ATen matmuls around the fused kernel (distill_forward,
// called through the dispatcher), registered for CPU and CUDA.
//
// Per chunk of rows: student and teacher logits in float32 (float64 for
// float64 inputs) from float32-accumulated matmuls, the kernel's loss and
// logits gradient, then grad_hidden = g W and grad_W += g^T h, grad_b += sum(g),
// both accumulated in float32 across chunks and cast once at the end.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "todi_op_common.h"

namespace todi_ext {
namespace {

using DistillForward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view, const at::Tensor&,
    double, double, double, const at::Tensor&, int64_t, c10::string_view, bool, bool, double, double);

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_linear(const char* hidden_name, const at::Tensor& hidden, const char* weight_name, const at::Tensor& weight,
                  const char* bias_name, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_TYPE(is_float_dtype(hidden.scalar_type()), hidden_name,
                   " must be float32, bfloat16, float16 or float64, got ", hidden.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), weight_name, " must have ", hidden_name,
                   "'s dtype ", hidden.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK_VALUE(hidden.dim() == 2, hidden_name, " must have shape (N, H), got ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(1), weight_name, " must have shape (V, ",
                    hidden.size(1), ") for ", hidden_name, " of shape ", hidden.sizes(), ", got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1, weight_name, " must have at least one row (V >= 1)");
  TORCH_CHECK_VALUE(weight.device() == hidden.device(), weight_name, " is on ", weight.device(), " but ",
                    hidden_name, " is on ", hidden.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), bias_name, " must have shape (",
                      weight.size(0), "), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == hidden.scalar_type(), bias_name, " must have ", hidden_name,
                     "'s dtype ", hidden.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == hidden.device(), bias_name, " is on ", bias->device(), " but ",
                      hidden_name, " is on ", hidden.device());
  }
}

// One lm_head: its weight as the matmuls take it, in the math dtype when the
// device has no float32-output matmul for low-precision inputs (CPU: one
// upcast copy of W per call).
struct Head {
  at::Tensor weight;  // (V, H): the input's, or its math-dtype copy
  std::optional<at::Tensor> bias;
  bool mixed = false;  // low-precision weight, float32-output matmuls (CUDA)
};

Head make_head(const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::ScalarType math) {
  Head head;
  head.bias = bias.has_value() ? std::optional<at::Tensor>(bias->to(math)) : std::nullopt;
  const bool low_precision = weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf;
  if (weight.scalar_type() == math) {
    head.weight = weight;
  } else if (weight.is_cuda() && low_precision && math == at::kFloat) {
    // mm's out_dtype takes fp16/bf16 inputs to a float32 result only.
    head.weight = weight;
    head.mixed = true;
  } else {
    head.weight = weight.to(math);
  }
  return head;
}

// a @ b in the math dtype with float32 (float64) accumulation.
at::Tensor matmul(const at::Tensor& a, const at::Tensor& b, const Head& head, at::ScalarType math) {
  if (head.mixed) return at::mm(a.to(head.weight.scalar_type()), b, math);
  return at::mm(a.to(math), b);
}

// The chunk's logits x W^T + b, in the math dtype.
at::Tensor logits(const at::Tensor& hidden, const Head& head, at::ScalarType math) {
  at::Tensor out = matmul(hidden, head.weight.t(), head, math);
  if (head.bias.has_value()) out.add_(*head.bias);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_distill_forward(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& labels, c10::string_view divergence, const at::Tensor& beta, double skew_lambda,
    double akl_mu, double jsd_beta, const at::Tensor& inv_temperature, int64_t ignore_index,
    c10::string_view reduction, double soft_label_weight, double hard_label_weight, int64_t chunk_size,
    const std::optional<at::Tensor>& row_weights, bool hidden_grad, bool weight_grad, bool bias_grad) {
  // The op picks its own precision (float32-accumulated matmuls, float32
  // logits): an enclosing torch.autocast must not recast the matmuls below,
  // which the dispatcher would otherwise do, since autocast stays on for the
  // ops a custom op calls.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_linear("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias);
  check_linear("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias);
  TORCH_CHECK_VALUE(teacher_weight.size(0) == student_weight.size(0), "the teacher's vocabulary (",
                    teacher_weight.size(0), " rows of teacher_weight) must equal the student's (",
                    student_weight.size(0), " rows of student_weight)");
  TORCH_CHECK_VALUE(teacher_hidden.size(0) == student_hidden.size(0), "teacher_hidden must have ",
                    student_hidden.size(0), " rows like student_hidden, got ", teacher_hidden.size(0));
  TORCH_CHECK_VALUE(teacher_hidden.device() == student_hidden.device(), "teacher_hidden is on ",
                    teacher_hidden.device(), " but student_hidden is on ", student_hidden.device());
  TORCH_CHECK_VALUE(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK_VALUE(!bias_grad || student_bias.has_value(), "bias_grad=True needs student_bias");
  const bool any_grad = hidden_grad || weight_grad || bias_grad;
  const bool per_row = reduction == "none";
  TORCH_CHECK_VALUE(!(per_row && any_grad) || row_weights.has_value(),
                    "reduction='none' computes gradients of sum(row_weights * loss): pass row_weights");
  TORCH_CHECK_VALUE(!row_weights.has_value() || per_row, "row_weights applies to reduction='none' only");
  const int64_t rows = student_hidden.size(0);
  const int64_t vocab = student_weight.size(0);
  if (row_weights.has_value()) {
    TORCH_CHECK_VALUE(row_weights->dim() == 1 && row_weights->size(0) == rows, "row_weights must have shape (",
                      rows, "), got ", row_weights->sizes());
  }
  if (labels.has_value()) {
    TORCH_CHECK_TYPE(!at::isFloatingType(labels->scalar_type()) && !at::isComplexType(labels->scalar_type()) &&
                         labels->scalar_type() != at::kBool,
                     "labels must be an integer tensor, got ", labels->scalar_type());
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == rows, "labels must have shape (", rows, "), got ",
                      labels->sizes());
    TORCH_CHECK_VALUE(labels->device() == student_hidden.device(), "labels is on ", labels->device(),
                      " but student_hidden is on ", student_hidden.device());
  }
  const at::ScalarType math = math_dtype(student_hidden, teacher_hidden);
  const auto math_opts = student_hidden.options().dtype(math);

  static const auto distill_forward = c10::Dispatcher::singleton()
                                          .findSchemaOrThrow("todi_ext::distill_forward", "")
                                          .typed<DistillForward>();
  const Head student = make_head(student_weight, student_bias, math);
  const Head teacher = make_head(teacher_weight, teacher_bias, math);
  const std::optional<at::Tensor> labels_long =
      labels.has_value() ? std::optional<at::Tensor>(labels->to(at::kLong)) : std::nullopt;
  // All rows as the logits op would see them: labels checked once for all
  // rows (CPU only: no sync), and "mean" divides by the counted positions of
  // all rows, not of a chunk.
  RowsView view;
  view.rows = rows;
  view.vocab = vocab;
  if (labels_long.has_value()) view.labels = *labels_long;
  if (labels_long.has_value() && hard_label_weight != 0) {
    check_label_weights(view, ignore_index, soft_label_weight, hard_label_weight);
  }
  const ReductionPlan plan = plan_reduction(reduction, view, ignore_index, math_opts);
  const at::Tensor grad_rows_scale = plan.kind == Reduction::kMean ? plan.grad_scale
                                     : per_row && any_grad        ? row_weights->to(math)
                                                                  : at::Tensor();

  at::Tensor loss_rows = at::empty({rows}, math_opts);
  at::Tensor grad_hidden = at::empty(hidden_grad ? student_hidden.sizes() : at::IntArrayRef{0}, student_hidden.options());
  at::Tensor grad_weight_acc = weight_grad ? at::zeros(student_weight.sizes(), math_opts) : at::Tensor();
  at::Tensor grad_bias_acc = bias_grad ? at::zeros({vocab}, math_opts) : at::Tensor();

  for (int64_t start = 0; start < rows; start += chunk_size) {
    const int64_t end = std::min(rows, start + chunk_size);
    const at::Tensor h = student_hidden.slice(0, start, end);
    const at::Tensor student_logits = logits(h, student, math);
    const at::Tensor teacher_logits = logits(teacher_hidden.slice(0, start, end), teacher, math);
    const std::optional<at::Tensor> chunk_labels =
        labels_long.has_value() ? std::optional<at::Tensor>(labels_long->slice(0, start, end)) : std::nullopt;
    auto [chunk_loss, grad_logits, unused] =
        distill_forward.call(student_logits, teacher_logits, chunk_labels, divergence, beta, skew_lambda, akl_mu,
                             jsd_beta, inv_temperature, ignore_index, "none", any_grad, false, soft_label_weight,
                             hard_label_weight);
    loss_rows.slice(0, start, end).copy_(chunk_loss);
    if (!any_grad) continue;
    // "mean" scales by 1/count after the matmuls (an (N, H) and a (V, H)
    // pass instead of one over every chunk's (rows, V) gradient); per-row
    // weights ("none", from backward) scale the logits gradient itself.
    if (per_row) grad_logits.mul_(grad_rows_scale.slice(0, start, end).unsqueeze(1));
    // With a low-precision weight on CUDA the matmuls take the gradient in
    // that dtype (as autograd of F.linear would) and accumulate in float32.
    const at::Tensor g = student.mixed ? grad_logits.to(student.weight.scalar_type()) : grad_logits;
    if (hidden_grad) {
      at::Tensor gh = matmul(g, student.weight, student, math);
      if (plan.kind == Reduction::kMean) gh.mul_(grad_rows_scale);
      grad_hidden.slice(0, start, end).copy_(gh);
    }
    if (weight_grad) {
      if (student.mixed) {
        at::addmm_out(grad_weight_acc, grad_weight_acc, g.t(), h.to(g.scalar_type()), math);
      } else {
        grad_weight_acc.addmm_(g.t(), h.to(math));
      }
    }
    if (bias_grad) grad_bias_acc.add_(grad_logits.sum(0));
  }
  if (plan.kind == Reduction::kMean && weight_grad) grad_weight_acc.mul_(grad_rows_scale);
  if (plan.kind == Reduction::kMean && bias_grad) grad_bias_acc.mul_(grad_rows_scale);

  at::Tensor loss = reduce_loss(loss_rows, plan);
  at::Tensor grad_weight = weight_grad ? grad_weight_acc.to(student_weight.scalar_type()) : at::empty({0}, student_weight.options());
  at::Tensor grad_bias = bias_grad ? grad_bias_acc.to(student_bias->scalar_type()) : at::empty({0}, student_hidden.options());
  return {loss, grad_hidden, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(todi_ext, CPU, m) { m.impl("fused_linear_distill_forward", &fused_linear_distill_forward); }

#if defined(TODI_EXT_WITH_CUDA)
TORCH_LIBRARY_IMPL(todi_ext, CUDA, m) { m.impl("fused_linear_distill_forward", &fused_linear_distill_forward); }
#endif

}  // namespace todi_ext
