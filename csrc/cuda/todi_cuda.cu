// CUDA implementations of the todi_ext ops: checks (shared with the CPU op),
// output allocation, dispatch. Kernels: todi_cuda_kernel.cuh; their launches:
// distill_forward_launch.cu (one object per divergence), launch_config.cuh.
// Stable ABI (see todi_op_common.h): the device guard and the current stream
// come through torch's C shim.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>

#include <tuple>

#include "launch_config.cuh"
#include "todi_op_common.h"
#include "vocab_parallel_ops.h"

namespace todi_ext::cuda {
namespace {

// torch's current stream on the tensor's device (the stream the caller's
// work is queued on), with that device made current for the launch.
struct LaunchContext {
  torch::stable::accelerator::DeviceGuard guard;
  int device;
  cudaStream_t stream;
  explicit LaunchContext(const Tensor& t)
      : guard(t.get_device_index()), device(t.get_device_index()), stream(current_stream(device)) {}
  static cudaStream_t current_stream(int device) {
    void* stream = nullptr;
    TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
    return static_cast<cudaStream_t>(stream);
  }
};

// Launches the forward kernel of the params' divergence on the logits' device
// and current stream.
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

std::tuple<Tensor, Tensor, Tensor> distill_forward_cuda(
    const Tensor& student_logits, const Tensor& teacher_logits, const std::optional<Tensor>& labels,
    std::string_view divergence, const Tensor& beta, double skew_lambda, double akl_mu, double jsd_beta,
    const Tensor& inv_temperature, int64_t ignore_index, std::string_view reduction, bool student_grad,
    bool teacher_grad, double soft_label_weight, double hard_label_weight) {
  // Checks first: with inputs on mixed devices this kernel may be the one
  // dispatched, and the error must name the argument.
  const ForwardSetup setup = prepare_forward(student_logits, teacher_logits, labels, divergence, beta, skew_lambda,
                                             akl_mu, jsd_beta, inv_temperature, ignore_index, reduction,
                                             student_grad, teacher_grad, soft_label_weight, hard_label_weight);
  if (setup.view.rows > 0) run_forward_kernel(forward_params(setup, ignore_index), student_logits);
  return {reduce_loss(setup.per_position, setup.plan), setup.grad_student, setup.grad_teacher};
}

void launch_scale_grad(const ScaleGradCall& call, const Tensor& grad) {
  if (grad.numel() == 0) return;
  const LaunchContext launch(grad);
  const ScaleGradParams& args = call.params;
  const int threads = threads_for(args.vocab);
  scale_grad_kernel_for(args)<<<grid_for(args.rows), threads, 0, launch.stream>>>(args);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

void scale_grad_cuda_(const Tensor& grad, const Tensor& scale) {
  launch_scale_grad(scale_grad_call(grad, scale, nullptr), grad);
}

Tensor scale_grad_cuda(const Tensor& grad, const Tensor& scale) {
  const Tensor out = new_empty(grad.sizes(), grad.scalar_type(), grad.device());
  launch_scale_grad(scale_grad_call(grad, scale, &out), grad);
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(todi_ext, CUDA, m) {
  m.impl("distill_forward", TORCH_BOX(&distill_forward_cuda));
  m.impl("scale_grad_", TORCH_BOX(&scale_grad_cuda_));
  m.impl("scale_grad", TORCH_BOX(&scale_grad_cuda));
  m.impl("vocab_parallel_row_stats", TORCH_BOX(&vocab_parallel::row_stats<run_phase_kernel>));
  m.impl("vocab_parallel_partial_sums", TORCH_BOX(&vocab_parallel::partial_sums<run_phase_kernel>));
  m.impl("vocab_parallel_gradients", TORCH_BOX(&vocab_parallel::gradients<run_phase_kernel>));
  m.impl("vocab_parallel_akl_walk", TORCH_BOX(&vocab_parallel::akl_walk<run_phase_kernel>));
  m.impl("vocab_parallel_akl_gaps", TORCH_BOX(&vocab_parallel::akl_gaps<run_phase_kernel>));
}

}  // namespace todi_ext::cuda
