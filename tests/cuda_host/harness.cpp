// Runs the CUDA kernels of csrc/cuda/streamed_kernel.cuh on the CPU through
// the host emulation (csrc/cuda/host_emulation.h). Built by
// tests/test_cuda_host.py as the library `todi_cuda_host_harness`, never
// installed: it is not todi_ext, and its ops live in their own namespace,
// torch.ops.todi_cuda_host. Like the extension it is built on the stable ABI,
// and the arguments go through the extension's own checks and parameter
// set-up (op_common, vocab_parallel_ops.h).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "register_rows_kernel.cuh"
#include "scale_grad_kernel.cuh"
#include "op_common.h"
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
      TODI_CHECK(vectors <= capacity, "registers: ", l.parts, " x ", l.threads, " threads hold ", capacity,
                  " vectors, the row has ", vectors);
      TODI_CHECK(l.threads <= kernels::kRegisterRowThreads, "registers: at most 256 threads");
      last_kernel = "registers";
      todi_host::launch(kernels::register_rows_kernel<T, D>, l.blocks * l.parts, l.threads,
                        kernels::register_row_smem(l.threads, sizeof(T)), l.parts, args);
      return;
    }
  }
  TODI_CHECK(l.variant == "registers" || l.variant == "streamed", "variant must be registers or streamed");
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

using todi_ext::Tensor;

std::tuple<Tensor, Tensor, Tensor> distill_forward(
    const Tensor& student, const Tensor& teacher, const std::optional<Tensor>& labels, std::string_view divergence,
    double beta, double skew_lambda, double akl_mu, double jsd_beta, double temperature, int64_t ignore_index,
    std::string_view reduction, bool student_grad, bool teacher_grad, std::string_view variant, int64_t threads,
    int64_t blocks, int64_t parts, double soft_label_weight, double hard_label_weight) {
  const auto scalar = [](double v) { return torch::stable::full({}, v, todi_ext::ScalarType::Double); };
  const auto setup = todi_ext::prepare_forward(student, teacher, labels, divergence, scalar(beta), skew_lambda, akl_mu,
                                               jsd_beta, scalar(1.0 / temperature), ignore_index, reduction,
                                               student_grad, teacher_grad, soft_label_weight, 0.0);
  if (setup.view.rows > 0) {
    ForwardParams args = todi_ext::forward_params(setup, ignore_index);
    // Set after the checks: the CUDA op cannot range-check labels in device
    // memory, so the harness lets out-of-range labels reach the kernel too.
    args.hard_label_weight = hard_label_weight;
    const Launch l{std::string(variant), static_cast<unsigned>(threads), static_cast<unsigned>(blocks),
                   static_cast<unsigned>(parts)};
    todi_ext::dispatch_divergence(args.divergence, [&](auto d) {
      launch_divergence<decltype(d)::value>(args, l);
    });
  }
  return {todi_ext::reduce_loss(setup.per_position, setup.plan), setup.grad_student, setup.grad_teacher};
}

// scale_grad_ and scale_grad: the extension's own ops (op_common.h) with the
// kernel launched emulated, on `blocks` blocks of `threads`.
unsigned scale_grad_threads = 64, scale_grad_blocks = 2;

void run_emulated_scale_grad(const todi_ext::ScaleGradParams& params, const Tensor&) {
  todi_host::launch(kernels::scale_grad_kernel_for(params), scale_grad_blocks, scale_grad_threads, 0, 1, params);
}

void scale_grad_(const Tensor& grad, const Tensor& scale, int64_t threads, int64_t blocks) {
  scale_grad_threads = static_cast<unsigned>(threads), scale_grad_blocks = static_cast<unsigned>(blocks);
  todi_ext::scale_grad_<run_emulated_scale_grad>(grad, scale);
}

Tensor scale_grad(const Tensor& grad, const Tensor& scale, int64_t threads, int64_t blocks) {
  scale_grad_threads = static_cast<unsigned>(threads), scale_grad_blocks = static_cast<unsigned>(blocks);
  return todi_ext::scale_grad<run_emulated_scale_grad>(grad, scale);
}

// The vocabulary-parallel phase ops (the extension's own vocab_parallel_ops.h)
// with this emulated launch; set_phase_launch picks its variant and shape.
Launch phase_launch{"streamed", 64, 2, 1};

void set_phase_launch(std::string_view variant, int64_t threads, int64_t blocks, int64_t parts) {
  phase_launch = Launch{std::string(variant), static_cast<unsigned>(threads), static_cast<unsigned>(blocks),
                        static_cast<unsigned>(parts)};
}

template <class A, class T, Divergence D>
void launch_phase(const ForwardParams& args, const todi_ext::VocabParallelParams& vp) {
  TODI_CHECK(phase_launch.variant == "streamed", "the phase kernels are streamed");
  todi_ext::dispatch_phase(vp.phase, [&](auto p) {
    constexpr todi_ext::Phase P = decltype(p)::value;
    if constexpr (kernels::kPhaseKernelExists<D, P>) {
      last_kernel = "phase";
      todi_host::launch(kernels::vocab_parallel_kernel<A, T, D, P>, phase_launch.blocks, phase_launch.threads, 0, 1,
                        args, vp);
    } else {
      TODI_CHECK(false, "AKL's search phases need divergence 'akl'");
    }
  });
}

// As the real launch (distill_forward_launch.cu) picks the phase kernel.
void run_emulated(const ForwardParams& args, const todi_ext::VocabParallelParams& vp, const Tensor&) {
  todi_ext::dispatch_divergence(args.divergence, [&](auto d) {
    kernels::dispatch_dtypes(args, [&](auto a, auto t) {
      launch_phase<typename decltype(a)::type, typename decltype(t)::type, decltype(d)::value>(args, vp);
    });
  });
}

std::string get_last_kernel() { return last_kernel; }

// The CUDA op's count of the mean's positions (the CPU op counts in a loop).
Tensor count_positions(const Tensor& labels, int64_t ignore_index, bool double_math) {
  return todi_ext::count_positions_with_ops(labels, ignore_index,
                                            double_math ? todi_ext::ScalarType::Double : todi_ext::ScalarType::Float);
}

std::tuple<int64_t, int64_t> register_row_shape(int64_t vocab, int64_t elem_bytes) {
  const auto shape = kernels::register_row_shape(vocab, elem_bytes);
  return {shape.parts, shape.threads};
}

// A kernel whose first `reaching` threads wait at __syncthreads and the rest
// return: the emulation must report it (on a GPU it hangs or is undefined).
__global__ void divergent_barrier_kernel(unsigned reaching) {
  if (threadIdx.x < reaching) __syncthreads();
}

void launch_divergent_barrier(int64_t threads, int64_t reaching) {
  todi_host::launch(divergent_barrier_kernel, 2, static_cast<unsigned>(threads), 0, 1,
                    static_cast<unsigned>(reaching));
}

// Whether emulated threads are fibers run in an order set_schedule picks, or
// OS threads (a sanitizer build).
bool uses_fibers() {
#ifdef TODI_EXT_HOST_OS_THREADS
  return false;
#else
  return true;
#endif
}

// Which ready emulated thread runs next: "oldest" or "newest" first.
void set_schedule(std::string_view order) {
  TODI_CHECK(uses_fibers(), "OS threads (a sanitizer build) have no schedule to set");
  TODI_CHECK(order == "oldest" || order == "newest", "order must be 'oldest' or 'newest', got '", order, "'");
  todi_host::schedule_order = order == "oldest" ? todi_host::Order::kOldestFirst : todi_host::Order::kNewestFirst;
}

// Two block sums through one scratch array (as streamed_kernel.cuh's
// block_sum) without the barrier between the first sum's reads and the
// second's writes; out gets each thread's first sum, blockDim.x where no warp
// overwrote scratch early. The schedule test shows newest-first finds it.
__global__ void block_sums_missing_a_barrier_kernel(float* out) {
  TODI_SHARED_ARRAY(float, scratch, 32);
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  float sums[2];
  for (int round = 0; round < 2; ++round) {
    float v = round + 1.0f;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(~0u, v, offset);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float x = lane < warps ? scratch[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(~0u, x, offset);
    sums[round] = x;  // the missing __syncthreads() belongs after this read
  }
  out[threadIdx.x] = sums[0];
}

// Run under `order`; the schedule the tests set is restored however it ends.
void block_sums_missing_a_barrier(const Tensor& out, std::string_view order) {
  TODI_CHECK(out.scalar_type() == todi_ext::ScalarType::Float && out.dim() == 1 && out.numel() % 32 == 0,
             "out must be a float32 vector of a multiple of 32 threads");
  struct Restore {
    todi_host::Order previous = todi_host::schedule_order;
    ~Restore() { todi_host::schedule_order = previous; }
  } restore;
  set_schedule(order);
  todi_host::launch(block_sums_missing_a_barrier_kernel, 1, static_cast<unsigned>(out.numel()), 0, 1,
                    out.mutable_data_ptr<float>());
}

}  // namespace

STABLE_TORCH_LIBRARY(todi_cuda_host, m) {
  m.def(
      "distill_forward(Tensor student, Tensor teacher, Tensor? labels, str divergence, float beta, "
      "float skew_lambda, float akl_mu, float jsd_beta, float temperature, int ignore_index, str reduction, "
      "bool student_grad, bool teacher_grad, str variant, int threads, int blocks, int parts, "
      "float soft_label_weight, float hard_label_weight) -> (Tensor, Tensor, Tensor)");
  m.def("scale_grad_(Tensor(a!) grad, Tensor scale, int threads, int blocks) -> ()");
  m.def("scale_grad(Tensor grad, Tensor scale, int threads, int blocks) -> Tensor");
  m.def("last_kernel() -> str");
  m.def("count_positions(Tensor labels, int ignore_index, bool double_math) -> Tensor");
  m.def("register_row_shape(int vocab, int elem_bytes) -> (int, int)");
  m.def("set_phase_launch(str variant, int threads, int blocks, int parts) -> ()");
  m.def("launch_divergent_barrier(int threads, int reaching) -> ()");
  m.def("uses_fibers() -> bool");
  m.def("block_sums_missing_a_barrier(Tensor(a!) out, str order) -> ()");
  m.def("set_schedule(str order) -> ()");
  for (const char* schema : todi_ext::vocab_parallel::kSchemas) m.def(schema);  // the extension's own
}

STABLE_TORCH_LIBRARY_IMPL(todi_cuda_host, CPU, m) {
  namespace vp = todi_ext::vocab_parallel;
  m.impl("distill_forward", TORCH_BOX(&distill_forward));
  m.impl("block_sums_missing_a_barrier", TORCH_BOX(&block_sums_missing_a_barrier));
  m.impl("scale_grad_", TORCH_BOX(&scale_grad_));
  m.impl("scale_grad", TORCH_BOX(&scale_grad));
  m.impl("count_positions", TORCH_BOX(&count_positions));
  m.impl("vocab_parallel_row_stats", TORCH_BOX(&vp::row_stats<run_emulated>));
  m.impl("vocab_parallel_partial_sums", TORCH_BOX(&vp::partial_sums<run_emulated>));
  m.impl("vocab_parallel_gradients", TORCH_BOX(&vp::gradients<run_emulated>));
  m.impl("vocab_parallel_akl_walk", TORCH_BOX(&vp::akl_walk<run_emulated>));
  m.impl("vocab_parallel_akl_gaps", TORCH_BOX(&vp::akl_gaps<run_emulated>));
}

STABLE_TORCH_LIBRARY_IMPL(todi_cuda_host, CompositeExplicitAutograd, m) {
  m.impl("last_kernel", TORCH_BOX(&get_last_kernel));
  m.impl("register_row_shape", TORCH_BOX(&register_row_shape));
  m.impl("set_phase_launch", TORCH_BOX(&set_phase_launch));
  m.impl("launch_divergent_barrier", TORCH_BOX(&launch_divergent_barrier));
  m.impl("uses_fibers", TORCH_BOX(&uses_fibers));
  m.impl("set_schedule", TORCH_BOX(&set_schedule));
}
