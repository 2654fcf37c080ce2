// CUDA implementations of the todi_ext ops: checks (shared with the CPU op),
// output allocation, launch configuration. Kernels: todi_cuda_kernel.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "todi_cuda_kernel.cuh"
#include "todi_op_common.h"

namespace todi_ext::cuda {
namespace {

// Threads per row: about 16 entries per thread, 32..512. (Untuned: see README.md.)
int threads_for(int64_t vocab) {
  int threads = kWarp;
  while (threads < kMaxThreads && threads * 16 < vocab) threads *= 2;
  return threads;
}

// TODI_EXT_CUDA_ROW_CACHE=0 turns the shared-memory row cache off (for A/B runs).
bool row_cache_allowed() {
  static const bool allowed = [] {
    const char* v = std::getenv("TODI_EXT_CUDA_ROW_CACHE");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return allowed;
}

constexpr int kMaxDevices = 64;

int max_dynamic_smem(int device) {
  static std::array<int, kMaxDevices> cached{};  // 0: not queried yet
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "todi_ext: device index ", device, " out of range");
  if (cached[device] == 0) {
    int bytes = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cached[device] = bytes - 4 * 1024;  // leave room for the static reduction scratch (<= 15 x 32 doubles)
  }
  return cached[device];
}

unsigned grid_for(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, INT_MAX)); }

// Raises a kernel's dynamic shared-memory limit to the device's maximum,
// once per device: the first call may not happen inside CUDA graph capture
// of a cold process, and repeating it would be wasted host work.
template <class Kernel>
void allow_max_dynamic_smem(Kernel kernel, int device) {
  static std::array<std::once_flag, kMaxDevices> once;
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "todi_ext: device index ", device, " out of range");
  std::call_once(once[device], [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_dynamic_smem(device)));
  });
}

template <class A, class T, math::Divergence D>
void launch_typed(const ForwardParams& args, int device, cudaStream_t stream) {
  const int threads = threads_for(args.vocab);
  const int64_t cache_bytes = 2 * ((args.vocab + 7) / 8) * 8 * static_cast<int64_t>(sizeof(T));
  if (row_cache_allowed() && cache_bytes <= max_dynamic_smem(device)) {
    auto kernel = distill_forward_kernel<A, T, true, D>;
    allow_max_dynamic_smem(kernel, device);
    kernel<<<grid_for(args.rows), threads, cache_bytes, stream>>>(args);
  } else {
    distill_forward_kernel<A, T, false, D><<<grid_for(args.rows), threads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class A, math::Divergence D>
void launch_any(const ForwardParams& args, cudaStream_t stream) {
  distill_forward_kernel<A, AnyDtype, false, D><<<grid_for(args.rows), threads_for(args.vocab), 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_forward_cuda(const at::Tensor& student_logits,
                                                                 const at::Tensor& teacher_logits,
                                                                 const std::optional<at::Tensor>& labels,
                                                                 c10::string_view divergence, double beta,
                                                                double skew_lambda, double akl_mu, double jsd_beta, double temperature,
                                                                 int64_t ignore_index, c10::string_view reduction,
                                                                 bool student_grad, bool teacher_grad) {
  // Checks first: with inputs on mixed devices this kernel may be the one
  // dispatched, and the error must name the argument.
  const ForwardSetup setup = prepare_forward(student_logits, teacher_logits, labels, divergence, beta, skew_lambda, akl_mu, jsd_beta, temperature,
                                             ignore_index, reduction, student_grad, teacher_grad);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  if (setup.view.rows > 0) {
    const ForwardParams args = forward_params(setup, temperature, ignore_index);
    const int device = student_logits.get_device();
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
    const at::ScalarType dtype = student_logits.scalar_type();
    dispatch_divergence(args.divergence, [&](auto divergence) {
      constexpr math::Divergence D = decltype(divergence)::value;
      if (dtype != teacher_logits.scalar_type()) {
        args.double_math ? launch_any<double, D>(args, stream) : launch_any<float, D>(args, stream);
      } else if (dtype == at::kFloat) {
        launch_typed<float, float, D>(args, device, stream);
      } else if (dtype == at::kBFloat16) {
        launch_typed<float, __nv_bfloat16, D>(args, device, stream);
      } else if (dtype == at::kHalf) {
        launch_typed<float, __half, D>(args, device, stream);
      } else {  // float64
        launch_typed<double, double, D>(args, device, stream);
      }
    });
  }
  return {reduce_loss(setup.per_position, setup.plan), setup.grad_student, setup.grad_teacher};
}

void launch_scale_grad(const ScaleGradCall& call, const at::Tensor& grad) {
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const ScaleGradParams& args = call.params;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad.get_device()).stream();
  const int threads = threads_for(args.vocab);
  if (args.grad.dtype == at::kDouble || args.scale_dtype == at::kDouble) {
    scale_grad_kernel<double><<<grid_for(args.rows), threads, 0, stream>>>(args);
  } else {
    scale_grad_kernel<float><<<grid_for(args.rows), threads, 0, stream>>>(args);
  }
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
}

}  // namespace todi_ext::cuda
