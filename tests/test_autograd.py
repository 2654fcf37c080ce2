"""Gradients: gradcheck, what is (not) computed without grad, double backward."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import todi_ext

from conftest import make_labels, make_logits


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
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.todi_ext.todi_forward.default:
            self.calls.append((args[6], args[7], out[1].numel(), out[2].numel()))
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
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    loss.backward()
    torch.testing.assert_close(student.grad, 2 * first)


def test_double_backward_is_refused_not_silently_wrong():
    student = make_logits((3, 50), torch.float64).requires_grad_()
    loss = todi_ext.todi_loss(student, make_logits((3, 50), torch.float64, seed=1))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, student, create_graph=True)


def test_direct_op_call_with_a_missing_flag_raises():
    student = make_logits((3, 50)).requires_grad_()
    loss, _, _ = torch.ops.todi_ext.todi_forward(student, make_logits((3, 50)), None, 1.0, 1.0, -100, False, False)
    with pytest.raises(RuntimeError, match="student_grad=False"):
        loss.sum().backward()


def test_scale_rows_matches_eager():
    grad = make_logits((3, 4, 1001), torch.bfloat16)
    scale = torch.rand(3, 4) + 0.5
    out = todi_ext.ops.scale_rows(grad, scale)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (grad.float() * scale[..., None]).bfloat16(), rtol=0, atol=0)
