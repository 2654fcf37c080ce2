// CUDA implementations of the todi_ext ops: checks (shared with the CPU op),
// output allocation, dispatch. Kernels: register_rows_kernel.cuh,
// streamed_kernel.cuh, scale_grad_kernel.cuh; the forward kernels' launches:
// distill_forward_launch.cu (one object per divergence), launch_config.cuh.
// Stable ABI (see op_common.h): the device guard and the current stream
// come through torch's C shim.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>

#include <tuple>

#include "launch_config.cuh"
#include "op_common.h"
#include "scale_grad_kernel.cuh"
#include "vocab_parallel_ops.h"

namespace todi_ext::cuda {
namespace {

// torch's current stream on the tensor's device (the stream the caller's
// work is queued on), with that device made current for the launch.
struct LaunchContext {
  int device;
  torch::stable::accelerator::DeviceGuard guard;
  cudaStream_t stream;
  explicit LaunchContext(const Tensor& t) : device(t.get_device_index()), guard(device), stream(current_stream(device)) {}
  static cudaStream_t current_stream(int device) {
    void* stream = nullptr;
    TODI_SHIM_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
    return static_cast<cudaStream_t>(stream);
  }
};

// Launches the forward kernel of the params' divergence on the logits' device
// and current stream (for distill_forward, op_common.h).
void run_forward_kernel(const ForwardParams& args, const Tensor& logits) {
  const LaunchContext launch(logits);
  dispatch_divergence(args.divergence, [&](auto divergence) {
    launch_distill_forward<decltype(divergence)::value>(args, launch.device, launch.stream);
  });
}

// The vocabulary-parallel phase ops of vocab_parallel_ops.h: one phase's kernel, likewise.
void run_phase_kernel(const ForwardParams& args, const VocabParallelParams& phase, const Tensor& logits) {
  const LaunchContext launch(logits);
  dispatch_divergence(args.divergence, [&](auto divergence) {
    launch_vocab_parallel<decltype(divergence)::value>(args, phase, launch.stream);
  });
}

// The launch of scale_grad(_) (op_common.h).
void run_scale_grad_kernel(const ScaleGradParams& args, const Tensor& grad) {
  const LaunchContext launch(grad);
  scale_grad_kernel_for(args)<<<grid_for(args.rows), threads_for(args.vocab), 0, launch.stream>>>(args);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(todi_ext, CUDA, m) {
  m.impl("distill_forward", TORCH_BOX(&distill_forward<run_forward_kernel>));
  m.impl("scale_grad_", TORCH_BOX(&scale_grad_<run_scale_grad_kernel>));
  m.impl("scale_grad", TORCH_BOX(&scale_grad<run_scale_grad_kernel>));
  m.impl("vocab_parallel_row_stats", TORCH_BOX(&vocab_parallel::row_stats<run_phase_kernel>));
  m.impl("vocab_parallel_partial_sums", TORCH_BOX(&vocab_parallel::partial_sums<run_phase_kernel>));
  m.impl("vocab_parallel_gradients", TORCH_BOX(&vocab_parallel::gradients<run_phase_kernel>));
  m.impl("vocab_parallel_akl_walk", TORCH_BOX(&vocab_parallel::akl_walk<run_phase_kernel>));
  m.impl("vocab_parallel_akl_gaps", TORCH_BOX(&vocab_parallel::akl_gaps<run_phase_kernel>));
}

}  // namespace todi_ext::cuda
