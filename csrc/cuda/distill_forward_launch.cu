// The forward kernels of one divergence and their launch. CMake compiles this
// file once per divergence with -DTODI_EXT_DIVERGENCE=kToDi, kFKL, ...:
// register rows for three dtypes, streamed for four (each also lean: student
// gradient only, no cross-entropy), two generic, and the vocabulary-parallel
// phase kernels for the same six; the eight objects build in parallel.
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
  STD_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args));
  return true;
}

// The register-row kernel where it serves the arguments, else the streamed
// kernel: its lean instantiation where that serves them, the full one
// otherwise (and for mixed dtypes, which have one generic instantiation).
template <class A, class T, math::Divergence D>
void launch_fused(const ForwardParams& args, int device, cudaStream_t stream) {
  const unsigned grid = grid_for(args.rows), threads = threads_for(args.vocab);
  if constexpr (!std::is_same_v<T, AnyDtype>) {
    if constexpr (sizeof(T) < 8) {
      if (launch_register_rows<T, D>(args, device, stream)) return;
    }
    if (streamed_is_lean(args)) {
      distill_forward_kernel<A, T, D, true><<<grid, threads, 0, stream>>>(args);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  distill_forward_kernel<A, T, D><<<grid, threads, 0, stream>>>(args);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

// One phase's kernel; AKL's search phases exist for AKL only (the ops that
// run them pass divergence "akl").
template <class A, class T, math::Divergence D>
void launch_phase(const ForwardParams& args, const VocabParallelParams& phase, cudaStream_t stream) {
  dispatch_phase(phase.phase, [&](auto p) {
    constexpr Phase P = decltype(p)::value;
    if constexpr (kPhaseKernelExists<D, P>) {
      vocab_parallel_kernel<A, T, D, P><<<grid_for(args.rows), threads_for(args.vocab), 0, stream>>>(args, phase);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      throw std::runtime_error("AKL's search phases need divergence 'akl'");  // the ops pass "akl"
    }
  });
}

}  // namespace

template <math::Divergence D>
void launch_distill_forward(const ForwardParams& args, int device, cudaStream_t stream) {
  dispatch_dtypes(args, [&](auto a, auto t) {
    launch_fused<typename decltype(a)::type, typename decltype(t)::type, D>(args, device, stream);
  });
}

template <math::Divergence D>
void launch_vocab_parallel(const ForwardParams& args, const VocabParallelParams& phase, cudaStream_t stream) {
  dispatch_dtypes(args, [&](auto a, auto t) {
    launch_phase<typename decltype(a)::type, typename decltype(t)::type, D>(args, phase, stream);
  });
}

template void launch_distill_forward<math::Divergence::TODI_EXT_DIVERGENCE>(const ForwardParams&, int, cudaStream_t);
template void launch_vocab_parallel<math::Divergence::TODI_EXT_DIVERGENCE>(const ForwardParams&,
                                                                          const VocabParallelParams&, cudaStream_t);

}  // namespace todi_ext::cuda
