// The scale_grad(_) kernel (op_common.h: the backward's rescaling of the
// in-place gradient by the upstream gradient). Its own header so that only
// cuda_ops.cu and the host-emulation harness instantiate it, not each of the
// eight per-divergence objects that include streamed_kernel.cuh.
#pragma once

#include "streamed_kernel.cuh"

namespace todi_ext::cuda {

// out = grad * scale, row by row, in A arithmetic; T: the gradient's dtype.
// 16-byte loads and stores where source and destination rows share their
// misalignment (always, in place), scalar head and tail.
template <class A, class T>
__global__ void __launch_bounds__(kMaxThreads) scale_grad_kernel(const ScaleGradParams args) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t vocab = args.vocab;
  for (int64_t row = blockIdx.x; row < args.rows; row += gridDim.x) {
    const A scale = load_any<A>(args.scale, args.scale_dtype, args.scale_per_row ? row : 0);
    const bool in_place = args.out == args.grad.data;
    if (in_place && scale == A(1)) continue;  // the usual loss.backward(): no memory traffic at all
    const T* src = static_cast<const T*>(args.grad.data) + args.grad.layout.row_offset(row);
    T* dst = in_place ? const_cast<T*>(src) : static_cast<T*>(args.out) + row * vocab;
    const int64_t head = vector_head<T>(src, dst, vocab);
    auto scaled = [&](T x) { return Elem<T>::from(Elem<T>::template load<A>(x) * scale); };
    for (int64_t i = threadIdx.x; i < head; i += blockDim.x) dst[i] = scaled(src[i]);
    const int64_t vectors = (vocab - head) / kVec;
    const uint4* src_v = reinterpret_cast<const uint4*>(src + head);
    uint4* dst_v = reinterpret_cast<uint4*>(dst + head);
    for (int64_t j = threadIdx.x; j < vectors; j += blockDim.x) {
      uint4 w = src_v[j];
      T* e = reinterpret_cast<T*>(&w);
#pragma unroll
      for (int k = 0; k < kVec; ++k) e[k] = scaled(e[k]);
      dst_v[j] = w;
    }
    for (int64_t i = head + vectors * kVec + threadIdx.x; i < vocab; i += blockDim.x) dst[i] = scaled(src[i]);
  }
}

// The scale_grad kernel for a call's dtypes: float64 arithmetic when the
// gradient or the scale is float64, float32 otherwise.
using ScaleGradKernel = void (*)(ScaleGradParams);
inline ScaleGradKernel scale_grad_kernel_for(const ScaleGradParams& p) {
  const bool dbl = p.scale_dtype == Dtype::Double;
  switch (p.grad.dtype) {
    case Dtype::Double: return scale_grad_kernel<double, double>;
    case Dtype::Float: return dbl ? scale_grad_kernel<double, float> : scale_grad_kernel<float, float>;
    case Dtype::BFloat16: return dbl ? scale_grad_kernel<double, __nv_bfloat16> : scale_grad_kernel<float, __nv_bfloat16>;
    default: return dbl ? scale_grad_kernel<double, __half> : scale_grad_kernel<float, __half>;
  }
}

}  // namespace todi_ext::cuda
