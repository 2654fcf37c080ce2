"""The distillation loss from hidden states and lm_head weights: logits are
formed a chunk of rows at a time inside one op and never held whole, and the
hard-label cross-entropy joins in the same pass."""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _validation, ops

# Bytes of chunk buffers per call (student and teacher logits and their
# gradient, float32, plus a low-precision copy of the gradient for CUDA's
# matmuls): rows per chunk = budget // (V x bytes per row entry). Set so that
# at N = 8192, H = 4096, V = 128256 bf16 the buffers (~300 rows) stay under
# the 2.1 GB float32 weight-gradient accumulator, and a CPU run stays small
# next to the (N, V) logits it replaces; chunks are never smaller than one
# row, so small batches are one chunk. Override per call with chunk_size.
CHUNK_MEMORY_BUDGET = {"cuda": 512 * 2**20, "cpu": 128 * 2**20}


def default_chunk_size(vocab: int, math_dtype: torch.dtype, weight_dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk for this call (see CHUNK_MEMORY_BUDGET)."""
    math_bytes = 8 if math_dtype == torch.float64 else 4
    low_precision_copy = 2 if device.type == "cuda" and weight_dtype != math_dtype else 0
    per_row = max(1, vocab) * (3 * math_bytes + low_precision_copy)  # V = 0: the op refuses it
    budget = CHUNK_MEMORY_BUDGET.get(device.type, CHUNK_MEMORY_BUDGET["cpu"])
    return max(1, budget // per_row)


def _check_teacher_constant(**tensors):
    for name, t in tensors.items():
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            how = ("compute the teacher under torch.no_grad()" if name == "teacher_hidden"
                   else "freeze the teacher's weights (requires_grad_(False)) or pass them .detach()ed")
            raise ValueError(f"{name} requires grad, but the teacher is a constant here: {how}")


def fused_linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    divergence: str = "todi",
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    beta: float = 1.0,
    skew_lambda: float = 0.1,
    akl_mu: float = 0.5,
    jsd_beta: float = 0.5,
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """distill_loss(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, labels, ...) without
    ever materialising the (..., V) logits.

    student_hidden (..., H_s) and teacher_hidden (..., H_t) share their
    leading shape; the weights are (V, H_s) and (V, H_t) with one V. Logits
    are formed chunk_size rows at a time with float32 accumulation and kept
    float32 for the loss kernel; gradients reach student_hidden,
    student_weight and student_bias (the weight's and bias's accumulated in
    float32 across chunks). The teacher is a constant: teacher tensors that
    require grad are an error. Returns float32 (float64 for float64 inputs):
    a scalar for "mean"/"sum", shape (...) for "none" ("none" recomputes the
    chunks in backward, since each row's upstream gradient differs).
    chunk_size: rows per chunk; None chooses it from CHUNK_MEMORY_BUDGET.
    Other arguments as in :func:`todi_ext.distill_loss`.
    """
    _validation.check_fused_linear_inputs(student_hidden, student_weight, student_bias, teacher_hidden,
                                          teacher_weight, teacher_bias, labels)
    _validation.check_api_config(divergence, beta, skew_lambda, akl_mu, jsd_beta, temperature, ignore_index,
                                 reduction, soft_label_weight, hard_label_weight, labels)
    _check_teacher_constant(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    if chunk_size is None:
        math = _validation.loss_dtype(student_hidden, teacher_hidden)
        chunk_size = default_chunk_size(student_weight.shape[0], math, student_weight.dtype, student_hidden.device)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int):  # its range: the op's (check_op_args)
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    elif chunk_size >= 2**63:  # the op's int is an int64
        raise ValueError(f"chunk_size must be below 2**63, got {chunk_size}")

    rows = student_hidden.shape[:-1].numel()  # not reshape(-1, H): H = 0 leaves -1 undefined
    kernel_divergence, kernel_jsd_beta = _validation.kernel_divergence(divergence, jsd_beta)
    grad_on = torch.is_grad_enabled() and reduction != "none"  # "none": gradients in backward
    loss, _, _, _ = ops.fused_linear_distill_forward(
        student_hidden.reshape(rows, student_hidden.shape[-1]),
        student_weight,
        student_bias,
        teacher_hidden.reshape(rows, teacher_hidden.shape[-1]),
        teacher_weight,
        teacher_bias,
        labels.reshape(-1) if labels is not None else None,
        kernel_divergence,
        beta,
        float(skew_lambda),
        float(akl_mu),
        kernel_jsd_beta,
        temperature,
        int(ignore_index),
        reduction,
        float(soft_label_weight),
        float(hard_label_weight),
        int(chunk_size),
        None,
        grad_on and student_hidden.requires_grad,
        grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    return loss.reshape(student_hidden.shape[:-1]) if reduction == "none" else loss


class FusedLinearDistillLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_distill_loss`:
    ``FusedLinearDistillLoss("todi", temperature=2.0, hard_label_weight=0.5, soft_label_weight=0.5)(
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels)``."""

    def __init__(self, divergence: str = "todi", *, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", beta: float = 1.0, skew_lambda: float = 0.1, akl_mu: float = 0.5,
                 jsd_beta: float = 0.5, hard_label_weight: float = 0.0, soft_label_weight: float = 1.0,
                 chunk_size: Optional[int] = None):
        super().__init__()
        _validation.check_module_config(divergence, beta, skew_lambda, akl_mu, jsd_beta, temperature, ignore_index,
                                        reduction, soft_label_weight, hard_label_weight)
        self.kwargs = dict(divergence=divergence, temperature=temperature, ignore_index=ignore_index,
                           reduction=reduction, beta=beta, skew_lambda=skew_lambda, akl_mu=akl_mu, jsd_beta=jsd_beta,
                           hard_label_weight=hard_label_weight, soft_label_weight=soft_label_weight,
                           chunk_size=chunk_size)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                labels: Optional[Tensor] = None, *, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None) -> Tensor:
        return fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                         student_bias=student_bias, teacher_bias=teacher_bias, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


# ------------------------------------------- the op's implementation (CPU, CUDA)
# torch.ops.todi_ext.fused_linear_distill_forward (schema: csrc/torch_bindings.cpp;
# fake and autograd: ops.py). Plain torch around the distill_forward kernel op:
# no C++ of its own, so it needs nothing of libtorch beyond the dispatcher.
# Per chunk of rows: student and teacher logits in float32 (float64 for float64
# inputs) from float32-accumulated matmuls, the kernel's loss and logits
# gradient, then grad_hidden = g W and grad_W += g^T h, grad_b += sum(g), the
# last two accumulated in float32 across chunks and cast once at the end.
class _Head(NamedTuple):
    """One lm_head as the matmuls take it: the weight in the math dtype, or
    (mixed, CUDA) the low-precision weight with float32-output matmuls."""

    weight: Tensor
    bias: Optional[Tensor]
    mixed: bool


def _head(weight: Tensor, bias: Optional[Tensor], math: torch.dtype) -> _Head:
    bias = bias.to(math) if bias is not None else None
    if weight.dtype == math:
        return _Head(weight, bias, False)
    if weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) and math == torch.float32:
        return _Head(weight, bias, True)  # mm's out_dtype takes fp16/bf16 inputs to a float32 result only
    return _Head(weight.to(math), bias, False)  # CPU: one upcast copy of W per call


def _matmul(a: Tensor, b: Tensor, head: _Head, math: torch.dtype) -> Tensor:
    """a @ b in the math dtype with float32 (float64) accumulation."""
    if head.mixed:
        return torch.ops.aten.mm.dtype(a.to(head.weight.dtype), b, math)
    return torch.mm(a.to(math), b)


def _chunk_logits(hidden: Tensor, head: _Head, math: torch.dtype) -> Tensor:
    out = _matmul(hidden, head.weight.t(), head, math)
    return out.add_(head.bias) if head.bias is not None else out


def check_op_args(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
                  divergence, beta, skew_lambda, akl_mu, jsd_beta, inv_temperature, ignore_index, reduction,
                  soft_label_weight, hard_label_weight, chunk_size, row_weights, hidden_grad, weight_grad, bias_grad):
    """The fused linear op's rules on its arguments (the op's own argument
    list), for the op and its fake: hidden states (N, H), lm_head weights (V, H) (+ biases
    (V,)) of one dtype and device per model, one V (no padding: padded
    entries would get probability mass), labels (N,); the loss's own rules
    are distill_forward's (check_op_config)."""
    for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if t.dtype not in _validation.LOGIT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16 (or float64), got {t.dtype}")
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2 or student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"student_hidden and teacher_hidden must have shape (N, H) with one N, got "
                         f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
    for who, hidden, weight, bias in (("student", student_hidden, student_weight, student_bias),
                                      ("teacher", teacher_hidden, teacher_weight, teacher_bias)):
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
            raise ValueError(
                f"{who}_weight must have shape (V, {hidden.shape[-1]}) for {who}_hidden of shape "
                f"{tuple(hidden.shape)}, got {tuple(weight.shape)}"
            )
        if weight.dtype != hidden.dtype:
            raise TypeError(f"{who}_weight must have {who}_hidden's dtype {hidden.dtype}, got {weight.dtype}")
        if weight.device != hidden.device:
            raise ValueError(f"{who}_weight is on {weight.device} but {who}_hidden is on {hidden.device}")
        if bias is not None:
            if tuple(bias.shape) != (weight.shape[0],):
                raise ValueError(f"{who}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
            if bias.dtype != hidden.dtype or bias.device != hidden.device:
                raise ValueError(
                    f"{who}_bias must be {hidden.dtype} on {hidden.device} like {who}_hidden, "
                    f"got {bias.dtype} on {bias.device}"
                )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"the student's vocabulary size ({student_weight.shape[0]}, rows of student_weight) differs from the "
            f"teacher's ({teacher_weight.shape[0]}, rows of teacher_weight); distillation needs one vocabulary"
        )
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on {student_hidden.device}")
    rows = student_hidden.shape[0]
    if labels is not None:
        _validation.check_label_type(labels)
        if tuple(labels.shape) != (rows,):
            raise ValueError(f"labels must have shape ({rows},) (student_hidden without its last dimension), "
                             f"got {tuple(labels.shape)}")
        if labels.device != student_hidden.device:
            raise ValueError(f"labels is on {labels.device} but student_hidden is on {student_hidden.device}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    if bias_grad and student_bias is None:
        raise ValueError("bias_grad=True needs student_bias")
    if reduction == "none" and (hidden_grad or weight_grad or bias_grad) and row_weights is None:
        raise ValueError("reduction='none' computes gradients of sum(row_weights * loss): pass row_weights")
    if row_weights is not None and reduction != "none":
        raise ValueError("row_weights applies to reduction='none' only")
    if row_weights is not None and tuple(row_weights.shape) != (rows,):
        raise ValueError(f"row_weights must have shape ({rows},), got {tuple(row_weights.shape)}")
    _validation.check_op_config(divergence, skew_lambda, akl_mu, jsd_beta, reduction, soft_label_weight,
                                hard_label_weight, has_labels=labels is not None)


def _fused_linear_distill_forward(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
    divergence, beta, skew_lambda, akl_mu, jsd_beta, inv_temperature, ignore_index, reduction, soft_label_weight,
    hard_label_weight, chunk_size, row_weights, hidden_grad, weight_grad, bias_grad,
):
    check_op_args(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
                  divergence, beta, skew_lambda, akl_mu, jsd_beta, inv_temperature, ignore_index, reduction,
                  soft_label_weight, hard_label_weight, chunk_size, row_weights, hidden_grad, weight_grad, bias_grad)
    any_grad = hidden_grad or weight_grad or bias_grad
    rows, vocab = student_hidden.shape[0], student_weight.shape[0]
    math = _validation.loss_dtype(student_hidden, teacher_hidden)
    labels = labels.long() if labels is not None else None
    # The labels' range once for all rows, with their positions (the chunks'
    # own checks would give positions within a chunk).
    if hard_label_weight != 0:
        _validation.check_label_range(labels, vocab, ignore_index)
    # "mean" divides by the counted positions of all rows, not of a chunk; an
    # all-ignored batch divides by 1 (loss 0, zero gradient).
    count = grad_scale = None
    if reduction == "mean":
        count = ((labels != ignore_index).sum().to(math).clamp_min(1) if labels is not None
                 else torch.full((), float(max(rows, 1)), dtype=math, device=student_hidden.device))
        grad_scale = count.reciprocal()
    student = _head(student_weight, student_bias, math)
    teacher = _head(teacher_weight, teacher_bias, math)
    row_scale = row_weights.to(math) if reduction == "none" and any_grad else None

    loss_rows = student_hidden.new_empty((rows,), dtype=math)
    grad_hidden = student_hidden.new_empty(student_hidden.shape if hidden_grad else (0,))
    grad_weight = torch.zeros(student_weight.shape, dtype=math, device=student_weight.device) if weight_grad else None
    grad_bias = torch.zeros((vocab,), dtype=math, device=student_weight.device) if bias_grad else None
    # The op picks its own precision (float32-accumulated matmuls, float32
    # logits): an enclosing torch.autocast, which stays on for the ops a custom
    # op calls, must not recast the matmuls.
    with torch.autocast(student_hidden.device.type, enabled=False):
        for start in range(0, rows, chunk_size):
            end = min(rows, start + chunk_size)
            h = student_hidden[start:end]
            chunk_loss, grad_logits, _ = torch.ops.todi_ext.distill_forward.default(
                _chunk_logits(h, student, math), _chunk_logits(teacher_hidden[start:end], teacher, math),
                labels[start:end] if labels is not None else None, divergence, beta, skew_lambda, akl_mu, jsd_beta,
                inv_temperature, ignore_index, "none", any_grad, False, soft_label_weight, hard_label_weight,
            )
            loss_rows[start:end] = chunk_loss
            if not any_grad:
                continue
            # "mean" scales by 1/count after the matmuls (an (N, H) and a (V, H)
            # pass instead of one over every chunk's (rows, V) gradient);
            # per-row weights ("none", from backward) scale the logits gradient.
            if row_scale is not None:
                grad_logits.mul_(row_scale[start:end].unsqueeze(1))
            # With a low-precision weight on CUDA the matmuls take the gradient
            # in that dtype (as autograd of F.linear would), accumulating in float32.
            g = grad_logits.to(student.weight.dtype) if student.mixed else grad_logits
            if hidden_grad:
                gh = _matmul(g, student.weight, student, math)
                grad_hidden[start:end] = gh.mul_(grad_scale) if grad_scale is not None else gh
            if weight_grad:
                if student.mixed:
                    torch.ops.aten.addmm.dtype_out(grad_weight, g.t(), h.to(g.dtype), math, out=grad_weight)
                else:
                    grad_weight.addmm_(g.t(), h.to(math))
            if bias_grad:
                grad_bias.add_(grad_logits.sum(0))
            # A loop's locals outlive its iteration: without this, the chunk's (rows, V) gradient would still
            # be held while the next chunk's logits are formed, one chunk buffer more at the peak.
            del grad_logits, g
    if grad_scale is not None:
        if weight_grad:
            grad_weight.mul_(grad_scale)
        if bias_grad:
            grad_bias.mul_(grad_scale)
    loss = loss_rows if reduction == "none" else loss_rows.sum() if reduction == "sum" else loss_rows.sum() / count
    return (
        loss,
        grad_hidden,
        grad_weight.to(student_weight.dtype) if weight_grad else student_weight.new_empty((0,)),
        grad_bias.to(student_bias.dtype) if bias_grad else student_hidden.new_empty((0,)),
    )


# For the devices the kernel op has kernels on (CUDA only in a CUDA build
# loaded under a CUDA torch), so other inputs fail at the op, naming it.
torch.library.impl(
    "todi_ext::fused_linear_distill_forward",
    [d for d, key in (("cpu", "CPU"), ("cuda", "CUDA"))
     if torch._C._dispatch_has_kernel_for_dispatch_key("todi_ext::distill_forward", key)],
    _fused_linear_distill_forward,
)
