// The distillation CUDA kernels: ToDi and its paper's baselines, the divergence a
// template parameter (math::divergence_entry). Design and status: README.md here.
//
// The streamed kernel: one thread block per position row (grid-stride over
// rows): pass 1 the online log-sum-exps of z/T and s/T, pass 2 the loss and
// the weight sums U, V, pass 3 the gradients, each pass reading the row again
// (from L2 as far as it holds the rows in flight). It serves what the
// register-row kernel (register_rows_kernel.cuh) does not: rows too long for
// its registers, misaligned rows, the teacher's gradient, float64, mixed
// dtypes and the vocabulary-parallel phases. Block reductions are warp
// shuffles then one warp over the per-warp partials, in a fixed order: the
// same inputs give bitwise the same outputs.
#pragma once

#ifdef TODI_EXT_HOST_EMULATION  // tests/test_cuda_host.py runs these kernels on the CPU
#include "host_emulation.h"
#else
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
// Shared-memory declarations go through this macro so that the host
// emulation can give each emulated block its own copy.
#define TODI_SHARED_ARRAY(type, name, count) __shared__ type name[count]
#define TODI_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#include <cstdint>
#include <limits>
#include <type_traits>

#include "todi_ext/kernel_params.h"
#include "todi_ext/row_layout.h"
#include "todi_ext/divergence_math.h"

namespace todi_ext::cuda {

constexpr int kMaxThreads = 512;
constexpr int kWarp = 32;

// ---------------------------------------------------------------- elements
// Typed element access, converting to and from the accumulation type:
// plain casts for float and double, intrinsics for the 16-bit types.
template <class T>
struct Elem {
  template <class A>
  static __device__ __forceinline__ A load(T x) { return static_cast<A>(x); }
  template <class A>
  static __device__ __forceinline__ T from(A x) { return static_cast<T>(x); }
};
template <>
struct Elem<__nv_bfloat16> {
  template <class A>
  static __device__ __forceinline__ A load(__nv_bfloat16 x) { return static_cast<A>(__bfloat162float(x)); }
  template <class A>
  static __device__ __forceinline__ __nv_bfloat16 from(A x) { return __float2bfloat16_rn(static_cast<float>(x)); }
};
template <>
struct Elem<__half> {
  template <class A>
  static __device__ __forceinline__ A load(__half x) { return static_cast<A>(__half2float(x)); }
  template <class A>
  static __device__ __forceinline__ __half from(A x) { return __float2half_rn(static_cast<float>(x)); }
};

// Inputs whose dtypes differ (student bf16 with a float32 teacher, say) go
// through one generic instantiation that switches on the dtype per element
// instead of compiling every dtype pair. Slower, rarely used.
using Dtype = c10::ScalarType;

template <class A>
__device__ __forceinline__ A load_any(const void* p, Dtype t, int64_t i) {
  switch (t) {
    case Dtype::Float: return Elem<float>::load<A>(static_cast<const float*>(p)[i]);
    case Dtype::Double: return Elem<double>::load<A>(static_cast<const double*>(p)[i]);
    case Dtype::BFloat16: return Elem<__nv_bfloat16>::load<A>(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return Elem<__half>::load<A>(static_cast<const __half*>(p)[i]);
  }
}

template <class A>
__device__ __forceinline__ void store_any(void* p, Dtype t, int64_t i, A x) {
  switch (t) {
    case Dtype::Float: static_cast<float*>(p)[i] = Elem<float>::from(x); break;
    case Dtype::Double: static_cast<double*>(p)[i] = Elem<double>::from(x); break;
    case Dtype::BFloat16: static_cast<__nv_bfloat16*>(p)[i] = Elem<__nv_bfloat16>::from(x); break;
    default: static_cast<__half*>(p)[i] = Elem<__half>::from(x); break;
  }
}

// Marker for the generic, per-element-switch instantiation.
struct AnyDtype {};

template <class T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<A>{}, TypeTag<T>{}) with the kernels' accumulation type A
// and element type T for these inputs (AnyDtype where their dtypes differ).
template <class Fn>
void dispatch_dtypes(const ForwardParams& args, Fn&& fn) {
  const Dtype t = args.student.dtype;
  if (t != args.teacher.dtype) {
    return args.double_math ? fn(TypeTag<double>{}, TypeTag<AnyDtype>{}) : fn(TypeTag<float>{}, TypeTag<AnyDtype>{});
  }
  switch (t) {
    case Dtype::Float: return fn(TypeTag<float>{}, TypeTag<float>{});
    case Dtype::BFloat16: return fn(TypeTag<float>{}, TypeTag<__nv_bfloat16>{});
    case Dtype::Half: return fn(TypeTag<float>{}, TypeTag<__half>{});
    default: return fn(TypeTag<double>{}, TypeTag<double>{});
  }
}

// ------------------------------------------------------------- reductions
template <class A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <class L>
__device__ __forceinline__ void warp_merge(L& l) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const auto other_max = __shfl_xor_sync(0xffffffffu, l.max, offset);
    const auto other_sum = __shfl_xor_sync(0xffffffffu, l.sum, offset);
    l.merge(other_max, other_sum);
  }
}

// Sums kN values over the block; every thread gets the totals. `scratch`
// holds kN * 32 values. Fixed order: deterministic.
template <int kN, class A>
__device__ __forceinline__ void block_sum(A (&v)[kN], A* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < kN; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kN; ++k) scratch[k * kWarp + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    A x = lane < warps ? scratch[k * kWarp + lane] : A(0);
    v[k] = warp_sum(x);
  }
  __syncthreads();  // scratch is reused by the next reduction
}

// Merges two log-sum-exp states over the block; every thread gets the result.
template <class A, class L>
__device__ __forceinline__ void block_merge(L& a, L& b, A* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  warp_merge(a);
  warp_merge(b);
  if (lane == 0) {
    scratch[warp] = a.max;
    scratch[kWarp + warp] = a.sum;
    scratch[2 * kWarp + warp] = b.max;
    scratch[3 * kWarp + warp] = b.sum;
  }
  __syncthreads();
  L wa = a.identity(), wb = b.identity();  // empty states (of a's kind: a scaled one keeps its scale)
  if (lane < warps) {
    wa.merge(scratch[lane], scratch[kWarp + lane]);
    wb.merge(scratch[2 * kWarp + lane], scratch[3 * kWarp + lane]);
  }
  warp_merge(wa);
  warp_merge(wb);
  a = wa;
  b = wb;
  __syncthreads();
}

// ------------------------------------------------------------ row walking
// Loads that will not be reused (evict-first) and stores of a gradient no
// one reads back in this kernel.
__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
#if defined(__CUDA_ARCH__)
  return __ldcs(p);
#else
  return *p;
#endif
}

__device__ __forceinline__ void store_streaming(uint4* p, const uint4& v) {
#if defined(__CUDA_ARCH__)
  __stcs(p, v);
#else
  *p = v;
#endif
}

// The 16-byte loads of a row walk: plain, or (pass 1 of the streamed kernel,
// whose row passes 2 and 3 read again) marked evict-last in L2, so that the
// rows in flight, more than L2 holds at long vocabularies, keep their lines
// ahead of the gradient's and other traffic.
struct PlainLoad {
  __device__ __forceinline__ uint4 operator()(const uint4* p) const { return *p; }
};

struct EvictLastLoad {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800  // createpolicy and L2::cache_hint: sm_80 on
  uint64_t policy;
  __device__ __forceinline__ EvictLastLoad() {
    asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
  }
  // Not volatile and no memory clobber, so the compiler schedules these like
  // plain loads: right for the kernel's inputs, which it never writes and no
  // output aliases. Memory the kernel writes would need asm volatile.
  __device__ __forceinline__ uint4 operator()(const uint4* p) const {
    uint4 v;
    asm("ld.global.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "l"(policy));
    return v;
  }
#else
  __device__ __forceinline__ uint4 operator()(const uint4* p) const { return *p; }
#endif
};

// Where a row's 16-byte vectors start: rows of one dtype whose starts share
// their 16-byte misalignment are read as a scalar head, 16-byte vectors and a
// scalar tail; other rows entry by entry (head = vocab).
template <class T>
__device__ __forceinline__ int64_t vector_head(const T* z, const T* s, int64_t vocab) {
  const auto z_addr = reinterpret_cast<uintptr_t>(z);
  const auto s_addr = reinterpret_cast<uintptr_t>(s);
  if (z_addr % 16 != s_addr % 16 || z_addr % sizeof(T) != 0) return vocab;
  const auto head = static_cast<int64_t>((16 - z_addr % 16) % 16 / sizeof(T));
  return head < vocab ? head : vocab;
}

// The entries of one row this thread owns: vec(i0, zw, sw) for each 16-byte
// word pair (entries i0 .. i0 + 16 / sizeof(T) - 1, raw), elem(i, z, s) for
// the scalar head and tail (raw T values).
template <class T, class FV, class FE, class Load = PlainLoad>
__device__ __forceinline__ void for_each_vector(const T* z, const T* s, int64_t vocab, FV&& vec, FE&& elem,
                                                const Load& load = {}) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t head = vector_head(z, s, vocab);
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) elem(i, z[i], s[i]);
  const int64_t vectors = (vocab - head) / kVec;
  const uint4* zv = reinterpret_cast<const uint4*>(z + head);
  const uint4* sv = reinterpret_cast<const uint4*>(s + head);
  for (int64_t j = threadIdx.x; j < vectors; j += blockDim.x) {
    const uint4 zw = load(zv + j);  // by value: one 16-byte load each (a reference would become scalar loads)
    const uint4 sw = load(sv + j);
    vec(head + j * kVec, zw, sw);
  }
  for (int64_t i = head + vectors * kVec + threadIdx.x; i < vocab; i += blockDim.x) elem(i, z[i], s[i]);
}

// Calls f(i, z_i, s_i) (converted to A) for the entries of one row this thread owns.
template <class A, class T, class F>
__device__ __forceinline__ void for_each_entry(const T* z, const T* s, int64_t vocab, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  for_each_vector(
      z, s, vocab,
      [&](int64_t i0, const uint4& zw, const uint4& sw) {
        const T* ze = reinterpret_cast<const T*>(&zw);
        const T* se = reinterpret_cast<const T*>(&sw);
#pragma unroll
        for (int k = 0; k < kVec; ++k) f(i0 + k, Elem<T>::template load<A>(ze[k]), Elem<T>::template load<A>(se[k]));
      },
      [&](int64_t i, T z_i, T s_i) { f(i, Elem<T>::template load<A>(z_i), Elem<T>::template load<A>(s_i)); });
}

// Pass 1: folds x_k / T (x raw logits) into an online log-sum-exp: one max
// and one rescale per group, then per entry a multiply, a subtract and an exp.
// x / T is the rounded product x * inv_t everywhere (mul_rn: nvcc may not
// fuse it into the subtraction), in the max, in the sum and in passes 2-3's
// log p = (x * inv_t - max) - log(sum): the max lane is exactly 0 after the
// shift. With the exact product of an FMA instead, the max lane was off by up
// to half an ulp of x / T, and at T = 1e-10 exp(ulp / 2) overflowed. max and
// log(sum) stay apart, so large logits lose nothing to ulp(max). fmax ignores
// a NaN, but the NaN still reaches the sum through its own term.
template <class A, int N>
__device__ __forceinline__ void lse_fold(math::LogSumExp<A>& l, const A (&x)[N], A inv_t) {
  using O = math::Ops<A>;
  A top = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) top = O::max(top, x[k]);
  const A inf = std::numeric_limits<A>::infinity();
  const A new_max = O::max(l.max, O::mul_rn(top, inv_t));  // max(x) / T == max(x / T): 1/T > 0
  const A ref = new_max == -inf ? A(0) : new_max;  // all -inf so far: exp(-inf - 0) = 0, not NaN
  A sum = l.sum * O::exp(l.max - ref);
#pragma unroll
  for (int k = 0; k < N; ++k) sum += O::exp(O::mul_rn(x[k], inv_t) - ref);
  l.max = new_max;
  l.sum = sum;
}

// A row's log-sum-exp, its parts kept apart: log prob = (x * inv_t - max) - log_sum.
template <class A>
struct RowLse {
  A max, log_sum;
  __device__ A log_prob(A x, A inv_t) const { return (math::Ops<A>::mul_rn(x, inv_t) - max) - log_sum; }
};

// The row source of one instantiation: typed (T) or generic (AnyDtype).
template <class A, class T>
struct RowSource {
  const T* z;
  const T* s;
  __device__ RowSource(const ForwardParams& args, int64_t row)
      : z(static_cast<const T*>(args.student.data) + args.student.layout.row_offset(row)),
        s(static_cast<const T*>(args.teacher.data) + args.teacher.layout.row_offset(row)) {}
  template <class F>
  __device__ void for_each(int64_t vocab, F&& f) const { for_each_entry<A>(z, s, vocab, f); }
  __device__ static void store(void* out, Dtype, int64_t i, A x) { static_cast<T*>(out)[i] = Elem<T>::from(x); }
};

template <class A>
struct RowSource<A, AnyDtype> {
  const void* z;
  const void* s;
  Dtype zt, st;
  __device__ RowSource(const ForwardParams& args, int64_t row) : zt(args.student.dtype), st(args.teacher.dtype) {
    z = static_cast<const char*>(args.student.data) + args.student.layout.row_offset(row) * element_size(zt);
    s = static_cast<const char*>(args.teacher.data) + args.teacher.layout.row_offset(row) * element_size(st);
  }
  template <class F>
  __device__ void for_each(int64_t vocab, F&& f) const {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) f(i, load_any<A>(z, zt, i), load_any<A>(s, st, i));
  }
  __device__ static void store(void* out, Dtype t, int64_t i, A x) { store_any(out, t, i, x); }
};

// An entry with a +-inf logit in either input is left out of every sum
// (loss, gradient weights, AKL's split), as on the CPU.
template <class A>
__device__ __forceinline__ bool left_out(A z, A s) {
  const A inf = std::numeric_limits<A>::infinity();
  return z == inf || z == -inf || s == inf || s == -inf;
}

// --------------------------------------------------------------------- AKL
// AKL's per-row weights: the k-ary search of math::AklTailSearch (one walk of
// the row per 4 bits of the threshold, kAklCandidates sums per thread, a
// deterministic row sum each), then one walk for g_head and g_tail. Every
// walk computes the probability with the one expression below, so an entry
// is compared consistently. `walk(f)` calls f(i, z, s) for this thread's
// entries.
// R: the row's log-sum-exp with log_prob(x, inv_t) (RowLse, or the
// register-row kernel's RawRowLse).
template <class A, class R>
__device__ __forceinline__ A akl_teacher_prob(A s, A inv_t, const R& ls) {
  return math::Ops<A>::exp(ls.log_prob(s, inv_t));
}

// One walk: this thread's sums of p at the search's thresholds.
template <class A, class R, class Walk>
__device__ void akl_walk_sums(Walk&& walk, A inv_t, const R& ls, const math::AklTailSearch<A>& search,
                              A (&sums)[math::kAklCandidates]) {
  A thresholds[math::kAklCandidates];
#pragma unroll
  for (int j = 0; j < math::kAklCandidates; ++j) {
    thresholds[j] = search.threshold(j);
    sums[j] = A(0);
  }
  walk([&](int64_t, A z, A s) {
    if (left_out(z, s)) return;
    const A p = akl_teacher_prob(s, inv_t, ls);
#pragma unroll
    for (int j = 0; j < math::kAklCandidates; ++j) sums[j] += p <= thresholds[j] ? p : A(0);
  });
}

// This thread's g_head (g[0]) and g_tail (g[1]) at the split.
template <class A, class R, class Walk>
__device__ void akl_gap_sums(Walk&& walk, A inv_t, const R& lz, const R& ls, A tail_max, A (&g)[2]) {
  g[0] = g[1] = A(0);
  walk([&](int64_t, A z, A s) {
    if (left_out(z, s)) return;
    const A p = akl_teacher_prob(s, inv_t, ls);
    const A diff = math::Ops<A>::abs(p - math::Ops<A>::exp(lz.log_prob(z, inv_t)));
    g[0] += p <= tail_max ? A(0) : diff;
    g[1] += p <= tail_max ? diff : A(0);
  });
}

template <class A, class R, class Walk, class RowSum>
__device__ void akl_row_weights(Walk&& walk, RowSum&& row_sum, A inv_t, const R& lz, const R& ls,
                                math::DivergenceParams& prm) {
  math::AklTailSearch<A> search;
  const A mu = static_cast<A>(prm.akl_mu);
  while (!search.done()) {
    A sums[math::kAklCandidates];
    akl_walk_sums(walk, inv_t, ls, search, sums);
    row_sum(sums);
    search.advance(sums, mu);
  }
  A g[2];
  akl_gap_sums(walk, inv_t, lz, ls, search.tail_threshold(), g);
  row_sum(g);
  math::set_akl_weights(g[0], g[1], prm);
}

// ------------------------------------------------------------------ clusters
// Row reductions over a thread-block cluster, through distributed shared
// memory (sm_90; the register-row kernel). Each block publishes its
// block-level values in a slot, one cluster barrier, then in every warp lane
// r reads rank r's slot and the warp combines the lanes in its fixed
// shuffle tree: every block gets bitwise the same totals, for ~6
// instructions a value instead of one load and add per rank. Two slot sets
// used in turn: a block rewrites a set only after the next barrier, which
// every block reaches only once it has read that set.
constexpr int kClusterSlot = 16;  // values per slot (AKL's 15 sums at most)

template <class A>
struct ClusterSlots {
  A* slots;  // 2 * kClusterSlot values in this block's shared memory
  int parity = 0;

  __device__ A* next() {
    A* set = slots + parity * kClusterSlot;
    parity ^= 1;
    return set;
  }
};

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define TODI_EXT_HAS_CLUSTERS 1
// v: block totals, the same in every thread (block_sum); afterwards the cluster's.
template <int kN, class A>
__device__ __forceinline__ void cluster_sum(A (&v)[kN], ClusterSlots<A>& slots) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  A* mine = slots.next();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kN; ++k) mine[k] = v[k];
  }
  cluster.sync();
  const unsigned lane = threadIdx.x % kWarp;
  const A* theirs = lane < cluster.num_blocks() ? cluster.map_shared_rank(mine, lane) : nullptr;
#pragma unroll
  for (int k = 0; k < kN; ++k) v[k] = warp_sum(theirs ? theirs[k] : A(0));
}

// a, b: block states, the same in every thread (block_merge); afterwards the cluster's.
template <class A, class L>
__device__ __forceinline__ void cluster_merge(L& a, L& b, ClusterSlots<A>& slots) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  A* mine = slots.next();
  if (threadIdx.x == 0) {
    mine[0] = a.max;
    mine[1] = a.sum;
    mine[2] = b.max;
    mine[3] = b.sum;
  }
  cluster.sync();
  const unsigned lane = threadIdx.x % kWarp;
  L ta = a.identity(), tb = b.identity();
  if (lane < cluster.num_blocks()) {
    const A* theirs = cluster.map_shared_rank(mine, lane);
    ta.merge(theirs[0], theirs[1]);
    tb.merge(theirs[2], theirs[3]);
  }
  warp_merge(ta);
  warp_merge(tb);
  a = ta;
  b = tb;
}
#endif


// ------------------------------------------------------------- row stages
// The streamed kernel's work on one row, in stages: the log-sum-exps (pass
// 1), AKL's weights, the sums (pass 2) and the gradients (pass 3). The fused
// kernel runs them in turn; each vocabulary-parallel phase kernel runs one,
// with the other slices' results read from its float64 tables.

// Pass 1 over this thread's entries and one block merge: the row's
// log-sum-exps of z / T and s / T, and of z (z1) when need_z1. load: how the
// 16-byte words are read (EvictLastLoad where passes 2-3 follow).
template <class A, class T, class Load>
__device__ __forceinline__ void row_log_sum_exps(const RowSource<A, T>& src, int64_t vocab, A inv_t, bool need_z1,
                                                 A* scratch, const Load& load, math::LogSumExp<A>& lse_z,
                                                 math::LogSumExp<A>& lse_s, math::LogSumExp<A>& lse_z1) {
  if constexpr (!std::is_same_v<T, AnyDtype>) {
    constexpr int kVec = 16 / sizeof(T);
    for_each_vector(
        src.z, src.s, vocab,
        [&](int64_t, const uint4& zw, const uint4& sw) {
          const T* ze = reinterpret_cast<const T*>(&zw);
          const T* se = reinterpret_cast<const T*>(&sw);
          A zs[kVec], ss[kVec];
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            zs[k] = Elem<T>::template load<A>(ze[k]);
            ss[k] = Elem<T>::template load<A>(se[k]);
          }
          lse_fold(lse_z, zs, inv_t);
          lse_fold(lse_s, ss, inv_t);
          if (need_z1) lse_fold(lse_z1, zs, A(1));
        },
        [&](int64_t, T z, T s) {
          const A zs[1] = {Elem<T>::template load<A>(z)}, ss[1] = {Elem<T>::template load<A>(s)};
          lse_fold(lse_z, zs, inv_t);
          lse_fold(lse_s, ss, inv_t);
          if (need_z1) lse_fold(lse_z1, zs, A(1));
        },
        load);
  } else {
    src.for_each(vocab, [&](int64_t, A z, A s) {
      const A zs[1] = {z}, ss[1] = {s};
      lse_fold(lse_z, zs, inv_t);
      lse_fold(lse_s, ss, inv_t);
      if (need_z1) lse_fold(lse_z1, zs, A(1));
    });
  }
  block_merge(lse_z, lse_s, scratch);
  if (need_z1) {
    math::LogSumExp<A> unused;
    block_merge(lse_z1, unused, scratch);
  }
}

template <class A>
__device__ __forceinline__ RowLse<A> row_lse(const math::LogSumExp<A>& l) {
  return {l.max, math::Ops<A>::log(l.sum)};
}

// One entry's terms from the row's log-sum-exps (kUnitBeta: ToDi at beta = 1,
// a = p / (p + q)). The +-inf entries of left_out(z, s) get zero terms: a
// +-inf logit makes r = log p - log q infinite or NaN (+inf and NaN logits
// never get here), one compare instead of four.
template <class A, math::Divergence D, bool kUnitBeta>
struct RowTerms {
  RowLse<A> lz, ls;
  A inv_t;
  const math::DivergenceParams& prm;
  __device__ __forceinline__ math::EntryTerms<A> operator()(A z, A s) const {
    const A log_p = ls.log_prob(s, inv_t);
    const A log_q = lz.log_prob(z, inv_t);
    auto t = math::divergence_entry<D, kUnitBeta>(log_p, log_q, prm);
    if (!(math::Ops<A>::abs(log_p - log_q) < std::numeric_limits<A>::infinity())) {
      t.loss = A(0);
      t.u = A(0);
      t.v = A(0);
    }
    return t;
  }
};

// Pass 2: the row's loss, U = sum u and V = sum v, in every thread.
template <class A, class Walk, class Terms>
__device__ __forceinline__ void row_sums(Walk&& walk, const Terms& terms, A* scratch, A (&sums)[3]) {
  sums[0] = sums[1] = sums[2] = A(0);
  walk([&](int64_t, A z, A s) {
    const auto t = terms(z, s);
    sums[0] += t.loss;
    sums[1] += t.u;
    sums[2] += t.v;
  });
  block_sum(sums, scratch);
}

// What pass 3 needs beyond the entry's terms: the weight sums and the scales.
// The student's gradient is the divergence's part plus, with the hard-label
// cross-entropy, hard_t * softmax(z) (its one-hot part: fix_label_gradient).
template <class A>
struct RowGradients {
  A u_sum, v_sum;
  A grad_t;  // 1/T times the reduction's factor and the divergence's weight
  A hard_t;  // the cross-entropy's weight times the reduction's factor
  bool hard, unit_t;
  RowLse<A> lz1;  // z's own log-sum-exp (T = 1)
  __device__ __forceinline__ A student(const math::EntryTerms<A>& t, A z) const {
    A g = math::log_softmax_grad(t.u, t.q, u_sum, grad_t);
    if (hard) g += hard_t * (unit_t ? t.q : math::Ops<A>::exp((math::Ops<A>::mul_rn(z, A(1)) - lz1.max) - lz1.log_sum));
    return g;
  }
  __device__ __forceinline__ A teacher(const math::EntryTerms<A>& t) const { return math::log_softmax_grad(t.v, t.p, v_sum, grad_t); }
};

// The scales of RowGradients, read where used: read once at the kernel's
// start, the two registers the label weights kept live lengthened pass 3.
template <class A>
__device__ __forceinline__ RowGradients<A> row_gradients(const ForwardParams& args, A u_sum, A v_sum, A inv_t,
                                                         bool hard, bool unit_t, const RowLse<A>& lz1) {
  const A reduction_scale = args.grad_scale ? *static_cast<const A*>(args.grad_scale) : A(1);
  return {u_sum,
          v_sum,
          inv_t * reduction_scale * static_cast<A>(args.effective_soft_label_weight()),
          static_cast<A>(args.effective_hard_label_weight()) * reduction_scale,
          hard,
          unit_t,
          lz1};
}

// Pass 3: the row's gradients into grad_z (student) and grad_s (teacher), at
// out_base; data nullptr: not wanted. 16-byte streaming stores where the output row
// shares the input row's misalignment (then its vectors line up with the
// input's), scalar stores otherwise.
template <class A, class T, class Terms>
__device__ __forceinline__ void write_row_gradients(const RowSource<A, T>& src, int64_t vocab, const Terms& terms,
                                                    const RowGradients<A>& grads, const OutMatrix& grad_z,
                                                    const OutMatrix& grad_s, int64_t out_base) {
  if constexpr (!std::is_same_v<T, AnyDtype>) {
    constexpr int kVec = 16 / sizeof(T);
    T* out_z = grad_z.data ? static_cast<T*>(grad_z.data) + out_base : nullptr;
    T* out_s = grad_s.data ? static_cast<T*>(grad_s.data) + out_base : nullptr;
    const auto misalignment = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16; };
    const bool vec_z = misalignment(out_z) == misalignment(src.z);
    const bool vec_s = misalignment(out_s) == misalignment(src.s);
    for_each_vector(
        src.z, src.s, vocab,
        [&](int64_t i0, const uint4& zw, const uint4& sw) {
          const T* ze = reinterpret_cast<const T*>(&zw);
          const T* se = reinterpret_cast<const T*>(&sw);
          uint4 gzw, gsw;
          T* gz = reinterpret_cast<T*>(&gzw);
          T* gs = reinterpret_cast<T*>(&gsw);
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            const A z = Elem<T>::template load<A>(ze[k]);
            const auto t = terms(z, Elem<T>::template load<A>(se[k]));
            if (out_z) gz[k] = Elem<T>::from(grads.student(t, z));
            if (out_s) gs[k] = Elem<T>::from(grads.teacher(t));
          }
          if (out_z) {
            if (vec_z) {
              store_streaming(reinterpret_cast<uint4*>(out_z + i0), gzw);
            } else {
#pragma unroll
              for (int k = 0; k < kVec; ++k) out_z[i0 + k] = gz[k];
            }
          }
          if (out_s) {
            if (vec_s) {
              store_streaming(reinterpret_cast<uint4*>(out_s + i0), gsw);
            } else {
#pragma unroll
              for (int k = 0; k < kVec; ++k) out_s[i0 + k] = gs[k];
            }
          }
        },
        [&](int64_t i, T z, T s) {
          const A za = Elem<T>::template load<A>(z);
          const auto t = terms(za, Elem<T>::template load<A>(s));
          if (out_z) out_z[i] = Elem<T>::from(grads.student(t, za));
          if (out_s) out_s[i] = Elem<T>::from(grads.teacher(t));
        });
  } else {
    src.for_each(vocab, [&](int64_t i, A z, A s) {
      const auto t = terms(z, s);
      if (grad_z.data) store_any(grad_z.data, grad_z.dtype, out_base + i, grads.student(t, z));
      if (grad_s.data) store_any(grad_s.data, grad_s.dtype, out_base + i, grads.teacher(t));
    });
  }
}

// The one-hot part of the cross-entropy's gradient, -hard_t at the label:
// its entry is rewritten once the block's pass 3 stores are visible to the
// thread that does it.
template <class A, class Terms>
__device__ __forceinline__ void fix_label_gradient(const ForwardParams& args, int64_t row, int64_t label,
                                                   bool label_here, A z_label, const Terms& terms,
                                                   const RowGradients<A>& grads) {
  __syncthreads();
  if (threadIdx.x == 0 && label_here) {
    const A s_label = load_any<A>(args.teacher.data, args.teacher.dtype, args.teacher.layout.row_offset(row) + label);
    const auto t = terms(z_label, s_label);
    store_any(args.grad_student.data, args.grad_student.dtype, row * args.vocab + label,
              grads.student(t, z_label) - grads.hard_t);
  }
}

// An output row (gradient dtype) filled with one value: ignored rows' zeros,
// NaN rows' NaNs.
template <class A>
__device__ __forceinline__ void fill_gradient_row(const OutMatrix& out, int64_t row, int64_t vocab, A value) {
  if (out.data == nullptr) return;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) store_any(out.data, out.dtype, row * vocab + i, value);
}

template <class A>
__device__ __forceinline__ A label_logit(const ForwardParams& args, int64_t row, int64_t label) {
  return load_any<A>(args.student.data, args.student.dtype, args.student.layout.row_offset(row) + label);
}

// Whether 1/T and beta are valid: invalid ones from a direct op call (not
// checked on the host: that would sync) make every counted row NaN instead
// of a wrong number.
template <class A>
__device__ __forceinline__ bool scalars_valid(A inv_t, double beta) {
  return inv_t > A(0) && math::is_finite(inv_t) && math::is_finite(beta);
}

// ------------------------------------------------------------------ kernels
// Whether the streamed kernel's lean instantiation serves these arguments.
inline bool streamed_is_lean(const ForwardParams& args) {
  return args.grad_teacher.data == nullptr && args.hard_label_weight == 0;
}

// The fused op's streamed kernel. T: the element type of both inputs, or
// AnyDtype; D: the divergence. kLean: only the student's gradient and no
// cross-entropy (streamed_is_lean), the teacher-gradient and hard-label code
// compiled out of its loops instead of predicated off.
template <class A, class T, math::Divergence D, bool kLean = false>
__global__ void __launch_bounds__(kMaxThreads) distill_forward_kernel(const ForwardParams args) {
  using Lse = math::LogSumExp<A>;
  // Reduction scratch: 4 values per warp (AKL's search sums 15).
  TODI_SHARED_ARRAY(A, scratch, (D == math::Divergence::kAKL ? math::kAklCandidates : 4) * kWarp);
  const A inv_t = static_cast<A>(*args.inv_temperature);  // 0-dim tensors in device memory
  const double beta = *args.beta;
  const bool scalars_ok = scalars_valid(inv_t, beta);
  // The hard-label cross-entropy (hard_label_weight != 0) needs z's own log-sum-exp:
  // lse_z's when T = 1, else a third one in pass 1.
  const bool hard = !kLean && args.hard_label_weight != 0;
  const bool unit_t = *args.inv_temperature == 1.0;
  const bool need_z1 = hard && !unit_t;
  // Read where used rather than held in a register (the full kernel has none to spare).
  const auto grad_teacher = [&]() { return kLean ? OutMatrix{} : args.grad_teacher; };
  const int64_t vocab = args.vocab;

  for (int64_t row = blockIdx.x; row < args.rows; row += gridDim.x) {
    A* loss_out = static_cast<A*>(args.loss) + row;
    const RowSource<A, T> src(args, row);

    if (args.labels != nullptr && args.labels[row] == args.ignore_index) {
      fill_gradient_row(args.grad_student, row, vocab, A(0));
      fill_gradient_row(grad_teacher(), row, vocab, A(0));
      if (threadIdx.x == 0) *loss_out = A(0);
      continue;
    }

    Lse lse_z, lse_s, lse_z1;
    row_log_sum_exps(src, vocab, inv_t, need_z1, scratch, EvictLastLoad{}, lse_z, lse_s, lse_z1);
    const RowLse<A> lz = row_lse(lse_z), ls = row_lse(lse_s), lz1 = need_z1 ? row_lse(lse_z1) : lz;
    const int64_t label = hard ? args.labels[row] : 0;
    // A label outside [0, vocab) is not checked on the host (a sync) and makes the row NaN.
    const bool label_here = hard && label >= 0 && label < vocab;
    if (!scalars_ok || (hard && !label_here) || !math::is_finite(lz.max + lz.log_sum) ||
        !math::is_finite(ls.max + ls.log_sum) || !math::is_finite(lz1.max + lz1.log_sum)) {
      const A nan = std::numeric_limits<A>::quiet_NaN();
      fill_gradient_row(args.grad_student, row, vocab, nan);
      fill_gradient_row(grad_teacher(), row, vocab, nan);
      if (threadIdx.x == 0) *loss_out = nan;
      continue;
    }

    // Passes 2-3 read the row again (L2 as far as it still holds it).
    auto walk = [&](auto&& f) { src.for_each(vocab, f); };
    math::DivergenceParams prm = args.divergence_params;
    prm.beta = beta;
    if constexpr (D == math::Divergence::kAKL) {
      akl_row_weights(walk, [&](auto& v) { block_sum(v, scratch); }, inv_t, lz, ls, prm);
    }
    // Passes 2-3, compiled twice for the lean ToDi kernel: at beta = 1 its
    // weight a = sigmoid(r) is p / (p + q), one reciprocal instead of an exp
    // and a reciprocal in each pass (beta lives on the device: no host
    // branch). Not in the full kernel: the copy took it from 74 to 100
    // registers, 3 to 2 blocks of 256 per SM.
    auto passes = [&](auto unit_beta) {
      const RowTerms<A, D, decltype(unit_beta)::value> terms{lz, ls, inv_t, prm};
      A sums[3];
      row_sums(walk, terms, scratch, sums);
      const A z_label = label_here ? label_logit<A>(args, row, label) : A(0);
      if (threadIdx.x == 0) {
        A loss = static_cast<A>(args.effective_soft_label_weight()) * sums[0];
        // log sum exp(z) - z_label, with max and log(sum) kept apart.
        if (hard) loss += static_cast<A>(args.effective_hard_label_weight()) * (lz1.log_sum - (z_label - lz1.max));
        *loss_out = loss;
      }
      if (!args.grad_student.data && !grad_teacher().data) return;
      const RowGradients<A> grads = row_gradients(args, sums[1], sums[2], inv_t, hard, unit_t, lz1);
      write_row_gradients(src, vocab, terms, grads, args.grad_student, grad_teacher(), row * vocab);
      if (hard && args.grad_student.data) fix_label_gradient(args, row, label, label_here, z_label, terms, grads);
    };
    if (kLean && D == math::Divergence::kToDi && beta == 1.0) {
      if constexpr (kLean && D == math::Divergence::kToDi) passes(std::true_type{});
    } else {
      passes(std::false_type{});
    }
  }
}

// One vocabulary-parallel phase (kernel_params.h: Phase, VocabParallelParams)
// on this rank's slice of the vocabulary: the fused kernel's stages, one per
// launch, the whole rows' statistics and sums read from vp's tables (the
// collectives between the launches merged every slice's). Each phase writes
// one float64 table row per position (phase_table; kGradients the
// gradients). A local label outside [0, vocab) is another rank's token, not
// a NaN row. kPhaseKernelExists: AKL's search phases only with AKL.
// One thread writes a phase's table row (the values in registers: a compile-time size).
template <int kWidth>
__device__ __forceinline__ void write_table_row(double* table, int64_t row, const double (&values)[kWidth]) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kWidth; ++k) table[row * kWidth + k] = values[k];
  }
}

template <math::Divergence D, Phase P>
constexpr bool kPhaseKernelExists = P != Phase::kFused && (D == math::Divergence::kAKL ||
                                                          (P != Phase::kAklWalk && P != Phase::kAklGaps));

template <class A, class T, math::Divergence D, Phase P>
__global__ void __launch_bounds__(kMaxThreads)
    vocab_parallel_kernel(const ForwardParams args, const VocabParallelParams vp) {
  static_assert(kPhaseKernelExists<D, P>, "no such phase kernel (AKL's search phases run with divergence AKL)");
  constexpr bool kAklPhase = P == Phase::kAklWalk || P == Phase::kAklGaps;
  using Lse = math::LogSumExp<A>;
  TODI_SHARED_ARRAY(A, scratch, (kAklPhase ? math::kAklCandidates : 4) * kWarp);
  const A inv_t = static_cast<A>(*args.inv_temperature);
  const double beta = *args.beta;
  const bool scalars_ok = scalars_valid(inv_t, beta);
  const bool hard = args.hard_label_weight != 0;
  const int64_t vocab = args.vocab;
  double* const table = phase_table(vp).data;  // none for kGradients, which writes the gradients
  constexpr int kWidth = P == Phase::kRowStats      ? 6
                         : P == Phase::kPartialSums ? 4
                         : P == Phase::kAklWalk     ? math::kAklCandidates
                         : P == Phase::kAklGaps     ? 2
                                                    : 0;
  // An ignored row's zeros, an undefined row's NaNs: in its table row, or its gradients.
  auto fill_row = [&](int64_t row, A value) {
    if constexpr (P == Phase::kGradients) {
      fill_gradient_row(args.grad_student, row, vocab, value);
      fill_gradient_row(args.grad_teacher, row, vocab, value);
    } else {
      if (threadIdx.x == 0) {
        for (int k = 0; k < kWidth; ++k) table[row * kWidth + k] = value;
      }
    }
  };

  for (int64_t row = blockIdx.x; row < args.rows; row += gridDim.x) {
    const RowSource<A, T> src(args, row);
    const bool ignored = args.labels != nullptr && args.labels[row] == args.ignore_index;

    if constexpr (P == Phase::kRowStats) {  // this slice's (max, sum) pairs of z/T, s/T and z
      if (ignored) {
        write_table_row(table, row, {0, 1, 0, 1, 0, 1});  // (max 0, sum 1): log-sum-exp 0
        continue;
      }
      Lse lse_z, lse_s, lse_z1;
      const bool need_z1 = hard && *args.inv_temperature != 1.0;
      row_log_sum_exps(src, vocab, inv_t, need_z1, scratch, PlainLoad{}, lse_z, lse_s, lse_z1);
      const Lse& z1 = need_z1 ? lse_z1 : lse_z;  // z's own = z/T's at T = 1
      write_table_row(table, row, {lse_z.max, lse_z.sum, lse_s.max, lse_s.sum, hard ? z1.max : A(0), hard ? z1.sum : A(1)});
      continue;
    } else {
      if (ignored) {
        fill_row(row, A(0));
        continue;
      }
      // The whole rows' (max, log sum) pairs, merged from every slice's.
      const double* g = vp.global_stats + row * 6;
      const RowLse<A> lz{static_cast<A>(g[0]), static_cast<A>(g[1])};
      const RowLse<A> ls{static_cast<A>(g[2]), static_cast<A>(g[3])};
      const RowLse<A> lz1{static_cast<A>(g[4]), static_cast<A>(g[5])};
      if (!scalars_ok || !math::is_finite(lz.max + lz.log_sum) || !math::is_finite(ls.max + ls.log_sum) ||
          !math::is_finite(lz1.max + lz1.log_sum)) {
        fill_row(row, std::numeric_limits<A>::quiet_NaN());
        continue;
      }
      auto walk = [&](auto&& f) { src.for_each(vocab, f); };
      if constexpr (P == Phase::kAklWalk) {  // one walk of the search every rank runs in step
        math::AklTailSearch<A> search;
        search.low = static_cast<typename math::AklTailSearch<A>::U>(vp.akl_low[row]);
        search.remaining = vp.akl_remaining;
        A sums[math::kAklCandidates];
        akl_walk_sums(walk, inv_t, ls, search, sums);
        block_sum(sums, scratch);
        double out[math::kAklCandidates];
        for (int j = 0; j < math::kAklCandidates; ++j) out[j] = sums[j];
        write_table_row(table, row, out);
      } else if constexpr (P == Phase::kAklGaps) {  // the search is done: its low key is the split
        math::AklTailSearch<A> search;
        search.low = static_cast<typename math::AklTailSearch<A>::U>(vp.akl_low[row]);
        search.remaining = 0;
        A g2[2];
        akl_gap_sums(walk, inv_t, lz, ls, search.tail_threshold(), g2);
        block_sum(g2, scratch);
        write_table_row(table, row, {g2[0], g2[1]});
      } else {
        math::DivergenceParams prm = args.divergence_params;
        prm.beta = beta;
        if constexpr (D == math::Divergence::kAKL) {  // the whole rows' gaps, summed over the slices
          const double* gaps = vp.akl_global_gaps + row * 2;
          math::set_akl_weights(static_cast<A>(gaps[0]), static_cast<A>(gaps[1]), prm);
        }
        const RowTerms<A, D, false> terms{lz, ls, inv_t, prm};
        const int64_t label = hard ? args.labels[row] : 0;
        const bool label_here = hard && label >= 0 && label < vocab;
        const A z_label = label_here ? label_logit<A>(args, row, label) : A(0);
        if constexpr (P == Phase::kPartialSums) {  // this slice's sums, and z[label] where it holds the label
          A sums[3];
          row_sums(walk, terms, scratch, sums);
          write_table_row(table, row, {sums[0], sums[1], sums[2], z_label});
        } else {  // kGradients, from all slices' weight sums
          const A u_sum = static_cast<A>(vp.global_sums[row * 4 + 1]);
          const A v_sum = static_cast<A>(vp.global_sums[row * 4 + 2]);
          const RowGradients<A> grads = row_gradients(args, u_sum, v_sum, inv_t, hard, *args.inv_temperature == 1.0, lz1);
          write_row_gradients(src, vocab, terms, grads, args.grad_student, args.grad_teacher, row * vocab);
          if (hard && args.grad_student.data) fix_label_gradient(args, row, label, label_here, z_label, terms, grads);
        }
      }
    }
  }
}

}  // namespace todi_ext::cuda
