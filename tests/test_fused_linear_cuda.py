"""fused_linear_distill_loss on CUDA (float32-output matmuls for low-precision
weights): parity with the float64 oracle and with the CPU op. Skipped without a GPU."""

import pytest
import torch

import todi_ext

from conftest import TOLERANCES, assert_grad_close
from test_fused_linear import check_autocast_changes_nothing, make_problem, materialised, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def to_cuda(problem):
    return tuple(t.cuda() if t is not None else None for t in problem)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_the_oracle(dtype, reduction):
    problem = to_cuda(make_problem(dtype, lead=(4, 33), vocab=5003, seed=1))
    kw = dict(temperature=2.0, hard_label_weight=0.5, soft_label_weight=0.5, chunk_size=17)
    got_loss, got_grads = run(todi_ext.fused_linear_distill_loss, problem, reduction, **kw)
    ref_loss, ref_grads = run(materialised, problem, reduction, **kw)
    loss_rtol, loss_atol, grad_tol = TOLERANCES[dtype]
    torch.testing.assert_close(got_loss.double(), ref_loss, rtol=loss_rtol, atol=loss_atol)
    for got, ref in zip(got_grads, ref_grads):
        assert got.dtype == dtype and got.is_cuda
        assert_grad_close(got, ref, grad_tol)


def test_compiles_and_matches_the_cpu_op():
    torch._dynamo.reset()
    problem = make_problem(torch.float32, lead=(64,), vocab=32000, seed=2)
    step = torch.compile(todi_ext.fused_linear_distill_loss, fullgraph=True)
    gpu = run(step, to_cuda(problem), "mean", chunk_size=16)
    cpu = run(todi_ext.fused_linear_distill_loss, problem, "mean", chunk_size=16)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=2e-5, atol=1e-6)
    for a, b in zip(gpu[1], cpu[1]):
        assert_grad_close(a.cpu(), b.double(), 1e-4)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_an_enclosing_autocast_changes_nothing(reduction):
    check_autocast_changes_nothing("cuda", reduction)
