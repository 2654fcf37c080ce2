"""Eager PyTorch ToDi loss, written from the spec: the test oracle (call it on
float64 inputs) and the benchmark baseline. Same signature as todi_ext.todi_loss.

It materialises about ten (N, V) temporaries, which is what the fused kernels avoid.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _validation


def todi_per_position(student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float) -> Tensor:
    """Unreduced ToDi divergence over the last dimension, in float32 (float64 for float64 inputs)."""
    dtype = _validation.loss_dtype(student_logits, teacher_logits)
    z = student_logits.to(dtype) / temperature
    s = teacher_logits.to(dtype) / temperature
    lse_z = torch.logsumexp(z, dim=-1, keepdim=True)
    lse_s = torch.logsumexp(s, dim=-1, keepdim=True)
    log_q = z - lse_z
    log_p = s - lse_s
    # Entries with a +-inf logit are left out of the sum. torch.where, not
    # masked multiplication, so their 0 * inf never reaches the gradient.
    skip = student_logits.isinf() | teacher_logits.isinf()
    zero = torch.zeros((), dtype=dtype, device=z.device)
    r = torch.where(skip, zero, log_p - log_q)
    p = torch.where(skip, zero, log_p.exp())
    q = torch.where(skip, zero, log_q.exp())
    a = torch.sigmoid(beta * r).detach()
    per_position = (a * p * r - (1 - a) * q * r).sum(dim=-1)
    # A row whose distribution is undefined (all -inf, +inf, NaN) is NaN.
    valid = torch.isfinite(lse_z.squeeze(-1)) & torch.isfinite(lse_s.squeeze(-1))
    return torch.where(valid, per_position, torch.full_like(per_position, float("nan")))


def todi_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Eager ToDi loss; see todi_ext.todi_loss for the arguments."""
    _validation.check_all(student_logits, teacher_logits, labels, beta, temperature, ignore_index, reduction)
    per_position = todi_per_position(student_logits, teacher_logits, beta, temperature)
    if labels is not None:
        keep = labels != ignore_index
        per_position = torch.where(keep, per_position, torch.zeros_like(per_position))
    return _reduce(per_position, labels, ignore_index, reduction)


def _reduce(per_position, labels, ignore_index, reduction):
    """Applies `reduction` to per-position losses that are already 0 where skipped.

    "mean" divides by the number of counted positions, and by 1 when none
    counts, so an all-ignored batch gives 0 with a zero gradient, never NaN.
    No host synchronisation: the count stays a tensor.
    """
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    if labels is None:
        return total / max(per_position.numel(), 1)
    count = (labels != ignore_index).sum().clamp_(min=1)
    return total / count.to(total.dtype)
