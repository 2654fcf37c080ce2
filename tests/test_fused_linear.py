"""fused_linear_distill_loss: the loss from hidden states and lm_head weights,
against the float64 oracle on materialised logits, gradients, opcheck,
torch.compile, memory and bad inputs."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import todi_ext
from todi_ext import reference

from conftest import TOLERANCES, assert_grad_close, make_labels, make_logits
from conftest import op_scalar as _s

OP = torch.ops.todi_ext.fused_linear_distill_forward.default


def make_problem(dtype=torch.float32, lead=(3, 5), hs=24, ht=40, vocab=700, bias=True, seed=0):
    hidden = make_logits((*lead, hs), dtype, scale=1.0, seed=seed)
    weight = make_logits((vocab, hs), dtype, scale=0.4, seed=seed + 1)
    teacher_hidden = make_logits((*lead, ht), dtype, scale=1.0, seed=seed + 2)
    teacher_weight = make_logits((vocab, ht), dtype, scale=0.4, seed=seed + 3)
    b = make_logits((vocab,), dtype, seed=seed + 4) if bias else None
    tb = make_logits((vocab,), dtype, seed=seed + 5) if bias else None
    labels = make_labels(lead, num_classes=vocab, seed=seed + 6)
    return hidden, weight, b, teacher_hidden, teacher_weight, tb, labels


def run(loss_fn, problem, reduction, cotangent_seed=3, **kwargs):
    """Loss and gradients of student hidden, weight and bias (a random cotangent for "none")."""
    hidden, weight, bias, th, tw, tb, labels = problem
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss = loss_fn(leaves[0], leaves[1], th, tw, labels, student_bias=leaves[2], teacher_bias=tb,
                   reduction=reduction, **kwargs)
    if loss.dim() == 0:
        loss.backward()
    else:
        g = torch.Generator().manual_seed(cotangent_seed)
        loss.backward((torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.dtype))
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


def materialised(hidden, weight, th, tw, labels, *, student_bias=None, teacher_bias=None, **kwargs):
    """The path the fused op replaces: F.linear, then the loss on the logits (float64 oracle here)."""
    logits = F.linear(hidden.double(), weight.double(), None if student_bias is None else student_bias.double())
    with torch.no_grad():
        teacher = F.linear(th.double(), tw.double(), None if teacher_bias is None else teacher_bias.double())
    kwargs.pop("chunk_size", None)
    return reference.distill_loss(logits, teacher, labels, **kwargs)


def assert_matches_oracle(problem, dtype, reduction, **kwargs):
    got_loss, got_grads = run(todi_ext.fused_linear_distill_loss, problem, reduction, **kwargs)
    ref_loss, ref_grads = run(materialised, problem, reduction, **kwargs)
    loss_rtol, loss_atol, grad_tol = TOLERANCES[dtype]
    assert got_loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got_loss.double(), ref_loss, rtol=loss_rtol, atol=loss_atol)
    for got, ref in zip(got_grads, ref_grads):
        if ref is not None:
            assert got.dtype == dtype
            assert_grad_close(got, ref, grad_tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_matches_the_oracle_on_materialised_logits(dtype, reduction, chunk_size):
    problem = make_problem(dtype)
    assert_matches_oracle(problem, dtype, reduction, chunk_size=chunk_size, temperature=2.0)


@pytest.mark.parametrize("divergence", ["todi", "fkl", "rkl", "js", "tvd", "skl", "srkl", "akl", "gjsd"])
def test_every_divergence_with_the_hard_label_term(divergence):
    problem = make_problem(bias=False, seed=10)
    assert_matches_oracle(problem, torch.float32, "mean", divergence=divergence, temperature=2.0,
                          hard_label_weight=0.5, soft_label_weight=0.5, chunk_size=6)


def test_equals_the_logits_path():
    # Same loss and gradients as F.linear + todi_ext.distill_loss (both fused kernels, float32).
    problem = make_problem(seed=20)
    kw = dict(temperature=2.0, hard_label_weight=0.5, soft_label_weight=0.5)

    def logits_path(h, w, th, tw, labels, *, student_bias, teacher_bias, reduction, **kwargs):
        with torch.no_grad():
            teacher = F.linear(th, tw, teacher_bias)
        return todi_ext.distill_loss(F.linear(h, w, student_bias), teacher, labels, reduction=reduction, **kwargs)

    fused = run(todi_ext.fused_linear_distill_loss, problem, "mean", chunk_size=4, **kw)
    plain = run(logits_path, problem, "mean", **kw)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(fused[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_all_positions_ignored_gives_zero_loss_and_gradient():
    hidden, weight, bias, th, tw, tb, labels = make_problem(seed=30)
    labels = torch.full_like(labels, -100)
    loss, grads = run(todi_ext.fused_linear_distill_loss, (hidden, weight, bias, th, tw, tb, labels), "mean")
    assert loss == 0 and all(torch.count_nonzero(g) == 0 for g in grads)


def test_only_the_needed_gradients_and_a_frozen_lm_head():
    # LoRA-style: lm_head frozen, only the hidden states get a gradient.
    hidden, weight, bias, th, tw, tb, labels = make_problem(seed=40)
    h = hidden.clone().requires_grad_()
    loss = todi_ext.fused_linear_distill_loss(h, weight, th, tw, labels, student_bias=bias, teacher_bias=tb)
    loss.backward()
    ref_h = hidden.double().requires_grad_()
    materialised(ref_h, weight, th, tw, labels, student_bias=bias, teacher_bias=tb).backward()
    assert_grad_close(h.grad, ref_h.grad, TOLERANCES[torch.float32][2])


def test_module_form():
    hidden, weight, bias, th, tw, tb, labels = make_problem(seed=50)
    criterion = todi_ext.FusedLinearDistillLoss("todi", temperature=2.0, hard_label_weight=0.5, soft_label_weight=0.5)
    assert "hard_label_weight=0.5" in repr(criterion)
    got = criterion(hidden, weight, th, tw, labels, student_bias=bias, teacher_bias=tb)
    expected = todi_ext.fused_linear_distill_loss(hidden, weight, th, tw, labels, student_bias=bias, teacher_bias=tb,
                                                  temperature=2.0, hard_label_weight=0.5, soft_label_weight=0.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_backward_twice_with_retain_graph():
    hidden, weight, bias, th, tw, tb, labels = make_problem(seed=60)
    h = hidden.clone().requires_grad_()
    loss = todi_ext.fused_linear_distill_loss(h, weight, th, tw, labels)
    (2 * loss).backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 1.5 * first)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction):
    hidden, weight, bias, th, tw, tb, labels = make_problem(lead=(6,), seed=70)
    grads = reduction == "mean"
    row_weights = None if grads else torch.rand(6) + 0.5
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), th, tw, tb, labels, "todi",
            _s(1.0), 0.1, 0.5, 0.5, _s(0.5), -100, reduction, 0.5, 0.5, 4, row_weights, grads, grads, grads)
    torch.library.opcheck(OP, args)
    if reduction == "none":  # the backward's own call: gradients of sum(row_weights * loss)
        torch.library.opcheck(OP, args[:-3] + (True, True, True))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    problem = make_problem(seed=80)

    def step(h, w, th, tw, labels, *, student_bias, teacher_bias, reduction):
        return todi_ext.fused_linear_distill_loss(h, w, th, tw, labels, student_bias=student_bias,
                                                  teacher_bias=teacher_bias, reduction=reduction, temperature=2.0,
                                                  hard_label_weight=0.5, soft_label_weight=0.5, chunk_size=4)

    eager = run(step, problem, "mean")
    compiled = run(torch.compile(step, fullgraph=True), problem, "mean")
    torch.testing.assert_close(compiled[0], eager[0])
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b)


def test_a_hidden_size_of_zero_gives_the_loss_of_the_biases():
    # h @ W.T of H = 0 is all zeros: every row's logits are the (random)
    # bias; the bias gradient is the one that is not empty.
    problem = make_problem(lead=(2, 3), hs=0, ht=0, seed=80)
    for reduction in ("mean", "none"):
        assert_matches_oracle(problem, torch.float32, reduction, hard_label_weight=0.5, soft_label_weight=0.5)


def test_bad_inputs_name_what_is_wrong():
    hidden, weight, bias, th, tw, tb, labels = make_problem(seed=90)
    f = todi_ext.fused_linear_distill_loss
    with pytest.raises(ValueError, match=r"student's vocabulary size \(700.*teacher's \(699"):
        f(hidden, weight, th, tw[:699], labels)
    with pytest.raises(ValueError, match=r"student_weight must have shape \(V, 24\)"):
        f(hidden, weight[:, :5], th, tw, labels)
    with pytest.raises(ValueError, match="teacher_hidden requires grad.*torch.no_grad"):
        f(hidden, weight, th.requires_grad_(), tw, labels)
    th.requires_grad_(False)
    with pytest.raises(ValueError, match="teacher_weight requires grad.*freeze"):
        f(hidden, weight, th, tw.clone().requires_grad_(), labels)
    with pytest.raises(ValueError, match="teacher_hidden must have student_hidden's leading shape"):
        f(hidden, weight, th[:2], tw, labels[:2])
    with pytest.raises(TypeError, match="student_weight must have student_hidden's dtype"):
        f(hidden, weight.double(), th, tw, labels)
    with pytest.raises(ValueError, match="needs labels"):
        f(hidden, weight, th, tw, hard_label_weight=1.0)
    with pytest.raises(ValueError, match="needs labels"):  # no rows: no chunk's check runs, the op's own does
        f(hidden[:0], weight, th[:0], tw, hard_label_weight=1.0)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        f(hidden, weight, th, tw, labels.float())
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        f(hidden, weight, th, tw, labels, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, got 2.0"):
        f(hidden, weight, th, tw, labels, chunk_size=2.0)
    with pytest.raises(ValueError, match=r"labels must have shape \(3, 5\) \(student_hidden without its last"):
        f(hidden, weight, th, tw, labels[0])
    with pytest.raises(ValueError, match="chunk_size must be below 2\\*\\*63"):
        f(hidden, weight, th, tw, labels, chunk_size=2**70)
    with pytest.raises(ValueError, match=r"student_weight must have shape \(V, 24\)"):  # V = 0, chunk_size chosen
        f(hidden, weight[:0], th, tw[:0], None)
    with pytest.raises(TypeError, match="student_hidden must be a dense"):
        f(hidden.to_sparse(), weight, th, tw, labels)
    # A direct op call gets the op's own checks, which name the argument too.
    args = [hidden.reshape(15, 24), weight, None, th.reshape(15, 40), tw[:699], None, None, "todi", _s(1.0), 0.1,
            0.5, 0.5, _s(1.0), -100, "mean", 1.0, 0.0, 4, None, False, False, False]
    with pytest.raises(ValueError, match=r"student's vocabulary size \(700.*teacher's \(699"):
        OP(*args)
    args[4] = tw
    for changes, message in (({17: 0}, "chunk_size must be a positive int, got 0"), ({0: hidden, 3: th}, r"must have shape \(N, H\)"),
                             ({21: True}, "bias_grad=True needs student_bias")):
        with pytest.raises(ValueError, match=message):
            OP(*(changes.get(i, a) for i, a in enumerate(args)))


_PEAK_N, _PEAK_H, _PEAK_V, _PEAK_CHUNK = 2048, 64, 32000, 256
_PEAK_MEMORY_SCRIPT = f"""
import torch, todi_ext
torch.set_num_threads(2)  # the CPU kernel's per-thread row scratch, bounded whatever the machine
def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
n, h, v = {_PEAK_N}, {_PEAK_H}, {_PEAK_V}
hidden = torch.randn(n, h).requires_grad_()
weight = (torch.randn(v, h) * 0.1).requires_grad_()
th, tw = torch.randn(n, h), torch.randn(v, h) * 0.1
todi_ext.fused_linear_distill_loss(hidden[:8], weight, th[:8], tw).backward()  # warm up
weight.grad = hidden.grad = None
base = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
todi_ext.fused_linear_distill_loss(hidden, weight, th, tw, chunk_size={_PEAK_CHUNK}).backward()
print((rss("VmHWM") - base) / (n * v * 4))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read peak memory")
def test_no_logits_sized_tensor_is_ever_held():
    # Chunks of 256 of 2048 rows. What must be live at the peak, in units of
    # one (N, V) float32 logits tensor: three chunk buffers (the chunk's two
    # logits and their gradient, 1/8 each) and the gradients of W and hidden;
    # half a chunk buffer more is allowed for everything else (measured: 0.013).
    # One chunk buffer more - the previous chunk's gradient still held while
    # the next chunk's logits are formed - measured 0.55, above the bound; a
    # whole (N, V) tensor would be 1.0. A fixed mmap threshold makes glibc
    # return every freed buffer at once, so the peak RSS is the live tensors'.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_SCRIPT], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    logits_held = float(out.stdout.strip().splitlines()[-1])
    chunk = _PEAK_CHUNK / _PEAK_N
    needed = 3 * chunk + (_PEAK_V * _PEAK_H + _PEAK_N * _PEAK_H) / (_PEAK_N * _PEAK_V)
    assert logits_held < needed + 0.5 * chunk, (
        f"peak extra memory is {logits_held:.3f} of one (N, V) logits tensor; three chunk buffers and the "
        f"gradients are {needed:.3f}")


def check_autocast_changes_nothing(device, reduction):
    """The op decides its own precision: under autocast the result is the one without it."""
    hidden, weight, bias, th, tw, tb, labels = (t.to(device) for t in make_problem(seed=91))
    results = []
    for autocast in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = todi_ext.fused_linear_distill_loss(h, w, th, tw, labels, temperature=2.0, reduction=reduction,
                                                      hard_label_weight=0.5, soft_label_weight=0.5)
        loss.sum().backward()
        results.append((loss.detach(), h.grad, w.grad))
    assert results[1][0].dtype == torch.float32
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_an_enclosing_autocast_changes_nothing(reduction):
    # Issue 21: under torch.autocast("cpu", bfloat16) the op's inner matmuls ran in bf16 (1.4e-4 relative
    # off for float32 inputs).
    check_autocast_changes_nothing("cpu", reduction)
