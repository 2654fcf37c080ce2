// Per-element ToDi math, shared by every backend.
//
// The CPU kernel instantiates these templates with at::vec::Vectorized<float>
// (and plain float/double for reductions); the CUDA kernel instantiates them
// with float in device code. Keeping the formulas here is what makes the
// backends compute the same thing. Definitions: docs/spec.md.
//
// Notation for one position (row) and vocabulary entry i:
//   log q_i = z_i / T - lse_z      (student)     log p_i = s_i / T - lse_s (teacher)
//   r_i = log p_i - log q_i,  a_i = sigmoid(beta * r_i)  (stop-gradient)
//   D   = sum_i r_i * (a_i p_i - (1 - a_i) q_i)
//   u_i = dD/dlog q_i = (1 - a_i) q_i (1 - r_i) - a_i p_i
//   v_i = dD/dlog p_i = a_i p_i (r_i + 1) - (1 - a_i) q_i
//   dD/dz_j = (u_j - q_j * sum u) / T      dD/ds_j = (v_j - p_j * sum v) / T
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TODI_HOST_DEVICE __host__ __device__ __forceinline__
#define TODI_UNROLL _Pragma("unroll")
#else
#define TODI_HOST_DEVICE inline
#define TODI_UNROLL
#endif

namespace todi_ext::math {

template <class F>
constexpr F kLog2e = F(1.4426950408889634);  // log2(e)

// Elementwise functions a value type must provide. Scalars are defined here;
// a backend adds specializations for its vector types.
template <class F>
struct Ops;

// In CUDA device code float exp and reciprocal are the hardware's
// approximations (MUFU ex2/rcp, ~2 ulp, results below 2^-126 flushed to 0:
// they weigh nothing in any row sum) instead of the ~10-instruction IEEE
// routines: the kernels evaluate ~8 per entry and were instruction-bound.
// The extra rounding of x * log2(e) is no larger than the rounding x itself
// already carries (x = log p = (logit / T - max) - log sum). Host code keeps
// the libm functions.
TODI_HOST_DEVICE float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return ::exp2f(x);
#endif
}

TODI_HOST_DEVICE float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return fast_exp2(x * kLog2e<float>);
#else
  return ::expf(x);
#endif
}

TODI_HOST_DEVICE float fast_recip(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.0f / x;
#endif
}

// a * b rounded to F, never fused into a following add: the kernels form
// x / T as this product everywhere (see RowLse in each backend). nvcc fuses
// a plain a * b - c into an FMA (the intrinsics below it may not); host
// code is built with -ffp-contract=off.
TODI_HOST_DEVICE float rounded_product(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

TODI_HOST_DEVICE double rounded_product(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

template <>
struct Ops<float> {
  static TODI_HOST_DEVICE float exp(float x) { return fast_exp(x); }
  static TODI_HOST_DEVICE float exp2(float x) { return fast_exp2(x); }
  static TODI_HOST_DEVICE float mul_rn(float a, float b) { return rounded_product(a, b); }
  static TODI_HOST_DEVICE float recip(float x) { return fast_recip(x); }
  static TODI_HOST_DEVICE float log(float x) { return ::logf(x); }
  static TODI_HOST_DEVICE float log1p(float x) { return ::log1pf(x); }
  static TODI_HOST_DEVICE float abs(float x) { return ::fabsf(x); }
  static TODI_HOST_DEVICE float max(float a, float b) { return a > b ? a : b; }
  static TODI_HOST_DEVICE float min(float a, float b) { return a < b ? a : b; }
  static TODI_HOST_DEVICE float sign(float x) { return x > 0.f ? 1.f : (x < 0.f ? -1.f : 0.f); }
};

template <>
struct Ops<double> {
  static TODI_HOST_DEVICE double exp(double x) { return ::exp(x); }
  static TODI_HOST_DEVICE double exp2(double x) { return ::exp2(x); }
  static TODI_HOST_DEVICE double mul_rn(double a, double b) { return rounded_product(a, b); }
  static TODI_HOST_DEVICE double recip(double x) { return 1.0 / x; }
  static TODI_HOST_DEVICE double log(double x) { return ::log(x); }
  static TODI_HOST_DEVICE double log1p(double x) { return ::log1p(x); }
  static TODI_HOST_DEVICE double abs(double x) { return ::fabs(x); }
  static TODI_HOST_DEVICE double max(double a, double b) { return a > b ? a : b; }
  static TODI_HOST_DEVICE double min(double a, double b) { return a < b ? a : b; }
  static TODI_HOST_DEVICE double sign(double x) { return x > 0. ? 1. : (x < 0. ? -1. : 0.); }
};

// Everything one vocabulary entry contributes.
template <class F>
struct EntryTerms {
  F loss;  // r * (a p - (1 - a) q)
  F u;     // dD / dlog q
  F v;     // dD / dlog p
  F p;     // teacher probability
  F q;     // student probability
};

// ToDi's terms from the probabilities p, q and r = log p - log q. a =
// sigmoid(beta r); for beta = 1 that is p / (p + q): one reciprocal instead
// of an exp and a reciprocal (kUnitBeta; p + q is held above the smallest
// normal so two flushed probabilities give a = 0, and their terms weigh 0).
template <bool kUnitBeta, class F>
TODI_HOST_DEVICE EntryTerms<F> todi_terms(F p, F q, F r, F beta) {
  using O = Ops<F>;
  const F one(1);
  F a;
  if constexpr (kUnitBeta) {
    a = p * O::recip(O::max(p + q, F(std::numeric_limits<float>::min())));
  } else {
    // exp overflowing to inf gives a = 0 and underflowing gives a = 1: the
    // exact limits of the sigmoid, so no clamping is needed.
    a = O::recip(one + O::exp(F(0) - beta * r));
  }
  const F ap = a * p;
  const F bq = (one - a) * q;
  return {r * (ap - bq), bq * (one - r) - ap, ap * (r + one) - bq, p, q};
}

// ------------------------------------------------------------ divergences
// Every divergence here is a sum over entries of f(log p_i, log q_i), so one
// kernel serves them all: it needs, per entry, f (loss), u = df/dlog q and
// v = df/dlog p; log_softmax_grad() turns u and v into logit gradients.
// Derivations: docs/divergences.md. AKL mixes FKL and RKL with weights that
// depend on the whole row (see AklTailSearch below); the kernels find them
// first and put them into a per-row copy of DivergenceParams.
enum class Divergence : int { kToDi = 0, kFKL = 1, kRKL = 2, kTVD = 3, kSKL = 4, kSRKL = 5, kGJSD = 6, kAKL = 7 };

struct DivergenceParams {
  double beta = 1.0;         // ToDi sharpness
  double skew_lambda = 0.1;  // SKL / SRKL
  double jsd_beta = 0.5;     // generalized JSD: m = jsd_beta p + (1 - jsd_beta) q ("js" is 0.5)
  double akl_mu = 0.5;       // AKL: the tail holds the smallest teacher probabilities summing to <= mu
  // AKL's per-row weights g_head / (g_head + g_tail) and g_tail / (...);
  // set by the kernel for each row before the terms are computed.
  double akl_head_weight = 0.5;
  double akl_tail_weight = 0.5;
  // Logs of the mixing weights, computed once on the host (set_logs): the
  // kernels would otherwise evaluate them in float64 for every entry.
  double log_skew_lambda = 0, log1m_skew_lambda = 0;  // log(lambda), log(1 - lambda)
  double log_jsd_beta = 0, log1m_jsd_beta = 0;        // log(b), log(1 - b)

  void set_logs() {
    log_skew_lambda = std::log(skew_lambda);
    log1m_skew_lambda = std::log1p(-skew_lambda);
    log_jsd_beta = std::log(jsd_beta);
    log1m_jsd_beta = std::log1p(-jsd_beta);
  }
};

// log(w_a e^la + w_b e^lb) from log-weights, stable when either term
// underflows (la, lb finite).
template <class F>
TODI_HOST_DEVICE F log_mix(F log_wa, F la, F log_wb, F lb) {
  using O = Ops<F>;
  const F x = log_wa + la;
  const F y = log_wb + lb;
  const F hi = O::max(x, y);
  return hi + O::log1p(O::exp(O::min(x, y) - hi));
}

// The linear weights (w_p, w_q) of the mixture m = w_p p + w_q q that SKL,
// SRKL and GJSD compare against.
template <Divergence D>
TODI_HOST_DEVICE void mix_weights(const DivergenceParams& prm, double& w_p, double& w_q) {
  static_assert(D == Divergence::kSKL || D == Divergence::kSRKL || D == Divergence::kGJSD);
  const double a = D == Divergence::kGJSD ? prm.jsd_beta : prm.skew_lambda;
  w_p = D == Divergence::kSRKL ? 1 - a : a;
  w_q = D == Divergence::kSRKL ? a : 1 - a;
}

template <Divergence D>
constexpr bool kHasMix = D == Divergence::kSKL || D == Divergence::kSRKL || D == Divergence::kGJSD;

// The terms of one entry given its log-probabilities and probabilities
// (p = exp(log p), q = exp(log q), which a kernel may hold already).
// kUnitBeta: ToDi's beta is 1 (todi_terms). kDirectMix: SKL/SRKL/GJSD's
// mixture as log(w_p p + w_q q) and its ratios as divisions, one log and
// one division instead of the log-domain mix's exp, log1p and exp; only
// where the mixture is a normal number well above underflow (the caller
// checks), since p and q lose their relative accuracy there.
template <Divergence D, bool kUnitBeta = false, bool kDirectMix = false, class F>
TODI_HOST_DEVICE EntryTerms<F> divergence_terms(F log_p, F log_q, F p, F q, const DivergenceParams& prm) {
  using O = Ops<F>;
  const F r = log_p - log_q;
  if constexpr (D == Divergence::kToDi) {
    return todi_terms<kUnitBeta>(p, q, r, F(prm.beta));
  } else {
    const F one(1), half(0.5);
    if constexpr (D == Divergence::kFKL) {  // sum p (log p - log q)
      return {p * r, F(0) - p, p * r + p, p, q};
    } else if constexpr (D == Divergence::kRKL) {  // sum q (log q - log p)
      return {F(0) - q * r, q - q * r, F(0) - q, p, q};
    } else if constexpr (D == Divergence::kTVD) {  // 0.5 sum |p - q|; zero gradient where p == q
      const F sgn = O::sign(p - q);
      return {half * O::abs(p - q), F(0) - half * q * sgn, half * p * sgn, p, q};
    } else if constexpr (D == Divergence::kSKL) {  // KL(p || lam p + (1 - lam) q)
      const F log_lam(prm.log_skew_lambda), log_rest(prm.log1m_skew_lambda);
      F lmix, w;  // w = p (1 - lam) q / mix
      if constexpr (kDirectMix) {
        double w_p, w_q;
        mix_weights<D>(prm, w_p, w_q);
        const F mix = F(w_p) * p + F(w_q) * q;
        lmix = O::log(mix);
        w = p * (F(w_q) * q / mix);
      } else {
        lmix = log_mix(log_lam, log_p, log_rest, log_q);
        w = p * O::exp(log_rest + log_q - lmix);
      }
      return {p * (log_p - lmix), F(0) - w, p * (log_p - lmix) + w, p, q};
    } else if constexpr (D == Divergence::kSRKL) {  // KL(q || (1 - lam) p + lam q)
      const F log_lam(prm.log_skew_lambda), log_rest(prm.log1m_skew_lambda);
      F lmix, w;  // w = q (1 - lam) p / mix
      if constexpr (kDirectMix) {
        double w_p, w_q;
        mix_weights<D>(prm, w_p, w_q);
        const F mix = F(w_p) * p + F(w_q) * q;
        lmix = O::log(mix);
        w = q * (F(w_p) * p / mix);
      } else {
        lmix = log_mix(log_rest, log_p, log_lam, log_q);
        w = q * O::exp(log_rest + log_p - lmix);
      }
      return {q * (log_q - lmix), q * (log_q - lmix) + w, F(0) - w, p, q};
    } else if constexpr (D == Divergence::kAKL) {  // w_head FKL + w_tail RKL, weights detached
      const F wh(prm.akl_head_weight), wt(prm.akl_tail_weight);
      const F pr = p * r, qr = q * r;
      return {wh * pr - wt * qr, wt * (q - qr) - wh * p, wh * (pr + p) - wt * q, p, q};
    } else {  // kGJSD: b KL(p || m) + (1 - b) KL(q || m), m = b p + (1 - b) q
      static_assert(D == Divergence::kGJSD);
      const F b(prm.jsd_beta);
      const F log_b(prm.log_jsd_beta), log_rest(prm.log1m_jsd_beta);
      F lm;
      if constexpr (kDirectMix) {
        double w_p, w_q;
        mix_weights<D>(prm, w_p, w_q);
        lm = O::log(F(w_p) * p + F(w_q) * q);
      } else {
        lm = log_mix(log_b, log_p, log_rest, log_q);
      }
      const F fp = b * p * (log_p - lm);
      const F fq = (one - b) * q * (log_q - lm);
      return {fp + fq, fq, fp, p, q};
    }
  }
}

template <Divergence D, bool kUnitBeta = false, class F>
TODI_HOST_DEVICE EntryTerms<F> divergence_entry(F log_p, F log_q, const DivergenceParams& prm) {
  return divergence_terms<D, kUnitBeta>(log_p, log_q, Ops<F>::exp(log_p), Ops<F>::exp(log_q), prm);
}

// ------------------------------------------------------------------- AKL
// AKL splits the teacher distribution of a row, sorted ascending, into a tail
// (cumulative probability <= mu) and a head, and weighs FKL by the head's
// share of sum |p - q| and RKL by the tail's. Ties in p (common with bf16
// logits) would make "cumulative" depend on the sort order, so the split is
// defined order-free: entry i is in the tail iff
//     S(p_i) = sum of p_j over all j with p_j <= p_i   is <= mu.
// Equivalently: tail iff p_i <= p*, where p* is the largest probability value
// with S(p*) <= mu. No sort is needed to find p*: for p >= 0 the bit pattern
// of p, read as an unsigned integer (the "key"), orders like p, and S is
// non-decreasing in it, so p* is found digit by digit from the top of the key
// - a k-ary search. Each pass evaluates S at kAklCandidates evenly spaced
// keys with one walk over the row (one compare-and-add per candidate and
// entry, no atomics, deterministic block sums) and fixes kAklDigitBits bits of
// p*: ceil(30 / 4) = 8 passes for float32 probabilities (p < 2, so keys have
// 30 significant bits), 16 for float64. Masked entries (a +-inf logit) never
// join the sums. Both kernels drive this struct the same way (the CPU one
// also drops the entries already decided between passes: window_low/high):
//
//   AklTailSearch<F> search;
//   while (!search.done()) {
//     F sums[kAklCandidates] = {};            // sums[j] = S(search.threshold(j))
//     for each unmasked entry: for j: sums[j] += p <= search.threshold(j) ? p : 0
//     reduce sums over the row; search.advance(sums, mu);
//   }
//   tail iff p <= search.tail_threshold()
constexpr int kAklDigitBits = 4;
constexpr int kAklCandidates = (1 << kAklDigitBits) - 1;

// The key of a probability of type F (float or double): its bits as an
// unsigned integer. p < 2 leaves the top two bits clear: 30 significant
// bits for float, 62 for double.
template <class F>
struct ProbKey {
  static_assert(sizeof(F) == 4 || sizeof(F) == 8, "float or double");
  using U = std::conditional_t<sizeof(F) == 4, uint32_t, uint64_t>;
  static constexpr int kBits = sizeof(F) == 4 ? 30 : 62;
  static TODI_HOST_DEVICE F value(U key) {
    F x;
    memcpy(&x, &key, sizeof x);
    return x;
  }
};

template <class F>
struct AklTailSearch {
  using U = typename ProbKey<F>::U;
  U low = 0;  // S(low) <= mu (S(0) sums only exact zeros); p* in [low, low + 2^remaining)
  int remaining = ProbKey<F>::kBits;

  TODI_HOST_DEVICE bool done() const { return remaining == 0; }
  TODI_HOST_DEVICE int digit_bits() const { return remaining < kAklDigitBits ? remaining : kAklDigitBits; }
  // Candidate j = 0 .. kAklCandidates-1 is the key low + (j + 1) * 2^(remaining - digit bits); candidates
  // past the digit's range get -1, which no probability is <= (their sums stay 0 and are not used).
  TODI_HOST_DEVICE F threshold(int j) const {
    const int bits = digit_bits();
    if (j + 1 >= (1 << bits)) return F(-1);
    return ProbKey<F>::value(low + (static_cast<U>(j + 1) << (remaining - bits)));
  }
  // Probabilities still undecided: low < key < low + 2^remaining. Entries
  // below always count in S, entries above never will (a backend may drop
  // both from later walks, adding S(low) to its sums).
  TODI_HOST_DEVICE F window_low() const { return ProbKey<F>::value(low); }
  TODI_HOST_DEVICE F window_high() const { return ProbKey<F>::value(low + (static_cast<U>(1) << remaining)); }
  // sums[j] = S(threshold(j)); keeps the largest candidate whose S is <= mu
  // and returns its digit (0: low stays, S(low) unchanged; d > 0: S of the new
  // low is sums[d - 1]). (An array reference and an unrolled loop: a pointer
  // would push the CUDA kernel's per-thread sums into local memory.)
  TODI_HOST_DEVICE int advance(const F (&sums)[kAklCandidates], F mu) {
    const int bits = digit_bits();
    int digit = 0;
    TODI_UNROLL
    for (int j = 0; j < kAklCandidates; ++j) {
      if (j + 1 < (1 << bits) && sums[j] <= mu) digit = j + 1;
    }
    low += static_cast<U>(digit) << (remaining - bits);
    remaining -= bits;
    return digit;
  }
  TODI_HOST_DEVICE F tail_threshold() const { return ProbKey<F>::value(low); }
};

// The weights of FKL (head) and RKL (tail) from g = sum |p - q| over each
// part. When both are 0, p == q on every entry and both divergences and their
// gradients vanish, so any weights do: 1/2 each.
template <class F>
TODI_HOST_DEVICE void set_akl_weights(F g_head, F g_tail, DivergenceParams& prm) {
  const F total = g_head + g_tail;
  prm.akl_head_weight = total > F(0) ? static_cast<double>(g_head / total) : 0.5;
  prm.akl_tail_weight = total > F(0) ? static_cast<double>(g_tail / total) : 0.5;
}

// Gradient of sum_i f_i with respect to a logit x_j when f depends on x only
// through log_softmax(x / T): (w_j - prob_j * sum_i w_i) / T, where
// w_i = df_i / dlog prob_i.
template <class F>
TODI_HOST_DEVICE F log_softmax_grad(F weight, F prob, F weight_sum, F inv_temperature) {
  return (weight - prob * weight_sum) * inv_temperature;
}

// The rescale of a LogSumExp: exp of a difference of maxima.
template <class T>
struct NaturalRescale {
  TODI_HOST_DEVICE T operator()(T difference) const { return Ops<T>::exp(difference); }
};

// Online log-sum-exp: a running (max, sum of exp(x - max)) pair.
// merge() folds in another pair. -inf entries contribute nothing; a NaN or
// +inf anywhere makes the result non-finite, which the kernels turn into a
// NaN row, as log_softmax would. Rescale turns a difference of maxima into
// the factor between their sums (a kernel that keeps maxima in other units
// brings its own: the CUDA register-row kernel's are raw logits).
template <class T, class Rescale = NaturalRescale<T>>
struct LogSumExp {
  T max = -std::numeric_limits<T>::infinity();
  T sum = T(0);
  Rescale rescale{};

  TODI_HOST_DEVICE void merge(T other_max, T other_sum) {
    if (other_max == -std::numeric_limits<T>::infinity()) {
      // Nothing to add (and exp(-inf - -inf) would be NaN), except a NaN
      // sum: a part whose entries were -inf and one NaN holds (-inf, NaN),
      // and the NaN must reach the row whatever the merge order.
      sum += other_sum * T(0);
      return;
    }
    if (other_max > max) {
      sum = sum * rescale(max - other_max) + other_sum;
      max = other_max;
    } else {  // also taken when either max is NaN, which then propagates
      sum = sum + other_sum * rescale(other_max - max);
    }
  }
  // The log-sum-exp is max + log(sum); the kernels keep the two apart.
  // The empty state (merges leave others unchanged), with this one's rescale.
  TODI_HOST_DEVICE LogSumExp identity() const { return {-std::numeric_limits<T>::infinity(), T(0), rescale}; }
};

template <class T>
TODI_HOST_DEVICE bool is_finite(T x) {
  return x - x == T(0);  // false for inf and NaN; works in device code too
}

}  // namespace todi_ext::math
