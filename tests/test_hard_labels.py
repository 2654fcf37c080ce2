"""The hard-label cross-entropy fused into the distillation pass:
loss = soft_label_weight * divergence + hard_label_weight * CE(student at T = 1)."""

import pytest
import torch
import torch.nn.functional as F

import todi_ext
from todi_ext import reference

from conftest import TOLERANCES, assert_grad_close, loss_and_grads, make_labels, make_logits
from conftest import op_scalar as _s

DIVERGENCES = ["todi", "fkl", "rkl", "js", "tvd", "skl", "srkl", "akl", "gjsd"]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_the_float64_oracle(divergence, temperature, reduction):
    z, s = make_logits((3, 4, 333), seed=7), make_logits((3, 4, 333), seed=8)
    labels = make_labels((3, 4), num_classes=333)
    kw = dict(divergence=divergence, temperature=temperature, reduction=reduction, hard_label_weight=0.5,
              soft_label_weight=0.5)
    got = loss_and_grads(todi_ext.distill_loss, z, s, labels, teacher_grad=True, **kw)
    expected = loss_and_grads(reference.distill_loss, z.double(), s.double(), labels, teacher_grad=True, **kw)
    # The bound comes from the best float32 formulation on the same inputs
    # (the eager reference in float32), as in test_accuracy.py: some
    # gradients are cancellation-bound (TVD's and SKL's teacher gradient at
    # T = 0.7: ~2.2e-5 relative in float32 however it is computed).
    best = loss_and_grads(reference.distill_loss, z, s, labels, teacher_grad=True, **kw)
    for i in range(3):
        err = float((got[i].double() - expected[i]).norm())
        best_err = float((best[i].double() - expected[i]).norm())
        assert err <= 4 * best_err + 1e-6 * float(expected[i].norm()), (i, err, best_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cross_entropy_alone_is_torch_cross_entropy(dtype):
    # soft_label_weight = 0: exactly F.cross_entropy on the student (computed
    # in float64 from the same rounded inputs), loss and gradient.
    z, s = make_logits((6, 1000), dtype, scale=5.0, seed=2), make_logits((6, 1000), dtype, seed=3)
    labels = make_labels((6,), num_classes=1000)
    got = loss_and_grads(todi_ext.distill_loss, z, s, labels, hard_label_weight=1.0, soft_label_weight=0.0,
                         temperature=2.0)
    zd = z.double().requires_grad_()
    ce = F.cross_entropy(zd, labels, ignore_index=-100)
    ce.backward()
    loss_rtol, loss_atol, grad_tol = TOLERANCES[dtype]
    torch.testing.assert_close(got[0].double(), ce.detach(), rtol=loss_rtol, atol=loss_atol)
    assert_grad_close(got[1], zd.grad, grad_tol)


def test_the_papers_objective_is_one_call():
    # 0.5 CE + 0.5 ToDi at T = 2, against the two computed separately.
    z, s = make_logits((8, 500), seed=4), make_logits((8, 500), seed=5)
    labels = make_labels((8,), num_classes=500)
    fused = loss_and_grads(todi_ext.todi_loss, z, s, labels, temperature=2.0, hard_label_weight=0.5,
                           soft_label_weight=0.5)
    zd = z.double().requires_grad_()
    separate = 0.5 * F.cross_entropy(zd, labels) + 0.5 * reference.todi_loss(zd, s.double(), labels, temperature=2.0)
    separate.backward()
    torch.testing.assert_close(fused[0].double(), separate.detach(), rtol=2e-5, atol=1e-6)
    assert_grad_close(fused[1], zd.grad, 2e-5)


def test_modules_take_the_weights():
    z, s = make_logits((4, 100)), make_logits((4, 100), seed=1)
    labels = make_labels((4,), num_classes=100)
    module = todi_ext.ToDiLoss(temperature=2.0, hard_label_weight=0.5, soft_label_weight=0.5)
    assert "hard_label_weight=0.5" in repr(module)
    expected = todi_ext.todi_loss(z, s, labels, temperature=2.0, hard_label_weight=0.5, soft_label_weight=0.5)
    torch.testing.assert_close(module(z, s, labels), expected, rtol=0, atol=0)
    generic = todi_ext.DistillLoss("fkl", hard_label_weight=0.25)
    expected = todi_ext.distill_loss(z, s, labels, divergence="fkl", hard_label_weight=0.25)
    torch.testing.assert_close(generic(z, s, labels), expected, rtol=0, atol=0)


def test_bad_arguments_name_themselves():
    z, s = make_logits((3, 10)), make_logits((3, 10), seed=1)
    with pytest.raises(ValueError, match="hard_label_weight=0.5 needs labels"):
        todi_ext.distill_loss(z, s, hard_label_weight=0.5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\) or equal ignore_index \(-100\).*got 10"):
        todi_ext.distill_loss(z, s, torch.tensor([1, 10, -100]), hard_label_weight=0.5)
    with pytest.raises(ValueError, match="got -3"):
        todi_ext.distill_loss(z, s, torch.tensor([1, -3, 2]), hard_label_weight=0.5)
    with pytest.raises(ValueError, match="hard_label_weight must be finite"):
        todi_ext.distill_loss(z, s, torch.tensor([1, 2, 3]), hard_label_weight=float("nan"))
    with pytest.raises(TypeError, match="soft_label_weight must be a real number"):
        todi_ext.DistillLoss(soft_label_weight="1")
    # Out-of-range labels need no check while the cross-entropy is off.
    todi_ext.distill_loss(z, s, torch.tensor([1, 10, -100]))
    # A direct op call gets the same checks from C++.
    args = (z, s, None, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(1.0), -100, "mean", False, False, 1.0, 0.5)
    with pytest.raises(ValueError, match="needs labels"):
        torch.ops.todi_ext.distill_forward(*args)
    args = (z, s, torch.tensor([1, 10, 2]), *args[3:])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        torch.ops.todi_ext.distill_forward(*args)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction):
    z = make_logits((3, 5, 129)).requires_grad_()
    s = make_logits((3, 5, 129), seed=1)
    labels = make_labels((3, 5), num_classes=129)
    args = (z, s, labels, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(0.5), -100, reduction, True, False, 0.5, 0.5)
    torch.library.opcheck(torch.ops.todi_ext.distill_forward.default, args)


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    z, s = make_logits((4, 7, 300)).requires_grad_(), make_logits((4, 7, 300), seed=1)
    labels = make_labels((4, 7), num_classes=300)
    step = torch.compile(lambda z, s, l: todi_ext.todi_loss(z, s, l, temperature=2.0, hard_label_weight=0.5,
                                                            soft_label_weight=0.5), fullgraph=True)
    loss = step(z, s, labels)
    loss.backward()
    expected, expected_grad, _ = loss_and_grads(todi_ext.todi_loss, z, s, labels, temperature=2.0,
                                                hard_label_weight=0.5, soft_label_weight=0.5)
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(z.grad, expected_grad)
