// Runs the CUDA kernels of csrc/cuda/todi_cuda_kernel.cuh on the CPU through
// the host emulation (csrc/cuda/host_emulation.h). Built by
// tests/test_cuda_host.py as the module `todi_cuda_host_harness`, never
// installed: it is not todi_ext and registers no ops. The arguments go
// through the extension's own checks and parameter set-up (todi_op_common).
#include <torch/extension.h>

#include <string>

#include "register_rows_kernel.cuh"
#include "todi_op_common.h"
#include "vocab_parallel_ops.h"

namespace {

using todi_ext::ForwardParams;
using todi_ext::math::Divergence;
namespace kernels = todi_ext::cuda;

struct Launch {
  std::string variant;  // "registers" (the register-row kernel, a cluster of `parts` CTAs) or "streamed"
  unsigned threads;     // per block, a multiple of 32
  unsigned blocks;      // rows in flight: clusters (registers) or blocks (streamed)
  unsigned parts;       // CTAs per cluster (registers only)
};

// Which kernel the last launch ran: the real launch's rule, register rows
// where they serve the arguments, is applied here too.
std::string last_kernel;

template <class A, class T, Divergence D>
void launch_fused(const ForwardParams& args, const Launch& l) {
  constexpr bool kTyped = !std::is_same_v<T, kernels::AnyDtype>;
  if constexpr (kTyped && sizeof(T) < 8) {
    if (l.variant == "registers" && kernels::register_rows_eligible(args, sizeof(T)) &&
        kernels::register_row_shape(args.vocab, sizeof(T)).parts > 0) {
      const int64_t per_vector = 16 / sizeof(T);
      const int64_t vectors = (args.vocab + per_vector - 1) / per_vector;
      const int64_t capacity = int64_t{l.parts} * l.threads * kernels::kRegisterRowEntries / per_vector;
      TORCH_CHECK(vectors <= capacity, "registers: ", l.parts, " x ", l.threads, " threads hold ", capacity,
                  " vectors, the row has ", vectors);
      TORCH_CHECK(l.threads <= kernels::kRegisterRowThreads, "registers: at most 256 threads");
      last_kernel = "registers";
      todi_host::launch(kernels::register_rows_kernel<T, D>, l.blocks * l.parts, l.threads,
                        kernels::register_row_smem(l.threads, sizeof(T)), l.parts, args);
      return;
    }
  }
  TORCH_CHECK(l.variant == "registers" || l.variant == "streamed", "variant must be registers or streamed");
  last_kernel = "streamed";
  if (kTyped && kernels::streamed_is_lean(args)) {
    todi_host::launch(kernels::distill_forward_kernel<A, T, D, kTyped>, l.blocks, l.threads, 0, 1, args);
  } else {
    todi_host::launch(kernels::distill_forward_kernel<A, T, D>, l.blocks, l.threads, 0, 1, args);
  }
}

// The kernel the real launch (distill_forward_launch.cu) picks for these
// arguments; mixed dtypes: the generic instantiation, streamed only.
template <Divergence D>
void launch_divergence(const ForwardParams& args, const Launch& l) {
  kernels::dispatch_dtypes(args, [&](auto a, auto t) {
    launch_fused<typename decltype(a)::type, typename decltype(t)::type, D>(args, l);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_forward(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::string& divergence, double beta, double skew_lambda, double akl_mu, double jsd_beta, double temperature,
    int64_t ignore_index, const std::string& reduction, bool student_grad, bool teacher_grad,
    const std::string& variant, int64_t threads, int64_t blocks, int64_t parts, double soft_label_weight,
    double hard_label_weight) {
  const auto scalar = [](double v) { return at::full({}, v, at::TensorOptions().dtype(at::kDouble)); };
  const auto setup = todi_ext::prepare_forward(student, teacher, labels, divergence, scalar(beta), skew_lambda, akl_mu,
                                               jsd_beta, scalar(1.0 / temperature), ignore_index, reduction,
                                               student_grad, teacher_grad, soft_label_weight, 0.0);
  if (setup.view.rows > 0) {
    ForwardParams args = todi_ext::forward_params(setup, ignore_index);
    // Set after the checks: the CUDA op cannot range-check labels in device
    // memory, so the harness lets out-of-range labels reach the kernel too.
    args.hard_weight = hard_label_weight;
    const Launch l{variant, static_cast<unsigned>(threads), static_cast<unsigned>(blocks), static_cast<unsigned>(parts)};
    todi_ext::dispatch_divergence(args.divergence, [&](auto d) {
      launch_divergence<decltype(d)::value>(args, l);
    });
  }
  return {todi_ext::reduce_loss(setup.per_position, setup.plan), setup.grad_student, setup.grad_teacher};
}

// scale_grad (out of place when in_place is false), as the CUDA op launches it.
at::Tensor scale_grad(const at::Tensor& grad, const at::Tensor& scale, bool in_place, int64_t threads, int64_t blocks) {
  at::Tensor out = in_place ? grad : at::empty(grad.sizes(), grad.options());
  auto call = todi_ext::scale_grad_call(grad, scale, out);
  if (grad.numel() > 0) {
    todi_host::launch(kernels::scale_grad_kernel_for(call.params), blocks, threads, 0, 1, call.params);
  }
  return out;
}

// The vocabulary-parallel phase ops (the extension's own vocab_parallel_ops.h)
// with this emulated launch; set_phase_launch picks its variant and shape.
Launch phase_launch{"streamed", 64, 2, 1};

void set_phase_launch(const std::string& variant, int64_t threads, int64_t blocks, int64_t parts) {
  phase_launch = Launch{variant, static_cast<unsigned>(threads), static_cast<unsigned>(blocks), static_cast<unsigned>(parts)};
}

template <class A, class T, Divergence D>
void launch_phase(const ForwardParams& args, const todi_ext::VocabParallelParams& vp) {
  TORCH_CHECK(phase_launch.variant == "streamed", "the phase kernels are streamed");
  todi_ext::dispatch_phase(vp.phase, [&](auto p) {
    constexpr todi_ext::Phase P = decltype(p)::value;
    if constexpr (kernels::kPhaseKernelExists<D, P>) {
      last_kernel = "phase";
      todi_host::launch(kernels::vocab_parallel_kernel<A, T, D, P>, phase_launch.blocks, phase_launch.threads, 0, 1,
                        args, vp);
    } else {
      TORCH_CHECK(false, "AKL's search phases need divergence 'akl'");
    }
  });
}

// As the real launch (distill_forward_launch.cu) picks the phase kernel.
void run_emulated(const ForwardParams& args, const todi_ext::VocabParallelParams& vp, const at::Tensor&) {
  todi_ext::dispatch_divergence(args.divergence, [&](auto d) {
    kernels::dispatch_dtypes(args, [&](auto a, auto t) {
      launch_phase<typename decltype(a)::type, typename decltype(t)::type, decltype(d)::value>(args, vp);
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "todi_ext's CUDA kernels executed on the CPU (test harness, not the extension)";
  m.def("distill_forward", &distill_forward);
  m.def("scale_grad", &scale_grad);
  m.def("last_kernel", [] { return last_kernel; });
  m.def("register_row_shape", [](int64_t vocab, int64_t elem_bytes) {
    const auto shape = kernels::register_row_shape(vocab, elem_bytes);
    return std::make_tuple(shape.parts, shape.threads);
  });
  namespace vp = todi_ext::vocab_parallel;
  m.def("set_phase_launch", &set_phase_launch);
  m.def("vocab_parallel_row_stats", &vp::row_stats<run_emulated>);
  m.def("vocab_parallel_partial_sums", &vp::partial_sums<run_emulated>);
  m.def("vocab_parallel_gradients", &vp::gradients<run_emulated>);
  m.def("vocab_parallel_akl_walk", &vp::akl_walk<run_emulated>);
  m.def("vocab_parallel_akl_gaps", &vp::akl_gaps<run_emulated>);
}
