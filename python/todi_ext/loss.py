"""The public losses: distill_loss / DistillLoss (every divergence) and todi_loss / ToDiLoss."""

from typing import Optional

import torch
from torch import Tensor

from . import _validation, ops


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
    """A distillation divergence between student and teacher next-token logits, fused.

    divergence: "todi" (default), or a baseline of the ToDi paper: "fkl"
    (KL(p||q), p = teacher), "rkl" (KL(q||p)), "js" (Jensen-Shannon), "tvd"
    (total variation), "skl" / "srkl" (skewed KLs, skew_lambda), "akl"
    (adaptive KL: FKL and RKL weighted by the head's and tail's share of
    sum |p - q|, the tail being the smallest teacher probabilities that sum
    to <= akl_mu; weights detached), "gjsd" (generalized JSD:
    jsd_beta KL(p||m) + (1 - jsd_beta) KL(q||m), m = jsd_beta p +
    (1 - jsd_beta) q, jsd_beta in (0, 1)). A parameter that does not apply to the divergence must
    keep its default. Masking, reduction, temperature, dtypes and gradients
    as in :func:`todi_loss`; see docs/divergences.md for the formulas.

    hard_label_weight, soft_label_weight: the loss is soft_label_weight *
    divergence + hard_label_weight * cross_entropy(student_logits at T = 1,
    labels), both in the same kernel pass and reduced alike ("mean": over the
    counted positions). The paper's objective is hard_label_weight=0.5,
    soft_label_weight=0.5, temperature=2. A nonzero hard_label_weight needs
    labels in [0, V) (or ignore_index): checked for CPU tensors; on CUDA,
    where checking would sync, a position with such a label gets a NaN loss.
    """
    _validation.check_api_args(student_logits, teacher_logits, labels, divergence, beta, skew_lambda, akl_mu, jsd_beta,
                               temperature, ignore_index, reduction, soft_label_weight, hard_label_weight)
    _validation.check_no_functorch(student_logits, teacher_logits)
    # The rest (shapes, devices, parameter ranges, the reduction, the label
    # weights and the labels' range) is the op's to check.
    kernel_divergence, kernel_jsd_beta = _validation.kernel_divergence(divergence, jsd_beta)
    grad_on = torch.is_grad_enabled()
    loss, _, _ = ops.distill_forward(
        student_logits,
        teacher_logits,
        labels,
        kernel_divergence,
        beta,  # made a tensor by ops.distill_forward: float() would specialise a torch.compile graph on it
        float(skew_lambda),
        float(akl_mu),
        kernel_jsd_beta,
        temperature,
        int(ignore_index),
        reduction,
        grad_on and student_logits.requires_grad,
        grad_on and teacher_logits.requires_grad,
        float(soft_label_weight),
        float(hard_label_weight),
    )
    return loss


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
    """ToDi distillation loss between student and teacher next-token logits.

    Args:
        student_logits: (..., V) float32, bfloat16 or float16 (float64 is
            accepted and computed in float64).
        teacher_logits: same shape; any of those dtypes.
        labels: (...) integer tensor, already shifted like Hugging Face
            labels; positions equal to ``ignore_index`` are skipped. None:
            every position counts.
        beta: sharpness of the sigmoid weight a = sigmoid(beta * (log p - log q)).
        temperature: both logits are divided by it; no T^2 factor is applied.
        reduction: "mean" (over counted positions; 0 when none counts),
            "sum", or "none" (one value per position, 0 where skipped).
        hard_label_weight, soft_label_weight: soft_label_weight * ToDi +
            hard_label_weight * cross-entropy of the student at T = 1 against
            labels, in one pass (see :func:`distill_loss`).

    Returns:
        float32 (float64 for float64 inputs): a scalar, or shape (...) for "none".
        Gradients reach student_logits (and teacher_logits, if it requires
        grad) in their own dtype. They are computed in the forward and, in
        backward, scaled in place by the upstream gradient (a copy is made
        only with retain_graph=True), so one gradient-sized buffer is held.
    """
    return distill_loss(
        student_logits,
        teacher_logits,
        labels,
        divergence="todi",
        beta=beta,
        temperature=temperature,
        ignore_index=ignore_index,
        reduction=reduction,
        hard_label_weight=hard_label_weight,
        soft_label_weight=soft_label_weight,
    )


class DistillLoss(torch.nn.Module):
    """Module form of :func:`distill_loss`: ``DistillLoss("fkl", temperature=2.0)(student, teacher, labels)``."""

    def __init__(self, divergence: str = "todi", *, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", beta: float = 1.0, skew_lambda: float = 0.1, akl_mu: float = 0.5,
                 jsd_beta: float = 0.5, hard_label_weight: float = 0.0, soft_label_weight: float = 1.0):
        super().__init__()
        _validation.check_module_config(divergence, beta, skew_lambda, akl_mu, jsd_beta, temperature, ignore_index,
                                        reduction, soft_label_weight, hard_label_weight)
        self.params = dict(beta=beta, skew_lambda=skew_lambda, akl_mu=akl_mu, jsd_beta=jsd_beta)
        self.label_weights = dict(hard_label_weight=hard_label_weight, soft_label_weight=soft_label_weight)
        self.divergence = divergence
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return distill_loss(
            student_logits,
            teacher_logits,
            labels,
            divergence=self.divergence,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            **self.params,
            **self.label_weights,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, temperature={self.temperature}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, "
            + ", ".join(f"{k}={v}" for k, v in {**self.params, **self.label_weights}.items())
        )


class ToDiLoss(DistillLoss):
    """Module form of :func:`todi_loss`: ``ToDiLoss(...)(student_logits, teacher_logits, labels)``."""

    def __init__(self, *, beta: float = 1.0, temperature: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                 hard_label_weight: float = 0.0, soft_label_weight: float = 1.0):
        super().__init__("todi", beta=beta, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                         hard_label_weight=hard_label_weight, soft_label_weight=soft_label_weight)
