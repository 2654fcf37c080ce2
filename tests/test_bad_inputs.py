"""Bad input gives a ValueError/TypeError that names the argument, from every entry point.

The Python API raises TypeError for a wrong type; a direct torch.ops.todi_ext
call, checked in C++ on the stable ABI, raises ValueError for every bad
argument (the stable ABI carries no TypeError). Where each rule is checked:
python/todi_ext/_validation.py."""

import fractions

import numpy
import pytest
import torch

import todi_ext
from todi_ext import reference

from conftest import op_scalar as _s
from conftest import make_logits

LOSSES = [todi_ext.todi_loss, reference.todi_loss, lambda *a, **k: todi_ext.ToDiLoss(**k)(*a)]


def _inputs(shape=(4, 10)):
    return make_logits(shape), make_logits(shape, seed=1)


CASES = [
    # (description, call kwargs builder, exception, message fragment)
    ("mismatched shapes", lambda s, t: dict(teacher_logits=t[:, :9]), ValueError, "teacher_logits must have the shape"),
    ("labels wrong shape", lambda s, t: dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels must have shape (4,)"),
    ("float labels", lambda s, t: dict(labels=torch.zeros(4)), TypeError, "labels must be an integer tensor"),
    ("bool labels", lambda s, t: dict(labels=torch.zeros(4, dtype=torch.bool)), TypeError, "labels must be an integer tensor"),
    ("integer student", lambda s, t: dict(student_logits=s.long()), TypeError, "student_logits must be float32"),
    ("integer teacher", lambda s, t: dict(teacher_logits=t.int()), TypeError, "teacher_logits must be float32"),
    ("not a tensor", lambda s, t: dict(teacher_logits=t.tolist()), TypeError, "teacher_logits must be a torch.Tensor"),
    ("zero-size vocabulary", lambda s, t: dict(student_logits=s[:, :0], teacher_logits=t[:, :0]), ValueError, "V >= 1"),
    ("scalar logits", lambda s, t: dict(student_logits=s[0, 0], teacher_logits=t[0, 0]), ValueError, "shape (..., V)"),
    ("zero temperature", lambda s, t: dict(temperature=0.0), ValueError, "temperature must be > 0"),
    ("huge temperature", lambda s, t: dict(temperature=1e46), ValueError, "reciprocal that is a normal float32"),
    ("tiny temperature", lambda s, t: dict(temperature=1e-39), ValueError, "reciprocal that is a normal float32"),
    ("ignore_index past int64", lambda s, t: dict(ignore_index=2**63), ValueError, "ignore_index must fit in int64"),
    ("ignore_index outside uint8 labels", lambda s, t: dict(labels=torch.zeros(4, dtype=torch.uint8)), ValueError,
     "outside the range of labels' dtype torch.uint8"),
    ("negative temperature", lambda s, t: dict(temperature=-1.0), ValueError, "temperature must be > 0"),
    ("nan temperature", lambda s, t: dict(temperature=float("nan")), ValueError, "temperature must be finite"),
    ("infinite beta", lambda s, t: dict(beta=float("inf")), ValueError, "beta must be finite"),
    ("nan beta", lambda s, t: dict(beta=float("nan")), ValueError, "beta must be finite"),
    ("beta past float32", lambda s, t: dict(beta=1e39), ValueError, "beta must be finite and within float32's range"),
    ("temperature past float64", lambda s, t: dict(temperature=10**400), ValueError, "temperature must be finite"),
    ("sparse student", lambda s, t: dict(student_logits=s.to_sparse()), TypeError, "student_logits must be a dense"),
    ("sparse labels", lambda s, t: dict(labels=torch.zeros(4, dtype=torch.long).to_sparse()), TypeError,
     "labels must be a dense"),
    ("tensor beta", lambda s, t: dict(beta=torch.tensor(1.0)), TypeError, "beta must be a real number"),
    ("unknown reduction", lambda s, t: dict(reduction="avg"), ValueError, "reduction must be one of"),
    ("float ignore_index", lambda s, t: dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    ("different devices", lambda s, t: dict(teacher_logits=t.to("meta")), ValueError, "teacher_logits is on meta"),
    ("labels on another device", lambda s, t: dict(labels=torch.zeros(4, dtype=torch.long, device="meta")), ValueError, "labels is on meta"),
]


SCALARS = ("beta", "temperature", "ignore_index", "reduction")


def _is_scalar_case(case):
    return set(case[1](*_inputs())) <= set(SCALARS)


# The module's forward is todi_loss: it adds only the checks its constructor
# makes (the scalars).
ENTRY_POINTS_AND_CASES = [
    pytest.param(loss_fn, case, id=f"{case[0]}-{name}")
    for case in CASES
    for loss_fn, name in zip(LOSSES, ["todi_loss", "reference", "module"])
    if name != "module" or _is_scalar_case(case)
]


@pytest.mark.parametrize("loss_fn,case", ENTRY_POINTS_AND_CASES)
def test_bad_input_is_rejected_with_a_clear_message(loss_fn, case):
    _, build, exc, fragment = case
    student, teacher = _inputs()
    args = dict(student_logits=student, teacher_logits=teacher, labels=None)
    overrides = build(student, teacher)
    scalars = {k: overrides.pop(k) for k in list(overrides) if k in SCALARS}
    args.update(overrides)
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        loss_fn(args["student_logits"], args["teacher_logits"], args["labels"], **scalars)


def test_module_checks_its_arguments_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        todi_ext.ToDiLoss(temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        todi_ext.ToDiLoss(reduction="batchmean")


@pytest.mark.parametrize(
    "args,exc,fragment",
    [
        ((make_logits((3, 8)), make_logits((3, 7)), None, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(1.0), -100, "mean", False, False), ValueError, "teacher_logits must have the shape"),
        ((make_logits((3, 8)).long(), make_logits((3, 8)), None, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(1.0), -100, "mean", False, False), ValueError, "student_logits must be"),
        ((make_logits((3, 8)), make_logits((3, 8)), torch.zeros(2, dtype=torch.long), "todi", _s(1.0), 0.1, 0.5, 0.5, _s(1.0), -100, "mean", False, False), ValueError, "labels must have shape"),
        ((make_logits((3, 8)), make_logits((3, 8)), torch.zeros(3), "todi", _s(1.0), 0.1, 0.5, 0.5, _s(1.0), -100, "mean", False, False), ValueError, "labels must be an integer"),
        ((make_logits((3, 8)), make_logits((3, 8)), None, "todi", _s(1.0), 0.1, 0.5, 0.5, torch.ones(2, dtype=torch.float64), -100, "mean", False, False), ValueError, "inv_temperature must be a 0-dim float64 tensor"),
        ((make_logits((3, 8)), make_logits((3, 8)), None, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(1.0), -100, "avg", False, False), ValueError, "reduction must be one of"),
        ((make_logits((3, 8)), make_logits((3, 8)), None, "todi", torch.tensor(1.0), 0.1, 0.5, 0.5, _s(1.0), -100, "mean", False, False), ValueError, "beta must be a 0-dim float64 tensor"),
        ((make_logits((3, 8)), make_logits((3, 8)), None, "todi", _s(float("nan")), 0.1, 0.5, 0.5, _s(1.0), -100, "mean", False, False), ValueError, "beta must be finite"),
        ((make_logits((3, 8)), make_logits((3, 8)), None, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(-2.0), -100, "mean", False, False), ValueError, r"inv_temperature \(1 / T\) must be finite and > 0"),
        ((make_logits((3, 8)), make_logits((3, 8)), None, "todi", _s(1e39), 0.1, 0.5, 0.5, _s(1.0), -100, "mean", False, False), ValueError, "beta must be finite and within float32's range"),
        ((make_logits((3, 8)), make_logits((3, 8)), None, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(1e-50), -100, "mean", False, False), ValueError, r"inv_temperature \(1 / T\) must be .* a normal float32"),
    ],
)
def test_direct_op_calls_are_checked_in_cpp(args, exc, fragment):
    # Calling the op directly bypasses the Python checks; the C++ checks
    # must still stop bad input before it reaches a kernel. They raise
    # ValueError, wrong dtypes too: the stable ABI carries no TypeError.
    with pytest.raises(exc, match=fragment):
        torch.ops.todi_ext.distill_forward(*args)


CHECKED_BY_THE_OP = [
    # (description, check_distill_args overrides, message fragment)
    ("mismatched shapes", dict(teacher_logits=make_logits((3, 7))), "teacher_logits must have the shape"),
    ("labels wrong shape", dict(labels=torch.zeros(2, dtype=torch.long)), "labels must have shape"),
    ("skew_lambda out of range", dict(skew_lambda=1.5), "skew_lambda must be in"),
    ("akl_mu at 1", dict(akl_mu=1.0), "akl_mu must be in"),
    ("jsd_beta at 0", dict(jsd_beta=0.0), "jsd_beta must be in"),
    ("unknown divergence", dict(divergence="kl"), "divergence must be one of"),
    ("unknown reduction", dict(reduction="avg"), "reduction must be one of"),
    ("infinite weight", dict(soft_label_weight=float("inf")), "soft_label_weight must be finite"),
    ("hard weight without labels", dict(hard_label_weight=0.5), "needs labels"),
]


@pytest.mark.parametrize("case", CHECKED_BY_THE_OP, ids=[c[0] for c in CHECKED_BY_THE_OP])
def test_the_check_op_is_the_kernel_ops_own_check(case):
    # The Python paths that reach no kernel first (the reference, the
    # vocabulary-parallel loss, the modules' constructors) call
    # check_distill_args: the same C++ as distill_forward, so the same error.
    _, overrides, fragment = case
    args = dict(student_logits=make_logits((3, 8)), teacher_logits=make_logits((3, 8), seed=1), labels=None,
                divergence="todi", skew_lambda=0.1, akl_mu=0.5, jsd_beta=0.5, reduction="mean",
                soft_label_weight=1.0, hard_label_weight=0.0)
    args.update(overrides)
    with pytest.raises(ValueError, match=fragment) as from_check:
        torch.ops.todi_ext.check_distill_args(*args.values())
    a = args
    with pytest.raises(ValueError, match=fragment) as from_kernel_op:
        torch.ops.todi_ext.distill_forward(a["student_logits"], a["teacher_logits"], a["labels"], a["divergence"],
                                           _s(1.0), a["skew_lambda"], a["akl_mu"], a["jsd_beta"], _s(1.0), -100,
                                           a["reduction"], False, False, a["soft_label_weight"],
                                           a["hard_label_weight"])
    assert str(from_check.value) == str(from_kernel_op.value)
    valid = dict(args, **{name: value for name, value in _valid_op_args().items() if name in overrides})
    torch.ops.todi_ext.check_distill_args(*valid.values())  # with the bad argument mended, it passes


def _valid_op_args():
    return dict(teacher_logits=make_logits((3, 8), seed=1), labels=torch.zeros(3, dtype=torch.long),
                divergence="todi", skew_lambda=0.1, akl_mu=0.5, jsd_beta=0.5, reduction="mean",
                soft_label_weight=1.0, hard_label_weight=0.0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_paths_that_reach_no_kernel_still_check_every_call(backend):
    # Traced with dynamic sizes, the check op is a node of the graph (not dead
    # code) and runs with each call's tensors: a later call with a mismatched
    # teacher or an out-of-range parameter gets the op's ValueError.
    torch._dynamo.reset()
    loss = torch.compile(reference.distill_loss, backend=backend, dynamic=True, fullgraph=True)
    s, t = _inputs((4, 10))
    loss(s, t)
    with pytest.raises(ValueError, match=r"teacher_logits must have the shape of student_logits \(5, 10\), got \(1, 10\)"):
        loss(make_logits((5, 10)), make_logits((1, 10), seed=1))
    with pytest.raises(ValueError, match=r"skew_lambda must be in \[0, 1\], got 1.5"):
        loss(s, t, divergence="skl", skew_lambda=1.5)


def test_the_label_range_check_op_reads_cpu_labels():
    labels = torch.tensor([[0, 3], [-100, 4]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\) or equal ignore_index \(-100\).*got 4 at position 3"):
        torch.ops.todi_ext.check_label_range(labels, 4, -100)
    torch.ops.todi_ext.check_label_range(labels, 5, -100)
    torch.ops.todi_ext.check_label_range(labels.to("meta"), 4, -100)  # no values to read: nothing to check
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        torch.ops.todi_ext.check_label_range(labels.float(), 5, -100)


def test_scale_grad_checks_its_arguments():
    with pytest.raises(ValueError, match="scale must be a scalar or have shape"):
        torch.ops.todi_ext.scale_grad_(make_logits((3, 8)), torch.ones(4))
    with pytest.raises(ValueError, match="scale must be float32"):  # ValueError: see above
        torch.ops.todi_ext.scale_grad_(make_logits((3, 8)), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="unit stride"):
        torch.ops.todi_ext.scale_grad_(make_logits((8, 3)).t(), torch.ones(3))


def test_scale_grad_in_place_refuses_a_grad_whose_entries_share_memory():
    # Scaled in place, a shared entry would be multiplied once per alias.
    for grad in (torch.ones(1, 7).expand(4, 7), torch.ones(10).as_strided((4, 7), (1, 1))):
        with pytest.raises(ValueError, match="grad must not have entries that share memory"):
            torch.ops.todi_ext.scale_grad_(grad, torch.tensor(2.0))
        out = torch.ops.todi_ext.scale_grad(grad, torch.tensor([2.0, 3.0, 5.0, 7.0]))  # a new tensor: fine
        torch.testing.assert_close(out, grad * torch.tensor([2.0, 3.0, 5.0, 7.0]).unsqueeze(-1), rtol=0, atol=0)
    # Distinct entries in another order than row-major are scaled as usual.
    base = make_logits((3, 4, 7))
    grad = base.clone().transpose(0, 1)
    torch.ops.todi_ext.scale_grad_(grad, torch.tensor(2.0))
    torch.testing.assert_close(grad, 2.0 * base.transpose(0, 1), rtol=0, atol=0)


def _distill_args(**changes):
    args = dict(student_logits=make_logits((3, 8)), teacher_logits=make_logits((3, 8), seed=1), labels=None,
                divergence="todi", beta=_s(1.0), skew_lambda=0.1, akl_mu=0.5, jsd_beta=0.5, inv_temperature=_s(1.0),
                ignore_index=-100, reduction="none", student_grad=True, teacher_grad=False)
    return {**args, **changes}


META_BESIDE_CPU = [
    # (description, op call, message): a meta tensor sends the call to the op's fake.
    ("beta", lambda: torch.ops.todi_ext.distill_forward(**_distill_args(beta=_s(1.0).to("meta"))),
     "beta is on meta but student_logits is on cpu"),
    ("inv_temperature", lambda: torch.ops.todi_ext.distill_forward(**_distill_args(inv_temperature=_s(1.0).to("meta"))),
     "inv_temperature is on meta but student_logits is on cpu"),
    ("scale, in place", lambda: torch.ops.todi_ext.scale_grad_(make_logits((3, 8)), torch.tensor(2.0, device="meta")),
     "scale is on meta but grad is on cpu"),
    ("scale", lambda: torch.ops.todi_ext.scale_grad(make_logits((3, 8)), torch.tensor(2.0, device="meta")),
     "scale is on meta but grad is on cpu"),
    ("vocab-parallel inv_temperature",
     lambda: torch.ops.todi_ext.vocab_parallel_row_stats(make_logits((3, 8)), make_logits((3, 8)), None,
                                                         _s(1.0).to("meta"), -100, False),
     "inv_temperature is on meta but student_logits is on cpu"),
]


@pytest.mark.parametrize("case", META_BESIDE_CPU, ids=[c[0] for c in META_BESIDE_CPU])
def test_a_meta_tensor_beside_cpu_tensors_is_refused(case):
    # Once returned uninitialised CPU tensors (a loss of 1e10) or left the grad unscaled.
    _, call, message = case
    with pytest.raises(ValueError, match=message):
        call()


def test_a_divergence_that_is_not_a_str_is_named():
    with pytest.raises(TypeError, match="divergence must be a str, one of 'todi'.*got list"):
        todi_ext.distill_loss(*_inputs(), divergence=["todi"])


def test_scalars_of_any_real_type_give_the_same_loss():
    student, teacher = _inputs()
    expected = todi_ext.todi_loss(student, teacher, beta=0.5, temperature=2.0)
    for beta, temperature in ((fractions.Fraction(1, 2), fractions.Fraction(2)), (numpy.float32(0.5), numpy.int64(2))):
        got = todi_ext.todi_loss(student, teacher, beta=beta, temperature=temperature)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_module_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        todi_ext.ToDiLoss(2.0)  # once silently beta


@pytest.mark.parametrize("transform", [torch.func.grad, torch.func.jacrev, torch.vmap])
def test_torch_func_transforms_get_a_clear_error(transform):
    z, s = _inputs()
    with pytest.raises(NotImplementedError, match="does not support torch.func transforms"):
        transform(lambda x: todi_ext.todi_loss(x, s if transform is not torch.vmap else s[0]))(z)
