"""todi_ext.todi_loss against the float64 eager reference: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

import todi_ext
from todi_ext import reference

from conftest import TOLERANCES, assert_close_to_oracle, assert_grad_close, make_labels, make_logits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_worked_example_of_the_spec():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    for loss_fn in (todi_ext.todi_loss, reference.todi_loss):
        z = q.log().requires_grad_()
        loss = loss_fn(z, p.log())
        loss.backward()
        assert abs(loss.item() - 0.17716) < 1e-5
        torch.testing.assert_close(z.grad, torch.tensor([-0.31775, 0.14439, 0.17336], dtype=torch.float64), atol=1e-5, rtol=0)


def test_beta_one_equals_forward_plus_reverse_kl_in_value():
    z, s = make_logits((6, 500), torch.float64), make_logits((6, 500), torch.float64, seed=5)
    log_q, log_p = F.log_softmax(z, -1), F.log_softmax(s, -1)
    fkl = (log_p.exp() * (log_p - log_q)).sum(-1)
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1)
    for loss_fn in (todi_ext.todi_loss, reference.todi_loss):
        torch.testing.assert_close(loss_fn(z, s, reduction="none"), fkl + rkl)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("vocab", [1, 2, 7, 1000, 4097, 32000, 50257, 128256, 262144])
def test_matches_reference_per_position(dtype, vocab):
    rows = 3 if vocab > 5000 else 11  # odd row counts
    student = make_logits((rows, vocab), dtype)
    teacher = make_logits((rows, vocab), dtype, seed=7)
    assert_close_to_oracle(student, teacher, reduction="none")


@pytest.mark.parametrize("beta", [1.0, 3.0])  # beta only scales the log-ratio: one value besides the default
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_beta_and_temperature(beta, temperature, dtype):
    student = make_logits((9, 777), dtype)
    teacher = make_logits((9, 777), dtype, seed=3)
    assert_close_to_oracle(student, teacher, beta=beta, temperature=temperature, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(257,), (5, 257), (3, 5, 257)])
def test_shapes_reductions_and_ignored_positions(reduction, shape):
    student = make_logits(shape)
    teacher = make_logits(shape, seed=4)
    labels = make_labels(shape[:-1]) if len(shape) > 1 else torch.tensor(3)
    loss, grad, _ = assert_close_to_oracle(student, teacher, labels, reduction=reduction, temperature=2.0)
    assert loss.shape == (shape[:-1] if reduction == "none" else ())
    ignored = labels == -100
    assert (grad[ignored] == 0).all(), "ignored positions must get an exactly-zero gradient"
    if reduction == "none":
        assert (loss[ignored] == 0).all()


def test_mean_is_sum_over_counted_positions():
    student, teacher = make_logits((4, 6, 300)), make_logits((4, 6, 300), seed=9)
    labels = make_labels((4, 6), ignore_index=-1)
    count = (labels != -1).sum()
    total = todi_ext.todi_loss(student, teacher, labels, ignore_index=-1, reduction="sum")
    mean = todi_ext.todi_loss(student, teacher, labels, ignore_index=-1, reduction="mean")
    torch.testing.assert_close(mean, total / count)
    unmasked = todi_ext.todi_loss(student, teacher, reduction="none")
    torch.testing.assert_close(total, unmasked[labels != -1].sum())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_positions_ignored_gives_zero_loss_and_zero_gradient(reduction):
    student = make_logits((4, 100)).requires_grad_()
    labels = torch.full((4,), -100)
    loss = todi_ext.todi_loss(student, make_logits((4, 100), seed=1), labels, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["student", "teacher", "both"])
def test_infinite_entries_are_left_out_with_finite_gradients(dtype, where):
    student = make_logits((6, 500), dtype)
    teacher = make_logits((6, 500), dtype, seed=2)
    banned = torch.zeros(6, 500, dtype=torch.bool)
    banned[:, 480:] = True  # padded vocabulary
    banned[1, ::7] = True  # banned tokens
    if where in ("student", "both"):
        student = student.masked_fill(banned, float("-inf"))
    if where in ("teacher", "both"):
        teacher = teacher.masked_fill(banned, float("-inf"))
    if where == "both":
        teacher[2, 3] = float("inf")  # +inf in one input: that entry is left out too
        student[2, 3] = float("inf")
        student, teacher = student[[0, 1, 3, 4, 5]], teacher[[0, 1, 3, 4, 5]]  # (+inf rows are NaN rows)
    loss, grad, _ = assert_close_to_oracle(student, teacher, reduction="none")
    assert torch.isfinite(loss).all()
    if where in ("student", "both"):
        assert (grad[student.isinf()] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits(dtype):
    student = make_logits((5, 3000), dtype, scale=40.0)
    teacher = make_logits((5, 3000), dtype, scale=40.0, seed=8)
    # |logits| ~ 120: float32 log-probabilities are good to ~1e-5 absolute.
    assert_close_to_oracle(student, teacher, reduction="none", tol_scale=10.0)


@pytest.mark.parametrize(
    "layout",
    ["vocab_strided", "row_slice", "every_other_row", "expanded", "shifted_3d", "nine_leading_dims"],
)
def test_non_contiguous_inputs(layout):
    base_s, base_t = make_logits((12, 700)), make_logits((12, 700), seed=6)
    if layout == "vocab_strided":  # last dimension not contiguous
        student, teacher = make_logits((700, 12)).t(), make_logits((700, 12), seed=6).t()
    elif layout == "row_slice":  # rows padded: row stride 700, V = 613
        student, teacher = base_s[:, :613], base_t[:, 87:]
    elif layout == "every_other_row":
        student, teacher = base_s.view(3, 4, 700)[:, ::2], base_t.view(3, 4, 700)[:, 1::2]
    elif layout == "expanded":  # one teacher row broadcast to every position (stride 0)
        student, teacher = base_s, base_t[:1].expand(12, 700)
    elif layout == "shifted_3d":  # logits[:, :-1] of a (B, L, V) batch, as in a training loop
        student, teacher = base_s.view(3, 4, 700)[:, :-1], base_t.view(3, 4, 700)[:, 1:]
    else:  # more leading dimensions than the kernels index directly: copied first
        student = base_s[:4].view(2, 1, 1, 1, 1, 1, 1, 1, 2, 700)[..., ::2, :]
        teacher = base_t[:4].view(2, 1, 1, 1, 1, 1, 1, 1, 2, 700)[..., 1::2, :]
    assert not student.is_contiguous() or not teacher.is_contiguous()
    labels = make_labels(student.shape[:-1])
    assert_close_to_oracle(student, teacher, labels, reduction="none", dtype=torch.float32)


@pytest.mark.parametrize("student_dtype,teacher_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16)])
def test_mixed_dtypes(student_dtype, teacher_dtype):
    student = make_logits((7, 999), student_dtype)
    teacher = make_logits((7, 999), teacher_dtype, seed=11)
    assert_close_to_oracle(student, teacher, reduction="none", teacher_grad=True)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_teacher_gradient(dtype, reduction):
    student = make_logits((5, 1234), dtype)
    teacher = make_logits((5, 1234), dtype, seed=12)
    teacher[0, :10] = float("-inf")
    assert_close_to_oracle(student, teacher, make_labels((5,)), teacher_grad=True, reduction=reduction, beta=2.0, temperature=2.0)


def test_undefined_rows_are_nan_and_do_not_touch_other_rows():
    student, teacher = make_logits((5, 64)), make_logits((5, 64), seed=1)
    student[1] = float("-inf")  # all -inf
    teacher[2, 5] = float("nan")
    student[3, 7] = float("inf")
    s = student.clone().requires_grad_()
    loss = todi_ext.todi_loss(s, teacher, reduction="none")
    ref = reference.todi_loss(student.double(), teacher.double(), reduction="none")
    assert torch.isnan(loss[1:4]).all() and torch.isnan(ref[1:4]).all()
    torch.testing.assert_close(loss[[0, 4]].double(), ref[[0, 4]], rtol=2e-5, atol=1e-6)
    loss[[0, 4]].sum().backward()
    assert torch.isfinite(s.grad[[0, 4]]).all()
    # and the same rows, ignored, contribute an exact zero
    labels = torch.tensor([0, -100, -100, -100, 0])
    masked = todi_ext.todi_loss(student, teacher, labels, reduction="sum")
    torch.testing.assert_close(masked, loss[[0, 4]].sum())


def nan_among_infinities(rows=3, vocab=4096, dtype=torch.float32):
    """Rows where one entry is finite, one is NaN and all others are -inf: the
    kernels' parts (threads, lanes, chunks) that hold only the NaN see a
    (max = -inf, sum = NaN) state, which a merge must not drop."""
    student, teacher = make_logits((rows, vocab), dtype), make_logits((rows, vocab), dtype, seed=1)
    student[1] = float("-inf")
    student[1, 0] = 1.0
    student[1, vocab * 3 // 4] = float("nan")
    teacher[2] = float("-inf")
    teacher[2, 5] = 0.5
    teacher[2, vocab - 3] = float("nan")
    return student, teacher


@pytest.mark.parametrize("divergence", ["todi", "akl"])
def test_nan_among_infinite_entries_makes_the_row_nan(divergence):
    student, teacher = nan_among_infinities()
    loss = todi_ext.distill_loss(student, teacher, divergence=divergence, reduction="none")
    assert torch.isnan(loss[1:]).all() and torch.isfinite(loss[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("divergence", ["todi", "fkl", "akl"])
def test_finfo_min_masking_acts_like_minus_infinity(dtype, temperature, divergence):
    # Hugging Face masks vocabulary entries with finfo(dtype).min; at T < 1
    # that overflows to -inf in x / T. Either way the entry must drop out.
    student, teacher = make_logits((3, 500), dtype), make_logits((3, 500), dtype, seed=1)
    masked = torch.zeros(500, dtype=torch.bool)
    masked[::7] = True
    kw = dict(divergence=divergence, temperature=temperature, reduction="none")
    results = []
    for fill in (torch.finfo(dtype).min, float("-inf")):
        z = student.masked_fill(masked, fill).requires_grad_()
        loss = todi_ext.distill_loss(z, teacher.masked_fill(masked, fill), **kw)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()
        results.append((loss.detach(), z.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2e-6, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-9)


def test_empty_batch():
    student = make_logits((0, 50)).requires_grad_()
    teacher = make_logits((0, 50))
    for reduction in ("mean", "sum"):
        loss = todi_ext.todi_loss(student, teacher, reduction=reduction)
        assert loss.item() == 0.0
    assert todi_ext.todi_loss(student, teacher, reduction="none").shape == (0,)
    todi_ext.todi_loss(student, teacher).backward()
    assert student.grad.shape == (0, 50)


def test_module_matches_function():
    module = todi_ext.ToDiLoss(beta=2.0, temperature=2.0, ignore_index=-1, reduction="sum")
    assert "temperature=2.0" in repr(module)
    student, teacher = make_logits((4, 3, 100)), make_logits((4, 3, 100), seed=3)
    labels = make_labels((4, 3), ignore_index=-1)
    expected = todi_ext.todi_loss(student, teacher, labels, beta=2.0, temperature=2.0, ignore_index=-1, reduction="sum")
    assert torch.equal(module(student, teacher, labels), expected)


def test_deterministic():
    student, teacher = make_logits((33, 5000)), make_logits((33, 5000), seed=3)
    outs = [todi_ext.todi_loss(student, teacher, reduction="none") for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_reference_has_the_signatures_of_the_fused_functions():
    # The README promises the eager reference takes the same arguments (issue 21: the label weights were missing).
    import inspect

    from todi_ext import reference

    for name in ("todi_loss", "distill_loss"):
        assert inspect.signature(getattr(reference, name)) == inspect.signature(getattr(todi_ext, name)), name
    z, t = make_logits((5, 40)), make_logits((5, 40), seed=1)
    labels = make_labels((5,), num_classes=40)
    kw = dict(temperature=2.0, hard_label_weight=0.3, soft_label_weight=0.7)
    torch.testing.assert_close(reference.todi_loss(z.double(), t.double(), labels, **kw),
                               todi_ext.todi_loss(z.double(), t.double(), labels, **kw), rtol=1e-12, atol=0)
