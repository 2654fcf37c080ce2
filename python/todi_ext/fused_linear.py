"""The distillation loss from hidden states and lm_head weights: logits are
formed a chunk of rows at a time inside one op and never held whole, and the
hard-label cross-entropy joins in the same pass."""

from typing import Optional

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
    per_row = vocab * (3 * math_bytes + low_precision_copy)
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
    _validation.check_fused_linear(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                   teacher_bias)
    lead = tuple(student_hidden.shape[:-1])
    if labels is not None:
        _validation.check_labels(labels, student_hidden, like="student_hidden")
    _validation.check_scalars(beta, temperature, ignore_index, reduction)
    _validation.check_ignore_index_fits(labels, ignore_index)
    _validation.check_divergence(divergence, beta=beta, skew_lambda=skew_lambda, akl_mu=akl_mu, jsd_beta=jsd_beta)
    _validation.check_label_weights(soft_label_weight, hard_label_weight, labels)
    vocab = student_weight.shape[0]
    if hard_label_weight != 0:
        _validation.check_label_range(labels, vocab, ignore_index)
    _check_teacher_constant(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    math = _validation.loss_dtype(student_hidden, teacher_hidden)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab, math, student_weight.dtype, student_hidden.device)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    kernel_divergence, kernel_jsd_beta = _validation.kernel_divergence(divergence, jsd_beta)
    grad_on = torch.is_grad_enabled() and reduction != "none"  # "none": gradients in backward
    loss, _, _, _ = ops.fused_linear_distill_forward(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_weight,
        student_bias,
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
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
    return loss.reshape(lead) if reduction == "none" else loss


class FusedLinearDistillLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_distill_loss`:
    ``FusedLinearDistillLoss("todi", temperature=2.0, hard_label_weight=0.5, soft_label_weight=0.5)(
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels)``."""

    def __init__(self, divergence: str = "todi", *, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", beta: float = 1.0, skew_lambda: float = 0.1, akl_mu: float = 0.5,
                 jsd_beta: float = 0.5, hard_label_weight: float = 0.0, soft_label_weight: float = 1.0,
                 chunk_size: Optional[int] = None):
        super().__init__()
        _validation.check_scalars(beta, temperature, ignore_index, reduction)
        _validation.check_divergence(divergence, beta=beta, skew_lambda=skew_lambda, akl_mu=akl_mu, jsd_beta=jsd_beta)
        _validation.check_label_weights(soft_label_weight, hard_label_weight, with_labels=False)
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
