// What every backend's kernels are given: plain structs of pointers, dtypes
// and sizes, built once on the host by op_common.cpp and passed by value
// to the CPU kernel or a CUDA launch.
#pragma once

#include <torch/headeronly/core/ScalarType.h>  // c10::ScalarType, header-only (stable ABI)

#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "todi_ext/row_layout.h"
#include "todi_ext/divergence_math.h"

namespace todi_ext {

// Bytes per element of the kernels' dtypes (float64, float32, bfloat16,
// float16): the only ones the ops accept.
TODI_HOST_DEVICE int64_t element_size(c10::ScalarType t) {
  return t == c10::ScalarType::Double ? 8 : t == c10::ScalarType::Float ? 4 : 2;
}

// A (..., vocab) input whose rows are contiguous but may sit anywhere.
struct RowMatrix {
  const void* data = nullptr;
  c10::ScalarType dtype = c10::ScalarType::Float;
  RowLayout layout;
};

// A contiguous (rows, vocab) output; data == nullptr: not wanted.
struct OutMatrix {
  void* data = nullptr;
  c10::ScalarType dtype = c10::ScalarType::Float;
};

// Vocabulary-parallel phases (todi_ext.distributed): every rank holds a
// slice of the vocabulary and runs one stage of the row's work on it per
// call, with the collectives in between. The phase and its tables travel
// beside the ForwardParams of the slice, never inside them: the fused op's
// kernels know nothing of phases. kFused (the CPU kernel's row function
// serves both) means "the whole row in one call".
// AKL adds two phases between the row statistics and the partial sums: the
// head/tail split is a search over the whole row (math::AklTailSearch), so
// each of its walks is a kernel call on every slice and an all-reduce.
enum class Phase : int { kFused = 0, kRowStats = 1, kPartialSums = 2, kGradients = 3, kAklWalk = 4, kAklGaps = 5 };

struct VocabParallelParams {
  Phase phase = Phase::kFused;
  // kRowStats writes, per row, this slice's (max, sum of exp(x - max)) of
  // z / T, s / T and z (the last pair with hard_label_weight != 0): (rows, 6).
  double* stats = nullptr;
  // The merged pairs of all slices, as (max, log sum): read by the later phases.
  const double* global_stats = nullptr;
  // kPartialSums writes this slice's sums of loss, u and v, and z[label] if
  // the label is in this slice (else 0): (rows, 4).
  double* sums = nullptr;
  // All slices' sums (u and v used), read by kGradients.
  const double* global_sums = nullptr;
  // AKL. The search's state, the same on every rank: per row the key of
  // the low end of the window (AklTailSearch::low) and, for all rows, the
  // bits still undecided (0 once the search is done). kAklWalk writes this
  // slice's S at the walk's kAklCandidates thresholds, (rows, 15); kAklGaps
  // (remaining 0) this slice's (g_head, g_tail) at the found split, (rows, 2).
  const int64_t* akl_low = nullptr;
  int akl_remaining = 0;
  double* akl_sums = nullptr;
  // All slices' (g_head, g_tail), read by kPartialSums and kGradients for AKL.
  const double* akl_global_gaps = nullptr;
};

// The float64 table a phase writes, `width` values per position; none for
// kFused and kGradients, which write the loss and the gradients.
struct PhaseTable {
  double* data = nullptr;
  int width = 0;
};

TODI_HOST_DEVICE PhaseTable phase_table(const VocabParallelParams& vp) {
  switch (vp.phase) {
    case Phase::kRowStats: return {vp.stats, 6};
    case Phase::kPartialSums: return {vp.sums, 4};
    case Phase::kAklWalk: return {vp.akl_sums, math::kAklCandidates};
    case Phase::kAklGaps: return {vp.akl_sums, 2};
    default: return {};
  }
}

struct ForwardParams {
  RowMatrix student;
  RowMatrix teacher;
  int64_t rows = 0;
  int64_t vocab = 0;
  const int64_t* labels = nullptr;  // (rows,), or nullptr for "no labels"
  int64_t ignore_index = -100;
  math::Divergence divergence = math::Divergence::kToDi;
  math::DivergenceParams divergence_params;
  const double* inv_temperature = nullptr;  // 1 / T, one value in the logits' memory (device for CUDA)
  const double* beta = nullptr;             // ToDi's sharpness, likewise; read into DivergenceParams::beta
  // loss = soft_label_weight * divergence + hard_label_weight * cross_entropy(z at T = 1,
  // label), in the same pass (hard_label_weight != 0 needs labels; a label outside
  // [0, vocab) makes its row NaN on CUDA, where checking would sync).
  double soft_label_weight = 1.0;
  double hard_label_weight = 0.0;
  // (soft, hard) in the logits' memory, or nullptr: when set, the kernel
  // reads the two weights from there (hard_label_weight != 0 still says whether
  // the cross-entropy is on).
  const double* label_weights = nullptr;
  TODI_HOST_DEVICE double effective_soft_label_weight() const { return label_weights ? label_weights[0] : soft_label_weight; }
  TODI_HOST_DEVICE double effective_hard_label_weight() const { return label_weights ? label_weights[1] : hard_label_weight; }
  bool double_math = false;          // accumulate in float64 (float64 inputs)
  void* loss = nullptr;              // (rows,) per-position losses, float32 (float64 with double_math)
  const void* grad_scale = nullptr;  // one value (loss dtype) multiplying the gradients, or nullptr
  OutMatrix grad_student;            // d loss / d student logits
  OutMatrix grad_teacher;            // d loss / d teacher logits
};

// out = grad * scale (rows of out contiguous). In place when out == grad,
// and then rows whose scale is exactly 1 are skipped.
struct ScaleGradParams {
  RowMatrix grad;
  void* out = nullptr;
  int64_t rows = 0;
  int64_t vocab = 0;
  const void* scale = nullptr;  // one value, or one per row
  c10::ScalarType scale_dtype = c10::ScalarType::Float;
  bool scale_per_row = false;
};

// Calls fn(std::integral_constant<Divergence, d>{}): turns the runtime
// divergence into the compile-time parameter of the kernel templates.
template <class Fn>
void dispatch_divergence(math::Divergence d, Fn&& fn) {
  using math::Divergence;
  switch (d) {
    case Divergence::kToDi: return fn(std::integral_constant<Divergence, Divergence::kToDi>{});
    case Divergence::kFKL: return fn(std::integral_constant<Divergence, Divergence::kFKL>{});
    case Divergence::kRKL: return fn(std::integral_constant<Divergence, Divergence::kRKL>{});
    case Divergence::kTVD: return fn(std::integral_constant<Divergence, Divergence::kTVD>{});
    case Divergence::kSKL: return fn(std::integral_constant<Divergence, Divergence::kSKL>{});
    case Divergence::kSRKL: return fn(std::integral_constant<Divergence, Divergence::kSRKL>{});
    case Divergence::kGJSD: return fn(std::integral_constant<Divergence, Divergence::kGJSD>{});
    case Divergence::kAKL: return fn(std::integral_constant<Divergence, Divergence::kAKL>{});
  }
}

// Calls fn(std::integral_constant<Phase, P>{}) for a phase that has a kernel
// of its own; kFused has none (the fused op's kernels serve it): an error.
template <class Fn>
void dispatch_phase(Phase phase, Fn&& fn) {
  switch (phase) {
    case Phase::kRowStats: return fn(std::integral_constant<Phase, Phase::kRowStats>{});
    case Phase::kPartialSums: return fn(std::integral_constant<Phase, Phase::kPartialSums>{});
    case Phase::kGradients: return fn(std::integral_constant<Phase, Phase::kGradients>{});
    case Phase::kAklWalk: return fn(std::integral_constant<Phase, Phase::kAklWalk>{});
    case Phase::kAklGaps: return fn(std::integral_constant<Phase, Phase::kAklGaps>{});
    case Phase::kFused: break;
  }
  throw std::invalid_argument("dispatch_phase: not a vocabulary-parallel phase");
}

}  // namespace todi_ext
