"""Fake (meta) and autograd registrations of the todi_ext ops, next to thin
typed wrappers. The schemas live in csrc/torch_bindings.cpp and the kernels in
csrc/<backend>/.

todi_forward computes, per position, the loss and (when asked) its gradients
for a unit weight in the same pass over the logits; the registered backward
only scales those gradients by the incoming per-position weights, through the
scale_rows op. No host synchronisation anywhere, so the ops run under
torch.compile(fullgraph=True) and CUDA graphs.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _validation

_EMPTY = (0,)


def todi_forward(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor],
    beta: float,
    temperature: float,
    ignore_index: int,
    student_grad: bool,
    teacher_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-position loss (shape student_logits.shape[:-1]) and, when the flags
    ask, dloss/dstudent_logits and dloss/dteacher_logits per position (else
    empty tensors)."""
    return torch.ops.todi_ext.todi_forward.default(
        student_logits, teacher_logits, labels, beta, temperature, ignore_index, student_grad, teacher_grad
    )


def scale_rows(grad: Tensor, row_scale: Tensor) -> Tensor:
    """grad * row_scale[..., None], in grad's dtype, without a float32 copy of grad."""
    return torch.ops.todi_ext.scale_rows.default(grad, row_scale)


@torch.library.register_fake("todi_ext::todi_forward")
def _todi_forward_fake(
    student_logits, teacher_logits, labels, beta, temperature, ignore_index, student_grad, teacher_grad
):
    _validation.check_all(student_logits, teacher_logits, labels, beta, temperature, ignore_index)
    loss = student_logits.new_empty(
        student_logits.shape[:-1], dtype=_validation.loss_dtype(student_logits, teacher_logits)
    )
    grad_student = student_logits.new_empty(student_logits.shape if student_grad else _EMPTY)
    grad_teacher = teacher_logits.new_empty(teacher_logits.shape if teacher_grad else _EMPTY)
    return loss, grad_student, grad_teacher


@torch.library.register_fake("todi_ext::scale_rows")
def _scale_rows_fake(grad, row_scale):
    if tuple(row_scale.shape) != tuple(grad.shape[:-1]):
        raise ValueError(
            f"row_scale must have shape {tuple(grad.shape[:-1])} (grad without its last dimension), "
            f"got {tuple(row_scale.shape)}"
        )
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _todi_forward_setup_context(ctx, inputs, output):
    _, _, _, _, _, _, student_grad, teacher_grad = inputs
    _, grad_student, grad_teacher = output
    ctx.student_grad = student_grad
    ctx.teacher_grad = teacher_grad
    ctx.save_for_backward(grad_student, grad_teacher)
    # The gradient outputs are never differentiated; without this, autograd
    # would materialise an (N, V) zero tensor for each of them in backward.
    ctx.mark_non_differentiable(grad_student, grad_teacher)
    ctx.set_materialize_grads(False)


def _missing_grad(name, flag):
    return RuntimeError(
        f"todi_ext: {name} requires grad but todi_forward was called with {flag}=False, so its gradient "
        f"was not computed; call it with {flag}=True (todi_ext.todi_loss sets this for you)"
    )


def _todi_forward_backward(ctx, grad_loss, _grad_of_grad_student, _grad_of_grad_teacher):
    if torch.is_grad_enabled():  # backward(create_graph=True)
        raise _double_backward_error()
    grad_student, grad_teacher = ctx.saved_tensors
    out_student = out_teacher = None
    if grad_loss is None:  # the loss was not used
        return out_student, out_teacher, None, None, None, None, None, None
    if ctx.needs_input_grad[0]:
        if not ctx.student_grad:
            raise _missing_grad("student_logits", "student_grad")
        out_student = scale_rows(grad_student, grad_loss)
    if ctx.needs_input_grad[1]:
        if not ctx.teacher_grad:
            raise _missing_grad("teacher_logits", "teacher_grad")
        out_teacher = scale_rows(grad_teacher, grad_loss)
    return out_student, out_teacher, None, None, None, None, None, None


torch.library.register_autograd(
    "todi_ext::todi_forward", _todi_forward_backward, setup_context=_todi_forward_setup_context
)


def _double_backward_error():
    # The saved per-row gradients are not differentiable functions of the
    # logits here, so refuse rather than return a partial, silently wrong
    # second derivative.
    return RuntimeError(
        "todi_ext: double backward (create_graph=True through todi_loss) is not supported; "
        "the ToDi gradient is computed in closed form without second derivatives"
    )


def _scale_rows_backward(ctx, grad_out):
    # scale_rows is only differentiated when the ToDi gradient itself is.
    raise _double_backward_error()


torch.library.register_autograd("todi_ext::scale_rows", _scale_rows_backward)
