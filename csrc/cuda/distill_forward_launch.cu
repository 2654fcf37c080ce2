// The forward kernels of one divergence and their launch. CMake compiles this
// file once per divergence with -DTODI_EXT_DIVERGENCE=kToDi, kFKL, ...:
// register rows for three dtypes, streamed for four (each also lean: student
// gradient only, no cross-entropy), two generic; the eight objects build in
// parallel.
#include <c10/cuda/CUDAException.h>

#include "launch_config.cuh"

#ifndef TODI_EXT_DIVERGENCE
#error "compile with -DTODI_EXT_DIVERGENCE=<a math::Divergence enumerator>"
#endif

namespace todi_ext::cuda {
namespace {

// The register-row kernel where it serves the arguments and its cluster
// places on the device; false: the caller streams.
template <class T, math::Divergence D>
bool launch_register_rows(const ForwardParams& args, int device, cudaStream_t stream) {
  if (!register_rows_eligible(args, sizeof(T))) return false;
  const RegisterRowShape shape = register_row_shape(args.vocab, sizeof(T));
  if (shape.parts == 0) return false;
  constexpr auto kernel = register_rows_kernel<T, D>;
  allow_register_row_smem<kernel>(device, register_row_smem(kRegisterRowThreads, sizeof(T)));
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = shape.parts;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(std::min<int64_t>(args.rows, INT_MAX / shape.parts) * shape.parts));
  config.blockDim = dim3(shape.threads);
  config.dynamicSmemBytes = register_row_smem(shape.threads, sizeof(T));
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = shape.parts > 1 ? 1 : 0;
  if (shape.parts > 1) {
    // Asked once per cluster size, for the largest CTA it can have (256
    // threads, their shared memory): a yes then holds for every row length.
    cudaLaunchConfig_t largest = config;
    largest.blockDim = dim3(kRegisterRowThreads);
    largest.dynamicSmemBytes = register_row_smem(kRegisterRowThreads, sizeof(T));
    if (!cluster_launchable<kernel>(device, largest, shape.parts)) return false;
  }
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args));
  return true;
}

template <class A, class T, math::Divergence D>
void launch_typed(const ForwardParams& args, int device, cudaStream_t stream) {
  if constexpr (sizeof(T) < 8) {
    if (launch_register_rows<T, D>(args, device, stream)) return;
  }
  if (streamed_is_lean(args)) {
    distill_forward_kernel<A, T, D, true><<<grid_for(args.rows), threads_for(args.vocab), 0, stream>>>(args);
  } else {
    distill_forward_kernel<A, T, D><<<grid_for(args.rows), threads_for(args.vocab), 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class A, math::Divergence D>
void launch_any(const ForwardParams& args, cudaStream_t stream) {
  distill_forward_kernel<A, AnyDtype, D><<<grid_for(args.rows), threads_for(args.vocab), 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <math::Divergence D>
void launch_distill_forward(const ForwardParams& args, c10::ScalarType student_dtype, c10::ScalarType teacher_dtype,
                            int device, cudaStream_t stream) {
  if (student_dtype != teacher_dtype) {
    args.double_math ? launch_any<double, D>(args, stream) : launch_any<float, D>(args, stream);
  } else if (student_dtype == c10::kFloat) {
    launch_typed<float, float, D>(args, device, stream);
  } else if (student_dtype == c10::kBFloat16) {
    launch_typed<float, __nv_bfloat16, D>(args, device, stream);
  } else if (student_dtype == c10::kHalf) {
    launch_typed<float, __half, D>(args, device, stream);
  } else {  // float64
    launch_typed<double, double, D>(args, device, stream);
  }
}

template void launch_distill_forward<math::Divergence::TODI_EXT_DIVERGENCE>(const ForwardParams&, c10::ScalarType,
                                                                           c10::ScalarType, int, cudaStream_t);

}  // namespace todi_ext::cuda
