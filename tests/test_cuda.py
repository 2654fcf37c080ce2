"""The CUDA kernels: parity with the float64 reference and with the CPU kernel,
opcheck, torch.compile, CUDA graphs, devices. Skipped without a GPU."""

import pytest
import torch

import todi_ext
from todi_ext import reference

from conftest import op_scalar as _s
from conftest import TOLERANCES, assert_close_to_oracle, assert_grad_close, loss_and_grads, make_labels, make_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# From one-block rows to rows far past L2 per block.
VOCABS = [1, 7, 4096, 32000, 50257, 128256, 151936, 262144]


def cuda(*tensors):
    return [t.cuda() if t is not None else None for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_matches_reference(dtype, vocab):
    rows = 5 if vocab > 100000 else 13  # odd row counts
    student, teacher = cuda(make_logits((rows, vocab), dtype), make_logits((rows, vocab), dtype, seed=3))
    labels = make_labels((rows,)).cuda()
    assert_close_to_oracle(student, teacher, labels, reduction="none", temperature=2.0, teacher_grad=True)


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "js", "tvd", "skl", "srkl", "akl", "gjsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("vocab", [4096, 128256])
def test_other_divergences_match_reference(divergence, dtype, vocab):
    student, teacher = cuda(make_logits((5, vocab), dtype), make_logits((5, vocab), dtype, seed=3))
    labels = make_labels((5,)).cuda()
    kwargs = dict(divergence=divergence, temperature=2.0, reduction="none")
    loss, gs, gt = loss_and_grads(todi_ext.distill_loss, student, teacher, labels, True, **kwargs)
    ref, ref_gs, ref_gt = loss_and_grads(reference.distill_loss, student.double(), teacher.double(), labels, True, **kwargs)
    loss_rtol, loss_atol, grad_tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), ref, rtol=loss_rtol, atol=loss_atol)
    assert_grad_close(gs, ref_gs, grad_tol)
    assert_grad_close(gt, ref_gt, grad_tol)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_cpu_kernel(dtype, reduction):
    student, teacher = make_logits((4, 9, 3001), dtype), make_logits((4, 9, 3001), dtype, seed=5)
    teacher[0, :2, :50] = float("-inf")
    labels = make_labels((4, 9))
    cpu = loss_and_grads(todi_ext.todi_loss, student, teacher, labels, True, reduction=reduction, beta=2.0)
    gpu = loss_and_grads(todi_ext.todi_loss, *cuda(student, teacher, labels), True, reduction=reduction, beta=2.0)
    loss_rtol, loss_atol, grad_tol = TOLERANCES[dtype]
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=loss_rtol, atol=loss_atol)
    for g_gpu, g_cpu in zip(gpu[1:], cpu[1:]):
        assert_grad_close(g_gpu.cpu(), g_cpu.double(), grad_tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_entries_ignored_rows_and_large_logits(dtype):
    student = make_logits((9, 50257), dtype, scale=40.0)
    teacher = make_logits((9, 50257), dtype, scale=40.0, seed=2)
    student[:, 50000:] = float("-inf")
    teacher[3, ::5] = float("-inf")
    labels = torch.tensor([0, -100, 2, 3, -100, 5, 6, 7, 8])
    loss, grad, _ = assert_close_to_oracle(*cuda(student, teacher, labels), reduction="none", tol_scale=10.0)
    assert (grad[labels.cuda() == -100] == 0).all()
    assert (grad[:, 50000:] == 0).all()


def test_undefined_rows_are_nan_only_there():
    student, teacher = make_logits((4, 1000)), make_logits((4, 1000), seed=1)
    student[1] = float("-inf")
    teacher[2, 10] = float("nan")
    loss = todi_ext.todi_loss(*cuda(student, teacher), reduction="none").cpu()
    assert torch.isnan(loss[1:3]).all() and torch.isfinite(loss[[0, 3]]).all()


@pytest.mark.parametrize("divergence", ["todi", "akl"])
def test_nan_among_infinite_entries_makes_the_row_nan(divergence):
    from test_parity import nan_among_infinities

    for dtype in (torch.float32, torch.bfloat16):
        student, teacher = nan_among_infinities(dtype=dtype)
        loss = todi_ext.distill_loss(*cuda(student, teacher), divergence=divergence, reduction="none").cpu()
        assert torch.isnan(loss[1:]).all() and torch.isfinite(loss[0]), dtype


@pytest.mark.parametrize("layout", ["shifted_3d", "vocab_strided", "odd_row_offset"])
def test_non_contiguous_inputs(layout):
    base_s, base_t = make_logits((3, 6, 5001)).cuda(), make_logits((3, 6, 5001), seed=1).cuda()
    if layout == "shifted_3d":
        student, teacher = base_s[:, :-1], base_t[:, 1:]
    elif layout == "vocab_strided":
        student, teacher = base_s[0].t(), base_t[0].t()
    else:  # rows start at odd element offsets: the 16-byte loads must fall back
        student, teacher = base_s[..., 1:], base_t[..., :-1]
    assert_close_to_oracle(student, teacher, reduction="none", dtype=torch.float32)


def test_mixed_dtypes():
    student = make_logits((5, 20000), torch.bfloat16).cuda()
    teacher = make_logits((5, 20000), torch.float32, seed=4).cuda()
    assert_close_to_oracle(student, teacher, reduction="none", teacher_grad=True)


def test_empty_input():
    student = torch.empty(0, 128, device="cuda", requires_grad=True)
    loss = todi_ext.todi_loss(student, torch.empty(0, 128, device="cuda"))
    loss.backward()
    assert loss.item() == 0 and student.grad.shape == (0, 128)


@pytest.mark.parametrize("divergence", ["todi", "akl"])
def test_deterministic(divergence):
    student, teacher = cuda(make_logits((64, 70000), torch.bfloat16), make_logits((64, 70000), torch.bfloat16, seed=1))
    runs = [
        loss_and_grads(todi_ext.distill_loss, student, teacher, divergence=divergence, reduction="none")
        for _ in range(3)
    ]
    for loss, grad, _ in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


@pytest.mark.parametrize("vocab", [4096, 128256])
def test_akl_matches_cpu_kernel_with_ties_and_masked_entries(vocab):
    # bf16 teacher logits of few distinct values: many ties straddle the split.
    teacher = (make_logits((7, vocab), seed=5) * 2).round().bfloat16()
    student = make_logits((7, vocab), torch.bfloat16, seed=6)
    teacher[1, ::5] = float("-inf")
    student[2, :100] = float("inf")  # an undefined row
    kwargs = dict(divergence="akl", akl_mu=0.3, reduction="none", teacher_grad=True)
    cpu = loss_and_grads(todi_ext.distill_loss, student, teacher, **kwargs)
    gpu = loss_and_grads(todi_ext.distill_loss, *cuda(student, teacher), **kwargs)
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu().float(), c.float(), rtol=2e-2, atol=1e-5, equal_nan=True)


def test_64_bit_offsets():
    # 8200 x 262144 entries > 2^31: offsets must not wrap. Check the first and last rows.
    n, v = 8200, 262144
    g = torch.Generator(device="cuda").manual_seed(0)
    student = torch.empty(n, v, dtype=torch.bfloat16, device="cuda").normal_(0, 3, generator=g).requires_grad_()
    teacher = torch.empty(n, v, dtype=torch.bfloat16, device="cuda").normal_(0, 3, generator=g)
    loss = todi_ext.todi_loss(student, teacher, reduction="none")
    loss.sum().backward()
    rows = [0, n - 1]
    ref_loss, ref_grad, _ = loss_and_grads(
        reference.todi_loss, student[rows].detach().double(), teacher[rows].double(), reduction="sum"
    )
    torch.testing.assert_close(loss[rows].sum().double(), ref_loss, rtol=2e-5, atol=1e-6)
    assert_grad_close(student.grad[rows], ref_grad, TOLERANCES[torch.bfloat16][2])


@pytest.mark.parametrize("grads", [(False, False), (True, False), (True, True)])
def test_opcheck(grads):
    student = make_logits((3, 5, 1029)).cuda().requires_grad_(grads[0])
    teacher = make_logits((3, 5, 1029), seed=1).cuda().requires_grad_(grads[1])
    labels = make_labels((3, 5)).cuda()
    for reduction in ("mean", "none"):
        torch.library.opcheck(
            torch.ops.todi_ext.distill_forward.default, (student, teacher, labels, "todi", _s(1.5, "cuda"), 0.1, 0.5, 0.5, _s(0.5, "cuda"), -100, reduction, *grads)
        )
    grad = student.detach().clone()
    torch.library.opcheck(torch.ops.todi_ext.scale_grad_.default, (grad, torch.rand(3, 5, device="cuda")))
    torch.library.opcheck(torch.ops.todi_ext.scale_grad_.default, (grad, torch.tensor(0.5, device="cuda")))
    torch.library.opcheck(torch.ops.todi_ext.scale_grad.default, (grad, torch.rand(3, 5, device="cuda")))


def test_compile_fullgraph():
    torch._dynamo.reset()

    def step(z, s, labels):
        return todi_ext.todi_loss(z, s, labels, temperature=2.0) * 0.5

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for n in (37, 64):
        z, s, labels = cuda(make_logits((n, 32000), torch.bfloat16), make_logits((n, 32000), torch.bfloat16, seed=1), make_labels((n,)))
        eager = loss_and_grads(step, z, s, labels)
        comp = loss_and_grads(compiled, z, s, labels)
        torch.testing.assert_close(comp[0], eager[0])
        torch.testing.assert_close(comp[1], eager[1])


@pytest.mark.parametrize("vocab", [32000, 128256])
def test_cuda_graph_capture_and_replay(vocab):
    z = make_logits((32, vocab), torch.bfloat16).cuda().requires_grad_()
    s = make_logits((32, vocab), torch.bfloat16, seed=1).cuda()
    labels = make_labels((32,)).cuda()

    def step():
        z.grad = None
        loss = todi_ext.todi_loss(z, s, labels)
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on a side stream, as the CUDA graphs docs ask
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    z.grad = None
    with torch.cuda.graph(graph):
        static_loss = todi_ext.todi_loss(z, s, labels)
        static_loss.backward()
    # new inputs, in place, then replay
    with torch.no_grad():
        s.copy_(make_logits((32, vocab), torch.bfloat16, seed=9).cuda())
    graph.replay()
    expected_loss, expected_grad, _ = loss_and_grads(todi_ext.todi_loss, z.detach(), s, labels)
    torch.testing.assert_close(static_loss, expected_loss)
    torch.testing.assert_close(z.grad, expected_grad)


# The register-row kernel serves rows that start on 16-byte boundaries when
# only the student's gradient is asked for (the usual distillation step), up
# to 131072 entries a row (16 CTAs x 256 threads x 32); a row one element off
# streams. Views are passed to the op as they are (a clone would
# make them contiguous).
REGISTER_CASES = [(torch.bfloat16, 1000), (torch.bfloat16, 32000), (torch.float16, 50257), (torch.bfloat16, 70001),
                  (torch.bfloat16, 128256), (torch.float32, 128256), (torch.bfloat16, 151936),
                  (torch.bfloat16, 262144)]


@pytest.mark.parametrize("dtype,vocab", REGISTER_CASES)
@pytest.mark.parametrize("divergence", ["todi", "akl", "gjsd"])
def test_register_rows_and_streamed_rows_match_the_oracle(divergence, dtype, vocab):
    width = -(-vocab // 8) * 8 + 8  # a multiple of 8 entries: every row of base[:, :vocab] is 16-byte aligned
    base_z = make_logits((6, width), dtype).cuda().requires_grad_()
    base_s = make_logits((6, width), dtype, seed=1).cuda()
    labels = make_labels((6,)).cuda()
    kwargs = dict(divergence=divergence, temperature=2.0, reduction="none", hard_label_weight=0.3,
                  soft_label_weight=0.7)
    weights = torch.rand(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    loss_rtol, loss_atol, grad_tol = TOLERANCES[dtype]
    for offset in (0, 1):  # aligned rows (registers where they fit), rows one element off (streamed)
        base_z.grad = None
        z, s = base_z[:, offset:offset + vocab], base_s[:, offset:offset + vocab]
        loss = todi_ext.distill_loss(z, s, labels, **kwargs)
        loss.backward(weights.to(device="cuda", dtype=loss.dtype))
        zd = z.detach().double().cpu().requires_grad_()
        ref = reference.distill_loss(zd, s.detach().double().cpu(), labels.cpu(), **kwargs)
        ref.backward(weights)
        torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=loss_rtol, atol=loss_atol)
        grad = base_z.grad[:, offset:offset + vocab].cpu()
        assert_grad_close(grad, zd.grad, grad_tol)
        assert (base_z.grad[:, :offset] == 0).all() and (base_z.grad[:, offset + vocab:] == 0).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    student = make_logits((7, 5000)).to("cuda:1")
    teacher = make_logits((7, 5000), seed=1).to("cuda:1")
    loss, grad, _ = assert_close_to_oracle(student, teacher, reduction="none")
    assert loss.device == torch.device("cuda:1") and grad.device == torch.device("cuda:1")


def test_invalid_scalars_in_a_direct_op_call_give_nan_not_numbers():
    # Not checked on the host for CUDA tensors (that would sync): the kernel
    # makes the counted rows NaN.
    z, s = make_logits((3, 100)).cuda(), make_logits((3, 100), seed=1).cuda()
    for beta, inv_t in ((1.0, -2.0), (float("nan"), 1.0), (1.0, float("inf"))):
        loss, _, _ = torch.ops.todi_ext.distill_forward(
            z, s, None, "todi", _s(beta, "cuda"), 0.1, 0.5, 0.5, _s(inv_t, "cuda"), -100, "none", False, False)
        assert torch.isnan(loss).all(), (beta, inv_t, loss)


def test_mixed_devices_are_rejected():
    student = make_logits((3, 10)).cuda()
    with pytest.raises(ValueError, match="teacher_logits is on cpu"):
        todi_ext.todi_loss(student, make_logits((3, 10)))
    with pytest.raises(ValueError, match="labels is on cpu"):
        todi_ext.todi_loss(student, student.clone(), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher_logits is on cpu"):  # the op's own C++ check
        torch.ops.todi_ext.distill_forward(student, make_logits((3, 10)), None, "todi", _s(1.0, "cuda"), 0.1, 0.5, 0.5, _s(1.0, "cuda"), -100, "mean", False, False)
    with pytest.raises(ValueError, match="teacher_logits is on cuda"):  # CPU student: the CUDA kernel may run
        torch.ops.todi_ext.distill_forward(make_logits((3, 10)), student, None, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(1.0), -100, "mean", False, False)


@pytest.mark.parametrize("divergence", ["todi", "fkl", "akl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("vocab", [4096, 128256])
def test_hard_label_cross_entropy_matches_reference(divergence, dtype, temperature, vocab):
    student, teacher = cuda(make_logits((5, vocab), dtype), make_logits((5, vocab), dtype, seed=3))
    labels = torch.tensor([0, -100, vocab - 1, 17, vocab // 2]).cuda()
    kwargs = dict(divergence=divergence, temperature=temperature, reduction="none", hard_label_weight=0.5,
                  soft_label_weight=0.5)
    loss, gs, gt = loss_and_grads(todi_ext.distill_loss, student, teacher, labels, True, **kwargs)
    ref, ref_gs, ref_gt = loss_and_grads(reference.distill_loss, student.double(), teacher.double(), labels, True,
                                         **kwargs)
    loss_rtol, loss_atol, grad_tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), ref, rtol=loss_rtol, atol=loss_atol)
    assert_grad_close(gs, ref_gs, grad_tol)
    assert_grad_close(gt, ref_gt, grad_tol)


def test_hard_label_outside_the_vocabulary_is_a_nan_row_not_a_sync():
    student, teacher = cuda(make_logits((3, 100)), make_logits((3, 100), seed=1))
    labels = torch.tensor([5, 100, -100]).cuda()
    loss = todi_ext.distill_loss(student, teacher, labels, hard_label_weight=1.0, reduction="none")
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and loss[2] == 0


def test_the_label_range_check_op_refuses_float_labels_on_the_gpu_too():
    # The values are not read on a GPU (a sync), the dtype is.
    labels = torch.tensor([5, 100, -100], dtype=torch.float32).cuda()
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        torch.ops.todi_ext.check_label_range(labels, 100, -100)
    torch.ops.todi_ext.check_label_range(labels.long(), 100, -100)  # out of range: not read here


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_training_step_never_syncs_with_the_host(reduction):
    # Labels, temperature and beta in device memory: the mean's count, the
    # checks and the launch queue device work only (count_positions_with_ops),
    # forward and backward.
    student, teacher = cuda(make_logits((6, 1000)), make_logits((6, 1000), seed=1))
    student.requires_grad_(True)
    labels = torch.tensor([3, -100, 999, 0, -100, 7]).cuda()
    expected = todi_ext.distill_loss(student, teacher, labels, temperature=2.0, hard_label_weight=0.5,
                                     reduction=reduction)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = todi_ext.distill_loss(student, teacher, labels, temperature=2.0, hard_label_weight=0.5,
                                     reduction=reduction)
        loss.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert student.grad is not None and torch.isfinite(student.grad).all()


# ------------------------------------------- vocabulary-parallel (issue 16)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("divergence", ["todi", "fkl", "tvd", "akl", "js"])
def test_vocab_parallel_phases_match_the_oracle(divergence, dtype):
    # The CUDA phase ops on three unequal slices of each row (collectives as
    # sums in this process): per-row loss and gradients of the whole rows.
    from conftest import phases_on_slices

    vocab, sizes = 50257, [16753, 16752, 16752]
    z, s = make_logits((6, vocab), dtype, seed=31), make_logits((6, vocab), dtype, seed=32)
    labels = torch.tensor([0, 16752, 16753, -100, 33505, 50256])
    kw = dict(temperature=2.0, hard_label_weight=0.3, soft_label_weight=0.7)
    got = phases_on_slices(torch.ops.todi_ext, *cuda(z, s, labels), sizes, divergence, **kw)
    zd, sd = z.double().requires_grad_(), s.double().requires_grad_()
    ref = reference.distill_loss(zd, sd, labels, divergence=divergence, reduction="none", temperature=2.0,
                                 hard_label_weight=0.3, soft_label_weight=0.7)
    ref.sum().backward()
    loss_rtol, loss_atol, grad_tol = TOLERANCES[dtype]
    torch.testing.assert_close(got[0].cpu().double(), ref.detach(), rtol=loss_rtol, atol=loss_atol)
    assert_grad_close(got[1].cpu(), zd.grad, grad_tol)
    assert_grad_close(got[2].cpu(), sd.grad, grad_tol)


def test_vocab_parallel_loss_on_an_nccl_group_of_one(tmp_path):
    # The whole path with NCCL's collectives (one rank: the code path, not the
    # scaling), eager and compiled, against the float64 oracle on the same rows.
    import datetime

    import torch.distributed as dist

    import todi_ext.distributed as td

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120), device_id=torch.device("cuda", 0))
    try:
        z, s = cuda(make_logits((4, 9, 32000), torch.bfloat16), make_logits((4, 9, 32000), torch.bfloat16, seed=1))
        labels = make_labels((4, 9), num_classes=32000).cuda()
        for divergence in ("todi", "akl"):
            kw = dict(divergence=divergence, temperature=2.0, hard_label_weight=0.5, soft_label_weight=0.5)
            zd = z.double().requires_grad_()
            expected = reference.distill_loss(zd, s.double(), labels, **kw)
            expected.backward()
            loss_rtol, loss_atol, grad_tol = TOLERANCES[torch.bfloat16]
            # Compiled for ToDi only (AKL's unrolled walks compile on gloo, tests/test_distributed.py).
            fns = [td.vocab_parallel_distill_loss]
            if divergence == "todi":
                fns.append(torch.compile(td.vocab_parallel_distill_loss, fullgraph=True))
            for fn in fns:
                zl = z.clone().requires_grad_()
                loss = fn(zl, s, labels, **kw)
                loss.backward()
                torch.testing.assert_close(loss.double(), expected.detach(), rtol=loss_rtol, atol=loss_atol)
                assert_grad_close(zl.grad, zd.grad, grad_tol)
    finally:
        dist.destroy_process_group()
