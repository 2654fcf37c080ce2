#include "op_common.h"

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace todi_ext {
namespace {

bool is_logit_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::BFloat16 || t == ScalarType::Half || t == ScalarType::Double;
}

bool is_integer_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Byte: case ScalarType::Char: case ScalarType::Short: case ScalarType::Int:
    case ScalarType::Long: case ScalarType::UInt16: case ScalarType::UInt32: case ScalarType::UInt64:
      return true;
    default:
      return false;
  }
}

// Calls an ATen op through the dispatcher (the stable ABI's way to reach an
// op that torch/csrc/stable/ops.h does not wrap) and returns its one result.
// Only overloads without Scalar arguments: the stable ABI cannot pass those.
// The stacks are laid out as these ops' schemas are in torch 2.10, and say
// so: a later torch adapts a stack from the version it is told.
template <class... Args>
Tensor call_aten(const char* name, const char* overload, const Args&... args) {
  std::array<StableIValue, std::max<size_t>(sizeof...(Args), 1)> stack{torch::stable::detail::from(args)...};
  TODI_SHIM_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_VERSION_2_10_0));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// A 0-dim CPU tensor holding v exactly. As the other operand of a binary op
// on a CUDA tensor, a 0-dim CPU tensor is read as a scalar when the op is
// launched: no copy to the device and no synchronisation.
template <class T>
Tensor cpu_scalar(T v, ScalarType dtype) {
  Tensor t = new_empty({}, dtype, torch::stable::Device(torch::headeronly::DeviceType::CPU));
  *t.mutable_data_ptr<T>() = v;
  return t;
}

// A gradient-sized CPU buffer is fresh memory at every call (the allocator
// maps blocks this large anew), and the kernel's first writes to it fault
// in 4 KiB pages: that cost as much as the loss itself (benchmarks/NOTES.md).
// Asking for huge pages before the first touch makes those faults 512x fewer
// where the kernel allows it (transparent huge pages "madvise" or "always");
// elsewhere the hint is ignored and nothing changes.
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
  if (!t.is_cpu() || nbytes < 2 * kHugePage) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.mutable_data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + nbytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)t;
#endif
}

}  // namespace

// As Python prints a shape (a tuple): the messages reach Python users.
std::string shape_str(torch::headeronly::IntHeaderOnlyArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

std::string device_str(const torch::stable::Device& device) {
  using torch::headeronly::DeviceType;
  std::string s = device.is_cpu()                       ? "cpu"
                  : device.is_cuda()                    ? "cuda"
                  : device.type() == DeviceType::Meta ? "meta"
                                                        : "device type " + std::to_string(static_cast<int>(device.type()));
  return device.has_index() && device.is_cuda() ? s + ":" + std::to_string(device.index()) : s;
}

Tensor new_empty(torch::headeronly::IntHeaderOnlyArrayRef sizes, ScalarType dtype,
                 const torch::stable::Device& device) {
  return torch::stable::empty(sizes, dtype, std::nullopt, device);
}

Tensor with_unit_vocab_stride(const Tensor& x) {
  const bool unit_stride = x.dim() == 0 || x.stride(x.dim() - 1) == 1 || last_size(x) == 1;
  if (unit_stride && x.dim() - 1 <= RowLayout::kMaxDims) return x;
  return torch::stable::view(torch::stable::contiguous(x), {-1, last_size(x)});
}

RowLayout row_layout(const Tensor& x) {
  if (!(x.dim() >= 1 && x.dim() - 1 <= RowLayout::kMaxDims)) throw std::logic_error("todi_ext: row_layout of a bad shape");
  RowLayout layout;
  layout.dims = static_cast<int>(x.dim() - 1);
  for (int d = 0; d < layout.dims; ++d) {
    layout.sizes[d] = x.size(d);
    layout.strides[d] = x.stride(d);
  }
  return layout;
}

ScalarType math_dtype(const Tensor& student, const Tensor& teacher) {
  return (student.scalar_type() == ScalarType::Double || teacher.scalar_type() == ScalarType::Double)
             ? ScalarType::Double
             : ScalarType::Float;
}

void check_label_dtype(const Tensor& labels) {
  TODI_CHECK(is_integer_dtype(labels.scalar_type()), "labels must be an integer tensor, got ", labels.scalar_type());
}

RowsView check_forward_args(const Tensor& student_logits, const Tensor& teacher_logits,
                            const std::optional<Tensor>& labels) {
  TODI_CHECK(is_logit_dtype(student_logits.scalar_type()),
             "student_logits must be float32, bfloat16, float16 or float64, got ", student_logits.scalar_type());
  TODI_CHECK(is_logit_dtype(teacher_logits.scalar_type()),
             "teacher_logits must be float32, bfloat16, float16 or float64, got ", teacher_logits.scalar_type());
  TODI_CHECK(student_logits.dim() >= 1 && last_size(student_logits) > 0,
             "student_logits must have shape (..., V) with V >= 1, got ", shape_str(student_logits.sizes()));
  TODI_CHECK(teacher_logits.sizes().equals(student_logits.sizes()), "teacher_logits must have the shape of student_logits ",
             shape_str(student_logits.sizes()), ", got ", shape_str(teacher_logits.sizes()));
  TODI_CHECK(teacher_logits.device() == student_logits.device(), "teacher_logits is on ",
             device_str(teacher_logits.device()), " but student_logits is on ", device_str(student_logits.device()));

  RowsView view;
  view.vocab = last_size(student_logits);
  view.rows = student_logits.numel() / view.vocab;
  view.student = with_unit_vocab_stride(student_logits);
  view.teacher = with_unit_vocab_stride(teacher_logits);
  if (labels.has_value()) {
    const Tensor& l = *labels;
    const auto rows_shape = student_logits.sizes().slice(0, student_logits.dim() - 1);
    check_label_dtype(l);
    TODI_CHECK(l.sizes().equals(rows_shape), "labels must have shape ", shape_str(rows_shape),
               " (student_logits without its last dimension), got ", shape_str(l.sizes()));
    TODI_CHECK(l.device() == student_logits.device(), "labels is on ", device_str(l.device()),
               " but student_logits is on ", device_str(student_logits.device()));
    view.labels = torch::stable::contiguous(
        torch::stable::to(torch::stable::reshape(l, {-1}), std::optional<ScalarType>(ScalarType::Long)));
  }
  return view;
}

Tensor count_positions_with_ops(const Tensor& labels, int64_t ignore_index, ScalarType math) {
  const Tensor counted = call_aten("aten::ne", "Tensor", labels, cpu_scalar<int64_t>(ignore_index, ScalarType::Long));
  // Counted in int64 and rounded once to the math dtype, as the CPU loop does.
  Tensor count = torch::stable::sum(counted, std::nullopt, false, ScalarType::Long);
  count = call_aten("aten::clamp_min_", "Tensor", count, cpu_scalar<int64_t>(1, ScalarType::Long));
  return torch::stable::to(count, std::optional<ScalarType>(math));
}

Reduction parse_reduction(std::string_view reduction) {
  if (reduction == "none") return Reduction::kNone;
  if (reduction == "sum") return Reduction::kSum;
  TODI_CHECK(reduction == "mean", "reduction must be one of 'mean', 'sum', 'none', got '", reduction, "'");
  return Reduction::kMean;
}

ReductionPlan plan_reduction(std::string_view reduction, const RowsView& view, int64_t ignore_index,
                             ScalarType math, const torch::stable::Device& device) {
  ReductionPlan plan;
  plan.kind = parse_reduction(reduction);
  if (plan.kind == Reduction::kMean) {
    // An all-ignored batch divides by 1: the loss is 0 with a zero gradient.
    // The counted positions with Tensor-overload ops (the stable ABI cannot
    // pass a Scalar); the CPU scalars are exact for any int64 ignore_index.
    // Labels in CPU memory are counted here (each op through the stable
    // dispatcher costs microseconds, which small calls notice).
    if (view.labels.has_value() && !view.labels->is_cpu()) {
      plan.count = count_positions_with_ops(*view.labels, ignore_index, math);
      plan.grad_scale = call_aten("aten::reciprocal", "", *plan.count);
    } else {
      int64_t count = view.rows;
      if (view.labels.has_value()) {
        const int64_t* l = view.labels->const_data_ptr<int64_t>();
        count = std::count_if(l, l + view.rows, [&](int64_t v) { return v != ignore_index; });
      }
      count = std::max<int64_t>(count, 1);
      // 1 / count rounded once, in the math dtype (as reciprocal() would).
      const double scale = math == ScalarType::Double ? 1.0 / static_cast<double>(count)
                                                      : static_cast<double>(1.0f / static_cast<float>(count));
      plan.count = torch::stable::full({}, static_cast<double>(count), math, std::nullopt, device);
      plan.grad_scale = torch::stable::full({}, scale, math, std::nullopt, device);
    }
  }
  return plan;
}

Tensor reduce_loss(const Tensor& per_position, const ReductionPlan& plan) {
  switch (plan.kind) {
    case Reduction::kNone: return per_position;
    case Reduction::kSum: return torch::stable::sum(per_position);
    case Reduction::kMean: return call_aten("aten::div", "Tensor", torch::stable::sum(per_position), *plan.count);
  }
  throw std::logic_error("todi_ext: unknown reduction");
}

void check_scalar_tensor(const char* name, const Tensor& t, const torch::stable::Device& device) {
  TODI_CHECK(t.dim() == 0 && t.scalar_type() == ScalarType::Double, name, " must be a 0-dim float64 tensor, got ",
             t.scalar_type(), " of shape ", shape_str(t.sizes()));
  TODI_CHECK(t.device() == device, name, " is on ", device_str(t.device()), " but student_logits is on ",
             device_str(device));
}

// The values, where reading them costs nothing (CPU memory). On a GPU that
// would sync: the Python API validates them before making the tensors, and
// the CUDA kernel turns invalid values into NaN rows rather than numbers.
void check_scalar_values(const Tensor& beta, const Tensor& inv_temperature) {
  if (!beta.is_cpu()) return;
  const double b = *beta.const_data_ptr<double>();
  const double inv_t = *inv_temperature.const_data_ptr<double>();
  // The kernels compute in float32 (float64 inputs aside; one rule for every
  // dtype, as the API's): beta and 1/T must be float32 numbers there (an inf
  // beta makes inf * 0 a NaN; a subnormal 1/T loses digits).
  constexpr double kFloatMax = std::numeric_limits<float>::max(), kFloatMin = std::numeric_limits<float>::min();
  TODI_CHECK(std::abs(b) <= kFloatMax,  // false for NaN too
             "beta must be finite and within float32's range (|beta| <= 3.4e38), got ", b);
  TODI_CHECK(inv_t >= kFloatMin && inv_t <= kFloatMax,
             "inv_temperature (1 / T) must be finite and > 0, a normal float32 (1.2e-38 to 3.4e38), got ", inv_t);
}

math::Divergence parse_divergence(std::string_view name, double skew_lambda, double akl_mu, double jsd_beta,
                                  math::DivergenceParams& params) {
  using math::Divergence;
  // The op-level names (python/todi_ext/_validation.py maps the API's onto these).
  static constexpr std::pair<std::string_view, Divergence> kNames[] = {
      {"todi", Divergence::kToDi}, {"fkl", Divergence::kFKL},   {"rkl", Divergence::kRKL},
      {"tvd", Divergence::kTVD},   {"skl", Divergence::kSKL},   {"srkl", Divergence::kSRKL},
      {"akl", Divergence::kAKL},   {"gjsd", Divergence::kGJSD},
  };
  const auto* found = std::find_if(std::begin(kNames), std::end(kNames), [&](const auto& n) { return n.first == name; });
  if (found == std::end(kNames)) {
    std::string choices;
    for (const auto& n : kNames) choices += (choices.empty() ? "'" : ", '") + std::string(n.first) + "'";
    TODI_CHECK(false, "divergence must be one of ", choices, ", got '", name, "'");
  }
  const Divergence kind = found->second;
  TODI_CHECK(skew_lambda >= 0 && skew_lambda <= 1, "skew_lambda must be in [0, 1], got ", skew_lambda);
  TODI_CHECK(jsd_beta > 0 && jsd_beta < 1, "jsd_beta must be in (0, 1), got ", jsd_beta,
             " (at 0 and 1 the generalized JSD is identically zero; use divergence='fkl' or 'rkl')");
  TODI_CHECK(akl_mu >= 0 && akl_mu < 1, "akl_mu must be in [0, 1), got ", akl_mu,
             " (at 1 the split would hinge on how the probabilities' sum rounds around 1; the tail is then "
             "everything, so use divergence='rkl')");
  params.skew_lambda = skew_lambda;
  params.jsd_beta = jsd_beta;
  params.akl_mu = akl_mu;
  params.set_logs();
  return kind;
}

void check_label_weights(const RowsView& view, double soft_label_weight, double hard_label_weight) {
  TODI_CHECK(std::isfinite(soft_label_weight), "soft_label_weight must be finite, got ", soft_label_weight);
  TODI_CHECK(std::isfinite(hard_label_weight), "hard_label_weight must be finite, got ", hard_label_weight);
  TODI_CHECK(hard_label_weight == 0 || view.labels.has_value(), "hard_label_weight=", hard_label_weight,
             " needs labels (the cross-entropy's targets), got labels=None");
}

// Where the labels are in CPU memory, check them; on a GPU that would sync,
// and the kernel makes a row with an out-of-range label NaN instead. A loop
// over the int64 labels: no ATen op with a Scalar argument, which the stable
// ABI cannot call, and no temporaries.
void check_label_range(const Tensor& labels, int64_t vocab, int64_t ignore_index) {
  check_label_dtype(labels);  // known on every device, values or not
  if (!labels.is_cpu()) return;
  // A no-op for the op's own (contiguous int64) labels.
  const Tensor flat = torch::stable::contiguous(
      torch::stable::to(torch::stable::reshape(labels, {-1}), std::optional<ScalarType>(ScalarType::Long)));
  const int64_t* l = flat.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    TODI_CHECK(l[i] == ignore_index || (l[i] >= 0 && l[i] < vocab), "labels must be in [0, ", vocab,
               ") or equal ignore_index (", ignore_index, ") for the hard-label cross-entropy, got ", l[i],
               " at position ", i);
  }
}

RowsView check_distill_args(const Tensor& student_logits, const Tensor& teacher_logits,
                            const std::optional<Tensor>& labels, std::string_view divergence, double skew_lambda,
                            double akl_mu, double jsd_beta, std::string_view reduction, double soft_label_weight,
                            double hard_label_weight, math::Divergence* kind, math::DivergenceParams* params) {
  RowsView view = check_forward_args(student_logits, teacher_logits, labels);
  check_label_weights(view, soft_label_weight, hard_label_weight);
  math::DivergenceParams unused;
  const math::Divergence parsed = parse_divergence(divergence, skew_lambda, akl_mu, jsd_beta, params ? *params : unused);
  if (kind) *kind = parsed;
  parse_reduction(reduction);
  return view;
}

ForwardSetup prepare_forward(const Tensor& student_logits, const Tensor& teacher_logits,
                             const std::optional<Tensor>& labels, std::string_view divergence, const Tensor& beta,
                             double skew_lambda, double akl_mu, double jsd_beta, const Tensor& inv_temperature,
                             int64_t ignore_index, std::string_view reduction, bool student_grad, bool teacher_grad,
                             double soft_label_weight, double hard_label_weight) {
  ForwardSetup setup;
  setup.view = check_distill_args(student_logits, teacher_logits, labels, divergence, skew_lambda, akl_mu, jsd_beta,
                                  reduction, soft_label_weight, hard_label_weight, &setup.divergence,
                                  &setup.divergence_params);
  if (hard_label_weight != 0) check_label_range(*setup.view.labels, setup.view.vocab, ignore_index);
  setup.soft_label_weight = soft_label_weight;
  setup.hard_label_weight = hard_label_weight;
  check_scalar_tensor("beta", beta, student_logits.device());
  check_scalar_tensor("inv_temperature", inv_temperature, student_logits.device());
  check_scalar_values(beta, inv_temperature);
  setup.beta = beta;
  setup.inv_temperature = inv_temperature;
  const torch::stable::Device device = student_logits.device();
  const ScalarType math = math_dtype(student_logits, teacher_logits);
  setup.plan = plan_reduction(reduction, setup.view, ignore_index, math, device);
  setup.per_position = new_empty(student_logits.sizes().slice(0, student_logits.dim() - 1), math, device);
  const int64_t none[] = {0};
  setup.grad_student = new_empty(student_grad ? student_logits.sizes() : none, student_logits.scalar_type(), device);
  setup.grad_teacher = new_empty(teacher_grad ? teacher_logits.sizes() : none, teacher_logits.scalar_type(), device);
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
  p.labels = setup.view.labels.has_value() ? setup.view.labels->const_data_ptr<int64_t>() : nullptr;
  p.ignore_index = ignore_index;
  p.divergence = setup.divergence;
  p.divergence_params = setup.divergence_params;
  p.inv_temperature = setup.inv_temperature.const_data_ptr<double>();
  p.beta = setup.beta.const_data_ptr<double>();
  p.soft_label_weight = setup.soft_label_weight;
  p.hard_label_weight = setup.hard_label_weight;
  p.double_math = setup.per_position.scalar_type() == ScalarType::Double;
  p.loss = setup.per_position.mutable_data_ptr();
  p.grad_scale = setup.plan.grad_scale.has_value() ? setup.plan.grad_scale->const_data_ptr() : nullptr;
  if (setup.grad_student.numel() > 0) {
    p.grad_student = OutMatrix{setup.grad_student.mutable_data_ptr(), setup.grad_student.scalar_type()};
  }
  if (setup.grad_teacher.numel() > 0) {
    p.grad_teacher = OutMatrix{setup.grad_teacher.mutable_data_ptr(), setup.grad_teacher.scalar_type()};
  }
  return p;
}

namespace {

void check_scale_grad_args(const Tensor& grad, const Tensor& scale) {
  TODI_CHECK(is_logit_dtype(grad.scalar_type()), "grad must be a floating tensor, got ", grad.scalar_type());
  TODI_CHECK(scale.scalar_type() == ScalarType::Float || scale.scalar_type() == ScalarType::Double,
             "scale must be float32 or float64, got ", scale.scalar_type());
  TODI_CHECK(grad.dim() >= 1, "grad must have shape (..., V), got ", shape_str(grad.sizes()));
  const auto rows_shape = grad.sizes().slice(0, grad.dim() - 1);
  TODI_CHECK(scale.dim() == 0 || scale.sizes().equals(rows_shape), "scale must be a scalar or have shape ",
             shape_str(rows_shape), " (grad without its last dimension), got ", shape_str(scale.sizes()));
  TODI_CHECK(scale.device() == grad.device(), "scale is on ", device_str(scale.device()), " but grad is on ",
             device_str(grad.device()));
  TODI_CHECK(last_size(grad) <= 1 || grad.stride(grad.dim() - 1) == 1,
             "grad must have unit stride along its last dimension (it is scaled in place)");
  TODI_CHECK(grad.dim() - 1 <= RowLayout::kMaxDims || grad.is_contiguous(), "grad may have at most ",
             RowLayout::kMaxDims, " leading dimensions unless it is contiguous, got ", grad.dim() - 1);
}

// Whether no two entries of x share memory, by a sufficient rule: with the
// dimensions ordered by stride, each one's stride clears the span of those
// inside it. It refuses expanded (stride 0) and overlapping as_strided views,
// which an in-place scale would multiply more than once.
bool entries_are_distinct(const Tensor& x) {
  if (x.numel() == 0 || x.is_contiguous()) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dimensions of size > 1
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) > 1) dims.emplace_back(x.stride(d), x.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 1;  // elements from the first entry to one past the last, of the dimensions so far
  for (const auto& [stride, size] : dims) {
    if (stride < span) return false;
    span = stride * (size - 1) + span;
  }
  return true;
}

}  // namespace

ScaleGradCall scale_grad_call(const Tensor& grad, const Tensor& scale, const Tensor* out) {
  check_scale_grad_args(grad, scale);
  TODI_CHECK(out != nullptr || entries_are_distinct(grad),
             "grad must not have entries that share memory (an expanded or overlapping view): it is scaled in place");
  ScaleGradCall call;
  // A contiguous grad with more leading dimensions than RowLayout indexes is
  // viewed as (rows, V).
  const Tensor rows = grad.dim() - 1 <= RowLayout::kMaxDims ? grad : torch::stable::view(grad, {-1, last_size(grad)});
  call.keep_alive[0] = rows;
  call.keep_alive[1] = torch::stable::contiguous(scale);
  ScaleGradParams& p = call.params;
  // In place, grad and out are one pointer (the kernels compare them), asked
  // for once: mutable_data_ptr() may materialise a copy-on-write storage.
  void* const grad_data = out == nullptr ? rows.mutable_data_ptr() : const_cast<void*>(rows.const_data_ptr());
  p.grad = RowMatrix{grad_data, rows.scalar_type(), row_layout(rows)};
  p.out = out == nullptr ? grad_data : out->mutable_data_ptr();
  p.vocab = last_size(grad);
  p.rows = p.vocab > 0 ? grad.numel() / p.vocab : 0;
  p.scale = call.keep_alive[1].const_data_ptr();
  p.scale_dtype = call.keep_alive[1].scalar_type();
  p.scale_per_row = call.keep_alive[1].dim() > 0;
  return call;
}

}  // namespace todi_ext
