"""Shared helpers: random logits, the float64 oracle, per-dtype tolerances."""

import pytest
import torch

import todi_ext
from todi_ext import _validation, reference

# Per input dtype: (loss rtol, loss atol, gradient norm-wise relative error).
# The loss is computed in float32 from inputs that are exact in float32, so it
# matches float64 to float32 accuracy whatever the input dtype; gradients are
# returned in the input dtype, so bf16 loses ~3 decimal digits to rounding.
TOLERANCES = {
    torch.float32: (2e-5, 1e-6, 2e-5),
    torch.bfloat16: (2e-5, 1e-6, 1e-2),
    torch.float16: (2e-5, 1e-6, 2e-3),
    torch.float64: (1e-10, 1e-12, 1e-10),
}


def make_logits(shape, dtype=torch.float32, scale=3.0, seed=0):
    """Random logits (never zeros), rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def op_scalar(value, device="cpu"):
    """beta or 1/T as torch.ops.todi_ext.distill_forward takes them: a 0-dim float64 tensor."""
    return torch.full((), value, dtype=torch.float64, device=device)


def make_labels(shape, ignore_fraction=0.3, ignore_index=-100, seed=1, num_classes=1000):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_fraction] = ignore_index
    return labels


def loss_and_grads(loss_fn, student, teacher, labels=None, teacher_grad=False, cotangent_seed=2, **kwargs):
    """Calls loss_fn on leaf copies and back-propagates (a random cotangent for reduction="none").

    Returns (loss, student.grad, teacher.grad or None).
    """
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = loss_fn(s, t, labels, **kwargs)
    if loss.dim() == 0:
        loss.backward()
    else:
        g = torch.Generator().manual_seed(cotangent_seed)
        weights = torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5
        loss.backward(weights.to(device=loss.device, dtype=loss.dtype))
    return loss.detach(), s.grad, t.grad if teacher_grad else None


def oracle(student, teacher, labels=None, teacher_grad=False, **kwargs):
    """The eager reference on exact float64 copies of the inputs."""
    return loss_and_grads(reference.todi_loss, student.double(), teacher.double(), labels, teacher_grad, **kwargs)


def assert_close_to_oracle(student, teacher, labels=None, teacher_grad=False, dtype=None, tol_scale=1.0, **kwargs):
    """tol_scale widens the tolerances, e.g. for logits of large magnitude, whose
    float32 log-probabilities carry an absolute error of ~eps * |logit|."""
    dtype = dtype or student.dtype
    loss_rtol, loss_atol, grad_tol = (t * tol_scale for t in TOLERANCES[dtype])
    loss, gs, gt = loss_and_grads(todi_ext.todi_loss, student, teacher, labels, teacher_grad, **kwargs)
    ref_loss, ref_gs, ref_gt = oracle(student, teacher, labels, teacher_grad, **kwargs)
    assert loss.dtype == (torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=loss_rtol, atol=loss_atol)
    assert gs.dtype == student.dtype and gs.shape == student.shape
    assert_grad_close(gs, ref_gs, grad_tol)
    if teacher_grad:
        assert gt.dtype == teacher.dtype
        assert_grad_close(gt, ref_gt, TOLERANCES[teacher.dtype][2] * tol_scale)
    return loss, gs, gt


def assert_grad_close(grad, ref, tol):
    assert torch.isfinite(grad).all(), "gradient has non-finite entries"
    err = (grad.double() - ref).norm()
    scale = ref.norm()
    # Plus what storing in grad's dtype must lose: half a subnormal step per
    # entry (float16 gradients of ~1e-5, as at V = 50k, are subnormal).
    info = torch.finfo(grad.dtype)
    storage = 0.5 * info.tiny * info.eps * grad.numel() ** 0.5
    assert err <= tol * scale + storage + 1e-12, f"gradient relative error {float(err / scale):.3e} > {tol:.1e}"


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


def phases_on_slices(ops, z, s, labels, sizes, divergence, temperature, hard_label_weight, soft_label_weight, akl_mu=0.5):
    """todi_ext.distributed's step with every rank's slice in this process
    (each collective a sum or a gather over the slices), through `ops` (the
    extension's ops, or the CUDA host-emulation harness): per-row losses and
    the slices' gradients of their sum, concatenated."""
    import todi_ext.distributed as td

    kernel, jsd_beta = _validation.kernel_divergence(divergence, 0.5)
    math = torch.float64 if z.dtype == torch.float64 else torch.float32
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float64, device=z.device)
    beta = torch.tensor(1.0, dtype=torch.float64, device=z.device)
    edges = [sum(sizes[:r]) for r in range(len(sizes))]
    slices = [(z[:, e:e + n].contiguous(), s[:, e:e + n].contiguous()) for e, n in zip(edges, sizes)]
    local = [torch.where(labels == -100, torch.full_like(labels, -1),
                         torch.where((labels >= e) & (labels < e + n), labels - e, torch.full_like(labels, n)))
             for e, n in zip(edges, sizes)]
    with_hard_label_term = hard_label_weight != 0
    stats = td.merge_row_stats(torch.stack([ops.vocab_parallel_row_stats(zr, sr, lr, inv_t, -1, with_hard_label_term)
                                             for (zr, sr), lr in zip(slices, local)]))
    gaps = None
    if kernel == "akl":
        def summed(fn):
            return sum(fn(zr, sr, lr) for (zr, sr), lr in zip(slices, local))
        gaps = td.akl_split_search(
            lambda low, rem: summed(lambda zr, sr, lr: ops.vocab_parallel_akl_walk(zr, sr, lr, inv_t, -1, stats, low, rem)),
            lambda low: summed(lambda zr, sr, lr: ops.vocab_parallel_akl_gaps(zr, sr, lr, inv_t, -1, stats, low)),
            z.shape[0], akl_mu, math, z.device)
    sums = sum(ops.vocab_parallel_partial_sums(zr, sr, lr, kernel, beta, 0.1, akl_mu, jsd_beta, inv_t, -1, stats,
                                               with_hard_label_term, gaps) for (zr, sr), lr in zip(slices, local))
    per_row = soft_label_weight * sums[:, 0] + (hard_label_weight * (stats[:, 5] - (sums[:, 3] - stats[:, 4])) if with_hard_label_term else 0)
    per_row = torch.where(labels == -100, torch.zeros_like(per_row), per_row)
    grads = [ops.vocab_parallel_gradients(zr, sr, lr, kernel, beta, 0.1, akl_mu, jsd_beta, inv_t, -1, stats, sums,
                                          torch.ones((), dtype=math, device=z.device),
                                          torch.tensor([soft_label_weight, hard_label_weight], dtype=torch.float64, device=z.device), with_hard_label_term,
                                          True, True, gaps)
             for (zr, sr), lr in zip(slices, local)]
    return per_row, torch.cat([g[0] for g in grads], dim=-1), torch.cat([g[1] for g in grads], dim=-1)


def undefined_rows_across_slices():
    """Rows for three 100-entry slices: which are undefined, and where."""
    z, s = make_logits((5, 300), seed=1), make_logits((5, 300), seed=2)
    z[0, 150] = float("nan")          # a NaN in the middle slice only
    s[1, 10] = float("inf")           # a +inf in the first
    z[2, 100:200] = float("-inf")     # a whole slice -inf in both inputs: left out, the row stays defined
    s[2, 100:200] = float("-inf")
    z[3] = float("-inf")              # a whole row -inf: undefined
    return z, s, torch.tensor([True, True, False, True, False])
