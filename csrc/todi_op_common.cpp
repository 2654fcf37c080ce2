#include "todi_op_common.h"

#include <c10/util/Exception.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <string>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace todi_ext {
namespace {

bool is_logit_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// A gradient-sized CPU buffer is fresh memory at every call (the allocator
// maps blocks this large anew), and the kernel's first writes to it fault
// in 4 KiB pages: that cost as much as the loss itself (benchmarks/NOTES.md).
// Asking for huge pages before the first touch makes those faults 512x fewer
// where the kernel allows it (transparent huge pages "madvise" or "always");
// elsewhere the hint is ignored and nothing changes.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  if (!t.device().is_cpu() || t.nbytes() < 2 * kHugePage) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + t.nbytes()) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)t;
#endif
}

}  // namespace

at::Tensor with_unit_vocab_stride(const at::Tensor& x) {
  const bool unit_stride = x.dim() == 0 || x.stride(-1) == 1 || x.size(-1) == 1;
  if (unit_stride && x.dim() - 1 <= RowLayout::kMaxDims) return x;
  return x.contiguous().view({-1, x.size(-1)});
}

RowLayout row_layout(const at::Tensor& x) {
  TORCH_INTERNAL_ASSERT(x.dim() >= 1 && x.dim() - 1 <= RowLayout::kMaxDims);
  RowLayout layout;
  layout.dims = static_cast<int>(x.dim() - 1);
  for (int d = 0; d < layout.dims; ++d) {
    layout.sizes[d] = x.size(d);
    layout.strides[d] = x.stride(d);
  }
  return layout;
}

at::ScalarType math_dtype(const at::Tensor& student, const at::Tensor& teacher) {
  return (student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

RowsView check_forward_args(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                            const std::optional<at::Tensor>& labels) {
  TORCH_CHECK_TYPE(is_logit_dtype(student_logits.scalar_type()),
                   "student_logits must be float32, bfloat16, float16 or float64, got ",
                   student_logits.scalar_type());
  TORCH_CHECK_TYPE(is_logit_dtype(teacher_logits.scalar_type()),
                   "teacher_logits must be float32, bfloat16, float16 or float64, got ",
                   teacher_logits.scalar_type());
  TORCH_CHECK_VALUE(student_logits.dim() >= 1 && student_logits.size(-1) > 0,
                    "student_logits must have shape (..., V) with V >= 1, got ", student_logits.sizes());
  TORCH_CHECK_VALUE(teacher_logits.sizes() == student_logits.sizes(),
                    "teacher_logits must have the shape of student_logits ", student_logits.sizes(), ", got ",
                    teacher_logits.sizes());
  TORCH_CHECK_VALUE(teacher_logits.device() == student_logits.device(), "teacher_logits is on ",
                    teacher_logits.device(), " but student_logits is on ", student_logits.device());

  RowsView view;
  view.vocab = student_logits.size(-1);
  view.rows = student_logits.numel() / view.vocab;
  view.student = with_unit_vocab_stride(student_logits);
  view.teacher = with_unit_vocab_stride(teacher_logits);
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK_TYPE(!at::isFloatingType(l.scalar_type()) && !at::isComplexType(l.scalar_type()) &&
                         l.scalar_type() != at::kBool,
                     "labels must be an integer tensor, got ", l.scalar_type());
    TORCH_CHECK_VALUE(l.sizes() == student_logits.sizes().slice(0, student_logits.dim() - 1),
                      "labels must have shape ", student_logits.sizes().slice(0, student_logits.dim() - 1),
                      " (student_logits without its last dimension), got ", l.sizes());
    TORCH_CHECK_VALUE(l.device() == student_logits.device(), "labels is on ", l.device(),
                      " but student_logits is on ", student_logits.device());
    view.labels = l.reshape({-1}).to(at::kLong).contiguous();
  }
  return view;
}

ReductionPlan plan_reduction(c10::string_view reduction, const RowsView& view, int64_t ignore_index,
                             const at::TensorOptions& math_options) {
  ReductionPlan plan;
  if (reduction == "none") {
    plan.kind = Reduction::kNone;
  } else if (reduction == "sum") {
    plan.kind = Reduction::kSum;
  } else {
    TORCH_CHECK_VALUE(reduction == "mean", "reduction must be one of 'mean', 'sum', 'none', got '", reduction, "'");
    plan.kind = Reduction::kMean;
    // An all-ignored batch divides by 1: the loss is 0 with a zero gradient.
    plan.count = view.labels.defined()
                     ? view.labels.ne(ignore_index).sum().to(math_options.dtype()).clamp_min_(1)
                     : at::full({}, static_cast<double>(std::max<int64_t>(view.rows, 1)), math_options);
    plan.grad_scale = plan.count.reciprocal();
  }
  return plan;
}

at::Tensor reduce_loss(const at::Tensor& per_position, const ReductionPlan& plan) {
  switch (plan.kind) {
    case Reduction::kNone: return per_position;
    case Reduction::kSum: return per_position.sum();
    case Reduction::kMean: return per_position.sum().div_(plan.count);
  }
  TORCH_INTERNAL_ASSERT(false);
}

void check_scalar_tensor(const char* name, const at::Tensor& t, const c10::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 0 && t.scalar_type() == at::kDouble, name, " must be a 0-dim float64 tensor, got ",
                    t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but student_logits is on ", device);
}

// The values, where reading them costs nothing (CPU memory). On a GPU that
// would sync: the Python API validates them before making the tensors, and
// the CUDA kernel turns invalid values into NaN rows rather than numbers.
void check_scalar_values(const at::Tensor& beta, const at::Tensor& inv_temperature) {
  if (!beta.device().is_cpu()) return;
  const double b = *beta.const_data_ptr<double>();
  const double inv_t = *inv_temperature.const_data_ptr<double>();
  TORCH_CHECK_VALUE(std::isfinite(b), "beta must be finite, got ", b);
  TORCH_CHECK_VALUE(std::isfinite(inv_t) && inv_t > 0, "inv_temperature (1 / T) must be finite and > 0, got ", inv_t);
}

math::Divergence parse_divergence(c10::string_view name, double skew_lambda, double akl_mu,
                                  double jsd_beta, math::DivergenceParams& params) {
  using math::Divergence;
  // The op-level names (python/todi_ext/_validation.py maps the API's onto these).
  static constexpr std::pair<c10::string_view, Divergence> kNames[] = {
      {"todi", Divergence::kToDi}, {"fkl", Divergence::kFKL},   {"rkl", Divergence::kRKL},
      {"tvd", Divergence::kTVD},   {"skl", Divergence::kSKL},   {"srkl", Divergence::kSRKL},
      {"akl", Divergence::kAKL},   {"gjsd", Divergence::kGJSD},
  };
  const auto* found = std::find_if(std::begin(kNames), std::end(kNames), [&](const auto& n) { return n.first == name; });
  if (found == std::end(kNames)) {
    std::string choices;
    for (const auto& n : kNames) choices += (choices.empty() ? "'" : ", '") + std::string(n.first) + "'";
    TORCH_CHECK_VALUE(false, "divergence must be one of ", choices, ", got '", name, "'");
  }
  const Divergence kind = found->second;
  TORCH_CHECK_VALUE(skew_lambda >= 0 && skew_lambda <= 1, "skew_lambda must be in [0, 1], got ", skew_lambda);
  TORCH_CHECK_VALUE(jsd_beta > 0 && jsd_beta < 1, "jsd_beta must be in (0, 1), got ", jsd_beta);
  TORCH_CHECK_VALUE(akl_mu >= 0 && akl_mu < 1, "akl_mu must be in [0, 1), got ", akl_mu);
  params.skew_lambda = skew_lambda;
  params.jsd_beta = jsd_beta;
  params.akl_mu = akl_mu;
  params.set_logs();
  return kind;
}

void check_label_weights(const RowsView& view, int64_t ignore_index, double soft_label_weight,
                         double hard_label_weight) {
  TORCH_CHECK_VALUE(std::isfinite(soft_label_weight), "soft_label_weight must be finite, got ", soft_label_weight);
  TORCH_CHECK_VALUE(std::isfinite(hard_label_weight), "hard_label_weight must be finite, got ", hard_label_weight);
  if (hard_label_weight == 0) return;
  TORCH_CHECK_VALUE(view.labels.defined(), "hard_label_weight = ", hard_label_weight,
                    " needs labels (the cross-entropy's targets), got labels=None");
  // Where the labels are in CPU memory, check them; on a GPU that would
  // sync, and the kernel makes a row with an out-of-range label NaN instead.
  // A loop over the (contiguous int64) labels: no ATen op with a Scalar
  // argument, which the stable ABI cannot call, and no temporaries.
  if (view.labels.device().is_cpu()) {
    const int64_t* l = view.labels.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < view.labels.numel(); ++i) {
      TORCH_CHECK_VALUE(l[i] == ignore_index || (l[i] >= 0 && l[i] < view.vocab), "labels must be in [0, ",
                        view.vocab, ") or equal ignore_index (", ignore_index,
                        ") for the hard-label cross-entropy, got ", l[i], " at position ", i);
    }
  }
}

ForwardSetup prepare_forward(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                             const std::optional<at::Tensor>& labels, c10::string_view divergence,
                             const at::Tensor& beta, double skew_lambda, double akl_mu, double jsd_beta,
                             const at::Tensor& inv_temperature,
                             int64_t ignore_index, c10::string_view reduction, bool student_grad,
                             bool teacher_grad, double soft_label_weight, double hard_label_weight) {
  ForwardSetup setup;
  setup.view = check_forward_args(student_logits, teacher_logits, labels);
  check_label_weights(setup.view, ignore_index, soft_label_weight, hard_label_weight);
  setup.soft_label_weight = soft_label_weight;
  setup.hard_label_weight = hard_label_weight;
  check_scalar_tensor("beta", beta, student_logits.device());
  check_scalar_tensor("inv_temperature", inv_temperature, student_logits.device());
  check_scalar_values(beta, inv_temperature);
  setup.beta = beta;
  setup.inv_temperature = inv_temperature;
  setup.divergence = parse_divergence(divergence, skew_lambda, akl_mu, jsd_beta, setup.divergence_params);
  const auto math_opts = student_logits.options().dtype(math_dtype(student_logits, teacher_logits));
  setup.plan = plan_reduction(reduction, setup.view, ignore_index, math_opts);
  setup.per_position = at::empty(student_logits.sizes().slice(0, student_logits.dim() - 1), math_opts);
  setup.grad_student =
      at::empty(student_grad ? student_logits.sizes() : at::IntArrayRef{0}, student_logits.options());
  setup.grad_teacher =
      at::empty(teacher_grad ? teacher_logits.sizes() : at::IntArrayRef{0}, teacher_logits.options());
  advise_huge_pages(setup.grad_student);
  advise_huge_pages(setup.grad_teacher);
  return setup;
}

ForwardParams forward_params(const ForwardSetup& setup, int64_t ignore_index) {
  ForwardParams p;
  p.student = RowMatrix{setup.view.student.const_data_ptr(), setup.view.student.scalar_type(),
                        row_layout(setup.view.student)};
  p.teacher = RowMatrix{setup.view.teacher.const_data_ptr(), setup.view.teacher.scalar_type(),
                        row_layout(setup.view.teacher)};
  p.rows = setup.view.rows;
  p.vocab = setup.view.vocab;
  p.labels = setup.view.labels.defined() ? setup.view.labels.const_data_ptr<int64_t>() : nullptr;
  p.ignore_index = ignore_index;
  p.divergence = setup.divergence;
  p.divergence_params = setup.divergence_params;
  p.inv_temperature = setup.inv_temperature.const_data_ptr<double>();
  p.beta = setup.beta.const_data_ptr<double>();
  p.soft_weight = setup.soft_label_weight;
  p.hard_weight = setup.hard_label_weight;
  p.double_math = setup.per_position.scalar_type() == at::kDouble;
  p.loss = setup.per_position.mutable_data_ptr();
  p.grad_scale = setup.plan.grad_scale.defined() ? setup.plan.grad_scale.const_data_ptr() : nullptr;
  if (setup.grad_student.numel() > 0) {
    p.grad_student = OutMatrix{setup.grad_student.mutable_data_ptr(), setup.grad_student.scalar_type()};
  }
  if (setup.grad_teacher.numel() > 0) {
    p.grad_teacher = OutMatrix{setup.grad_teacher.mutable_data_ptr(), setup.grad_teacher.scalar_type()};
  }
  return p;
}

namespace {

void check_scale_grad_args(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK_TYPE(is_logit_dtype(grad.scalar_type()), "grad must be a floating tensor, got ", grad.scalar_type());
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble,
                   "scale must be float32 or float64, got ", scale.scalar_type());
  TORCH_CHECK_VALUE(grad.dim() >= 1, "grad must have shape (..., V), got ", grad.sizes());
  const auto rows_shape = grad.sizes().slice(0, grad.dim() - 1);
  TORCH_CHECK_VALUE(scale.dim() == 0 || scale.sizes() == rows_shape, "scale must be a scalar or have shape ",
                    rows_shape, " (grad without its last dimension), got ", scale.sizes());
  TORCH_CHECK_VALUE(scale.device() == grad.device(), "scale is on ", scale.device(), " but grad is on ",
                    grad.device());
  TORCH_CHECK_VALUE(grad.size(-1) <= 1 || grad.stride(-1) == 1,
                    "grad must have unit stride along its last dimension (it is scaled in place)");
  TORCH_CHECK_VALUE(grad.dim() - 1 <= RowLayout::kMaxDims || grad.is_contiguous(), "grad may have at most ",
                    RowLayout::kMaxDims, " leading dimensions unless it is contiguous, got ", grad.dim() - 1);
}

}  // namespace

ScaleGradCall scale_grad_call(const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& out) {
  check_scale_grad_args(grad, scale);
  ScaleGradCall call;
  // A contiguous grad with more leading dimensions than RowLayout indexes is
  // viewed as (rows, V).
  const at::Tensor rows = grad.dim() - 1 <= RowLayout::kMaxDims ? grad : grad.view({-1, grad.size(-1)});
  call.keep_alive[0] = rows;
  call.keep_alive[1] = scale.contiguous();
  ScaleGradParams& p = call.params;
  p.grad = RowMatrix{rows.const_data_ptr(), rows.scalar_type(), row_layout(rows)};
  p.out = out.is_same(grad) ? const_cast<void*>(p.grad.data) : out.mutable_data_ptr();
  p.vocab = grad.size(-1);
  p.rows = p.vocab > 0 ? grad.numel() / p.vocab : 0;
  p.scale = call.keep_alive[1].const_data_ptr();
  p.scale_dtype = call.keep_alive[1].scalar_type();
  p.scale_per_row = call.keep_alive[1].dim() > 0;
  return call;
}

}  // namespace todi_ext
