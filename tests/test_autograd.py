"""Gradients: gradcheck, what is (not) computed without grad, double backward."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import todi_ext

from todi_ext import reference

from conftest import op_scalar as _s
from conftest import assert_grad_close, loss_and_grads, make_labels, make_logits


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher_requires_grad", [False, True])
def test_gradcheck(reduction, teacher_requires_grad):
    # The ToDi gradient treats a = sigmoid(beta * r) as a constant; finite
    # differences would see a move. With beta = 0, a = 1/2 everywhere, so the
    # analytic gradient is the true derivative and gradcheck applies exactly.
    # (For beta != 0, gradients are checked against autograd of the detached
    # reference in test_parity.py.)
    student = make_logits((2, 3, 17), torch.float64).requires_grad_()
    teacher = make_logits((2, 3, 17), torch.float64, seed=3).requires_grad_(teacher_requires_grad)
    teacher.data[0, 0, :4] = float("-inf")
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])

    def fn(z, s):
        return todi_ext.todi_loss(z, s, labels, beta=0.0, temperature=2.0, reduction=reduction)

    assert torch.autograd.gradcheck(fn, (student, teacher), eps=1e-6, atol=1e-7)


class _RecordTodiForward(TorchDispatchMode):
    def __init__(self, keep_outputs=False):
        super().__init__()
        self.calls, self.outputs, self.keep_outputs = [], [], keep_outputs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.todi_ext.distill_forward.default:
            names = [a.name for a in func._schema.arguments]
            flags = dict(zip(names, args))
            self.calls.append((flags["student_grad"], flags["teacher_grad"], out[1].numel(), out[2].numel()))
            if self.keep_outputs:
                self.outputs.append(out[1].data_ptr())  # not the tensor: a reference would force a copy
        return out


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "student_not_requiring_grad"])
def test_no_gradient_is_computed_without_grad(mode):
    student = make_logits((4, 300)).requires_grad_(mode != "student_not_requiring_grad")
    teacher = make_logits((4, 300), seed=1)
    recorder = _RecordTodiForward()
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    with context(), recorder:
        loss = todi_ext.todi_loss(student, teacher)
    assert recorder.calls == [(False, False, 0, 0)]
    assert loss.grad_fn is None


def test_gradient_is_computed_only_for_inputs_that_need_it():
    recorder = _RecordTodiForward()
    student = make_logits((4, 300)).requires_grad_()
    teacher = make_logits((4, 300), seed=1)
    with recorder:
        todi_ext.todi_loss(student, teacher)
        todi_ext.todi_loss(student, teacher.requires_grad_())
    assert recorder.calls == [(True, False, 4 * 300, 0), (True, True, 4 * 300, 4 * 300)]


def test_backward_twice_with_retain_graph_gives_the_same_gradient():
    student = make_logits((3, 100)).requires_grad_()
    loss = todi_ext.todi_loss(student, make_logits((3, 100), seed=1))
    (2 * loss).backward(retain_graph=True)
    first = student.grad.clone()
    loss.backward()
    torch.testing.assert_close(student.grad, 1.5 * first)


def test_backward_hands_over_the_saved_gradient_without_a_copy():
    # The gradient is computed in the forward; without retain_graph the
    # backward scales it in place and returns it: one (N, V) buffer in all.
    recorder = _RecordTodiForward(keep_outputs=True)
    student = make_logits((3, 100)).requires_grad_()
    with recorder:
        loss = todi_ext.todi_loss(student, make_logits((3, 100), seed=1), reduction="none")
    (loss * torch.tensor([0.5, 1.0, 2.0])).sum().backward()
    assert student.grad.data_ptr() == recorder.outputs[0]


def test_two_losses_over_one_graph():
    # The common multi-loss step: each loss is back-propagated once, together.
    student = make_logits((4, 200)).requires_grad_()
    teacher = make_logits((4, 200), seed=1)
    total = 0.3 * todi_ext.todi_loss(student, teacher) + 0.7 * todi_ext.todi_loss(student, teacher, temperature=2.0)
    total.backward()
    s64 = student.detach().double().requires_grad_()
    t64 = teacher.double()
    (0.3 * reference.todi_loss(s64, t64) + 0.7 * reference.todi_loss(s64, t64, temperature=2.0)).backward()
    assert_grad_close(student.grad, s64.grad, 2e-5)


def test_double_backward_is_refused_not_silently_wrong():
    student = make_logits((3, 50), torch.float64).requires_grad_()
    loss = todi_ext.todi_loss(student, make_logits((3, 50), torch.float64, seed=1))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, student, create_graph=True)


def test_direct_op_call_with_a_missing_flag_raises():
    student = make_logits((3, 50)).requires_grad_()
    loss, _, _ = torch.ops.todi_ext.distill_forward(student, make_logits((3, 50)), None, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(1.0), -100, "sum", False, False)
    with pytest.raises(RuntimeError, match="student_grad=False"):
        loss.sum().backward()


@pytest.mark.parametrize("per_row", [True, False])
def test_scale_grad_in_place(per_row):
    grad = make_logits((3, 4, 1001), torch.bfloat16)
    expected = grad.clone()
    scale = (torch.rand(3, 4) + 0.5) if per_row else torch.tensor(0.25)
    if per_row:
        scale[1, 2] = 1.0  # rows scaled by exactly 1 are skipped: unchanged bits
    todi_ext.ops.scale_grad_(grad, scale)
    ref = (expected.float() * (scale[..., None] if per_row else scale)).bfloat16()
    assert torch.equal(grad, ref)
    out_of_place = todi_ext.ops.scale_grad(expected.transpose(0, 1), scale.t() if per_row else scale)
    assert out_of_place.is_contiguous() and torch.equal(out_of_place, ref.transpose(0, 1))


@pytest.mark.skipif(not hasattr(torch, "_lazy_clone"), reason="no copy-on-write tensors in this torch")
def test_scale_grad_in_place_on_a_copy_on_write_strided_grad():
    # Writing to a copy-on-write storage materialises a copy first; the op must
    # still scale in place (its rows strided), not take the out-of-place path.
    original = make_logits((6, 10))[:, :8]
    before = original.clone()
    grad = torch._lazy_clone(original)
    torch.ops.todi_ext.scale_grad_(grad, torch.tensor(0.5))
    assert torch.equal(grad, before * 0.5) and torch.equal(original, before)


def test_upstream_gradient_scales_the_result():
    for reduction in ("mean", "sum", "none"):
        student, teacher = make_logits((5, 300)), make_logits((5, 300), seed=1)
        labels = make_labels((5,))
        weight = torch.rand(()) + 0.5 if reduction != "none" else torch.rand(5) + 0.5
        s = student.clone().requires_grad_()
        (todi_ext.todi_loss(s, teacher, labels, reduction=reduction) * weight).sum().backward()
        s64 = student.double().requires_grad_()
        (reference.todi_loss(s64, teacher.double(), labels, reduction=reduction) * weight.double()).sum().backward()
        assert_grad_close(s.grad, s64.grad, 2e-5)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_vectorized_jacobian_matches_the_float64_oracle(reduction):
    # jacobian(vectorize=True) back-propagates a batch of cotangents through
    # vmap: the backward must scale with batchable ops, not the custom op.
    student = make_logits((3, 40), torch.float64)
    teacher = make_logits((3, 40), torch.float64, seed=1)
    jac = torch.autograd.functional.jacobian(
        lambda s: todi_ext.todi_loss(s, teacher, reduction=reduction, temperature=2.0), student, vectorize=True
    )
    expected = torch.autograd.functional.jacobian(
        lambda s: reference.todi_loss(s, teacher, reduction=reduction, temperature=2.0), student
    )
    torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12)
