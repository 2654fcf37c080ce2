// CPU implementations of the todi_ext ops: argument checks, output
// allocation, and the choice of the kernel copy for this machine's widest
// instruction set.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "todi_cpu_kernel.h"
#include "todi_op_common.h"

namespace todi_ext::cpu {

struct Kernels {
  ForwardKernel forward;
  ScaleGradKernel scale_grad;
  const char* capability;
};

// Picked once, from what ATen itself uses (it honours ATEN_CPU_CAPABILITY).
const Kernels& kernels() {
  static const Kernels chosen = [] {
    const std::string best = at::get_cpu_capability();
#if defined(TODI_EXT_HAVE_AVX512)
    if (best == "AVX512") return Kernels{AVX512::distill_forward_kernel, AVX512::scale_grad_kernel, "AVX512"};
#endif
#if defined(TODI_EXT_HAVE_AVX2)
    if (best == "AVX512" || best == "AVX2") return Kernels{AVX2::distill_forward_kernel, AVX2::scale_grad_kernel, "AVX2"};
#endif
    return Kernels{DEFAULT::distill_forward_kernel, DEFAULT::scale_grad_kernel, "DEFAULT"};
  }();
  return chosen;
}

const char* kernel_capability() { return kernels().capability; }

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_forward_cpu(const at::Tensor& student_logits,
                                                                const at::Tensor& teacher_logits,
                                                                const std::optional<at::Tensor>& labels,
                                                                c10::string_view divergence, const at::Tensor& beta,
                                                                double skew_lambda, double akl_mu, double jsd_beta, const at::Tensor& inv_temperature,
                                                                int64_t ignore_index, c10::string_view reduction,
                                                                bool student_grad, bool teacher_grad,
                                                                double soft_label_weight, double hard_label_weight) {
  const ForwardSetup setup = prepare_forward(student_logits, teacher_logits, labels, divergence, beta, skew_lambda, akl_mu, jsd_beta, inv_temperature,
                                             ignore_index, reduction, student_grad, teacher_grad, soft_label_weight,
                                             hard_label_weight);
  if (setup.view.rows > 0) kernels().forward(forward_params(setup, ignore_index));
  return {reduce_loss(setup.per_position, setup.plan), setup.grad_student, setup.grad_teacher};
}

void scale_grad_cpu_(const at::Tensor& grad, const at::Tensor& scale) {
  const ScaleGradCall call = scale_grad_call(grad, scale, grad);
  if (grad.numel() > 0) kernels().scale_grad(call.params);
}

at::Tensor scale_grad_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  at::Tensor out = at::empty(grad.sizes(), grad.options());
  const ScaleGradCall call = scale_grad_call(grad, scale, out);
  if (grad.numel() > 0) kernels().scale_grad(call.params);
  return out;
}

// ---- vocabulary-parallel phases: the same kernel, one phase per call.

void check_row_table(const char* name, const at::Tensor& t, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kDouble && t.dim() == 2 && t.size(0) == rows && t.size(1) == cols &&
                        t.is_contiguous() && t.device().is_cpu(),
                    name, " must be a contiguous (", rows, ", ", cols, ") float64 CPU tensor, got ", t.scalar_type(),
                    " of shape ", t.sizes());
}

ForwardSetup prepare_phase(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                           const std::optional<at::Tensor>& labels, c10::string_view divergence, const at::Tensor& beta,
                           double skew_lambda, double akl_mu, double jsd_beta, const at::Tensor& inv_temperature,
                           int64_t ignore_index, bool student_grad, bool teacher_grad) {
  // hard_label_weight 0 here: local labels outside the slice are legal.
  return prepare_forward(student_logits, teacher_logits, labels, divergence, beta, skew_lambda, akl_mu, jsd_beta,
                         inv_temperature, ignore_index, "sum", student_grad, teacher_grad, 1.0, 0.0);
}

// AKL's weights come from the whole row's (g_head, g_tail): required with
// AKL, refused without it (a table that would be silently ignored).
void set_akl_gaps(const ForwardSetup& setup, const std::optional<at::Tensor>& akl_gaps, ForwardParams& p) {
  const bool akl = setup.divergence == math::Divergence::kAKL;
  TORCH_CHECK_VALUE(akl == akl_gaps.has_value(), akl ? "divergence 'akl' needs akl_gaps, the whole rows' "
                    "(g_head, g_tail)" : "akl_gaps is only for divergence 'akl'");
  if (!akl) return;
  check_row_table("akl_gaps", *akl_gaps, setup.view.rows, 2);
  p.vocab_parallel.akl_global_gaps = akl_gaps->const_data_ptr<double>();
}

// The AKL search phases: S at one walk's thresholds, or the gap sums at
// the split (remaining_bits 0). tail_key: (rows,) int64, the search's low key.
at::Tensor akl_phase(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                     const std::optional<at::Tensor>& labels, const at::Tensor& inv_temperature, int64_t ignore_index,
                     const at::Tensor& global_stats, const at::Tensor& tail_key, int64_t remaining_bits) {
  const at::Tensor one = at::ones({}, inv_temperature.options());
  const ForwardSetup setup = prepare_phase(student_logits, teacher_logits, labels, "akl", one, 0.1, 0.5, 0.5,
                                           inv_temperature, ignore_index, false, false);
  check_row_table("global_stats", global_stats, setup.view.rows, 6);
  TORCH_CHECK_VALUE(tail_key.scalar_type() == at::kLong && tail_key.dim() == 1 &&
                        tail_key.size(0) == setup.view.rows && tail_key.is_contiguous() && tail_key.device().is_cpu(),
                    "tail_key must be a contiguous (", setup.view.rows, ",) int64 CPU tensor, got ",
                    tail_key.scalar_type(), " of shape ", tail_key.sizes());
  const bool double_math = setup.per_position.scalar_type() == at::kDouble;
  const int64_t key_bits = double_math ? math::ProbKey<double>::kBits : math::ProbKey<float>::kBits;
  TORCH_CHECK_VALUE(remaining_bits >= 0 && remaining_bits <= key_bits, "remaining_bits must be in [0, ", key_bits,
                    "] for ", setup.per_position.scalar_type(), " math, got ", remaining_bits);
  const bool walk = remaining_bits > 0;
  at::Tensor out = at::empty({setup.view.rows, walk ? math::kAklCandidates : 2},
                             student_logits.options().dtype(at::kDouble));
  if (setup.view.rows > 0) {
    ForwardParams p = forward_params(setup, ignore_index);
    VocabParallelParams& vp = p.vocab_parallel;
    vp.phase = walk ? Phase::kAklWalk : Phase::kAklGaps;
    vp.global_stats = global_stats.const_data_ptr<double>();
    vp.akl_low = tail_key.const_data_ptr<int64_t>();
    vp.akl_remaining = static_cast<int>(remaining_bits);
    vp.akl_sums = out.mutable_data_ptr<double>();
    kernels().forward(p);
  }
  return out;
}

at::Tensor vocab_parallel_akl_walk_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                       const std::optional<at::Tensor>& labels, const at::Tensor& inv_temperature,
                                       int64_t ignore_index, const at::Tensor& global_stats,
                                       const at::Tensor& tail_key, int64_t remaining_bits) {
  TORCH_CHECK_VALUE(remaining_bits > 0, "remaining_bits must be positive for a walk, got ", remaining_bits);
  return akl_phase(student_logits, teacher_logits, labels, inv_temperature, ignore_index, global_stats, tail_key,
                   remaining_bits);
}

at::Tensor vocab_parallel_akl_gaps_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                       const std::optional<at::Tensor>& labels, const at::Tensor& inv_temperature,
                                       int64_t ignore_index, const at::Tensor& global_stats,
                                       const at::Tensor& tail_key) {
  return akl_phase(student_logits, teacher_logits, labels, inv_temperature, ignore_index, global_stats, tail_key, 0);
}

at::Tensor vocab_parallel_row_stats_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                        const std::optional<at::Tensor>& labels, const at::Tensor& inv_temperature,
                                        int64_t ignore_index, bool with_cross_entropy) {
  const at::Tensor one = at::ones({}, inv_temperature.options());
  const ForwardSetup setup = prepare_phase(student_logits, teacher_logits, labels, "fkl", one, 0.1, 0.5, 0.5,
                                           inv_temperature, ignore_index, false, false);
  at::Tensor stats = at::empty({setup.view.rows, 6}, student_logits.options().dtype(at::kDouble));
  if (setup.view.rows > 0) {
    ForwardParams p = forward_params(setup, ignore_index);
    p.hard_weight = with_cross_entropy ? 1.0 : 0.0;
    p.vocab_parallel.phase = Phase::kRowStats;
    p.vocab_parallel.stats = stats.mutable_data_ptr<double>();
    kernels().forward(p);
  }
  return stats;
}

at::Tensor vocab_parallel_partial_sums_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                           const std::optional<at::Tensor>& labels, c10::string_view divergence,
                                           const at::Tensor& beta, double skew_lambda, double akl_mu, double jsd_beta,
                                           const at::Tensor& inv_temperature, int64_t ignore_index,
                                           const at::Tensor& global_stats, bool with_cross_entropy,
                                           const std::optional<at::Tensor>& akl_gaps) {
  const ForwardSetup setup = prepare_phase(student_logits, teacher_logits, labels, divergence, beta, skew_lambda,
                                           akl_mu, jsd_beta, inv_temperature, ignore_index, false, false);
  check_row_table("global_stats", global_stats, setup.view.rows, 6);
  at::Tensor sums = at::empty({setup.view.rows, 4}, student_logits.options().dtype(at::kDouble));
  if (setup.view.rows > 0) {
    ForwardParams p = forward_params(setup, ignore_index);
    p.hard_weight = with_cross_entropy ? 1.0 : 0.0;
    p.vocab_parallel.phase = Phase::kPartialSums;
    p.vocab_parallel.global_stats = global_stats.const_data_ptr<double>();
    p.vocab_parallel.sums = sums.mutable_data_ptr<double>();
    set_akl_gaps(setup, akl_gaps, p);
    kernels().forward(p);
  }
  return sums;
}

std::tuple<at::Tensor, at::Tensor> vocab_parallel_gradients_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    c10::string_view divergence, const at::Tensor& beta, double skew_lambda, double akl_mu, double jsd_beta,
    const at::Tensor& inv_temperature, int64_t ignore_index, const at::Tensor& global_stats,
    const at::Tensor& global_sums, const at::Tensor& grad_scale, double soft_label_weight, double hard_label_weight,
    bool student_grad, bool teacher_grad, const std::optional<at::Tensor>& akl_gaps) {
  const ForwardSetup setup = prepare_phase(student_logits, teacher_logits, labels, divergence, beta, skew_lambda,
                                           akl_mu, jsd_beta, inv_temperature, ignore_index, student_grad, teacher_grad);
  check_row_table("global_stats", global_stats, setup.view.rows, 6);
  check_row_table("global_sums", global_sums, setup.view.rows, 4);
  TORCH_CHECK_VALUE(grad_scale.dim() == 0 && grad_scale.scalar_type() == setup.per_position.scalar_type(),
                    "grad_scale must be a 0-dim ", setup.per_position.scalar_type(), " tensor, got ",
                    grad_scale.scalar_type(), " of shape ", grad_scale.sizes());
  if (setup.view.rows > 0 && (student_grad || teacher_grad)) {
    ForwardParams p = forward_params(setup, ignore_index);
    p.soft_weight = soft_label_weight;
    p.hard_weight = hard_label_weight;
    p.grad_scale = grad_scale.const_data_ptr();
    p.vocab_parallel.phase = Phase::kGradients;
    p.vocab_parallel.global_stats = global_stats.const_data_ptr<double>();
    p.vocab_parallel.global_sums = global_sums.const_data_ptr<double>();
    set_akl_gaps(setup, akl_gaps, p);
    kernels().forward(p);
  }
  return {setup.grad_student, setup.grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(todi_ext, CPU, m) {
  m.impl("vocab_parallel_row_stats", &vocab_parallel_row_stats_cpu);
  m.impl("vocab_parallel_partial_sums", &vocab_parallel_partial_sums_cpu);
  m.impl("vocab_parallel_gradients", &vocab_parallel_gradients_cpu);
  m.impl("vocab_parallel_akl_walk", &vocab_parallel_akl_walk_cpu);
  m.impl("vocab_parallel_akl_gaps", &vocab_parallel_akl_gaps_cpu);
  m.impl("distill_forward", &distill_forward_cpu);
  m.impl("scale_grad_", &scale_grad_cpu_);
  m.impl("scale_grad", &scale_grad_cpu);
}

}  // namespace todi_ext::cpu
