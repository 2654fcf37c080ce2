// CPU implementations of the todi_ext ops: argument checks, output
// allocation, and the choice of the kernel copy for this machine's widest
// instruction set.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "todi_cpu_kernel.h"
#include "todi_op_common.h"

namespace todi_ext::cpu {

struct Kernels {
  ForwardKernel forward;
  ScaleRowsKernel scale_rows;
  const char* capability;
};

// Picked once, from what ATen itself uses (it honours ATEN_CPU_CAPABILITY).
const Kernels& kernels() {
  static const Kernels chosen = [] {
    const std::string best = at::get_cpu_capability();
#if defined(TODI_EXT_HAVE_AVX512)
    if (best == "AVX512") return Kernels{AVX512::todi_forward_kernel, AVX512::scale_rows_kernel, "AVX512"};
#endif
#if defined(TODI_EXT_HAVE_AVX2)
    if (best == "AVX512" || best == "AVX2") return Kernels{AVX2::todi_forward_kernel, AVX2::scale_rows_kernel, "AVX2"};
#endif
    return Kernels{DEFAULT::todi_forward_kernel, DEFAULT::scale_rows_kernel, "DEFAULT"};
  }();
  return chosen;
}

const char* kernel_capability() { return kernels().capability; }

namespace {

RowMatrix row_matrix(const at::Tensor& x) {
  return RowMatrix{x.const_data_ptr(), x.scalar_type(), row_layout(x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> todi_forward_cpu(const at::Tensor& student_logits,
                                                                const at::Tensor& teacher_logits,
                                                                const std::optional<at::Tensor>& labels,
                                                                double beta, double temperature,
                                                                int64_t ignore_index, bool student_grad,
                                                                bool teacher_grad) {
  const RowsView view = check_forward_args(student_logits, teacher_logits, labels, beta, temperature);
  const auto opts = student_logits.options();
  const auto positions = student_logits.sizes().slice(0, student_logits.dim() - 1);
  at::Tensor loss = at::empty(positions, opts.dtype(math_dtype(student_logits, teacher_logits)));
  at::Tensor grad_student = at::empty(student_grad ? student_logits.sizes() : at::IntArrayRef{0}, opts);
  at::Tensor grad_teacher =
      at::empty(teacher_grad ? teacher_logits.sizes() : at::IntArrayRef{0}, teacher_logits.options());

  ForwardParams p;
  p.student = row_matrix(view.student);
  p.teacher = row_matrix(view.teacher);
  p.rows = view.rows;
  p.vocab = view.vocab;
  p.labels = view.labels.defined() ? view.labels.const_data_ptr<int64_t>() : nullptr;
  p.ignore_index = ignore_index;
  p.beta = beta;
  p.inv_temperature = 1.0 / temperature;
  p.double_math = loss.scalar_type() == at::kDouble;
  p.loss = loss.mutable_data_ptr();
  if (student_grad) p.grad_student = OutMatrix{grad_student.mutable_data_ptr(), grad_student.scalar_type()};
  if (teacher_grad) p.grad_teacher = OutMatrix{grad_teacher.mutable_data_ptr(), grad_teacher.scalar_type()};
  if (p.rows > 0) kernels().forward(p);
  return {loss, grad_student, grad_teacher};
}

at::Tensor scale_rows_cpu(const at::Tensor& grad, const at::Tensor& row_scale) {
  check_scale_rows_args(grad, row_scale);
  const int64_t vocab = grad.size(-1);
  at::Tensor out = at::empty(grad.sizes(), grad.options());
  if (grad.numel() == 0) return out;
  const at::Tensor rows = with_unit_vocab_stride(grad);
  const at::Tensor scale = row_scale.reshape({-1}).contiguous();
  ScaleRowsParams p;
  p.grad = row_matrix(rows);
  p.rows = grad.numel() / vocab;
  p.vocab = vocab;
  p.scale = scale.const_data_ptr();
  p.scale_dtype = scale.scalar_type();
  p.out = OutMatrix{out.mutable_data_ptr(), out.scalar_type()};
  kernels().scale_rows(p);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(todi_ext, CPU, m) {
  m.impl("todi_forward", &todi_forward_cpu);
  m.impl("scale_rows", &scale_rows_cpu);
}

}  // namespace todi_ext::cpu
