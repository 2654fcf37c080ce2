// The register-row kernel (kernel v2): each logit is read from memory once.
// A row pair is split over a thread-block cluster (1-16 CTAs, sized by the
// vocabulary: register_row_shape); every thread owns 32 entries of both
// rows: their raw 16-byte words wait in shared memory, their exponentials
// stay in registers from pass 1 to the gradient store:
//   load    every word in flight at once, thread maxima, words to shared memory
//   pass 1  e = 2^((x - m) log2(e) / T) against the thread max m, kept; sums;
//           one (max, sum) merge over the CTA and the cluster
//   pass 2  p = e_s f_s, q = e_z f_z (f: the thread's max moved to the row's,
//           and 1 / sum: no exp); log p, log q from the raw words and the
//           log-sums; the divergence's terms (math::divergence_terms; ToDi at
//           beta = 1 one reciprocal); e becomes u and q; one (loss, U) row sum
//   pass 3  g = (u - q U) / T from registers, 16-byte streaming stores.
// So ToDi costs 3 MUFU per entry instead of ~10, and HBM sees each input
// once and the gradient once. What it does not serve (rows longer than
// 16 x 256 x 32 entries or not 16-byte aligned, a teacher gradient, float64,
// mixed dtypes, the vocabulary-parallel phases) takes the streamed kernel of
// streamed_kernel.cuh. Reductions run in a fixed order: the same inputs
// give bitwise the same outputs.
#pragma once

#include "streamed_kernel.cuh"

namespace todi_ext::cuda {

// Entries of each row a thread holds: their exponentials (and later the
// gradient's parts) take 64 registers, so 2 CTAs of 256 threads fit an SM at
// <= 128 registers a thread. The raw words sit in shared memory (32 KB a CTA
// for 16-bit rows, 64 KB for float32): in registers too they took 96-128
// registers and spilled (kernel_resources.py, NOTES).
constexpr int kRegisterRowEntries = 32;
constexpr int kRegisterRowThreads = 256;
constexpr int kRegisterRowMaxParts = 16;  // above the portable 8: allowed per kernel on sm_90
static_assert(kRegisterRowMaxParts <= kWarp, "cluster reductions read one rank per lane");

// Dynamic shared memory of a CTA: both rows' raw words.
inline size_t register_row_smem(int threads, int64_t elem_bytes) {
  return 2 * static_cast<size_t>(threads) * kRegisterRowEntries * elem_bytes;
}

// A launch of the register-row kernel: `parts` CTAs per cluster of `threads`
// threads each; parts == 0: the row does not fit.
struct RegisterRowShape {
  int parts = 0;
  int threads = 0;
};

// The smallest cluster (a power of 2) whose registers hold the row, and the
// fewest warps per CTA that do; short rows get one CTA of fewer threads.
inline RegisterRowShape register_row_shape(int64_t vocab, int64_t elem_bytes, int max_parts = kRegisterRowMaxParts) {
  const int64_t per_vector = 16 / elem_bytes;
  const int64_t vectors_per_thread = kRegisterRowEntries / per_vector;
  const int64_t vectors = (vocab + per_vector - 1) / per_vector;  // the last one may be partial
  for (int parts = 1; parts <= max_parts; parts *= 2) {
    const int64_t per_cta = (vectors + parts - 1) / parts;
    if (per_cta <= kRegisterRowThreads * vectors_per_thread) {
      const int64_t threads = ((per_cta + vectors_per_thread - 1) / vectors_per_thread + kWarp - 1) / kWarp * kWarp;
      return {parts, static_cast<int>(threads < kWarp ? kWarp : threads)};
    }
  }
  return {};
}

// Whether the kernel serves these arguments: one dtype of 4 or 2 bytes for
// both inputs, every row starting on a 16-byte boundary, no teacher gradient (its two more terms per
// entry would not fit the registers).
inline bool register_rows_eligible(const ForwardParams& args, int64_t elem_bytes) {
  const auto aligned = [&](const RowMatrix& m) {
    if (reinterpret_cast<uintptr_t>(m.data) % 16 != 0) return false;
    for (int d = 0; d < m.layout.dims; ++d) {
      if (m.layout.sizes[d] > 1 && m.layout.strides[d] * elem_bytes % 16 != 0) return false;
    }
    return true;
  };
  return !args.double_math && elem_bytes != 8 && args.student.dtype == args.teacher.dtype &&
         args.grad_teacher.data == nullptr && aligned(args.student) && aligned(args.teacher);
}

// Keeps the compiler from carrying values across it in registers: the raw
// words are read from shared memory again after it, not kept from before.
__device__ __forceinline__ void reload_barrier() {
#if defined(__CUDA_ARCH__)
  asm volatile("" ::: "memory");
#endif
}

// A (max, sum) log-sum-exp state of x / T in logit units: max is the
// largest logit x itself and sum adds 2^((x - max) k2), k2 = log2(e) / T.
// x - max is exact for 16-bit logits (one rounding for float32) and the max
// entry's term exactly 1; forming x / T first would add an error of
// ~eps |x / T| to every exponent (and take one more instruction).
struct Base2Rescale {
  float k2;
  __device__ float operator()(float difference) const { return math::Ops<float>::exp2(difference * k2); }
};
using ScaledLse = math::LogSumExp<float, Base2Rescale>;

// 2^(d k) for d = x - m (exact: 16-bit logits; one rounding for float32) and
// k = log2(e) / T held as hi + lo: ex2 of the rounded product d hi, times
// 1 + ln(2) (its rounding error + d lo). The exponent is then good to
// ~2^-48 |d k| instead of ~2^-24 |d k|: an entry 100 below the max gets its
// exponential to ~1e-7 instead of ~1e-5, and those tiny entries decide the
// gradient of saturated rows (without it SKL at large logit scales fails the
// accuracy standard; NOTES). 5 instructions more than ex2 alone.
struct Exp2Scaled {
  float hi, lo;
  __device__ Exp2Scaled(float inv_t) {
    hi = inv_t * math::kLog2e<float>;
    lo = fmaf(inv_t, math::kLog2e<float>, -hi) + inv_t * float(1.4426950408889634 - double(math::kLog2e<float>));
  }
  __device__ float operator()(float d) const {
    const float a = d * hi;
    // The rounding error of a, and d lo. d <= 0 (or NaN): a -inf d, or one
    // whose d hi overflows (finfo.min masks), makes it NaN or +inf, where the
    // exponential is 0: fminf drops a NaN. A NaN d stays NaN in e.
    const float c = fminf(fmaf(d, lo, fmaf(d, hi, -a)), 1.f);
    const float e = math::Ops<float>::exp2(a);
    return fmaf(e * 0.6931471805599453f, c, e);
  }
};

// A row's log-sum-exp in the same units: log q = (x - max) / T - log_sum,
// one FMA (fmaf on the host too: the emulation rounds the same way).
struct RawRowLse {
  float max, log_sum;
  __device__ float log_prob(float x, float inv_t) const { return fmaf(x - max, inv_t, -log_sum); }
};

// A 16-byte word of T values and the floats it holds.
template <class T>
struct Word {
  static constexpr int kN = 16 / sizeof(T);
  // w by value: a reference into shared memory became kN 2-byte loads.
  static __device__ __forceinline__ void unpack(const uint4 w, float (&x)[kN]) {
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int k = 0; k < kN; ++k) x[k] = Elem<T>::template load<float>(e[k]);
  }
  static __device__ __forceinline__ uint4 pack(const float (&x)[kN]) {
    uint4 w;
    T* e = reinterpret_cast<T*>(&w);
#pragma unroll
    for (int k = 0; k < kN; ++k) e[k] = Elem<T>::from(x[k]);
    return w;
  }
  // max(m, the word's values), NaN left out as by fmaxf; 16-bit values two
  // at a time in their own type (exact), with no unpacking.
  static __device__ __forceinline__ float max_into(float m, const uint4 w) {
    using O = math::Ops<float>;
    if constexpr (sizeof(T) == 2) {
      using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
      const T2* h = reinterpret_cast<const T2*>(&w);
      const T2 top = __hmax2(__hmax2(h[0], h[1]), __hmax2(h[2], h[3]));
      return O::max(m, O::max(__low2float(top), __high2float(top)));
    } else {
      float x[kN];
      unpack(w, x);
#pragma unroll
      for (int k = 0; k < kN; ++k) m = O::max(m, x[k]);
      return m;
    }
  }
  static __device__ __forceinline__ uint4 splat(float v) {
    float x[kN];
#pragma unroll
    for (int k = 0; k < kN; ++k) x[k] = v;
    return pack(x);
  }
};

template <class T, math::Divergence D>
__global__ void __launch_bounds__(kRegisterRowThreads, 2) register_rows_kernel(const ForwardParams args) {
  using A = float;
  using O = math::Ops<A>;
  using W = Word<T>;
  constexpr int kVec = W::kN;
  constexpr int kVecs = kRegisterRowEntries / kVec;
  constexpr A kInf = std::numeric_limits<A>::infinity();
  TODI_DYNAMIC_SHARED(raw_bytes);
  TODI_SHARED_ARRAY(A, scratch, (D == math::Divergence::kAKL ? math::kAklCandidates : 4) * kWarp);
  TODI_SHARED_ARRAY(A, slot_memory, 2 * kClusterSlot);
  ClusterSlots<A> cluster_slots{slot_memory};

  int parts = 1, rank = 0;
#ifdef TODI_EXT_HAS_CLUSTERS
  parts = static_cast<int>(cooperative_groups::this_cluster().num_blocks());
  rank = static_cast<int>(cooperative_groups::this_cluster().block_rank());
#endif
  const int threads = static_cast<int>(blockDim.x);
  const int tid = static_cast<int>(threadIdx.x);
  // Row positions fit an int here (rows of <= 16 x 256 x 32 entries): 32-bit
  // index arithmetic, where 64-bit divisions inlined long subroutines.
  const int vocab = static_cast<int>(args.vocab);
  const int full_vectors = vocab / kVec;
  const int tail = vocab - full_vectors * kVec;  // entries of the partial last vector (0: none)
  const int vectors = full_vectors + (tail > 0);
  // Vector j of this thread: (j * parts + rank) * threads + tid, so every
  // CTA of the cluster has a part of each of the kVecs strips of the row,
  // and a warp reads 512 consecutive bytes.
  const auto vector_index = [&](int j) { return (j * parts + rank) * threads + tid; };
  // This thread's raw words: only it writes and reads them.
  uint4* const raw = reinterpret_cast<uint4*>(raw_bytes);
  const auto z_word = [&](int j) -> uint4& { return raw[j * threads + tid]; };
  const auto s_word = [&](int j) -> uint4& { return raw[(kVecs + j) * threads + tid]; };

  const A inv_t = static_cast<A>(*args.inv_temperature);
  const double beta = *args.beta;
  const bool scalars_ok = inv_t > A(0) && math::is_finite(inv_t) && math::is_finite(beta);
  const bool hard = args.hard_label_weight != 0;
  const bool unit_t = *args.inv_temperature == 1.0;
  const bool need_z1 = hard && !unit_t;

  auto row_sum = [&](auto& v) {
    block_sum(v, scratch);
#ifdef TODI_EXT_HAS_CLUSTERS
    if (parts > 1) cluster_sum(v, cluster_slots);
#endif
  };
  auto row_merge = [&](ScaledLse& a, ScaledLse& b) {
    block_merge(a, b, scratch);
#ifdef TODI_EXT_HAS_CLUSTERS
    if (parts > 1) cluster_merge(a, b, cluster_slots);
#endif
  };
  // f(j, k, x, y) for this thread's entries (word j, entry k), x and y from shared memory.
  auto for_entries = [&](auto&& f) {
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      A x[kVec], y[kVec];
      W::unpack(z_word(j), x);
      W::unpack(s_word(j), y);
#pragma unroll
      for (int k = 0; k < kVec; ++k) f(j, k, x[k], y[k]);
    }
  };

  for (int64_t row = blockIdx.x / parts; row < args.rows; row += gridDim.x / parts) {
    const T* z_row = static_cast<const T*>(args.student.data) + args.student.layout.row_offset(row);
    const T* s_row = static_cast<const T*>(args.teacher.data) + args.teacher.layout.row_offset(row);
    T* out = args.grad_student.data ? static_cast<T*>(args.grad_student.data) + row * args.vocab : nullptr;
    const bool out_vectors = reinterpret_cast<uintptr_t>(out) % 16 == 0;  // else scalar stores
    const bool writes_loss = rank == 0 && tid == 0;

    // Writes this thread's entries of the gradient row: vector j (its
    // entries before the row's end, where it is the partial last one).
    const auto store_vector = [&](int j, const A (&g)[kVec]) {
      const int v = vector_index(j);
      if (out == nullptr || v >= vectors) return;
      if (out_vectors && v < full_vectors) {
        store_streaming(reinterpret_cast<uint4*>(out) + v, W::pack(g));
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          if (v * kVec + k < vocab) out[v * kVec + k] = Elem<T>::from(g[k]);
        }
      }
    };
    const auto fill_row = [&](A value) {
      A g[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) g[k] = value;
#pragma unroll
      for (int j = 0; j < kVecs; ++j) store_vector(j, g);
      if (writes_loss) static_cast<A*>(args.loss)[row] = value;
    };

    if (args.labels != nullptr && args.labels[row] == args.ignore_index) {
      fill_row(A(0));
      continue;
    }

    // Load: every word of this thread in flight at once, the thread maxima of
    // z and s (of x; / T after: 1/T > 0), the words to shared memory. Slots
    // past the row hold -inf, which every sum leaves out.
    A top_z = -kInf, top_s = -kInf;
    {
      uint4 zw[kVecs], sw[kVecs];
      const uint4 empty = W::splat(-kInf);
#pragma unroll
      for (int j = 0; j < kVecs; ++j) {
        const int v = vector_index(j);
        const bool here = v < full_vectors;
        zw[j] = here ? load_streaming(reinterpret_cast<const uint4*>(z_row) + v) : empty;
        sw[j] = here ? load_streaming(reinterpret_cast<const uint4*>(s_row) + v) : empty;
        if (v == full_vectors && tail > 0) {  // the partial last vector, entry by entry (exact: T -> float -> T)
          A x[kVec], y[kVec];
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            x[k] = k < tail ? Elem<T>::template load<A>(z_row[v * kVec + k]) : -kInf;
            y[k] = k < tail ? Elem<T>::template load<A>(s_row[v * kVec + k]) : -kInf;
          }
          zw[j] = W::pack(x);
          sw[j] = W::pack(y);
        }
      }
#pragma unroll
      for (int j = 0; j < kVecs; ++j) {
        top_z = W::max_into(top_z, zw[j]);
        top_s = W::max_into(top_s, sw[j]);
        z_word(j) = zw[j];
        s_word(j) = sw[j];
      }
    }
    reload_barrier();

    // Pass 1: the exponentials against the thread maxima, kept, and their sums.
    const bool none_z = top_z == -kInf, none_s = top_s == -kInf;  // no finite entry in this thread
    const A ref_z = none_z ? A(0) : top_z;  // 2^(-inf - 0) = 0, not NaN
    const A ref_s = none_s ? A(0) : top_s;
    const Exp2Scaled exp2_scaled(inv_t), exp2_unscaled(A(1));
    const A k2 = exp2_scaled.hi;
    A ez[kVecs][kVec], es[kVecs][kVec];
    ScaledLse lse_z{top_z, A(0), {k2}}, lse_s{top_s, A(0), {k2}}, lse_z1{top_z, A(0), {math::kLog2e<A>}};
    auto exponentials = [&](A x, A y, A& e_z, A& e_s) {
      e_z = exp2_scaled(x - ref_z);
      e_s = exp2_scaled(y - ref_s);
      lse_z.sum += e_z;
      lse_s.sum += e_s;
      if (need_z1) lse_z1.sum += exp2_unscaled(x - ref_z);  // z's own (T = 1), for the cross-entropy
    };
    for_entries([&](int j, int k, A x, A y) { exponentials(x, y, ez[j][k], es[j][k]); });
    ScaledLse row_z = lse_z, row_s = lse_s, row_z1 = lse_z1;
    row_merge(row_z, row_s);
    if (need_z1) {
      ScaledLse unused = row_z1.identity();
      row_merge(row_z1, unused);
    }
    const RawRowLse lz{row_z.max, O::log(row_z.sum)}, ls{row_s.max, O::log(row_s.sum)};
    const RawRowLse lz1 = need_z1 ? RawRowLse{row_z1.max, O::log(row_z1.sum)} : lz;

    const int64_t label64 = hard ? args.labels[row] : 0;
    const bool label_ok = !hard || (label64 >= 0 && label64 < vocab);  // not checked on the host: a sync
    const int label = static_cast<int>(label64);
    if (!scalars_ok || !label_ok || !math::is_finite(lz.max + lz.log_sum) || !math::is_finite(ls.max + ls.log_sum) ||
        !math::is_finite(lz1.max + lz1.log_sum)) {
      fill_row(std::numeric_limits<A>::quiet_NaN());
      continue;
    }
    // p = e_s * f_s: the thread's max moved to the row's, and 1 / sum.
    // A thread with no finite entry has e = 0 everywhere and ref 0, which may
    // lie above the row max: its exponent is clamped to 0 (2^(0 - max) can
    // overflow, and 0 * inf is NaN).
    const A f_z = exp2_scaled(O::min(ref_z - row_z.max, A(0))) * O::recip(row_z.sum);
    const A f_s = exp2_scaled(O::min(ref_s - row_s.max, A(0))) * O::recip(row_s.sum);

    math::DivergenceParams prm = args.divergence_params;
    prm.beta = beta;
    if constexpr (D == math::Divergence::kAKL) {
      auto walk = [&](auto&& f) {
        for_entries([&](int, int, A x, A y) { f(int64_t(0), x, y); });
      };
      akl_row_weights(walk, row_sum, inv_t, lz, ls, prm);
    }

    // The peak: where the student's largest probability 1 / sum exceeds 3/4
    // (so one entry, the row's max logit), its gradient (u - q U) / T is a
    // cancellation - u and q U agree but for ~eps |u| - that decided the
    // whole error of saturated rows (TVD, JS at logit scale 40) and lost the
    // entry at T <= 1e-8. It is formed as (u Q' - q U') / T instead, Q' and
    // U' summed over the other entries (as on the CPU: docs/accuracy.md).
    // Only the thread holding the row max sees the entry; the others' sums
    // are over other entries already. The peak's q is f_z: its exponential
    // is 2^0.
    const bool peak_row = row_z.sum < A(4) / A(3);
    const bool holds_peak = peak_row && !none_z && ref_z == row_z.max;

    // Pass 2: the terms; e_z becomes u = df/dlog q, e_s becomes q.
    A sums[2] = {A(0), A(0)};  // loss, U
    auto pass2 = [&](auto unit_beta) {
      auto entry = [&](A z, A s, A& e_z, A& e_s) {
        const A log_p = ls.log_prob(s, inv_t);
        const A log_q = lz.log_prob(z, inv_t);
        auto t = math::divergence_terms<D, decltype(unit_beta)::value>(log_p, log_q, e_s * f_s, e_z * f_z, prm);
        // A +-inf logit (or a padding slot) makes |r| infinite or NaN: left out, as in the streamed kernel.
        if (!(O::abs(log_p - log_q) < kInf)) {
          t.loss = A(0);
          t.u = A(0);
        }
        sums[0] += t.loss;
        sums[1] += t.u;
        e_z = t.u;
        e_s = t.q;
      };
      for_entries([&](int j, int k, A x, A y) { entry(x, y, ez[j][k], es[j][k]); });
    };
    if (beta == 1.0) {
      pass2(std::true_type{});
    } else {
      pass2(std::false_type{});
    }
    // The slot (j * kVec + k) of the entry whose logit is the row max, in the thread that holds it.
    const auto peak_slot = [&] {  // -1: none (cannot happen where holds_peak: the max is this thread's)
      int slot = -1;
      for_entries([&](int j, int k, A x, A) { slot = x == lz.max ? j * kVec + k : slot; });
      return slot;
    };
    A rest[2] = {A(0), A(0)};  // over the other entries: sum q; and the peak's u
    if (peak_row) {
      // A thread's sum of q: its pass-1 sum times f_z; the holder's U and sum
      // of q again from its registers, without the peak (one thread of a row).
      A thread_q = lse_z.sum * f_z, peak_u = A(0);
      if (holds_peak) {
        const int slot = peak_slot();
        sums[1] = thread_q = A(0);
#pragma unroll
        for (int j = 0; j < kVecs; ++j) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            const bool peak = j * kVec + k == slot;
            sums[1] += peak ? A(0) : ez[j][k];
            thread_q += peak ? A(0) : es[j][k];
            peak_u += peak ? ez[j][k] : A(0);
          }
        }
      }
      A parts4[4] = {sums[0], sums[1], thread_q, peak_u};
      row_sum(parts4);
      sums[0] = parts4[0];
      sums[1] = parts4[1];
      rest[0] = parts4[2];
      rest[1] = parts4[3];
    } else {
      row_sum(sums);
    }
    if (writes_loss) {
      A loss = static_cast<A>(args.effective_soft_label_weight()) * sums[0];
      if (hard) {
        const A z_label = Elem<T>::template load<A>(z_row[label]);
        loss += static_cast<A>(args.effective_hard_label_weight()) * (lz1.log_sum - (z_label - lz1.max));
      }
      static_cast<A*>(args.loss)[row] = loss;
    }
    if (out == nullptr) continue;

    // Pass 3: the gradient from registers, (u - q U) / T scaled (the
    // subtraction first: u and q U can be ~1/T and agree to the last bits),
    // plus the cross-entropy's softmax(z) - one-hot.
    const A u_sum = sums[1] + rest[1];
    const A reduction_scale = args.grad_scale ? *static_cast<const A*>(args.grad_scale) : A(1);
    const A grad_t = inv_t * reduction_scale * static_cast<A>(args.effective_soft_label_weight());
    const A hard_t = static_cast<A>(args.effective_hard_label_weight()) * reduction_scale;
    // The label's slot among this thread's entries (j * kVec + k), or -1.
    int label_slot = -1;
    if (hard) {
      const int v = label / kVec, strip = v / threads;
      if (tid == v % threads && rank == strip % parts) label_slot = strip / parts * kVec + label % kVec;
    }
    // mode 0: no cross-entropy; 1: at T = 1 (its softmax is q); 2: at T != 1 (exp from the raw logit).
    auto pass3 = [&](auto mode) {
      constexpr int kMode = decltype(mode)::value;
      auto grad = [&](A u, A q, A z, int slot) {
        A g = math::log_softmax_grad(u, q, u_sum, grad_t);
        if constexpr (kMode == 1) g += hard_t * q;
        if constexpr (kMode == 2) g += hard_t * O::exp(lz1.log_prob(z, A(1)));
        if constexpr (kMode != 0) g -= slot == label_slot ? hard_t : A(0);
        return g;
      };
#pragma unroll
      for (int j = 0; j < kVecs; ++j) {
        A x[kVec], g[kVec];
        if constexpr (kMode == 2) W::unpack(z_word(j), x);
#pragma unroll
        for (int k = 0; k < kVec; ++k) g[k] = grad(ez[j][k], es[j][k], kMode == 2 ? x[k] : A(0), j * kVec + k);
        store_vector(j, g);
      }
    };
    if (!hard) {
      pass3(std::integral_constant<int, 0>{});
    } else if (unit_t) {
      pass3(std::integral_constant<int, 1>{});
    } else {
      pass3(std::integral_constant<int, 2>{});
    }
    if (holds_peak) {  // the peak's gradient, over the one pass 3 wrote
      const int slot = peak_slot();
      A g = (rest[1] * rest[0] - f_z * sums[1]) * grad_t;  // rest[1]: the peak's u, summed with zeros
      if (hard) g += hard_t * (unit_t ? f_z : O::exp(lz1.log_prob(lz.max, A(1))));
      if (hard && slot == label_slot) g -= hard_t;
      if (slot >= 0) out[vector_index(slot / kVec) * kVec + slot % kVec] = Elem<T>::from(g);
    }
  }
#ifdef TODI_EXT_HAS_CLUSTERS
  // No CTA may leave while another can still read its slots.
  if (parts > 1) cooperative_groups::this_cluster().sync();
#endif
}

}  // namespace todi_ext::cuda
