// CUDA implementations of the todi_ext ops: checks (shared with the CPU op),
// output allocation, dispatch. Kernels: todi_cuda_kernel.cuh; their launches:
// distill_forward_launch.cu (one object per divergence), launch_config.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "launch_config.cuh"
#include "todi_op_common.h"
#include "vocab_parallel_ops.h"

namespace todi_ext::cuda {
namespace {

// Launches the forward kernel of the params' divergence on the logits' device
// and current stream.
void run_forward_kernel(const ForwardParams& args, const at::Tensor& logits) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int device = logits.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  dispatch_divergence(args.divergence, [&](auto divergence) {
    launch_distill_forward<decltype(divergence)::value>(args, device, stream);
  });
}

// The vocabulary-parallel phase ops of vocab_parallel_ops.h: one phase's kernel, likewise.
void run_phase_kernel(const ForwardParams& args, const VocabParallelParams& phase, const at::Tensor& logits) {
  const c10::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.get_device()).stream();
  dispatch_divergence(args.divergence, [&](auto divergence) {
    launch_vocab_parallel<decltype(divergence)::value>(args, phase, stream);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_forward_cuda(const at::Tensor& student_logits,
                                                                 const at::Tensor& teacher_logits,
                                                                 const std::optional<at::Tensor>& labels,
                                                                 c10::string_view divergence, const at::Tensor& beta,
                                                                double skew_lambda, double akl_mu, double jsd_beta, const at::Tensor& inv_temperature,
                                                                 int64_t ignore_index, c10::string_view reduction,
                                                                 bool student_grad, bool teacher_grad,
                                                                double soft_label_weight, double hard_label_weight) {
  // Checks first: with inputs on mixed devices this kernel may be the one
  // dispatched, and the error must name the argument.
  const ForwardSetup setup = prepare_forward(student_logits, teacher_logits, labels, divergence, beta, skew_lambda, akl_mu, jsd_beta, inv_temperature,
                                             ignore_index, reduction, student_grad, teacher_grad, soft_label_weight,
                                             hard_label_weight);
  if (setup.view.rows > 0) run_forward_kernel(forward_params(setup, ignore_index), student_logits);
  return {reduce_loss(setup.per_position, setup.plan), setup.grad_student, setup.grad_teacher};
}

void launch_scale_grad(const ScaleGradCall& call, const at::Tensor& grad) {
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const ScaleGradParams& args = call.params;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad.get_device()).stream();
  const int threads = threads_for(args.vocab);
  scale_grad_kernel_for(args)<<<grid_for(args.rows), threads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scale_grad_cuda_(const at::Tensor& grad, const at::Tensor& scale) {
  launch_scale_grad(scale_grad_call(grad, scale, grad), grad);
}

at::Tensor scale_grad_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  at::Tensor out = at::empty(grad.sizes(), grad.options());
  launch_scale_grad(scale_grad_call(grad, scale, out), grad);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(todi_ext, CUDA, m) {
  m.impl("distill_forward", &distill_forward_cuda);
  m.impl("scale_grad_", &scale_grad_cuda_);
  m.impl("scale_grad", &scale_grad_cuda);
  m.impl("vocab_parallel_row_stats", &vocab_parallel::row_stats<run_phase_kernel>);
  m.impl("vocab_parallel_partial_sums", &vocab_parallel::partial_sums<run_phase_kernel>);
  m.impl("vocab_parallel_gradients", &vocab_parallel::gradients<run_phase_kernel>);
  m.impl("vocab_parallel_akl_walk", &vocab_parallel::akl_walk<run_phase_kernel>);
  m.impl("vocab_parallel_akl_gaps", &vocab_parallel::akl_gaps<run_phase_kernel>);
}

}  // namespace todi_ext::cuda
