"""Eager PyTorch ToDi loss and its paper's baselines, written from the spec:
the test oracle (call it on float64 inputs) and the benchmark baseline. Same
signatures as todi_ext.todi_loss and todi_ext.distill_loss.

It materialises about ten (N, V) temporaries, which is what the fused kernels avoid.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from . import _validation


def _log_mix(log_p, weight_p, log_q):
    """log(weight_p p + (1 - weight_p) q), stable, for weight_p in [0, 1]."""
    log_w = lambda w: math.log(w) if w > 0 else -math.inf  # noqa: E731
    return torch.logaddexp(log_p + log_w(weight_p), log_q + log_w(1 - weight_p))


@torch.no_grad()
def akl_weights(p: Tensor, q: Tensor, skip: Tensor, mu: float):
    """AKL's detached (head, tail) weights per row, each of shape (..., 1).

    The tail is the entries whose teacher probability p_i satisfies
    S(p_i) = sum of p_j over p_j <= p_i (all entries, ties included) <= mu:
    "cumulative probability of p sorted ascending <= mu", with ties kept
    together so the split does not depend on the order a sort leaves them in.
    Entries in `skip` join neither part. g = sum |p - q| over each part; the
    weights are g_head / (g_head + g_tail) and g_tail / (...), 1/2 each when
    p == q everywhere.
    """
    key = torch.where(skip, torch.full_like(p, math.inf), p)
    ordered, _ = key.sort(dim=-1)
    cumulative = torch.where(ordered.isinf(), torch.zeros_like(ordered), ordered).cumsum(dim=-1)
    last_tied = torch.searchsorted(ordered, key, right=True) - 1  # the last sorted entry <= key_i
    tail = ~skip & (cumulative.gather(-1, last_tied) <= mu)
    diff = torch.where(skip, torch.zeros_like(p), (p - q).abs())
    g_tail = torch.where(tail, diff, torch.zeros_like(diff)).sum(dim=-1, keepdim=True)
    g_head = torch.where(tail, torch.zeros_like(diff), diff).sum(dim=-1, keepdim=True)
    total = g_head + g_tail
    half = torch.full_like(total, 0.5)
    has_mass = total > 0
    return torch.where(has_mass, g_head / total, half), torch.where(has_mass, g_tail / total, half)


def per_position(
    student_logits: Tensor,
    teacher_logits: Tensor,
    divergence: str = "todi",
    temperature: float = 1.0,
    beta: float = 1.0,
    skew_lambda: float = 0.1,
    jsd_beta: float = 0.5,
    akl_mu: float = 0.5,
) -> Tensor:
    """Unreduced divergence over the last dimension, in float32 (float64 for float64 inputs)."""
    dtype = _validation.loss_dtype(student_logits, teacher_logits)
    z = student_logits.to(dtype) / temperature
    s = teacher_logits.to(dtype) / temperature
    lse_z = torch.logsumexp(z, dim=-1, keepdim=True)
    lse_s = torch.logsumexp(s, dim=-1, keepdim=True)
    # Entries with a +-inf logit are left out of the sum. Their log-probs are
    # replaced by 0 before any arithmetic (and the term masked after), so no
    # inf or NaN - not even a 0 * inf in backward - reaches the gradient.
    skip = student_logits.isinf() | teacher_logits.isinf()
    zero = torch.zeros((), dtype=dtype, device=z.device)
    # log_softmax forms (x - max) - log(sum): x - logsumexp would lose ulp(max)
    # per entry at large logits.
    log_q = torch.where(skip, zero, torch.log_softmax(z, dim=-1))
    log_p = torch.where(skip, zero, torch.log_softmax(s, dim=-1))
    p, q, r = log_p.exp(), log_q.exp(), log_p - log_q
    if divergence == "todi":
        a = torch.sigmoid(beta * r).detach()  # stop-gradient weight
        terms = a * p * r - (1 - a) * q * r
    elif divergence == "fkl":
        terms = p * r
    elif divergence == "rkl":
        terms = -q * r
    elif divergence == "akl":
        head, tail = akl_weights(p, q, skip, akl_mu)
        terms = head * p * r - tail * q * r
    elif divergence == "tvd":
        terms = 0.5 * (p - q).abs()
    elif divergence == "skl":
        terms = p * (log_p - _log_mix(log_p, skew_lambda, log_q))
    elif divergence == "srkl":
        terms = q * (log_q - _log_mix(log_p, 1 - skew_lambda, log_q))
    elif divergence in ("gjsd", "js"):
        b = 0.5 if divergence == "js" else jsd_beta
        log_m = _log_mix(log_p, b, log_q)
        terms = b * p * (log_p - log_m) + (1 - b) * q * (log_q - log_m)
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    total = torch.where(skip, zero, terms).sum(dim=-1)
    # A row whose distribution is undefined (all -inf, +inf, NaN) is NaN.
    valid = torch.isfinite(lse_z.squeeze(-1)) & torch.isfinite(lse_s.squeeze(-1))
    return torch.where(valid, total, torch.full_like(total, float("nan")))


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    *,
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
) -> Tensor:
    """Eager distillation loss; see todi_ext.distill_loss for the arguments."""
    _validation.check_api_args(student_logits, teacher_logits, labels, divergence, beta, skew_lambda, akl_mu, jsd_beta,
                               temperature, ignore_index, reduction, soft_label_weight, hard_label_weight)
    # No kernel runs here: the op's own checks, called alone.
    _validation.check_op_args(student_logits, teacher_logits, labels, divergence, skew_lambda, akl_mu, jsd_beta,
                              reduction, soft_label_weight, hard_label_weight)
    if hard_label_weight != 0.0:
        _validation.check_label_range(labels, student_logits.shape[-1], ignore_index)
    values = per_position(student_logits, teacher_logits, divergence, temperature, beta, skew_lambda, jsd_beta, akl_mu)
    if soft_label_weight != 1.0:
        values = soft_label_weight * values
    if hard_label_weight != 0.0:
        # Cross-entropy of the student at T = 1 (log_softmax in the math dtype).
        log_q1 = torch.log_softmax(student_logits.to(values.dtype), dim=-1)
        target = torch.where(labels == ignore_index, torch.zeros_like(labels), labels).long()
        ce = -log_q1.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        values = values + hard_label_weight * ce
    if labels is not None:
        keep = labels != ignore_index
        values = torch.where(keep, values, torch.zeros_like(values))
    return _reduce(values, labels, ignore_index, reduction)


def todi_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
) -> Tensor:
    """Eager ToDi loss; see todi_ext.todi_loss for the arguments."""
    return distill_loss(student_logits, teacher_logits, labels, divergence="todi", beta=beta,
                        temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                        hard_label_weight=hard_label_weight, soft_label_weight=soft_label_weight)


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
