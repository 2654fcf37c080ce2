// The hub of the extension: every op schema. Backends register their kernels
// for these schemas in their own files (cpu/cpu_ops.cpp, cuda/...); fake and
// autograd registrations are in python/todi_ext/ops.py; the Python module is
// python_module.cpp. Registered through the LibTorch stable ABI
// (STABLE_TORCH_LIBRARY): the schemas are strings, the same for every torch.
#include <torch/csrc/stable/library.h>

#include "vocab_parallel_ops.h"

STABLE_TORCH_LIBRARY(todi_ext, m) {
  // A distillation divergence (ToDi, or one of its paper's baselines) over
  // the last dimension, reduced ("none", "sum" or "mean" over counted
  // positions), and (when asked) its gradients for an upstream gradient of 1,
  // written by the same pass over the logits. Ignored
  // positions count 0 and get a zero gradient. The autograd registration
  // (python/todi_ext/ops.py) saves the gradient outputs and scales them in
  // place in backward. beta and inv_temperature (1 / T) are 0-dim float64
  // tensors on the logits' device, read by the kernels: values users sweep
  // or schedule do not specialise a torch.compile graph, and nothing syncs.
  // With hard_label_weight != 0 the loss is soft_label_weight * divergence
  // + hard_label_weight * cross_entropy(student_logits at T = 1, labels),
  // computed in the same pass.
  m.def(
      "distill_forward(Tensor student_logits, Tensor teacher_logits, Tensor? labels, str divergence, "
      "Tensor beta, float skew_lambda, float akl_mu, float jsd_beta, Tensor inv_temperature, int ignore_index, "
      "str reduction, bool student_grad, bool teacher_grad, float soft_label_weight=1.0, "
      "float hard_label_weight=0.0) -> (Tensor loss, Tensor grad_student, Tensor grad_teacher)");
  // The same loss from hidden states and lm_head weights, implemented in
  // Python over the op above (python/todi_ext/fused_linear.py, CPU and CUDA):
  // logits are formed a chunk of rows at a time (chunk_size rows) and never
  // held whole. hidden: (N, H); weight: (V, H); labels: (N,). The gradients
  // asked for (of the reduced loss; for "none", of sum(row_weights * loss))
  // are computed in the same pass: grad_hidden in hidden's dtype, grad_weight
  // and grad_bias accumulated in float32 and returned in the weight's dtype.
  m.def(
      "fused_linear_distill_forward(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
      "Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, Tensor? labels, str divergence, "
      "Tensor beta, float skew_lambda, float akl_mu, float jsd_beta, Tensor inv_temperature, int ignore_index, "
      "str reduction, float soft_label_weight, float hard_label_weight, int chunk_size, Tensor? row_weights, "
      "bool hidden_grad, bool weight_grad, bool bias_grad) "
      "-> (Tensor loss, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // The vocabulary-parallel phases (python/todi_ext/distributed.py): the
  // logits are this rank's slice of the vocabulary; labels are local indices
  // (outside [0, V_local): another rank's token). Row statistics: this
  // slice's (max, sum exp(x - max)) of z/T, s/T and (with_hard_label_term) z,
  // (rows, 6) float64. Partial sums, given the merged (max, log sum) pairs:
  // this slice's sums of the loss, u, v and z[label], (rows, 4) float64.
  // Gradients, given all slices' sums: this slice's logits gradients, scaled
  // by grad_scale (math dtype, 0-dim), with label_weights = (soft, hard),
  // float64 (2,), read by the kernel like beta (a compiled step's schedule of
  // them is a graph input, not a recompile).
  //
  // AKL's head/tail split (math::AklTailSearch) between the statistics and
  // the partial sums: with tail_key the search's per-row low key (int64) and
  // remaining_bits the bits still open, a walk gives this slice's sums of p
  // at the walk's 15 thresholds, (rows, 15) float64; once the search is done,
  // the gaps op gives this slice's (g_head, g_tail), (rows, 2) float64. The
  // all-reduced gaps then go to the partial sums and gradients as akl_gaps.
  //
  // The schemas: vocab_parallel_ops.h (the CUDA host-emulation harness
  // registers the same ops under its own namespace).
  for (const char* schema : todi_ext::vocab_parallel::kSchemas) m.def(schema);
  // The compiled vocabulary-parallel loss's agreement check (Python,
  // python/todi_ext/distributed.py): value, returned once agree - computed by
  // every rank from the same gathered table - has been checked (a
  // RuntimeError with message on the CPU, a device-side assert on CUDA). Its
  // output feeds the first phase op, so a compiled graph cannot reach the
  // next collective (whose sizes may differ between ranks) before it.
  m.def("vocab_parallel_agreement(Tensor agree, Tensor value, str message) -> Tensor");
  // grad *= scale, in place, with float32 (float64) arithmetic: the backward
  // of distill_forward. scale is a scalar (0-dim) or one value per row; rows
  // whose scale is exactly 1 are not touched, so the usual loss.backward()
  // costs no memory traffic at all.
  m.def("scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
  // The out-of-place form, for backward passes that must keep the saved
  // gradient (retain_graph=True) and for traced graphs (torch.compile).
  m.def("scale_grad(Tensor grad, Tensor scale) -> Tensor");
  // distill_forward's checks alone, for the Python paths that reach no
  // kernel first: the eager reference, the vocabulary-parallel loss (before
  // its collectives, so that every rank refuses alike) and the modules'
  // constructors (on meta tensors). One authority for these rules: the C++
  // that the op runs (ops/op_common.cpp). check_label_range takes the
  // vocabulary labels index (a vocabulary-parallel slice's is the whole
  // one); it reads CPU labels only, as the op does.
  m.def(
      "check_distill_args(Tensor student_logits, Tensor teacher_logits, Tensor? labels, str divergence, "
      "float skew_lambda, float akl_mu, float jsd_beta, str reduction, float soft_label_weight, "
      "float hard_label_weight) -> ()");
  m.def("check_label_range(Tensor labels, int vocab, int ignore_index) -> ()");
  // The copy of the CPU kernel that runs (DEFAULT, AVX2 or AVX512), for
  // build_info(); and its choice, made at import from the capability torch
  // reports (torch.backends.cpu.get_cpu_capability(), which honours
  // ATEN_CPU_CAPABILITY): the widest compiled copy it allows. Returns the copy.
  // Implemented in cpu/cpu_ops.cpp.
  m.def("cpu_kernel_capability() -> str");
  m.def("use_cpu_capability(str capability) -> str");
}

namespace {

void check_distill_args(torch::stable::Tensor student_logits, torch::stable::Tensor teacher_logits,
                        std::optional<torch::stable::Tensor> labels, std::string_view divergence, double skew_lambda,
                        double akl_mu, double jsd_beta, std::string_view reduction, double soft_label_weight,
                        double hard_label_weight) {
  todi_ext::check_distill_args(student_logits, teacher_logits, labels, divergence, skew_lambda, akl_mu, jsd_beta,
                               reduction, soft_label_weight, hard_label_weight);
}

void check_label_range(torch::stable::Tensor labels, int64_t vocab, int64_t ignore_index) {
  todi_ext::check_label_range(labels, vocab, ignore_index);
}

}  // namespace

// Metadata and CPU memory only: one kernel for every device, meta included.
STABLE_TORCH_LIBRARY_IMPL(todi_ext, CompositeExplicitAutograd, m) {
  m.impl("check_distill_args", TORCH_BOX(&check_distill_args));
  m.impl("check_label_range", TORCH_BOX(&check_label_range));
}
