"""distill_loss: every divergence of the ToDi paper against its float64 eager reference."""

import math
import re

import pytest
import torch

import todi_ext
from todi_ext import reference

from conftest import op_scalar as _s
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
    ("akl", {}),
    ("akl", {"akl_mu": 0.2}),
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("vocab", [1, 7, 4097, 50257])
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


# ToDi and AKL weigh their terms with detached, data-dependent weights, which
# finite differences would differentiate: their gradients are checked against
# autograd of the reference (above) and, for AKL, against FKL's and RKL's.
NO_STOP_GRADIENT = [(c, i) for c, i in zip(CASES, IDS) if c[0] not in ("todi", "akl")]


@pytest.mark.parametrize("case", [c for c, _ in NO_STOP_GRADIENT], ids=[i for _, i in NO_STOP_GRADIENT])
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
        (dict(divergence="akl", akl_mu=1.0), "akl_mu must be in [0, 1), got 1 (at 1 the split"),
        (dict(divergence="akl", akl_mu=-0.1), "akl_mu must be in [0, 1)"),
        (dict(divergence="akl", beta=2.0), "beta=2.0 does not apply to divergence 'akl'"),
        (dict(divergence="fkl", beta=2.0), "beta=2.0 does not apply to divergence 'fkl'"),
        (dict(divergence="todi", skew_lambda=0.2), "skew_lambda=0.2 does not apply"),
        (dict(divergence="js", jsd_beta=0.3), "jsd_beta=0.3 does not apply to divergence 'js'"),
        (dict(divergence="skl", akl_mu=0.3), "akl_mu=0.3 does not apply"),
        (dict(divergence="skl", skew_lambda=1.5), "skew_lambda must be in"),
        (dict(divergence="gjsd", jsd_beta=0.0), "got 0 (at 0 and 1 the generalized JSD is identically zero; use "
                                               "divergence='fkl' or 'rkl')"),
        (dict(divergence="gjsd", jsd_beta=float("nan")), "jsd_beta must be in (0, 1), got nan"),
    ],
)
def test_bad_divergence_arguments(kwargs, fragment):
    z, s = make_logits((2, 10)), make_logits((2, 10), seed=1)
    for fn in (todi_ext.distill_loss, reference.distill_loss):
        with pytest.raises(ValueError, match=re.escape(fragment)):
            fn(z, s, **kwargs)
    with pytest.raises(ValueError, match="divergence must be one of"):  # the op's own check
        torch.ops.todi_ext.distill_forward(z, s, None, "js", _s(1.0), 0.1, 0.5, 0.5, _s(1.0), -100, "mean", False, False)


@pytest.mark.parametrize("divergence", ["fkl", "tvd", "akl", "gjsd"])
def test_opcheck(divergence):
    z = make_logits((3, 5, 65)).requires_grad_()
    s = make_logits((3, 5, 65), seed=1).requires_grad_()
    args = (z, s, make_labels((3, 5)), divergence, _s(1.0), 0.1, 0.4, 0.3, _s(0.5), -100, "mean", True, True)
    torch.library.opcheck(torch.ops.todi_ext.distill_forward.default, args)


@pytest.mark.parametrize("divergence,params", [("srkl", {"skew_lambda": 0.2}), ("akl", {"akl_mu": 0.3})])
def test_compile_fullgraph(divergence, params):
    torch._dynamo.reset()

    def fn(z, s):
        return todi_ext.distill_loss(z, s, divergence=divergence, temperature=2.0, **params)

    compiled = torch.compile(fn, fullgraph=True)
    z, s = make_logits((6, 300)), make_logits((6, 300), seed=1)
    eager, comp = loss_and_grads(lambda a, b, _: fn(a, b), z, s), loss_and_grads(lambda a, b, _: compiled(a, b), z, s)
    torch.testing.assert_close(comp[0], eager[0])
    torch.testing.assert_close(comp[1], eager[1])


# ------------------------------------------------------------------------ AKL
def _fkl_rkl(student, teacher, **kwargs):
    return [todi_ext.distill_loss(student, teacher, divergence=d, reduction="none", **kwargs) for d in ("fkl", "rkl")]


def test_akl_worked_example():
    # p = (0.1, 0.2, 0.3, 0.4): sorted ascending, the cumulative sums are
    # 0.1, 0.3, 0.6, 1.0, so with mu = 0.5 the tail is {0.1, 0.2}.
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.1, 0.1, 0.4]], dtype=torch.float64)
    g_tail = 0.3 + 0.1
    g_head = 0.2 + 0.0
    fkl = sum(a * math.log(a / b) for a, b in zip(p[0].tolist(), q[0].tolist()))
    rkl = sum(b * math.log(b / a) for a, b in zip(p[0].tolist(), q[0].tolist()))
    expected = (g_head * fkl + g_tail * rkl) / (g_head + g_tail)
    for dtype in (torch.float64, torch.float32):
        loss = todi_ext.distill_loss(q.log().to(dtype), p.log().to(dtype), divergence="akl", akl_mu=0.5)
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_akl_keeps_ties_together():
    # Three tied probabilities 0.2 straddle mu = 0.5 (sorted cumulative sums
    # 0.2, 0.4, 0.6): by the order-free rule S(0.2) = 0.6 > 0.5, none of them
    # is in the tail, so AKL is exactly FKL here - whatever order a sort
    # would leave the ties in.
    teacher = torch.tensor([[0.2, 0.4, 0.2, 0.2]]).log()
    student = make_logits((1, 4), seed=3)
    fkl, rkl = _fkl_rkl(student, teacher)
    torch.testing.assert_close(
        todi_ext.distill_loss(student, teacher, divergence="akl", akl_mu=0.5, reduction="none"), fkl
    )
    # With mu = 0.65 all three join the tail: weights from g over each part.
    p, q = teacher.exp()[0], torch.softmax(student, -1)[0]
    g_head, g_tail = (p[1] - q[1]).abs(), (p - q).abs().sum() - (p[1] - q[1]).abs()
    expected = (g_head * fkl + g_tail * rkl) / (g_head + g_tail)
    torch.testing.assert_close(
        todi_ext.distill_loss(student, teacher, divergence="akl", akl_mu=0.65, reduction="none"), expected
    )


def test_akl_split_is_the_sorted_cumulative_sum_without_ties():
    # Without ties the order-free rule is the plain definition: sort p
    # ascending, tail = entries whose cumulative sum is <= mu.
    student, teacher = make_logits((6, 300), torch.float64), make_logits((6, 300), torch.float64, seed=8)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    ordered, order = p.sort(dim=-1)
    tail = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, ordered.cumsum(-1) <= 0.4)
    diff = (p - q).abs()
    g_tail, g_head = (diff * tail).sum(-1), (diff * ~tail).sum(-1)
    fkl, rkl = _fkl_rkl(student, teacher)
    expected = (g_head * fkl + g_tail * rkl) / (g_head + g_tail)
    loss = todi_ext.distill_loss(student, teacher, divergence="akl", akl_mu=0.4, reduction="none")
    torch.testing.assert_close(loss, expected)
    head_w, tail_w = reference.akl_weights(p, q, torch.zeros_like(tail), 0.4)
    torch.testing.assert_close(head_w.squeeze(-1), g_head / (g_head + g_tail))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_akl_gradient_is_the_weighted_fkl_and_rkl_gradients(dtype):
    # The weights are detached: d AKL = w_head d FKL + w_tail d RKL, each of
    # which test_gradcheck checks by finite differences.
    student = make_logits((5, 257), dtype).requires_grad_()
    teacher = make_logits((5, 257), dtype, seed=4).requires_grad_()
    p, q = torch.softmax(teacher.detach().double(), -1), torch.softmax(student.detach().double(), -1)
    head_w, tail_w = reference.akl_weights(p, q, torch.zeros_like(p, dtype=torch.bool), 0.5)
    grads = []
    for divergence in ("akl", "fkl", "rkl"):
        loss = todi_ext.distill_loss(student, teacher, divergence=divergence, reduction="sum")
        grads.append(torch.autograd.grad(loss, (student, teacher)))
    for k in range(2):
        expected = head_w * grads[1][k].double() + tail_w * grads[2][k].double()
        torch.testing.assert_close(grads[0][k].double(), expected, rtol=1e-4, atol=1e-7)


def test_akl_is_deterministic():
    student, teacher = make_logits((16, 5000), torch.bfloat16), make_logits((16, 5000), torch.bfloat16, seed=2)
    runs = [todi_ext.distill_loss(student, teacher, divergence="akl", reduction="none") for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
