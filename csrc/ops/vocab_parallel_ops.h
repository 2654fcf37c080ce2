// The vocabulary-parallel phase ops (schemas: torch_bindings.cpp; the
// collectives between them: python/todi_ext/distributed.py): argument checks,
// the output tables and the kernel parameters of each phase, written once for
// every backend. Each is a template on the backend's phase runner,
// Run(params, phase, logits), which launches the phase's kernel on the
// logits' device (the CPU kernel copy for this machine, or the CUDA launch),
// so a backend registers e.g. vocab_parallel::row_stats<run_phase_kernel>.
// With a phase, a local label outside [0, vocab) (and not ignore_index) is in
// another rank's slice: no one-hot term here, and not a NaN row.
// Header-only: the CUDA host-emulation test harness instantiates it too.
#pragma once

#include <torch/csrc/stable/ops.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "op_common.h"

namespace todi_ext::vocab_parallel {

// The phase ops' schemas, defined by torch_bindings.cpp (which says what each
// computes) and, under its own namespace, by the CUDA host-emulation harness.
inline constexpr const char* kSchemas[] = {
    "vocab_parallel_row_stats(Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
    "Tensor inv_temperature, int ignore_index, bool with_hard_label_term) -> Tensor",
    "vocab_parallel_partial_sums(Tensor student_logits, Tensor teacher_logits, Tensor? labels, str divergence, "
    "Tensor beta, float skew_lambda, float akl_mu, float jsd_beta, Tensor inv_temperature, int ignore_index, "
    "Tensor global_stats, bool with_hard_label_term, Tensor? akl_gaps=None) -> Tensor",
    "vocab_parallel_gradients(Tensor student_logits, Tensor teacher_logits, Tensor? labels, str divergence, "
    "Tensor beta, float skew_lambda, float akl_mu, float jsd_beta, Tensor inv_temperature, int ignore_index, "
    "Tensor global_stats, Tensor global_sums, Tensor grad_scale, Tensor label_weights, "
    "bool with_hard_label_term, bool student_grad, bool teacher_grad, Tensor? akl_gaps=None) "
    "-> (Tensor grad_student, Tensor grad_teacher)",
    "vocab_parallel_akl_walk(Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
    "Tensor inv_temperature, int ignore_index, Tensor global_stats, Tensor tail_key, int remaining_bits) -> Tensor",
    "vocab_parallel_akl_gaps(Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
    "Tensor inv_temperature, int ignore_index, Tensor global_stats, Tensor tail_key) -> Tensor",
};

using PhaseRunner = void (*)(const ForwardParams&, const VocabParallelParams&, const Tensor& logits);

// A per-row float64 table handed from one phase to the next (through a
// collective): contiguous, (rows, cols), on the logits' device.
inline void check_row_table(const char* name, const Tensor& t, int64_t rows, int64_t cols,
                            const Tensor& logits) {
  TODI_CHECK(t.scalar_type() == ScalarType::Double && t.dim() == 2 && t.size(0) == rows && t.size(1) == cols &&
                 t.is_contiguous() && t.device() == logits.device(),
             name, " must be a contiguous (", rows, ", ", cols, ") float64 tensor on ", device_str(logits.device()),
             ", got ", t.scalar_type(), " of shape ", shape_str(t.sizes()), " on ", device_str(t.device()));
}

// The forward's checks and set-up; hard_label_weight 0 here: local labels
// outside the slice are legal (another rank's token).
inline ForwardSetup prepare_phase(const Tensor& student_logits, const Tensor& teacher_logits,
                                  const std::optional<Tensor>& labels, std::string_view divergence,
                                  const Tensor& beta, double skew_lambda, double akl_mu, double jsd_beta,
                                  const Tensor& inv_temperature, int64_t ignore_index, bool student_grad,
                                  bool teacher_grad) {
  return prepare_forward(student_logits, teacher_logits, labels, divergence, beta, skew_lambda, akl_mu, jsd_beta,
                         inv_temperature, ignore_index, "sum", student_grad, teacher_grad, 1.0, 0.0);
}

// beta for the phases that do not read it, on the logits' device: a
// misplaced inv_temperature is then reported under its own name.
inline Tensor unread_beta(const Tensor& logits) {
  return torch::stable::full({}, 1.0, ScalarType::Double, std::nullopt, logits.device());
}

// AKL's weights come from the whole row's (g_head, g_tail): required with
// AKL, refused without it (a table that would be silently ignored).
inline void set_akl_gaps(const ForwardSetup& setup, const std::optional<Tensor>& akl_gaps,
                         const Tensor& logits, VocabParallelParams& vp) {
  const bool akl = setup.divergence == math::Divergence::kAKL;
  TODI_CHECK(akl == akl_gaps.has_value(),
             akl ? "divergence 'akl' needs akl_gaps, the whole rows' (g_head, g_tail)"
                 : "akl_gaps is only for divergence 'akl'");
  if (!akl) return;
  check_row_table("akl_gaps", *akl_gaps, setup.view.rows, 2, logits);
  vp.akl_global_gaps = akl_gaps->const_data_ptr<double>();
}

template <PhaseRunner Run>
Tensor row_stats(const Tensor& student_logits, const Tensor& teacher_logits,
                     const std::optional<Tensor>& labels, const Tensor& inv_temperature, int64_t ignore_index,
                     bool with_hard_label_term) {
  const ForwardSetup setup = prepare_phase(student_logits, teacher_logits, labels, "fkl", unread_beta(student_logits),
                                           0.1, 0.5, 0.5, inv_temperature, ignore_index, false, false);
  Tensor stats = new_empty({setup.view.rows, 6}, ScalarType::Double, student_logits.device());
  if (setup.view.rows > 0) {
    ForwardParams p = forward_params(setup, ignore_index);
    p.hard_label_weight = with_hard_label_term ? 1.0 : 0.0;
    VocabParallelParams vp;
    vp.phase = Phase::kRowStats;
    vp.stats = stats.mutable_data_ptr<double>();
    Run(p, vp, student_logits);
  }
  return stats;
}

template <PhaseRunner Run>
Tensor partial_sums(const Tensor& student_logits, const Tensor& teacher_logits,
                        const std::optional<Tensor>& labels, std::string_view divergence, const Tensor& beta,
                        double skew_lambda, double akl_mu, double jsd_beta, const Tensor& inv_temperature,
                        int64_t ignore_index, const Tensor& global_stats, bool with_hard_label_term,
                        const std::optional<Tensor>& akl_gaps) {
  const ForwardSetup setup = prepare_phase(student_logits, teacher_logits, labels, divergence, beta, skew_lambda,
                                           akl_mu, jsd_beta, inv_temperature, ignore_index, false, false);
  check_row_table("global_stats", global_stats, setup.view.rows, 6, student_logits);
  TODI_CHECK(!with_hard_label_term || labels.has_value(), "with_hard_label_term needs labels");
  Tensor sums = new_empty({setup.view.rows, 4}, ScalarType::Double, student_logits.device());
  ForwardParams p = forward_params(setup, ignore_index);
  VocabParallelParams vp;
  set_akl_gaps(setup, akl_gaps, student_logits, vp);
  if (setup.view.rows > 0) {
    p.hard_label_weight = with_hard_label_term ? 1.0 : 0.0;
    vp.phase = Phase::kPartialSums;
    vp.global_stats = global_stats.const_data_ptr<double>();
    vp.sums = sums.mutable_data_ptr<double>();
    Run(p, vp, student_logits);
  }
  return sums;
}

template <PhaseRunner Run>
std::tuple<Tensor, Tensor> gradients(
    const Tensor& student_logits, const Tensor& teacher_logits, const std::optional<Tensor>& labels,
    std::string_view divergence, const Tensor& beta, double skew_lambda, double akl_mu, double jsd_beta,
    const Tensor& inv_temperature, int64_t ignore_index, const Tensor& global_stats,
    const Tensor& global_sums, const Tensor& grad_scale, const Tensor& label_weights,
    bool with_hard_label_term, bool student_grad, bool teacher_grad, const std::optional<Tensor>& akl_gaps) {
  const ForwardSetup setup = prepare_phase(student_logits, teacher_logits, labels, divergence, beta, skew_lambda,
                                           akl_mu, jsd_beta, inv_temperature, ignore_index, student_grad, teacher_grad);
  check_row_table("global_stats", global_stats, setup.view.rows, 6, student_logits);
  check_row_table("global_sums", global_sums, setup.view.rows, 4, student_logits);
  // The label weights' checks but the range one (a local label may be another slice's): prepare_phase passed 0.
  TODI_CHECK(label_weights.scalar_type() == ScalarType::Double && label_weights.dim() == 1 &&
                 label_weights.size(0) == 2 && label_weights.is_contiguous() &&
                 label_weights.device() == student_logits.device(),
             "label_weights must be a contiguous (2,) float64 tensor (soft, hard) on ",
             device_str(student_logits.device()), ", got ", label_weights.scalar_type(), " of shape ",
             shape_str(label_weights.sizes()), " on ", device_str(label_weights.device()));
  if (label_weights.is_cpu()) {  // elsewhere reading them would sync: the Python API checked them
    const double* w = label_weights.const_data_ptr<double>();
    TODI_CHECK(std::isfinite(w[0]) && std::isfinite(w[1]),
                      "label_weights (soft, hard) must be finite, got ", w[0], " and ", w[1]);
  }
  TODI_CHECK(!with_hard_label_term || labels.has_value(), "with_hard_label_term needs labels");
  TODI_CHECK(grad_scale.dim() == 0 && grad_scale.scalar_type() == setup.per_position.scalar_type() &&
                 grad_scale.device() == student_logits.device(),
             "grad_scale must be a 0-dim ", setup.per_position.scalar_type(), " tensor on ",
             device_str(student_logits.device()), ", got ", grad_scale.scalar_type(), " of shape ",
             shape_str(grad_scale.sizes()), " on ", device_str(grad_scale.device()));
  ForwardParams p = forward_params(setup, ignore_index);
  VocabParallelParams vp;
  set_akl_gaps(setup, akl_gaps, student_logits, vp);
  if (setup.view.rows > 0 && (student_grad || teacher_grad)) {
    p.hard_label_weight = with_hard_label_term ? 1.0 : 0.0;  // on or off; the values are label_weights'
    p.label_weights = label_weights.const_data_ptr<double>();
    p.grad_scale = grad_scale.const_data_ptr();
    vp.phase = Phase::kGradients;
    vp.global_stats = global_stats.const_data_ptr<double>();
    vp.global_sums = global_sums.const_data_ptr<double>();
    Run(p, vp, student_logits);
  }
  return {setup.grad_student, setup.grad_teacher};
}

// The AKL search phases: S at one walk's thresholds (remaining_bits > 0), or
// the gap sums at the split (remaining_bits 0). tail_key: (rows,) int64, the
// search's low key.
template <PhaseRunner Run>
Tensor akl_phase(const Tensor& student_logits, const Tensor& teacher_logits,
                     const std::optional<Tensor>& labels, const Tensor& inv_temperature, int64_t ignore_index,
                     const Tensor& global_stats, const Tensor& tail_key, int64_t remaining_bits) {
  const ForwardSetup setup = prepare_phase(student_logits, teacher_logits, labels, "akl", unread_beta(student_logits),
                                           0.1, 0.5, 0.5, inv_temperature, ignore_index, false, false);
  check_row_table("global_stats", global_stats, setup.view.rows, 6, student_logits);
  TODI_CHECK(tail_key.scalar_type() == ScalarType::Long && tail_key.dim() == 1 &&
                 tail_key.size(0) == setup.view.rows && tail_key.is_contiguous() &&
                 tail_key.device() == student_logits.device(),
             "tail_key must be a contiguous (", setup.view.rows, ",) int64 tensor on ",
             device_str(student_logits.device()), ", got ", tail_key.scalar_type(), " of shape ",
             shape_str(tail_key.sizes()), " on ", device_str(tail_key.device()));
  const bool double_math = setup.per_position.scalar_type() == ScalarType::Double;
  const int64_t key_bits = double_math ? math::ProbKey<double>::kBits : math::ProbKey<float>::kBits;
  TODI_CHECK(remaining_bits >= 0 && remaining_bits <= key_bits, "remaining_bits must be in [0, ", key_bits,
                    "] for ", setup.per_position.scalar_type(), " math, got ", remaining_bits);
  const bool walk = remaining_bits > 0;
  Tensor out = new_empty({setup.view.rows, walk ? int64_t{math::kAklCandidates} : 2}, ScalarType::Double,
                         student_logits.device());
  if (setup.view.rows > 0) {
    ForwardParams p = forward_params(setup, ignore_index);
    VocabParallelParams vp;
    vp.phase = walk ? Phase::kAklWalk : Phase::kAklGaps;
    vp.global_stats = global_stats.const_data_ptr<double>();
    vp.akl_low = tail_key.const_data_ptr<int64_t>();
    vp.akl_remaining = static_cast<int>(remaining_bits);
    vp.akl_sums = out.mutable_data_ptr<double>();
    Run(p, vp, student_logits);
  }
  return out;
}

template <PhaseRunner Run>
Tensor akl_walk(const Tensor& student_logits, const Tensor& teacher_logits,
                    const std::optional<Tensor>& labels, const Tensor& inv_temperature, int64_t ignore_index,
                    const Tensor& global_stats, const Tensor& tail_key, int64_t remaining_bits) {
  TODI_CHECK(remaining_bits > 0, "remaining_bits must be positive for a walk, got ", remaining_bits);
  return akl_phase<Run>(student_logits, teacher_logits, labels, inv_temperature, ignore_index, global_stats,
                        tail_key, remaining_bits);
}

template <PhaseRunner Run>
Tensor akl_gaps(const Tensor& student_logits, const Tensor& teacher_logits,
                    const std::optional<Tensor>& labels, const Tensor& inv_temperature, int64_t ignore_index,
                    const Tensor& global_stats, const Tensor& tail_key) {
  return akl_phase<Run>(student_logits, teacher_logits, labels, inv_temperature, ignore_index, global_stats,
                        tail_key, 0);
}

}  // namespace todi_ext::vocab_parallel
