// CPU implementations of the todi_ext ops: argument checks, output
// allocation, and the choice of the kernel copy for this machine's widest
// instruction set. Stable ABI (see op_common.h).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <atomic>
#include <string>
#include <string_view>
#include <tuple>

#include "distill_kernel.h"
#include "op_common.h"
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

std::string use_cpu_capability(std::string_view capability) {
  const Kernels* k = kernels_for(capability);
  chosen_kernels.store(k, std::memory_order_release);
  return k->capability;
}

std::string kernel_capability() { return kernels().capability; }

// The kernels' ParallelFor: torch's intra-op thread pool.
void intra_op_parallel_for(int64_t begin, int64_t end, int64_t grain, RowsBody body, void* context) {
  torch::stable::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(context, b, e); });
}

namespace {

// The ops of op_common.h and vocab_parallel_ops.h run these kernels.
void run_forward_kernel(const ForwardParams& params, const Tensor&) {
  kernels().forward(params, intra_op_parallel_for);
}

void run_scale_grad_kernel(const ScaleGradParams& params, const Tensor&) {
  kernels().scale_grad(params, intra_op_parallel_for);
}

void run_phase_kernel(const ForwardParams& params, const VocabParallelParams& phase, const Tensor&) {
  kernels().phase(params, phase, intra_op_parallel_for);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(todi_ext, CPU, m) {
  m.impl("vocab_parallel_row_stats", TORCH_BOX(&vocab_parallel::row_stats<run_phase_kernel>));
  m.impl("vocab_parallel_partial_sums", TORCH_BOX(&vocab_parallel::partial_sums<run_phase_kernel>));
  m.impl("vocab_parallel_gradients", TORCH_BOX(&vocab_parallel::gradients<run_phase_kernel>));
  m.impl("vocab_parallel_akl_walk", TORCH_BOX(&vocab_parallel::akl_walk<run_phase_kernel>));
  m.impl("vocab_parallel_akl_gaps", TORCH_BOX(&vocab_parallel::akl_gaps<run_phase_kernel>));
  m.impl("distill_forward", TORCH_BOX(&distill_forward<run_forward_kernel>));
  m.impl("scale_grad_", TORCH_BOX(&scale_grad_<run_scale_grad_kernel>));
  m.impl("scale_grad", TORCH_BOX(&scale_grad<run_scale_grad_kernel>));
}

// No tensor arguments: the ops that report and choose the kernel copy.
STABLE_TORCH_LIBRARY_IMPL(todi_ext, CompositeExplicitAutograd, m) {
  m.impl("cpu_kernel_capability", TORCH_BOX(&kernel_capability));
  m.impl("use_cpu_capability", TORCH_BOX(&use_cpu_capability));
}

}  // namespace todi_ext::cpu
