// The CPU kernel for every divergence (a template parameter; the per-entry
// math is math::divergence_terms). This file is compiled once per instruction set with
// CPU_CAPABILITY set to DEFAULT, AVX2 or AVX512 (see CMakeLists.txt), which
// selects the width of at::vec::Vectorized; everything here lives in a
// namespace named after the capability so the copies never collide.
//
// Per row: (1) online log-sum-exp of z/T and s/T, (2) loss and the row sums
// U = sum u, V = sum v, (3) the gradients, which need U and V. In the usual
// step (student gradient only) pass 1 keeps its exponentials in the row
// scratch and pass 2 turns them into p and q by one product (forward_row),
// so ToDi, FKL, RKL and TVD evaluate two exps per entry in all. The row is
// walked in chunks of kChunk entries of the accumulation type: read in place
// where the input already is that type (a whole chunk), else converted into
// a small buffer (it stays in L1), so the math below is written once for
// every input dtype and has no scalar tail: the buffer is padded to whole
// vectors with -inf, which the masking already ignores.
//
// Row sums are blocked: vector partials over one chunk (at most kChunk /
// lanes additions per lane), then the chunk totals added in double. A
// lane-wise sum over the whole row lost accuracy linearly in V (3.6e-5
// relative at V = 262144 with 8 lanes).
#include "distill_kernel.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>

#include "todi_ext/divergence_math.h"

#ifndef CPU_CAPABILITY
#error "CPU_CAPABILITY must be defined (DEFAULT, AVX2 or AVX512)"
#endif

namespace todi_ext::math {
// The vector specializations the shared math needs.
template <class T>
struct Ops<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V exp(const V& x) { return x.exp(); }
  static V log(const V& x) { return x.log(); }
  // log1p from log: log(u) x / (u - 1), u = 1 + x rounded, is within a few
  // ulp of log1p(x) (Goldberg 1991); x where u rounds to 1. ATen's AVX512
  // log1p (Sleef's) is many times slower than log (NOTES: "Measurements
  // that were in code comments").
  static V log1p(const V& x) {
    const V one(T(1));
    const V u = x + one;
    const V r = V::blendv(u.log() * (x / (u - one)), x, u == one);
    return V::blendv(r, x, x == V(std::numeric_limits<T>::infinity()));
  }
  static V abs(const V& x) { return x.abs(); }
  static V recip(const V& x) { return x.reciprocal(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  static V sign(const V& x) {
    const V zero(T(0));
    return V::blendv(zero, V(T(1)), x > zero) - V::blendv(zero, V(T(1)), x < zero);
  }
};
}  // namespace todi_ext::math

namespace todi_ext::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// 1024 entries: a chunk's buffers (at most four of the 4 KiB float32
// arrays of RowChunk are live at once) stay in a 32 KiB L1 with room for
// the input stream.
constexpr int64_t kChunk = 1024;

template <class T>
T hsum(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T total = 0;
  for (int i = 0; i < Vectorized<T>::size(); ++i) total += lanes[i];
  return total;
}

// Max of the lanes; a NaN lane wins, as in torch.max.
template <class T>
T hmax(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T best = lanes[0];
  for (int i = 1; i < Vectorized<T>::size(); ++i) {
    if (std::isnan(lanes[i]) || lanes[i] > best) best = lanes[i];
  }
  return best;
}

// x * factor (1/T, or pass 2's factor for its kept exponentials), rounded
// to acc_t and never fused into the next addition: the AVX2/AVX512 copies
// are built with -mfma, and GCC contracts a product and a sum of vectors
// into an FMA, which differs from the rounded product by up to half an ulp
// of x / T. The empty asm makes the product opaque, at no
// instruction cost (a blanket -ffp-contract=off was slower; NOTES); the
// DEFAULT copy has no FMA on x86 and is built with -ffp-contract=off for
// other targets (CMakeLists.txt).
template <class acc_t>
[[gnu::always_inline]] inline Vectorized<acc_t> scaled(const Vectorized<acc_t>& x, const Vectorized<acc_t>& factor) {
  Vectorized<acc_t> y = x * factor;
#if defined(__GNUC__) && (defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512))
#if defined(CPU_CAPABILITY_AVX512)
  using Raw = std::conditional_t<std::is_same_v<acc_t, float>, __m512, __m512d>;
#else
  using Raw = std::conditional_t<std::is_same_v<acc_t, float>, __m256, __m256d>;
#endif
  Raw raw = y;
  asm("" : "+v"(raw));
  y = Vectorized<acc_t>(raw);
#endif
  return y;
}

// exp(d) for d <= 0 (-inf gives 0, NaN stays NaN), inline: pass 1's exps
// through ATen's exp are a call to Sleef per vector (a large share of the
// op's time, NOTES; and the call spills the loop's registers). float:
// n = round(d log2 e), r = d - n ln 2 in two parts (Cody-Waite; n C1 is
// exact), exp(r) by Cephes' expf polynomial, times 2^n from the exponent
// bits; results below 2^-126 (d < -87.3) flush to 0 (they weigh < 1e-38 of
// the row max's 1 in any sum). K vectors at once: for float, step by step
// across them, so that their independent chains interleave (chunk_exps);
// each result is the same as alone. double: ATen's exp, one call a vector.
template <class acc_t, int K>
[[gnu::always_inline]] inline void exp_nonpositive(const Vectorized<acc_t> (&d)[K], Vectorized<acc_t> (&out)[K]) {
  if constexpr (!std::is_same_v<acc_t, float>) {
    for (int k = 0; k < K; ++k) out[k] = d[k].exp();
  } else {
    using Vec = Vectorized<float>;
    using IVec = Vectorized<int32_t>;
    Vec x[K], n[K], r[K], poly[K];
    for (int k = 0; k < K; ++k) x[k] = at::vec::maximum(d[k], Vec(-104.f));  // NaN stays NaN; -inf -> -104, which flushes
    for (int k = 0; k < K; ++k) n[k] = (x[k] * Vec(1.44269504088896341f) + Vec(0.5f)).floor();
    for (int k = 0; k < K; ++k) r[k] = x[k] - n[k] * Vec(0.693359375f);
    for (int k = 0; k < K; ++k) r[k] = r[k] - n[k] * Vec(-2.12194440e-4f);
    for (int k = 0; k < K; ++k) poly[k] = Vec(1.9875691500e-4f) * r[k] + Vec(1.3981999507e-3f);
    for (int k = 0; k < K; ++k) poly[k] = poly[k] * r[k] + Vec(8.3334519073e-3f);
    for (int k = 0; k < K; ++k) poly[k] = poly[k] * r[k] + Vec(4.1665795894e-2f);
    for (int k = 0; k < K; ++k) poly[k] = poly[k] * r[k] + Vec(1.6666665459e-1f);
    for (int k = 0; k < K; ++k) poly[k] = poly[k] * r[k] + Vec(5.0000001201e-1f);
    for (int k = 0; k < K; ++k) {
      const Vec e = poly[k] * (r[k] * r[k]) + r[k] + Vec(1.f);
      const IVec biased = at::vec::convert_to_int_of_same_size(n[k]) + IVec(127);
      const Vec scale = at::vec::cast<float>(biased * IVec(1 << 23));
      out[k] = Vec::blendv(e * scale, Vec(0.f), n[k] < Vec(-126.f));
    }
  }
}

template <class acc_t>
[[gnu::always_inline]] inline Vectorized<acc_t> exp_nonpositive(const Vectorized<acc_t>& d) {
  const Vectorized<acc_t> in[1] = {d};
  Vectorized<acc_t> out[1];
  exp_nonpositive<acc_t, 1>(in, out);
  return out[0];
}

// n rounded up to a whole number of vectors: the length every chunk loop walks.
template <class acc_t>
int64_t padded_length(int64_t n) {
  constexpr int64_t width = Vectorized<acc_t>::size();
  return (n + width - 1) / width * width;
}

// The ScalarType of the accumulation type (float or double).
template <class acc_t>
constexpr c10::ScalarType kAccType = std::is_same_v<acc_t, float> ? c10::ScalarType::Float : c10::ScalarType::Double;

// Converts n entries of src (any supported dtype) to acc_t, padding the
// buffer with -inf up to a whole number of vectors. Returns the padded count.
template <class acc_t>
int64_t load_chunk(const void* src, c10::ScalarType dtype, int64_t n, acc_t* dst) {
  switch (dtype) {
    case c10::ScalarType::Float:
      at::vec::convert(static_cast<const float*>(src), dst, n);
      break;
    case c10::ScalarType::Double:
      at::vec::convert(static_cast<const double*>(src), dst, n);
      break;
    case c10::ScalarType::BFloat16:
      at::vec::convert(static_cast<const c10::BFloat16*>(src), dst, n);
      break;
    case c10::ScalarType::Half:
      at::vec::convert(static_cast<const c10::Half*>(src), dst, n);
      break;
    default:
      throw std::invalid_argument("todi_ext: unsupported dtype");  // the op accepts none
  }
  const int64_t padded = padded_length<acc_t>(n);
  std::fill(dst + n, dst + padded, -std::numeric_limits<acc_t>::infinity());
  return padded;
}

// The n entries of a row chunk at src as acc_t, padded with -inf to
// padded_length(n): src itself where it already is that (a whole chunk of
// acc_t), else converted into buffer.
template <class acc_t>
const acc_t* chunk_entries(const void* src, c10::ScalarType dtype, int64_t n, acc_t* buffer) {
  if (dtype == kAccType<acc_t> && n == kChunk) return static_cast<const acc_t*>(src);
  load_chunk(src, dtype, n, buffer);
  return buffer;
}

template <class acc_t>
void store_chunk(const acc_t* src, int64_t n, void* dst, c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float:
      at::vec::convert(src, static_cast<float*>(dst), n);
      break;
    case c10::ScalarType::Double:
      at::vec::convert(src, static_cast<double*>(dst), n);
      break;
    case c10::ScalarType::BFloat16:
      at::vec::convert(src, static_cast<c10::BFloat16*>(dst), n);
      break;
    case c10::ScalarType::Half:
      at::vec::convert(src, static_cast<c10::Half*>(dst), n);
      break;
    default:
      throw std::invalid_argument("todi_ext: unsupported dtype");  // the op accepts none
  }
}

template <class T>
void fill_row(void* dst, c10::ScalarType dtype, int64_t offset, int64_t n, T value) {
  alignas(64) T buffer[kChunk];
  std::fill(buffer, buffer + kChunk, value);
  const int64_t elem = element_size(dtype);
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t count = std::min(kChunk, n - start);
    store_chunk(buffer, count, static_cast<char*>(dst) + (offset + start) * elem, dtype);
  }
}

const void* row_ptr(const RowMatrix& m, int64_t row, int64_t col) {
  return static_cast<const char*>(m.data) +
         (m.layout.row_offset(row) + col) * element_size(m.dtype);
}

template <class acc_t>
struct RowChunk {
  alignas(64) acc_t z[kChunk];
  alignas(64) acc_t s[kChunk];
  alignas(64) acc_t grad[kChunk];
  // Pass 1's second buffer slot (odd-numbered chunks): it converts the next
  // chunk while reading this one (row_log_sum_exps).
  alignas(64) acc_t z_ahead[kChunk];
  alignas(64) acc_t s_ahead[kChunk];
};

// The usual step: the fused op (not a vocabulary-parallel phase), the
// student's gradient only, not AKL (whose walks take exp(log p)).
template <math::Divergence D>
bool is_usual_step(const ForwardParams& p, Phase phase) {
  return D != math::Divergence::kAKL && phase == Phase::kFused && p.grad_student.data != nullptr &&
         p.grad_teacher.data == nullptr;
}

// Row-sized scratch of one thread: pass 2 keeps the per-entry gradient
// weights and probabilities there, so pass 3 neither reloads the inputs nor
// recomputes the exps (recomputing them cost more than the whole forward;
// NOTES). AKL's selection
// walks its own two arrays. O(V) per thread.
template <class acc_t>
struct RowScratch {
  std::unique_ptr<acc_t[]> storage;
  acc_t* u = nullptr;  // dD/dlog q
  acc_t* q = nullptr;
  acc_t* v = nullptr;  // dD/dlog p
  acc_t* p = nullptr;
  acc_t* akl_prob = nullptr;    // AKL: p, or +inf for a masked entry (never in the tail)
  acc_t* akl_diff = nullptr;    // AKL: |p - q|, 0 for a masked entry
  acc_t* akl_window = nullptr;  // AKL: the probabilities the search has not decided yet
  // Pass 1's exponentials kept (KeptExps): each chunk's max of z/T and of s/T.
  std::vector<acc_t> chunk_max_z, chunk_max_s;
  // The usual step's inputs of another dtype than acc_t, converted by pass 1
  // for pass 2, which then need not convert them again (KeptExps).
  acc_t* z = nullptr;
  acc_t* s = nullptr;

  // usual_step: is_usual_step of the rows it serves.
  RowScratch(const ForwardParams& params, bool akl, bool usual_step) {
    const int64_t chunks = (params.vocab + kChunk - 1) / kChunk;
    chunk_max_z.resize(chunks);
    chunk_max_s.resize(chunks);
    const int64_t width = Vectorized<acc_t>::size();
    const int64_t padded = (params.vocab + kChunk - 1) / kChunk * kChunk + width;
    const bool gs = params.grad_student.data != nullptr;
    const bool gt = params.grad_teacher.data != nullptr;
    const bool convert_z = usual_step && params.student.dtype != kAccType<acc_t>;
    const bool convert_s = usual_step && params.teacher.dtype != kAccType<acc_t>;
    const int64_t arrays = (gs ? 2 : 0) + (gt ? 2 : 0) + (akl ? 3 : 0) + convert_z + convert_s;
    if (arrays == 0) return;
    storage.reset(new acc_t[arrays * padded]);  // uninitialised: each array is written before it is read
    acc_t* next = storage.get();
    if (gs) {
      u = next, next += padded;
      q = next, next += padded;
    }
    if (gt) {
      v = next, next += padded;
      p = next, next += padded;
    }
    if (convert_z) z = next, next += padded;
    if (convert_s) s = next, next += padded;
    if (akl) {
      akl_prob = next, next += padded;
      akl_diff = next, next += padded;
      akl_window = next;
    }
  }
};

// Where pass 1 leaves its exponentials exp(x/T - chunk max) of z and s for
// pass 2 (row-sized arrays, and each chunk's max), or nullptr: not kept.
template <class acc_t>
struct KeptExps {
  acc_t* e_z;
  acc_t* e_s;
  acc_t* max_z;
  acc_t* max_s;
  acc_t* z;  // inputs of another dtype converted to acc_t (else nullptr)
  acc_t* s;
};

// The shift that brings a chunk's scaled logits (x/T, or x) to <= 0, given
// their max: 0 for a chunk that is all -inf (masked), whose exponentials are
// then exp(-inf) = 0 rather than NaN.
template <class acc_t>
Vectorized<acc_t> exp_shift(acc_t chunk_max) {
  return Vectorized<acc_t>(chunk_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : chunk_max);
}

// How pass 1's loop over one chunk reads the next chunk (row_log_sum_exps):
// entries of acc_t where they lie (in place, or already converted), ...
template <class acc_t>
struct AcceptedEntries {
  const acc_t* entries;
  Vectorized<acc_t> load(int64_t i) const { return Vectorized<acc_t>::loadu(entries + i); }
};

// ... or a whole chunk of 16-bit floats, converted vector by vector in that
// loop and stored where the next loop reads them (and, in the usual step,
// pass 2: the row arrays of KeptExps).
template <class src_t>
struct ConvertedEntries {
  const src_t* source;
  float* entries;
  Vectorized<float> load(int64_t i) const {
    Vectorized<float> x;
    at::vec::load_to_float(source + i, x);
    x.store(entries + i);
    return x;
  }
};

// f(reader) with the reader of a chunk of n entries at src: bf16 and fp16
// whole chunks are converted in the loop (float accumulation only), the
// rest by chunk_entries before it.
template <class acc_t, class F>
void with_chunk_reader(const void* src, c10::ScalarType dtype, int64_t n, acc_t* buffer, const F& f) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (n == kChunk && dtype == c10::ScalarType::BFloat16)
      return f(ConvertedEntries<c10::BFloat16>{static_cast<const c10::BFloat16*>(src), buffer});
    if (n == kChunk && dtype == c10::ScalarType::Half)
      return f(ConvertedEntries<c10::Half>{static_cast<const c10::Half*>(src), buffer});
  }
  f(AcceptedEntries<acc_t>{chunk_entries(src, dtype, n, buffer)});
}

// The running maxima of x/T over a chunk (the next one, in chunk_exps;
// the first, in row_log_sum_exps), with vector i of it if it is among the
// first `ahead` entries.
template <class acc_t, class ZNext, class SNext>
[[gnu::always_inline]] inline void next_chunk_max(const ZNext& z_next, const SNext& s_next, int64_t i, int64_t ahead,
                                                  Vectorized<acc_t> inv_t, Vectorized<acc_t>& max_z,
                                                  Vectorized<acc_t>& max_s) {
  if (i < ahead) {
    max_z = at::vec::maximum(max_z, scaled(z_next.load(i), inv_t));
    max_s = at::vec::maximum(max_s, scaled(s_next.load(i), inv_t));
  }
}

// Pass 1's loop over one chunk: the exponentials exp(x/T - shift) of its
// padded entries z and s, summed (and stored to e_z, e_s unless null), and
// the max of x/T over the next chunk's first `ahead` entries, read through
// z_next and s_next. Everything by value in locals: in a lambda that
// captured them by reference, GCC reloaded every capture after each store.
// Two vectors of z and two of s a step: four exponentials whose
// instructions interleave (each is one long dependency chain), 2-6% off
// the step against one vector of each (NOTES). The sums and maxima take
// the same operands in the same order as one vector a step.
template <class acc_t, class ZNext, class SNext>
[[gnu::always_inline]] inline void chunk_exps(const acc_t* z, const acc_t* s, int64_t padded, Vectorized<acc_t> inv_t,
                                              Vectorized<acc_t> shift_z, Vectorized<acc_t> shift_s, acc_t* e_z,
                                              acc_t* e_s, Vectorized<acc_t>& sum_z, Vectorized<acc_t>& sum_s,
                                              ZNext z_next, SNext s_next, int64_t ahead, Vectorized<acc_t>& max_z,
                                              Vectorized<acc_t>& max_s) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec sz(acc_t(0)), ss(acc_t(0)), mz(-std::numeric_limits<acc_t>::infinity()), ms(mz);
  int64_t i = 0;
  for (; i + W < padded; i += 2 * W) {
    // x / T - m as RowLse::log_prob forms it: the max lane gives exp(0).
    const Vec d[4] = {scaled(Vec::loadu(z + i), inv_t) - shift_z, scaled(Vec::loadu(s + i), inv_t) - shift_s,
                      scaled(Vec::loadu(z + i + W), inv_t) - shift_z, scaled(Vec::loadu(s + i + W), inv_t) - shift_s};
    Vec e[4];
    exp_nonpositive<acc_t, 4>(d, e);
    sz = sz + e[0], ss = ss + e[1];
    sz = sz + e[2], ss = ss + e[3];
    if (e_z != nullptr) {
      e[0].store(e_z + i), e[1].store(e_s + i);
      e[2].store(e_z + i + W), e[3].store(e_s + i + W);
    }
    next_chunk_max(z_next, s_next, i, ahead, inv_t, mz, ms);
    next_chunk_max(z_next, s_next, i + W, ahead, inv_t, mz, ms);
  }
  if (i < padded) {  // the last of an odd number of vectors
    const Vec d[2] = {scaled(Vec::loadu(z + i), inv_t) - shift_z, scaled(Vec::loadu(s + i), inv_t) - shift_s};
    Vec e[2];
    exp_nonpositive<acc_t, 2>(d, e);
    sz = sz + e[0], ss = ss + e[1];
    if (e_z != nullptr) e[0].store(e_z + i), e[1].store(e_s + i);
    next_chunk_max(z_next, s_next, i, ahead, inv_t, mz, ms);
  }
  sum_z = sz, sum_s = ss, max_z = mz, max_s = ms;
}

// Pass 1: log-sum-exp of z/T and s/T over the row, and with lse_z1 that of
// z itself (the hard-label cross-entropy's, when T != 1). With `kept`, the
// exponentials of z/T and s/T and the chunk maxima are stored there.
// Software-pipelined by one chunk: the loop that takes chunk k's
// exponentials also reads chunk k + 1 from memory (converting 16-bit
// floats) and takes its max, so the reads overlap the exponentials'
// arithmetic instead of stalling a loop of their own (NOTES). Each chunk's
// max and sum are what a max loop and an exp loop over it alone would give,
// bit for bit.
template <class acc_t>
void row_log_sum_exps(const ForwardParams& p, int64_t row, RowChunk<acc_t>& c, math::LogSumExp<double>& lse_z,
                      math::LogSumExp<double>& lse_s, math::LogSumExp<double>* lse_z1,
                      const KeptExps<acc_t>* kept = nullptr) {
  using Vec = Vectorized<acc_t>;
  const Vec inv_t(static_cast<acc_t>(*p.inv_temperature));
  const Vec neg_inf(-std::numeric_limits<acc_t>::infinity());
  // Where chunk `start`'s entries go when converted: kept's row arrays, or
  // one of two buffer slots (the next chunk is converted while this one is
  // still read).
  const auto buffers = [&](int64_t start) {
    const bool odd = (start / kChunk) % 2 != 0;
    return std::pair{kept != nullptr && kept->z != nullptr ? kept->z + start : odd ? c.z_ahead : c.z,
                     kept != nullptr && kept->s != nullptr ? kept->s + start : odd ? c.s_ahead : c.s};
  };
  // The first chunk alone: its entries and max.
  const int64_t n0 = std::min(kChunk, p.vocab);
  const acc_t* zc = chunk_entries(row_ptr(p.student, row, 0), p.student.dtype, n0, buffers(0).first);
  const acc_t* sc = chunk_entries(row_ptr(p.teacher, row, 0), p.teacher.dtype, n0, buffers(0).second);
  // z and s side by side in each loop: two independent chains (NOTES).
  Vec max_zv(neg_inf), max_sv(neg_inf);
  const int64_t padded0 = padded_length<acc_t>(n0);
  for (int64_t i = 0; i < padded0; i += Vec::size()) {
    next_chunk_max(AcceptedEntries<acc_t>{zc}, AcceptedEntries<acc_t>{sc}, i, padded0, inv_t, max_zv, max_sv);
  }
  for (int64_t start = 0; start < p.vocab; start += kChunk) {
    const int64_t padded = padded_length<acc_t>(std::min(kChunk, p.vocab - start));
    const acc_t max_z = hmax(max_zv), max_s = hmax(max_sv);
    const Vec shift_z = exp_shift(max_z), shift_s = exp_shift(max_s);
    acc_t* e_z = kept != nullptr ? kept->e_z + start : nullptr;
    acc_t* e_s = kept != nullptr ? kept->e_s + start : nullptr;
    Vec sum_z, sum_s;
    const int64_t next = start + kChunk;
    const acc_t* next_zc = nullptr;
    const acc_t* next_sc = nullptr;
    if (next < p.vocab) {
      // The next chunk is never longer than this one (only the last is partial).
      const int64_t n = std::min(kChunk, p.vocab - next);
      const auto [z_buffer, s_buffer] = buffers(next);
      const void* z_src = row_ptr(p.student, row, next);
      const void* s_src = row_ptr(p.teacher, row, next);
      const auto walk = [&](auto z_next, auto s_next) {
        chunk_exps(zc, sc, padded, inv_t, shift_z, shift_s, e_z, e_s, sum_z, sum_s, z_next, s_next,
                   padded_length<acc_t>(n), max_zv, max_sv);
        next_zc = z_next.entries, next_sc = s_next.entries;
      };
      with_chunk_reader(z_src, p.student.dtype, n, z_buffer, [&](auto z_next) {
        with_chunk_reader(s_src, p.teacher.dtype, n, s_buffer, [&](auto s_next) { walk(z_next, s_next); });
      });
    } else {
      const AcceptedEntries<acc_t> none{nullptr};
      chunk_exps(zc, sc, padded, inv_t, shift_z, shift_s, e_z, e_s, sum_z, sum_s, none, none, 0, max_zv, max_sv);
    }
    if (kept != nullptr) kept->max_z[start / kChunk] = max_z, kept->max_s[start / kChunk] = max_s;
    lse_z.merge(max_z, hsum(sum_z));
    lse_s.merge(max_s, hsum(sum_s));
    if (lse_z1 != nullptr) {  // z's own (T = 1) log-sum-exp
      Vec max_v(neg_inf);
      for (int64_t i = 0; i < padded; i += Vec::size()) max_v = at::vec::maximum(max_v, Vec::loadu(zc + i));
      const acc_t max_z1 = hmax(max_v);
      const Vec shift = exp_shift(max_z1);
      Vec sum(acc_t(0));
      for (int64_t i = 0; i < padded; i += Vec::size()) sum = sum + exp_nonpositive(Vec::loadu(zc + i) - shift);
      lse_z1->merge(max_z1, hsum(sum));
    }
    zc = next_zc, sc = next_sc;
  }
}

// A row's log-sum-exp with its two parts kept apart: log p = (x/T - max) -
// log_sum loses nothing to the magnitude of max. x/T is the rounded product
// x * (1/T) everywhere - pass 1's max and sum and here - so the max lane
// is exactly 0 after the shift, and the copies agree. (With the product
// fused into the subtraction, the probabilities were off by up to half an
// ulp of x/T: -4.6% at T = 1e-6; at T = 1e-10 the max lane's exp(ulp/2)
// overflowed to NaN rows.)
template <class acc_t>
struct RowLse {
  Vectorized<acc_t> inv_t, neg_max, log_sum;
  Vectorized<acc_t> log_prob(const Vectorized<acc_t>& x) const { return (scaled(x, inv_t) + neg_max) - log_sum; }
};

// Lanes left out of every sum: a +-inf logit in either input, or one whose
// x / T overflows (a finfo.min mask at T < 1), i.e. r = log p - log q not finite.
template <class acc_t>
Vectorized<acc_t> kept(const Vectorized<acc_t>& log_p, const Vectorized<acc_t>& log_q) {
  return (log_p - log_q).abs() < Vectorized<acc_t>(std::numeric_limits<acc_t>::infinity());
}

// Whether every lane of v is at least bound (false for a NaN lane).
template <class acc_t>
bool all_at_least(const Vectorized<acc_t>& v, acc_t bound) {
  return (v >= Vectorized<acc_t>(bound)).zero_mask() == 0;
}

// Whether every lane of v is below bound (false for a NaN lane).
template <class acc_t>
bool all_below(const Vectorized<acc_t>& v, acc_t bound) {
  return (v < Vectorized<acc_t>(bound)).zero_mask() == 0;
}

// Probabilities above this come from exp(log p) even where pass 1's
// exponentials are kept (forward_row): at most 2 / kExactProbability
// entries of a row pay the two exps.
constexpr double kExactProbability = 1.0 / 64;

// q = exp(log q) and p = exp(log p) of one vector of entries, for the few
// that forward_row's kept exponentials do not serve; out of line, so the
// exp calls stay out of its loop.
template <class acc_t>
[[gnu::noinline]] void exact_probabilities(const acc_t* z, const acc_t* s, const RowLse<acc_t>& lse_z,
                                           const RowLse<acc_t>& lse_s, acc_t* q, acc_t* p) {
  lse_z.log_prob(Vectorized<acc_t>::loadu(z)).exp().store(q);
  lse_s.log_prob(Vectorized<acc_t>::loadu(s)).exp().store(p);
}

// An entry's terms with masking; p and q as given (nullptr: exp(log p), exp(log q)).
template <math::Divergence D, bool kUnitBeta, bool kDirectMix = false, class acc_t>
math::EntryTerms<Vectorized<acc_t>> masked_terms(const acc_t* z, const acc_t* s, const RowLse<acc_t>& lse_z,
                                                 const RowLse<acc_t>& lse_s, const math::DivergenceParams& prm,
                                                 const Vectorized<acc_t>* p = nullptr,
                                                 const Vectorized<acc_t>* q = nullptr) {
  using Vec = Vectorized<acc_t>;
  const Vec log_p = lse_s.log_prob(Vec::loadu(s));
  const Vec log_q = lse_z.log_prob(Vec::loadu(z));
  const Vec keep = kept(log_p, log_q);
  auto t = p == nullptr ? math::divergence_entry<D, kUnitBeta>(log_p, log_q, prm)
                        : math::divergence_terms<D, kUnitBeta, kDirectMix>(log_p, log_q, *p, *q, prm);
  const Vec zero(acc_t(0));
  t.loss = Vec::blendv(zero, t.loss, keep);
  t.u = Vec::blendv(zero, t.u, keep);
  t.v = Vec::blendv(zero, t.v, keep);
  return t;
}

// SKL/SRKL/GJSD's terms with the log-domain mix, for a vector of kept
// probabilities whose mixture comes near underflow; out of line, so the
// transcendental calls stay out of forward_row's loop.
template <math::Divergence D, class acc_t>
[[gnu::noinline]] math::EntryTerms<Vectorized<acc_t>> log_mix_terms(const acc_t* z, const acc_t* s,
                                                                     const RowLse<acc_t>& lse_z,
                                                                     const RowLse<acc_t>& lse_s,
                                                                     const math::DivergenceParams& prm,
                                                                     const Vectorized<acc_t>& p,
                                                                     const Vectorized<acc_t>& q) {
  return masked_terms<D, false, false>(z, s, lse_z, lse_s, prm, &p, &q);
}

// The direct mix (math::divergence_terms' kDirectMix) serves vectors whose
// mixtures are all at least this (far above float32's underflow, where the
// kept probabilities have their full relative accuracy) and whose
// probabilities are all below kExactProbability: on the row's few large
// entries the log-domain mix decides saturated rows' cancellations (with
// the direct mix there, JS's worst gradient ratio on the AVX2 copy rose
// from 1.59 to 2.40).
constexpr double kDirectMixFloor = 0x1p-100;

// AKL, step 1: p (or +inf for a masked entry: never in the tail) and, with
// with_diff, |p - q| (0 for a masked entry) of every entry into the row
// scratch. Returns the padded length of the arrays. (A search walk alone
// needs only p: one exp per entry instead of two.)
template <class acc_t>
int64_t akl_fill_row(const ForwardParams& p, int64_t row, RowChunk<acc_t>& c, RowScratch<acc_t>& scratch,
                     const RowLse<acc_t>& lse_z, const RowLse<acc_t>& lse_s, bool with_diff = true) {
  using Vec = Vectorized<acc_t>;
  const Vec inf(std::numeric_limits<acc_t>::infinity()), zero(acc_t(0));
  int64_t padded_vocab = 0;
  for (int64_t start = 0; start < p.vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, p.vocab - start);
    const int64_t padded = padded_length<acc_t>(n);
    const acc_t* zc = chunk_entries(row_ptr(p.student, row, start), p.student.dtype, n, c.z);
    const acc_t* sc = chunk_entries(row_ptr(p.teacher, row, start), p.teacher.dtype, n, c.s);
    for (int64_t i = 0; i < padded; i += Vec::size()) {
      const Vec log_p = lse_s.log_prob(Vec::loadu(sc + i));
      const Vec log_q = lse_z.log_prob(Vec::loadu(zc + i));
      const Vec keep = kept(log_p, log_q);
      const Vec prob = log_p.exp();
      Vec::blendv(inf, prob, keep).store(scratch.akl_prob + start + i);
      if (with_diff) Vec::blendv(zero, (prob - log_q.exp()).abs(), keep).store(scratch.akl_diff + start + i);
    }
    padded_vocab = start + padded;
  }
  return padded_vocab;
}

// AKL, one search walk: totals[j] = sum of the probabilities in
// window[0, size) that are <= search.threshold(j) (blocked sums).
template <class acc_t>
void akl_candidate_sums(const acc_t* window, int64_t size, const math::AklTailSearch<acc_t>& search,
                        double (&totals)[math::kAklCandidates]) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(acc_t(0));
  Vec thresholds[math::kAklCandidates];
  for (int j = 0; j < math::kAklCandidates; ++j) thresholds[j] = Vec(search.threshold(j)), totals[j] = 0;
  for (int64_t start = 0; start < size; start += kChunk) {
    const int64_t end = std::min(size, start + kChunk);
    Vec sums[math::kAklCandidates];
    for (int j = 0; j < math::kAklCandidates; ++j) sums[j] = zero;
    for (int64_t i = start; i < end; i += Vec::size()) {
      const Vec prob = Vec::loadu(window + i);
      for (int j = 0; j < math::kAklCandidates; ++j) {
        sums[j] = sums[j] + Vec::blendv(zero, prob, prob <= thresholds[j]);
      }
    }
    for (int j = 0; j < math::kAklCandidates; ++j) totals[j] += hsum(sums[j]);
  }
}

// AKL, last step: g_head and g_tail, the sums of |p - q| over the entries
// above and at-or-below the tail threshold (blocked sums).
template <class acc_t>
void akl_gap_sums(const RowScratch<acc_t>& scratch, int64_t padded_vocab, acc_t tail_threshold, double& head_sum,
                  double& tail_sum) {
  using Vec = Vectorized<acc_t>;
  const Vec tail_max(tail_threshold), zero(acc_t(0));
  head_sum = tail_sum = 0;
  for (int64_t start = 0; start < padded_vocab; start += kChunk) {
    const int64_t end = std::min(padded_vocab, start + kChunk);
    Vec g_head(acc_t(0)), g_tail(acc_t(0));
    for (int64_t i = start; i < end; i += Vec::size()) {
      const Vec in_tail = Vec::loadu(scratch.akl_prob + i) <= tail_max;
      const Vec diff = Vec::loadu(scratch.akl_diff + i);
      g_tail = g_tail + Vec::blendv(zero, diff, in_tail);
      g_head = g_head + Vec::blendv(diff, zero, in_tail);
    }
    head_sum += hsum(g_head);
    tail_sum += hsum(g_tail);
  }
}

// AKL's per-row weights in one process (math::AklTailSearch has the
// method): the fill, the search walks, g_head / g_tail. After each walk the
// probabilities still undecided are compacted (branch-free) into
// akl_window, and later walks visit only those, adding S(low) for the ones
// below: the window shrinks 16-fold per walk, so the search costs about two
// walks of the row instead of eight (measured: NOTES).
template <class acc_t>
void akl_row_weights(const ForwardParams& p, int64_t row, RowChunk<acc_t>& c, RowScratch<acc_t>& scratch,
                     const RowLse<acc_t>& lse_z, const RowLse<acc_t>& lse_s, math::DivergenceParams& prm) {
  const int64_t padded_vocab = akl_fill_row(p, row, c, scratch, lse_z, lse_s);
  math::AklTailSearch<acc_t> search;
  const acc_t mu = static_cast<acc_t>(prm.akl_mu);
  const acc_t* window = scratch.akl_prob;  // the first walk visits every entry
  int64_t window_size = padded_vocab;
  double below = 0;  // S(low): the probabilities under the window
  while (!search.done()) {
    double chunk_totals[math::kAklCandidates];
    akl_candidate_sums(window, window_size, search, chunk_totals);
    acc_t totals[math::kAklCandidates];
    for (int j = 0; j < math::kAklCandidates; ++j) totals[j] = static_cast<acc_t>(below + chunk_totals[j]);
    const int digit = search.advance(totals, mu);
    if (digit > 0) below = totals[digit - 1];
    if (search.done()) break;
    // Keep low < p < high; in place after the first walk (writes trail reads).
    const acc_t low = search.window_low(), high = search.window_high();
    int64_t kept = 0;
    for (int64_t i = 0; i < window_size; ++i) {
      const acc_t prob = window[i];
      scratch.akl_window[kept] = prob;
      kept += (prob > low) & (prob < high);
    }
    window_size = (kept + Vectorized<acc_t>::size() - 1) / Vectorized<acc_t>::size() * Vectorized<acc_t>::size();
    std::fill(scratch.akl_window + kept, scratch.akl_window + window_size, std::numeric_limits<acc_t>::infinity());
    window = scratch.akl_window;
  }
  double head_sum, tail_sum;
  akl_gap_sums(scratch, padded_vocab, search.tail_threshold(), head_sum, tail_sum);
  math::set_akl_weights(static_cast<acc_t>(head_sum), static_cast<acc_t>(tail_sum), prm);
}

// The vocabulary-parallel AKL phases on this slice: one walk of the search
// whose state every rank holds (kAklWalk), or the gap sums at its result
// (kAklGaps). The whole slice every time: no window to keep between calls.
template <class acc_t>
void akl_slice_sums(const ForwardParams& p, const VocabParallelParams& vp, int64_t row, RowChunk<acc_t>& c,
                    RowScratch<acc_t>& scratch, const RowLse<acc_t>& lse_z, const RowLse<acc_t>& lse_s) {
  const int64_t padded_vocab = akl_fill_row(p, row, c, scratch, lse_z, lse_s, vp.phase == Phase::kAklGaps);
  math::AklTailSearch<acc_t> search;
  search.low = static_cast<typename math::AklTailSearch<acc_t>::U>(vp.akl_low[row]);
  search.remaining = vp.akl_remaining;
  if (vp.phase == Phase::kAklWalk) {
    double totals[math::kAklCandidates];
    akl_candidate_sums(scratch.akl_prob, padded_vocab, search, totals);
    std::copy(totals, totals + math::kAklCandidates, vp.akl_sums + row * math::kAklCandidates);
  } else {
    akl_gap_sums(scratch, padded_vocab, search.tail_threshold(), vp.akl_sums[row * 2], vp.akl_sums[row * 2 + 1]);
  }
}

// hard_label_weight * d CE / dz for one student row: hard_label_weight * (softmax(z) - onehot(label)).
template <class acc_t>
struct HardLabelGrad {
  bool on = false;
  int64_t label = 0;
  acc_t weight = 0;         // hard_label_weight times the reduction's factor
  bool probs_are_q = true;  // T == 1: softmax(z) is the q already in the scratch
  acc_t neg_max = 0, log_sum = 0;  // else: z's own log-sum-exp
};

// The gradient (w_j - prob_j W) / T of the one entry whose probability
// exceeds 1/2 is all cancellation when prob_j is near 1: w_j and prob_j W
// agree but for ~1 ulp of w_j, which can be all there is (at T <= 1e-8 it
// was 0 for +1/T). Without cancellation it is w_j (1 - prob_j) - prob_j
// (W - w_j), with 1 - prob_j and W - w_j summed over the other entries,
// whose error is ~eps (|w_j| (1 - prob_j) + |W - w_j|). That form replaces
// the direct one only where the two differ by more than 4x that error: the
// direct one is then provably off; elsewhere it stands (where a saturated
// divergence's w is proportional to prob, it is exactly 0, as is the truth
// to ~1e-17). (chunk start, sums) of pass 2 locate the entry.
template <class acc_t>
struct PeakTracker {
  double prob_total = 0;  // sum of prob over the row
  int64_t chunk = -1;     // start of the chunk holding a prob > 1/2
  double chunk_weight = 0, chunk_prob = 0;

  void add_chunk(int64_t start, double weight_sum, double prob_sum, acc_t prob_max) {
    prob_total += prob_sum;
    if (prob_max > acc_t(0.5)) chunk = start, chunk_weight = weight_sum, chunk_prob = prob_sum;
  }
};

template <class acc_t>
struct PeakEntry {
  int64_t index = -1;  // -1: no entry has prob > 1/2
  acc_t grad = 0;      // w_j (1 - prob_j) - prob_j (W - w_j), before the 1/T and weights
};

// How far apart the two forms may be before the direct one counts as off.
constexpr double kPeakErrorBounds = 4;

template <class acc_t>
PeakEntry<acc_t> peak_entry(const PeakTracker<acc_t>& tracker, const acc_t* weight, const acc_t* prob,
                            double weight_total, int64_t vocab) {
  PeakEntry<acc_t> peak;
  if (tracker.chunk < 0) return peak;
  const int64_t end = std::min(vocab, tracker.chunk + kChunk);
  double weight_rest = 0, prob_rest = 0;  // the chunk's other entries
  for (int64_t i = tracker.chunk; i < end; ++i) {
    if (peak.index < 0 && prob[i] > acc_t(0.5)) {
      peak.index = i;
    } else {
      weight_rest += weight[i], prob_rest += prob[i];
    }
  }
  if (peak.index < 0) return peak;
  weight_rest += weight_total - tracker.chunk_weight;
  prob_rest += tracker.prob_total - tracker.chunk_prob;
  const double w = weight[peak.index], pr = prob[peak.index];
  const double exact = w * prob_rest - pr * weight_rest;
  const acc_t direct = weight[peak.index] - prob[peak.index] * static_cast<acc_t>(weight_total);
  const double error = std::numeric_limits<acc_t>::epsilon() * (std::abs(w) * prob_rest + std::abs(weight_rest));
  if (std::abs(direct - exact) <= kPeakErrorBounds * error) peak.index = -1;
  peak.grad = static_cast<acc_t>(exact);
  return peak;
}

// grad = soft_label_weight * (weight - prob * sum(weight)) / T (+ the hard-label
// term) over one row, stored in out's dtype; the peak entry from its own
// formula.
template <class acc_t>
void write_grad_row(const acc_t* weight, const acc_t* prob, acc_t weight_sum, const ForwardParams& p,
                    const OutMatrix& out, int64_t out_offset, RowChunk<acc_t>& c, int64_t row,
                    const HardLabelGrad<acc_t>& hard, const PeakEntry<acc_t>& peak) {
  using Vec = Vectorized<acc_t>;
  // 1/T, times the reduction's factor (1/count for "mean") and the divergence's weight.
  const acc_t scale = p.grad_scale ? *static_cast<const acc_t*>(p.grad_scale) : acc_t(1);
  const acc_t soft_scale = static_cast<acc_t>(*p.inv_temperature) * scale * static_cast<acc_t>(p.effective_soft_label_weight());
  const Vec inv_t(soft_scale);
  const Vec sum_v(weight_sum);
  const Vec hard_w(hard.weight * scale), neg_max(hard.neg_max), log_sum(hard.log_sum);
  const int64_t elem = element_size(out.dtype);
  for (int64_t start = 0; start < p.vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, p.vocab - start);
    // z for the hard label's softmax at T != 1
    const acc_t* zc =
        hard.on && !hard.probs_are_q ? chunk_entries(row_ptr(p.student, row, start), p.student.dtype, n, c.z) : nullptr;
    char* dst = static_cast<char*>(out.data) + (out_offset + start) * elem;
    const bool direct = out.dtype == kAccType<acc_t> && n == kChunk;
    acc_t* gout = direct ? reinterpret_cast<acc_t*>(dst) : c.grad;
    for (int64_t i = 0; i < n; i += Vec::size()) {
      Vec g = math::log_softmax_grad(Vec::loadu(weight + start + i), Vec::loadu(prob + start + i), sum_v, inv_t);
      if (hard.on) {
        const Vec probs = hard.probs_are_q ? Vec::loadu(prob + start + i) : ((Vec::loadu(zc + i) + neg_max) - log_sum).exp();
        g = g + hard_w * probs;
      }
      g.store(gout + i);
    }
    if (peak.index >= start && peak.index < start + n) {
      const int64_t k = peak.index - start;
      acc_t g = peak.grad * soft_scale;
      if (hard.on) {
        g += hard.weight * scale * (hard.probs_are_q ? prob[peak.index] : std::exp((zc[k] + hard.neg_max) - hard.log_sum));
      }
      gout[k] = g;
    }
    if (hard.on && hard.label >= start && hard.label < start + n) gout[hard.label - start] -= hard.weight * scale;
    if (!direct) store_chunk(c.grad, n, dst, out.dtype);
  }
}

// Fills the row of the phase's output table with `value` (an ignored row's
// zeros, an undefined row's NaN); false for phases without one.
bool fill_phase_row(const VocabParallelParams& vp, int64_t row, double value) {
  const PhaseTable table = phase_table(vp);
  if (table.data != nullptr) std::fill(table.data + row * table.width, table.data + (row + 1) * table.width, value);
  return table.data != nullptr;
}

// One row: the whole of it (vp.phase kFused: the distill_forward op), or one
// vocabulary-parallel phase on this rank's slice.
template <math::Divergence D, class acc_t>
void forward_row(const ForwardParams& p, const VocabParallelParams& vp, int64_t row, RowChunk<acc_t>& c,
                 RowScratch<acc_t>& scratch) {
  using Vec = Vectorized<acc_t>;
  acc_t* loss_out = static_cast<acc_t*>(p.loss) + row;
  const int64_t out_offset = row * p.vocab;
  const bool want_gs = p.grad_student.data != nullptr;
  const bool want_gt = p.grad_teacher.data != nullptr;

  const Phase phase = vp.phase;
  if (p.labels != nullptr && p.labels[row] == p.ignore_index) {
    if (phase == Phase::kRowStats) {
      for (int k = 0; k < 6; ++k) vp.stats[row * 6 + k] = k % 2;  // (max 0, sum 1): log-sum-exp 0
      return;
    }
    if (fill_phase_row(vp, row, 0.0)) return;
    if (phase == Phase::kFused) *loss_out = 0;  // skipped position: no loss, exactly-zero gradient
    if (want_gs) fill_row<acc_t>(p.grad_student.data, p.grad_student.dtype, out_offset, p.vocab, 0);
    if (want_gt) fill_row<acc_t>(p.grad_teacher.data, p.grad_teacher.dtype, out_offset, p.vocab, 0);
    return;
  }

  // The usual step: pass 1's exponentials go to the scratch arrays pass 2
  // overwrites (e_z where q goes, e_s where u goes), and pass 2 forms p and q
  // from them by one product instead of two exps; inputs of another dtype
  // are converted once, by pass 1.
  const bool reuse = is_usual_step<D>(p, phase);
  const KeptExps<acc_t> kept_exps{scratch.q, scratch.u, scratch.chunk_max_z.data(), scratch.chunk_max_s.data(),
                                  scratch.z, scratch.s};

  // Chunk results merged in double (the blocked sum), rounded once at the end.
  // The hard-label cross-entropy needs z's own log-sum-exp: lse_z's when T = 1.
  const bool hard = p.hard_label_weight != 0;
  const bool unit_t = *p.inv_temperature == 1.0;
  math::LogSumExp<double> lse_z, lse_s, lse_z1;
  double log_sum_z, log_sum_s, log_sum_z1 = 0;
  if (phase != Phase::kFused && phase != Phase::kRowStats) {
    // The whole vocabulary's log-sum-exps, merged from every slice's.
    const double* g = vp.global_stats + row * 6;
    lse_z.max = g[0], log_sum_z = g[1], lse_s.max = g[2], log_sum_s = g[3], lse_z1.max = g[4], log_sum_z1 = g[5];
  } else {
    row_log_sum_exps(p, row, c, lse_z, lse_s, hard && !unit_t ? &lse_z1 : nullptr, reuse ? &kept_exps : nullptr);
    if (hard && unit_t) lse_z1 = lse_z;
    if (phase == Phase::kRowStats) {
      const double stats[6] = {lse_z.max, lse_z.sum, lse_s.max, lse_s.sum, hard ? lse_z1.max : 0.0, hard ? lse_z1.sum : 1.0};
      std::copy(stats, stats + 6, vp.stats + row * 6);
      return;
    }
    log_sum_z1 = hard ? std::log(lse_z1.sum) : 0.0;
    log_sum_z = std::log(lse_z.sum), log_sum_s = std::log(lse_s.sum);
  }
  if (!math::is_finite(lse_z.max + log_sum_z) || !math::is_finite(lse_s.max + log_sum_s)) {
    // NaN, +inf, or a row that is all -inf: the distribution is undefined.
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    if (fill_phase_row(vp, row, std::numeric_limits<double>::quiet_NaN())) return;
    if (phase == Phase::kFused) *loss_out = nan;
    if (want_gs) fill_row<acc_t>(p.grad_student.data, p.grad_student.dtype, out_offset, p.vocab, nan);
    if (want_gt) fill_row<acc_t>(p.grad_teacher.data, p.grad_teacher.dtype, out_offset, p.vocab, nan);
    return;
  }

  // max is a rounded x / T (exact in acc_t); log(sum) rounded once from double.
  const Vec inv_t(static_cast<acc_t>(*p.inv_temperature));
  const RowLse<acc_t> lse_zv{inv_t, Vec(static_cast<acc_t>(-lse_z.max)), Vec(static_cast<acc_t>(log_sum_z))};
  const RowLse<acc_t> lse_sv{inv_t, Vec(static_cast<acc_t>(-lse_s.max)), Vec(static_cast<acc_t>(log_sum_s))};
  math::DivergenceParams prm = p.divergence_params;
  prm.beta = *p.beta;
  if constexpr (D == math::Divergence::kAKL) {
    if (phase == Phase::kAklWalk || phase == Phase::kAklGaps) return akl_slice_sums(p, vp, row, c, scratch, lse_zv, lse_sv);
    if (phase == Phase::kFused) {
      akl_row_weights(p, row, c, scratch, lse_zv, lse_sv, prm);
    } else {  // the whole row's gaps, summed over the slices
      const double* g = vp.akl_global_gaps + row * 2;
      math::set_akl_weights(static_cast<acc_t>(g[0]), static_cast<acc_t>(g[1]), prm);
    }
  }

  // Pass 2: loss and the weight sums (blocked); keep what pass 3 needs.
  double loss_sum = 0, u_sum = 0, v_sum = 0;
  PeakTracker<acc_t> peak_q, peak_p;  // the student's and the teacher's (fused phase only)
  const bool peaks = phase == Phase::kFused;
  // ToDi at beta = 1: a = sigmoid(r) = p / (p + q), a division instead of an exp and a division.
  // float only: todi_terms holds p + q above float's smallest normal, which in double math would
  // misweigh entries below 1e-38 that sigmoid(r) gets right.
  const bool unit_beta = D == math::Divergence::kToDi && prm.beta == 1.0 && std::is_same_v<acc_t, float>;
  // SKL/SRKL/GJSD's mixture weights, for the direct mix's floor check.
  double mix_pd = 0, mix_qd = 0;
  if constexpr (math::kHasMix<D>) math::mix_weights<D>(prm, mix_pd, mix_qd);
  const Vec mix_p(static_cast<acc_t>(mix_pd)), mix_q(static_cast<acc_t>(mix_qd));
  const Vec zero(acc_t(0));
  for (int64_t start = 0; start < p.vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, p.vocab - start);
    const int64_t padded = padded_length<acc_t>(n);
    // An input pass 1 converted (the usual step's scratch.z, s), else the chunk as chunk_entries gives it.
    const auto entries = [&](const RowMatrix& m, const acc_t* converted, acc_t* buffer) {
      return converted != nullptr ? converted + start : chunk_entries(row_ptr(m, row, start), m.dtype, n, buffer);
    };
    const acc_t* zc = entries(p.student, scratch.z, c.z);
    const acc_t* sc = entries(p.teacher, scratch.s, c.s);
    Vec loss_acc(zero), u_acc(zero), v_acc(zero), q_acc(zero), q_max(zero), p_acc(zero), p_max(zero);
    Vec f_z(zero), f_s(zero);
    if (reuse) {
      // p and q over pass 1's exponentials: q = exp(z/T - chunk max)
      // exp(chunk max - max - log sum), the second factor formed in double
      // and rounded once (terms_loop multiplies). A vector holding a
      // probability above kExactProbability takes exp(log p), exp(log q)
      // instead: the row's few large entries decide the cancellations of
      // saturated rows (the gradient's u - q U, TVD's p - q), where the
      // product's ~2 ulp against the exp's ~1 broke the accuracy standard
      // (NOTES).
      const auto factor = [&](acc_t chunk_max, const math::LogSumExp<double>& lse, double log_sum) {
        return Vec(static_cast<acc_t>(std::exp((static_cast<double>(chunk_max) - lse.max) - log_sum)));
      };
      f_z = factor(scratch.chunk_max_z[start / kChunk], lse_z, log_sum_z);
      f_s = factor(scratch.chunk_max_s[start / kChunk], lse_s, log_sum_s);
    }
    // The loop over the chunk, compiled per case: the one over kept
    // probabilities has no inline exp (the rare exact ones are out of line).
    const auto terms_loop = [&](auto kept_probs, auto unit) {
      constexpr bool kKept = decltype(kept_probs)::value;
      for (int64_t i = 0; i < padded; i += Vec::size()) {
        Vec pv, qv;
        if constexpr (kKept) {
          pv = scaled(Vec::loadu(scratch.u + start + i), f_s);  // rounded, as p's terms expect
          qv = scaled(Vec::loadu(scratch.q + start + i), f_z);
          if (!all_below(at::vec::maximum(pv, qv), acc_t(kExactProbability))) [[unlikely]] {
            exact_probabilities(zc + i, sc + i, lse_zv, lse_sv, scratch.q + start + i, scratch.u + start + i);
            pv = Vec::loadu(scratch.u + start + i);
            qv = Vec::loadu(scratch.q + start + i);
          }
        }
        math::EntryTerms<Vec> t;
        if constexpr (kKept && math::kHasMix<D>) {
          if (all_at_least(mix_p * pv + mix_q * qv, acc_t(kDirectMixFloor)) &&
              all_below(at::vec::maximum(pv, qv), acc_t(kExactProbability))) [[likely]] {
            t = masked_terms<D, false, true>(zc + i, sc + i, lse_zv, lse_sv, prm, &pv, &qv);
          } else {
            t = log_mix_terms<D>(zc + i, sc + i, lse_zv, lse_sv, prm, pv, qv);
          }
        } else {
          t = masked_terms<D, decltype(unit)::value>(zc + i, sc + i, lse_zv, lse_sv, prm, kKept ? &pv : nullptr,
                                                     kKept ? &qv : nullptr);
        }
        loss_acc = loss_acc + t.loss;
        u_acc = u_acc + t.u;
        v_acc = v_acc + t.v;
        if (want_gs) {
          t.u.store(scratch.u + start + i);
          t.q.store(scratch.q + start + i);
          q_acc = q_acc + t.q;
          q_max = at::vec::maximum(q_max, t.q);
        }
        if (want_gt) {
          t.v.store(scratch.v + start + i);
          t.p.store(scratch.p + start + i);
          p_acc = p_acc + t.p;
          p_max = at::vec::maximum(p_max, t.p);
        }
      }
    };
    if (reuse && unit_beta) {
      terms_loop(std::true_type{}, std::true_type{});
    } else if (reuse) {
      terms_loop(std::true_type{}, std::false_type{});
    } else if (unit_beta) {
      terms_loop(std::false_type{}, std::true_type{});
    } else {
      terms_loop(std::false_type{}, std::false_type{});
    }
    const double u_chunk = hsum(u_acc), v_chunk = hsum(v_acc);
    loss_sum += hsum(loss_acc);
    u_sum += u_chunk;
    v_sum += v_chunk;
    if (peaks && want_gs) peak_q.add_chunk(start, u_chunk, hsum(q_acc), hmax(q_max));
    if (peaks && want_gt) peak_p.add_chunk(start, v_chunk, hsum(p_acc), hmax(p_max));
  }
  HardLabelGrad<acc_t> hard_grad;
  double cross_entropy = 0, z_label_here = 0;
  if (hard) {
    // The host checked 0 <= label < vocab (and not ignore_index: skipped
    // above), except in the vocabulary-parallel phases, where a label
    // outside this slice is another rank's.
    const int64_t label = p.labels[row];
    const bool here = label >= 0 && label < p.vocab;
    if (here) {
      alignas(64) acc_t z_label[Vectorized<acc_t>::size()];  // load_chunk pads to a whole vector
      load_chunk(row_ptr(p.student, row, label), p.student.dtype, 1, z_label);
      z_label_here = z_label[0];
    }
    // log sum exp(z) - z_label, with max and log(sum) kept apart.
    cross_entropy = log_sum_z1 - (z_label_here - lse_z1.max);
    hard_grad = {true, here ? label : -1, static_cast<acc_t>(p.effective_hard_label_weight()), unit_t,
                 static_cast<acc_t>(-lse_z1.max), static_cast<acc_t>(log_sum_z1)};
  }
  if (phase == Phase::kPartialSums) {
    const double sums[4] = {loss_sum, u_sum, v_sum, z_label_here};
    std::copy(sums, sums + 4, vp.sums + row * 4);
    return;
  }
  if (phase == Phase::kGradients) {  // the whole row's weight sums
    u_sum = vp.global_sums[row * 4 + 1];
    v_sum = vp.global_sums[row * 4 + 2];
  } else {
    *loss_out = static_cast<acc_t>(p.effective_soft_label_weight() * loss_sum + p.effective_hard_label_weight() * cross_entropy);
  }

  // Pass 3: gradients from the scratch.
  if (want_gs) {
    write_grad_row(scratch.u, scratch.q, static_cast<acc_t>(u_sum), p, p.grad_student, out_offset, c, row, hard_grad,
                   peak_entry(peak_q, scratch.u, scratch.q, u_sum, p.vocab));
  }
  if (want_gt) {
    write_grad_row(scratch.v, scratch.p, static_cast<acc_t>(v_sum), p, p.grad_teacher, out_offset, c, row,
                   HardLabelGrad<acc_t>{}, peak_entry(peak_p, scratch.v, scratch.p, v_sum, p.vocab));
  }
}

// Rows per parallel task: enough entries (~32k) that scheduling is noise.
int64_t grain_rows(int64_t vocab) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
}

// f(begin, end) over the rows [0, rows) on the op's thread pool.
template <class F>
void parallel_rows(ParallelFor parallel_for, int64_t rows, int64_t grain, const F& f) {
  parallel_for(0, rows, grain, [](void* context, int64_t begin, int64_t end) {
    (*static_cast<const F*>(context))(begin, end);
  }, const_cast<F*>(&f));
}

template <math::Divergence D, class acc_t>
void forward_rows(const ForwardParams& p, const VocabParallelParams& vp, ParallelFor parallel_for) {
  parallel_rows(parallel_for, p.rows, grain_rows(p.vocab), [&](int64_t begin, int64_t end) {
    RowChunk<acc_t> chunk;
    RowScratch<acc_t> scratch(p, D == math::Divergence::kAKL, is_usual_step<D>(p, vp.phase));
    for (int64_t row = begin; row < end; ++row) forward_row<D>(p, vp, row, chunk, scratch);
  });
}

template <class acc_t>
void scale_grad(const ScaleGradParams& p, ParallelFor parallel_for) {
  using Vec = Vectorized<acc_t>;
  const c10::ScalarType dtype = p.grad.dtype;
  const int64_t elem = element_size(dtype);
  parallel_rows(parallel_for, p.rows, grain_rows(p.vocab), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buffer[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t k = p.scale_per_row ? row : 0;
      const acc_t scale = p.scale_dtype == c10::ScalarType::Double
                              ? static_cast<acc_t>(static_cast<const double*>(p.scale)[k])
                              : static_cast<acc_t>(static_cast<const float*>(p.scale)[k]);
      const bool in_place = p.out == p.grad.data;
      if (in_place && scale == acc_t(1)) continue;  // the usual loss.backward(): nothing to do
      const Vec scale_v(scale);
      const char* src = static_cast<const char*>(row_ptr(p.grad, row, 0));
      char* dst = in_place ? const_cast<char*>(src) : static_cast<char*>(p.out) + row * p.vocab * elem;
      for (int64_t start = 0; start < p.vocab; start += kChunk) {
        const int64_t n = std::min(kChunk, p.vocab - start);
        const int64_t padded = load_chunk(src + start * elem, dtype, n, buffer);
        for (int64_t i = 0; i < padded; i += Vec::size()) (Vec::loadu(buffer + i) * scale_v).store(buffer + i);
        store_chunk(buffer, n, dst + start * elem, dtype);
      }
    }
  });
}

}  // namespace

void vocab_parallel_kernel(const ForwardParams& params, const VocabParallelParams& phase, ParallelFor parallel_for) {
  dispatch_divergence(params.divergence, [&](auto divergence) {
    if (params.double_math) {
      forward_rows<decltype(divergence)::value, double>(params, phase, parallel_for);
    } else {
      forward_rows<decltype(divergence)::value, float>(params, phase, parallel_for);
    }
  });
}

void distill_forward_kernel(const ForwardParams& params, ParallelFor parallel_for) {
  vocab_parallel_kernel(params, VocabParallelParams{}, parallel_for);
}

void scale_grad_kernel(const ScaleGradParams& params, ParallelFor parallel_for) {
  if (params.grad.dtype == c10::ScalarType::Double || params.scale_dtype == c10::ScalarType::Double) {
    scale_grad<double>(params, parallel_for);
  } else {
    scale_grad<float>(params, parallel_for);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace todi_ext::cpu
