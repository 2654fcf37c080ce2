"""distill_loss: every divergence of the ToDi paper against its float64 eager reference."""

import pytest
import torch

import todi_ext
from todi_ext import reference

from conftest import TOLERANCES, assert_grad_close, loss_and_grads, make_labels, make_logits

# (divergence, its own parameters) - every kernel path, some at non-default values.
CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("js", {}),
    ("tvd", {}),
    ("skl", {}),
    ("skl", {"skew_lambda": 0.3}),
    ("srkl", {}),
    ("srkl", {"skew_lambda": 0.0}),
    ("gjsd", {"jsd_beta": 0.1}),
    ("gjsd", {"jsd_beta": 0.9}),
    ("todi", {"beta": 2.0}),
]
IDS = [f"{d}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for d, p in CASES]


def assert_matches_reference(student, teacher, labels=None, tol_scale=1.0, teacher_grad=True, **kwargs):
    loss_rtol, loss_atol, grad_tol = (t * tol_scale for t in TOLERANCES[student.dtype])
    loss, gs, gt = loss_and_grads(todi_ext.distill_loss, student, teacher, labels, teacher_grad, **kwargs)
    ref, ref_gs, ref_gt = loss_and_grads(
        reference.distill_loss, student.double(), teacher.double(), labels, teacher_grad, **kwargs
    )
    torch.testing.assert_close(loss.double(), ref, rtol=loss_rtol, atol=loss_atol)
    assert_grad_close(gs, ref_gs, grad_tol)
    if teacher_grad:
        assert_grad_close(gt, ref_gt, TOLERANCES[teacher.dtype][2] * tol_scale)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("vocab", [7, 4097, 50257])
def test_matches_reference(case, dtype, vocab):
    divergence, params = case
    rows = 3 if vocab > 5000 else 9
    student, teacher = make_logits((rows, vocab), dtype), make_logits((rows, vocab), dtype, seed=3)
    assert_matches_reference(
        student, teacher, make_labels((rows,)), divergence=divergence, temperature=2.0, reduction="none", **params
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_infinite_entries_and_large_logits(case, reduction):
    divergence, params = case
    student = make_logits((2, 5, 600), scale=10.0)
    teacher = make_logits((2, 5, 600), scale=10.0, seed=4)
    student[..., 590:] = float("-inf")
    teacher[0, 1, ::3] = float("-inf")
    # |logits| ~ 30: float32 log-probabilities carry ~eps * 30 absolute error,
    # which terms such as p (log p - log q) amplify by |log p - log q|.
    # (Extreme logits: test_mixtures_stay_finite_where_a_distribution_is_zero.)
    assert_matches_reference(
        student, teacher, make_labels((2, 5)), tol_scale=10.0, divergence=divergence, reduction=reduction, **params
    )


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "todi"], ids=[i for c, i in zip(CASES, IDS) if c[0] != "todi"])
def test_gradcheck(case):
    # These divergences have no stop-gradient: finite differences check the
    # closed-form gradients exactly (student and teacher).
    divergence, params = case
    student = make_logits((3, 11), torch.float64).requires_grad_()
    teacher = make_logits((3, 11), torch.float64, seed=1).requires_grad_()
    teacher.data[0, :2] = float("-inf")
    labels = torch.tensor([1, -100, 2])

    def fn(z, s):
        return todi_ext.distill_loss(z, s, labels, divergence=divergence, temperature=2.0, reduction="none", **params)

    assert torch.autograd.gradcheck(fn, (student, teacher), eps=1e-6, atol=1e-7)


def test_tvd_gradient_is_zero_where_distributions_agree():
    logits = make_logits((4, 300))
    student = logits.clone().requires_grad_()
    loss = todi_ext.distill_loss(student, logits.clone(), divergence="tvd")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("divergence", ["js", "skl", "srkl", "gjsd"])
def test_mixtures_stay_finite_where_a_distribution_is_zero(divergence):
    # Probabilities that underflow to exactly 0 in float32 (logit gaps of
    # thousands) must not give 0 * log 0 = NaN.
    student = torch.tensor([[0.0, 5000.0, -5000.0, 1.0]]).requires_grad_()
    teacher = torch.tensor([[3000.0, 0.0, 2.0, -4000.0]])
    loss = todi_ext.distill_loss(student, teacher, divergence=divergence)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    ref = reference.distill_loss(student.detach().double(), teacher.double(), divergence=divergence)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_js_is_gjsd_at_one_half_and_symmetric():
    z, s = make_logits((5, 200)), make_logits((5, 200), seed=2)
    js = todi_ext.distill_loss(z, s, divergence="js", reduction="none")
    torch.testing.assert_close(js, todi_ext.distill_loss(z, s, divergence="gjsd", jsd_beta=0.5, reduction="none"))
    torch.testing.assert_close(js, todi_ext.distill_loss(s, z, divergence="js", reduction="none"), rtol=1e-5, atol=1e-7)


def test_todi_loss_is_distill_loss_todi():
    z, s, y = make_logits((6, 300)), make_logits((6, 300), seed=1), make_labels((6,))
    expected = todi_ext.todi_loss(z, s, y, beta=3.0, temperature=2.0)
    assert torch.equal(todi_ext.distill_loss(z, s, y, divergence="todi", beta=3.0, temperature=2.0), expected)


def test_module():
    module = todi_ext.DistillLoss("skl", skew_lambda=0.2, temperature=2.0, reduction="sum")
    assert "skl" in repr(module) and "skew_lambda=0.2" in repr(module)
    z, s = make_logits((3, 4, 50)), make_logits((3, 4, 50), seed=1)
    expected = todi_ext.distill_loss(z, s, divergence="skl", skew_lambda=0.2, temperature=2.0, reduction="sum")
    assert torch.equal(module(z, s), expected)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(divergence="kl"), "divergence must be one of"),
        (dict(divergence="akl"), "not implemented yet"),
        (dict(divergence="fkl", beta=2.0), "beta=2.0 does not apply to divergence 'fkl'"),
        (dict(divergence="todi", skew_lambda=0.2), "skew_lambda=0.2 does not apply"),
        (dict(divergence="js", jsd_beta=0.3), "jsd_beta=0.3 does not apply to divergence 'js'"),
        (dict(divergence="skl", akl_mu=0.3), "akl_mu=0.3 does not apply"),
        (dict(divergence="skl", skew_lambda=1.5), "skew_lambda must be in"),
        (dict(divergence="gjsd", jsd_beta=0.0), "jsd_beta must be in"),
        (dict(divergence="gjsd", jsd_beta=float("nan")), "jsd_beta must be finite"),
    ],
)
def test_bad_divergence_arguments(kwargs, fragment):
    z, s = make_logits((2, 10)), make_logits((2, 10), seed=1)
    for fn in (todi_ext.distill_loss, reference.distill_loss):
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            fn(z, s, **kwargs)
    with pytest.raises(ValueError, match="divergence must be one of"):  # the op's own check
        torch.ops.todi_ext.distill_forward(z, s, None, "js", 1.0, 0.1, 0.5, 1.0, -100, "mean", False, False)


@pytest.mark.parametrize("divergence", ["fkl", "tvd", "gjsd"])
def test_opcheck(divergence):
    z = make_logits((3, 5, 65)).requires_grad_()
    s = make_logits((3, 5, 65), seed=1).requires_grad_()
    args = (z, s, make_labels((3, 5)), divergence, 1.0, 0.1, 0.3, 2.0, -100, "mean", True, True)
    torch.library.opcheck(torch.ops.todi_ext.distill_forward.default, args)


def test_compile_fullgraph():
    torch._dynamo.reset()

    def fn(z, s):
        return todi_ext.distill_loss(z, s, divergence="srkl", skew_lambda=0.2, temperature=2.0)

    compiled = torch.compile(fn, fullgraph=True)
    z, s = make_logits((6, 300)), make_logits((6, 300), seed=1)
    eager, comp = loss_and_grads(lambda a, b, _: fn(a, b), z, s), loss_and_grads(lambda a, b, _: compiled(a, b), z, s)
    torch.testing.assert_close(comp[0], eager[0])
    torch.testing.assert_close(comp[1], eager[1])
