// CPU implementations of the todi_ext ops: argument checks, output
// allocation, and the choice of the kernel copy for this machine's widest
// instruction set.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <torch/library.h>

#include <atomic>
#include <string>
#include <string_view>
#include <tuple>

#include "todi_cpu_kernel.h"
#include "todi_op_common.h"
#include "vocab_parallel_ops.h"

namespace todi_ext::cpu {

struct Kernels {
  ForwardKernel forward;
  PhaseKernel phase;
  ScaleGradKernel scale_grad;
  const char* capability;
};

// The copy in use: the widest this CPU runs, narrowed at import to what torch
// reports for this machine (use_cpu_capability; at::get_cpu_capability is not
// in the stable ABI).
namespace {

const Kernels kDefaultKernels{DEFAULT::distill_forward_kernel, DEFAULT::vocab_parallel_kernel,
                              DEFAULT::scale_grad_kernel, "DEFAULT"};
#if defined(TODI_EXT_HAVE_AVX2)
const Kernels kAvx2Kernels{AVX2::distill_forward_kernel, AVX2::vocab_parallel_kernel, AVX2::scale_grad_kernel,
                           "AVX2"};
#endif
#if defined(TODI_EXT_HAVE_AVX512)
const Kernels kAvx512Kernels{AVX512::distill_forward_kernel, AVX512::vocab_parallel_kernel,
                             AVX512::scale_grad_kernel, "AVX512"};
#endif

// The widest copy both allowed by `capability` and executable on this CPU
// (the instructions each copy is compiled with: CMakeLists.txt), so a wrong
// capability string can slow the op down but never crash it.
const Kernels* kernels_for(std::string_view capability) {
#if defined(TODI_EXT_HAVE_AVX2)
  __builtin_cpu_init();  // this may run during the module's static initialisation
#endif
#if defined(TODI_EXT_HAVE_AVX512)
  if (capability == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
    return &kAvx512Kernels;
  }
#endif
#if defined(TODI_EXT_HAVE_AVX2)
  if ((capability == "AVX512" || capability == "AVX2") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2")) {
    return &kAvx2Kernels;
  }
#endif
  return &kDefaultKernels;
}

std::atomic<const Kernels*> chosen_kernels{kernels_for("AVX512")};

}  // namespace

const Kernels& kernels() { return *chosen_kernels.load(std::memory_order_acquire); }

const char* use_cpu_capability(std::string_view capability) {
  const Kernels* k = kernels_for(capability);
  chosen_kernels.store(k, std::memory_order_release);
  return k->capability;
}

const char* kernel_capability() { return kernels().capability; }

// The kernels' ParallelFor: torch's intra-op thread pool.
void intra_op_parallel_for(int64_t begin, int64_t end, int64_t grain, RowsBody body, void* context) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(context, b, e); });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_forward_cpu(const at::Tensor& student_logits,
                                                                const at::Tensor& teacher_logits,
                                                                const std::optional<at::Tensor>& labels,
                                                                c10::string_view divergence, const at::Tensor& beta,
                                                                double skew_lambda, double akl_mu, double jsd_beta, const at::Tensor& inv_temperature,
                                                                int64_t ignore_index, c10::string_view reduction,
                                                                bool student_grad, bool teacher_grad,
                                                                double soft_label_weight, double hard_label_weight) {
  const ForwardSetup setup = prepare_forward(student_logits, teacher_logits, labels, divergence, beta, skew_lambda, akl_mu, jsd_beta, inv_temperature,
                                             ignore_index, reduction, student_grad, teacher_grad, soft_label_weight,
                                             hard_label_weight);
  if (setup.view.rows > 0) kernels().forward(forward_params(setup, ignore_index), intra_op_parallel_for);
  return {reduce_loss(setup.per_position, setup.plan), setup.grad_student, setup.grad_teacher};
}

void scale_grad_cpu_(const at::Tensor& grad, const at::Tensor& scale) {
  const ScaleGradCall call = scale_grad_call(grad, scale, grad);
  if (grad.numel() > 0) kernels().scale_grad(call.params, intra_op_parallel_for);
}

at::Tensor scale_grad_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  at::Tensor out = at::empty(grad.sizes(), grad.options());
  const ScaleGradCall call = scale_grad_call(grad, scale, out);
  if (grad.numel() > 0) kernels().scale_grad(call.params, intra_op_parallel_for);
  return out;
}

// The vocabulary-parallel phase ops (vocab_parallel_ops.h) run this kernel.
void run_phase_kernel(const ForwardParams& params, const VocabParallelParams& phase, const at::Tensor&) {
  kernels().phase(params, phase, intra_op_parallel_for);
}

}  // namespace

TORCH_LIBRARY_IMPL(todi_ext, CPU, m) {
  m.impl("vocab_parallel_row_stats", &vocab_parallel::row_stats<run_phase_kernel>);
  m.impl("vocab_parallel_partial_sums", &vocab_parallel::partial_sums<run_phase_kernel>);
  m.impl("vocab_parallel_gradients", &vocab_parallel::gradients<run_phase_kernel>);
  m.impl("vocab_parallel_akl_walk", &vocab_parallel::akl_walk<run_phase_kernel>);
  m.impl("vocab_parallel_akl_gaps", &vocab_parallel::akl_gaps<run_phase_kernel>);
  m.impl("distill_forward", &distill_forward_cpu);
  m.impl("scale_grad_", &scale_grad_cpu_);
  m.impl("scale_grad", &scale_grad_cpu);
}

}  // namespace todi_ext::cpu
