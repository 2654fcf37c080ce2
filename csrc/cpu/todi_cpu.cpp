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
  ScaleGradKernel scale_grad;
  const char* capability;
};

// Picked once, from what ATen itself uses (it honours ATEN_CPU_CAPABILITY).
const Kernels& kernels() {
  static const Kernels chosen = [] {
    const std::string best = at::get_cpu_capability();
#if defined(TODI_EXT_HAVE_AVX512)
    if (best == "AVX512") return Kernels{AVX512::todi_forward_kernel, AVX512::scale_grad_kernel, "AVX512"};
#endif
#if defined(TODI_EXT_HAVE_AVX2)
    if (best == "AVX512" || best == "AVX2") return Kernels{AVX2::todi_forward_kernel, AVX2::scale_grad_kernel, "AVX2"};
#endif
    return Kernels{DEFAULT::todi_forward_kernel, DEFAULT::scale_grad_kernel, "DEFAULT"};
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
                                                                int64_t ignore_index, c10::string_view reduction,
                                                                bool student_grad, bool teacher_grad) {
  auto [view, plan, per_position, grad_student, grad_teacher] = prepare_forward(
      student_logits, teacher_logits, labels, beta, temperature, ignore_index, reduction, student_grad, teacher_grad);

  ForwardParams p;
  p.student = row_matrix(view.student);
  p.teacher = row_matrix(view.teacher);
  p.rows = view.rows;
  p.vocab = view.vocab;
  p.labels = view.labels.defined() ? view.labels.const_data_ptr<int64_t>() : nullptr;
  p.ignore_index = ignore_index;
  p.beta = beta;
  p.inv_temperature = 1.0 / temperature;
  p.double_math = per_position.scalar_type() == at::kDouble;
  p.loss = per_position.mutable_data_ptr();
  p.grad_scale = plan.grad_scale.defined() ? plan.grad_scale.const_data_ptr() : nullptr;
  if (student_grad) p.grad_student = OutMatrix{grad_student.mutable_data_ptr(), grad_student.scalar_type()};
  if (teacher_grad) p.grad_teacher = OutMatrix{grad_teacher.mutable_data_ptr(), grad_teacher.scalar_type()};
  if (p.rows > 0) kernels().forward(p);
  return {reduce_loss(per_position, plan), grad_student, grad_teacher};
}

// out is grad (in place) or a contiguous tensor of grad's shape.
void scale_grad_into(const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& out) {
  check_scale_grad_args(grad, scale);
  if (grad.numel() == 0) return;
  const at::Tensor scale_values = scale.contiguous();
  const at::Tensor rows = rows_for_scaling(grad);
  ScaleGradParams p;
  p.grad = rows.const_data_ptr();
  p.out = out.is_same(grad) ? const_cast<void*>(p.grad) : out.mutable_data_ptr();
  p.dtype = grad.scalar_type();
  p.layout = row_layout(rows);
  p.vocab = grad.size(-1);
  p.rows = grad.numel() / p.vocab;
  p.scale = scale_values.const_data_ptr();
  p.scale_dtype = scale_values.scalar_type();
  p.scale_per_row = scale_values.dim() > 0;
  kernels().scale_grad(p);
}

void scale_grad_cpu_(const at::Tensor& grad, const at::Tensor& scale) { scale_grad_into(grad, scale, grad); }

at::Tensor scale_grad_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  at::Tensor out = at::empty(grad.sizes(), grad.options());
  scale_grad_into(grad, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(todi_ext, CPU, m) {
  m.impl("todi_forward", &todi_forward_cpu);
  m.impl("scale_grad_", &scale_grad_cpu_);
  m.impl("scale_grad", &scale_grad_cpu);
}

}  // namespace todi_ext::cpu
