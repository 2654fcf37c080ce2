// The forward kernels of one divergence and their launch. CMake compiles this
// file once per divergence with -DTODI_EXT_DIVERGENCE=kToDi, kFKL, ...: ten
// kernels each (four dtypes: row cached, cluster-split and streamed; two generic),
// and the eight objects build in parallel.
#include <c10/cuda/CUDAException.h>

#include "launch_config.cuh"

#ifndef TODI_EXT_DIVERGENCE
#error "compile with -DTODI_EXT_DIVERGENCE=<a math::Divergence enumerator>"
#endif

namespace todi_ext::cuda {
namespace {

// Rows too long for one block's shared memory: the smallest cluster whose
// blocks can each cache their slice of the row (2, 4, 8 or 16 blocks). False
// when none fits or the device cannot launch it; the caller then streams.
template <class A, class T, math::Divergence D>
bool launch_split_rows(const ForwardParams& args, int device, cudaStream_t stream) {
  constexpr auto kernel = distill_forward_kernel<A, T, true, D, true>;
  for (int parts = 2; parts <= kMaxClusterParts; parts *= 2) {
    const int64_t chunk = slice_chunk(args.vocab, parts);
    const int64_t cache_bytes = 2 * row_cache_stride(chunk) * static_cast<int64_t>(sizeof(T));
    if (cache_bytes > max_dynamic_smem(device)) continue;
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = parts;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(std::min<int64_t>(args.rows, INT_MAX / parts) * parts));
    config.blockDim = dim3(threads_for(chunk, forward_max_threads(args.double_math)));
    config.dynamicSmemBytes = static_cast<size_t>(cache_bytes);
    config.stream = stream;
    config.attrs = &cluster;
    config.numAttrs = 1;
    if (!cluster_launchable<kernel>(device, config, parts)) return false;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args));
    return true;
  }
  return false;
}

template <class A, class T, math::Divergence D>
void launch_typed(const ForwardParams& args, int device, cudaStream_t stream) {
  const int threads = threads_for(args.vocab, forward_max_threads(args.double_math));
  const int64_t cache_bytes = 2 * row_cache_stride(args.vocab) * static_cast<int64_t>(sizeof(T));
  // The vocabulary-parallel phases stream: the cache is filled by the fused
  // kernel's own pass 1, which they skip.
  const bool fused = args.vocab_parallel.phase == Phase::kFused;
  if (fused && row_cache_allowed() && cache_bytes <= max_dynamic_smem(device)) {
    constexpr auto kernel = distill_forward_kernel<A, T, true, D>;
    allow_max_dynamic_smem<kernel>(device);
    kernel<<<grid_for(args.rows), threads, cache_bytes, stream>>>(args);
  } else if (fused && split_rows_allowed() && cache_bytes > max_dynamic_smem(device) &&
             launch_split_rows<A, T, D>(args, device, stream)) {
    return;  // launched and checked
  } else {
    distill_forward_kernel<A, T, false, D><<<grid_for(args.rows), threads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class A, math::Divergence D>
void launch_any(const ForwardParams& args, cudaStream_t stream) {
  distill_forward_kernel<A, AnyDtype, false, D>
      <<<grid_for(args.rows), threads_for(args.vocab, forward_max_threads(args.double_math)), 0, stream>>>(args);
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
