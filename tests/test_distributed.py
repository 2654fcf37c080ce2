"""Vocabulary-parallel distillation (todi_ext.distributed) on gloo: world
sizes 2 and 3 spawned from pytest, vocabulary slices of unequal sizes, every
supported divergence and reduction, ignored positions, hard labels landing on
every rank, float32 and float64. Each rank's loss and slice gradient must
equal the single-process result on the gathered rows."""

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import todi_ext
import todi_ext.distributed as td

from conftest import TOLERANCES, assert_grad_close, make_labels, make_logits

DIVERGENCES = ["todi", "fkl", "rkl", "js", "tvd", "skl", "srkl", "gjsd", "akl"]
TIMEOUT_S = 120  # a bug must fail the test, not hang it


def _slices(vocab, world):
    # Unequal, and not a divisor split: e.g. 1001 over 3 -> 335, 333, 333.
    base = [vocab // world] * world
    base[0] += vocab - sum(base)
    return base


def _cases():
    for dtype in (torch.float64, torch.float32):
        for divergence in DIVERGENCES:
            for reduction in ("mean", "sum", "none"):
                yield dtype, divergence, reduction, dict(temperature=2.0)
        yield dtype, "todi", "mean", dict(temperature=2.0, hard_label_weight=0.5, soft_label_weight=0.5)
        yield dtype, "fkl", "none", dict(temperature=1.0, hard_label_weight=0.3)
        yield dtype, "akl", "mean", dict(temperature=0.7, akl_mu=0.3, hard_label_weight=0.2)


def _check_case(rank, world, dtype, divergence, reduction, kwargs):
    # Over 2 ranks, slices of 1026 + 1025: each a whole kernel chunk (1024
    # entries, read in place in float32/64) and a partial one; over 3 ranks,
    # 685 + 683 + 683: partial chunks only.
    vocab = 2051
    z, s = make_logits((3, 4, vocab), dtype, seed=1), make_logits((3, 4, vocab), dtype, seed=2)
    labels = make_labels((3, 4), num_classes=vocab, seed=3)
    # Labels on every rank's slice, and the slice edges.
    sizes = _slices(vocab, world)
    edges = [sum(sizes[:r]) for r in range(world)]
    for r, e in enumerate(edges):
        labels[r % 3, 0] = e
        labels[r % 3, 1] = e + sizes[r] - 1
    lo, hi = edges[rank], edges[rank] + sizes[rank]
    cotangent = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.5

    def backward(loss):
        (loss * cotangent.to(loss.dtype)).sum().backward() if loss.dim() else loss.backward()

    zl = z[..., lo:hi].clone().requires_grad_()
    sl = s[..., lo:hi].clone().requires_grad_()
    loss = td.vocab_parallel_distill_loss(zl, sl, labels, divergence=divergence, reduction=reduction, **kwargs)
    backward(loss)
    zf, sf = z.clone().requires_grad_(), s.clone().requires_grad_()
    expected = todi_ext.distill_loss(zf, sf, labels, divergence=divergence, reduction=reduction, **kwargs)
    backward(expected)
    if dtype == torch.float64:
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(zl.grad, zf.grad[..., lo:hi], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sl.grad, sf.grad[..., lo:hi], rtol=1e-9, atol=1e-12)
    else:  # float32: to the single-process accuracy, against the float64 oracle
        zd, sd = z.double().requires_grad_(), s.double().requires_grad_()
        oracle = todi_ext.distill_loss(zd, sd, labels, divergence=divergence, reduction=reduction, **kwargs)
        backward(oracle)
        loss_rtol, loss_atol, grad_tol = TOLERANCES[dtype]
        torch.testing.assert_close(loss.double(), oracle.detach(), rtol=loss_rtol, atol=loss_atol)
        assert_grad_close(zl.grad, zd.grad[..., lo:hi], grad_tol)
        assert_grad_close(sl.grad, sd.grad[..., lo:hi], grad_tol)


def _check_bad_inputs(rank, world):
    # Row counts that differ between ranks: every rank raises, nobody hangs.
    rows = 4 if rank == 0 else 5
    z, s = make_logits((rows, 10)), make_logits((rows, 10), seed=1)
    with pytest.raises(ValueError, match="ranks disagree on rows"):
        td.vocab_parallel_distill_loss(z, s)
    z, s = make_logits((4, 10)), make_logits((4, 10), seed=1)
    with pytest.raises(ValueError, match="ranks disagree on divergence"):
        td.vocab_parallel_distill_loss(z, s, divergence="fkl" if rank == 0 else "rkl")
    with pytest.raises(ValueError, match="ranks disagree on student dtype"):
        td.vocab_parallel_distill_loss(z.double() if rank == 0 else z, s)
    with pytest.raises(ValueError, match=r"ranks disagree on labels \("):
        td.vocab_parallel_distill_loss(z, s, torch.tensor([1, 2, 3, rank]))
    # Differences that keep the labels' sum and index-weighted sum (issue 21: both ranks returned a loss
    # that matched neither rank's labels).
    labels = torch.tensor([5, 6, 7, 8]) + (torch.tensor([1, -2, 1, 0]) if rank == 1 else 0)
    with pytest.raises(ValueError, match=r"ranks disagree on labels \("):
        td.vocab_parallel_distill_loss(z, s, labels)
    with pytest.raises(ValueError, match=r"ranks disagree on ignore_index \(\[-100, 7"):
        td.vocab_parallel_distill_loss(z, s, torch.tensor([1, 2, 3, 7]), ignore_index=-100 if rank == 0 else 7)
    with pytest.raises(ValueError, match=r"ranks disagree on divergence \(\['fkl', 'rkl'"):
        td.vocab_parallel_distill_loss(z, s, divergence="fkl" if rank == 0 else "rkl")
    with pytest.raises(ValueError, match=r"ranks disagree on hard_label_weight \(\[0.5, 0.25"):
        td.vocab_parallel_distill_loss(z, s, torch.tensor([1, 2, 3, 4]), hard_label_weight=0.5 if rank == 0 else 0.25)
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {10 * world}\)"):
        td.vocab_parallel_distill_loss(z, s, torch.tensor([1, 2, 3, 10 * world]), hard_label_weight=1.0)
    with pytest.raises(ValueError, match=r"ranks disagree on akl_mu \(\[0.5, 0.25"):
        td.vocab_parallel_distill_loss(z, s, divergence="akl", akl_mu=0.5 if rank == 0 else 0.25)
    with pytest.raises(ValueError, match="ranks disagree on temperature"):
        td.vocab_parallel_distill_loss(z, s, temperature=1.0 + rank)
    # Compiled, the check is an assert in the graph: it still fires on every rank.
    step = torch.compile(lambda z, s, d: td.vocab_parallel_distill_loss(z, s, divergence=d), fullgraph=True)
    with pytest.raises(RuntimeError, match="ranks disagree on rows, dtypes, the divergence"):
        step(z, s, "fkl" if rank == 0 else "rkl")
    compiled_t = torch.compile(lambda z, s, t: td.vocab_parallel_distill_loss(z, s, temperature=t), fullgraph=True)
    compiled_t(z, s, 1.0)  # both ranks alike: the first, specialised, graph
    with pytest.raises(RuntimeError, match="ranks disagree on rows, dtypes, the divergence"):
        compiled_t(z, s, 1.5 + rank)  # a temperature that is a graph input still reaches the check
    rows = 4 if rank == 0 else 5
    with pytest.raises(RuntimeError, match="ranks disagree"):
        step(make_logits((rows, 10)), make_logits((rows, 10), seed=1), "todi")
    # Only one rank's own input is invalid: it raises its error, the others
    # are told (they would otherwise wait for it in the first collective).
    with pytest.raises(ValueError, match="akl_mu must be in" if rank == 1 else r"rank\(s\) \[1\] rejected"):
        td.vocab_parallel_distill_loss(z, s, divergence="akl", akl_mu=1.5 if rank == 1 else 0.5)
    # With the hard-label term under Inductor, the assert once ran after the next collective: ranks with
    # different row counts aborted gloo, a divergence mismatch left rank 0 waiting for rank 1.
    hard = torch.compile(lambda z, s, y, d: td.vocab_parallel_distill_loss(
        z, s, y, divergence=d, hard_label_weight=0.5, soft_label_weight=0.5), fullgraph=True)
    with pytest.raises(RuntimeError, match="ranks disagree"):
        hard(z, s, torch.tensor([1, 2, 3, 4]), "todi" if rank == 0 else "akl")
    with pytest.raises(RuntimeError, match="ranks disagree"):
        hard(make_logits((rows, 10)), make_logits((rows, 10), seed=1), torch.arange(rows), "todi")
    # A rank whose logits are on meta (nothing a collective can send) still tells the others.
    with pytest.raises((NotImplementedError, ValueError), match="got meta" if rank == 1 else r"rank\(s\) \[1\]"):
        td.vocab_parallel_distill_loss(z.to("meta") if rank == 1 else z, s.to("meta") if rank == 1 else s)
    with pytest.raises(RuntimeError, match="hard label is outside"):
        torch.compile(td.vocab_parallel_distill_loss, fullgraph=True)(z, s, torch.tensor([1, 2, 3, 10 * world]),
                                                                        hard_label_weight=1.0)
    # Still in step after the errors: a valid call works.
    td.vocab_parallel_distill_loss(z.requires_grad_(), s).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def _check_zero_rows(rank, world):
    # No positions at all: a zero loss and empty gradients on every rank, for every reduction.
    for reduction in ("mean", "sum", "none"):
        z = make_logits((0, 7, 10)).requires_grad_()
        loss = td.vocab_parallel_distill_loss(z, make_logits((0, 7, 10), seed=1), reduction=reduction)
        loss.sum().backward()
        assert loss.shape == ((0, 7) if reduction == "none" else ()) and float(loss.sum()) == 0
        assert z.grad.shape == (0, 7, 10)


def _check_compiled_step(rank, world):
    # Functional collectives: the whole step compiles as one graph.
    vocab = 301
    z, s = make_logits((2, 5, vocab), seed=5), make_logits((2, 5, vocab), seed=6)
    labels = make_labels((2, 5), num_classes=vocab, seed=7)
    sizes = _slices(vocab, world)
    lo = sum(sizes[:rank])
    for divergence in ("todi", "akl"):  # AKL: the search's walks unroll into the graph
        kw = dict(divergence=divergence, temperature=2.0, hard_label_weight=0.5, soft_label_weight=0.5)

        def step(z, s, labels):
            return td.vocab_parallel_distill_loss(z, s, labels, **kw)

        results = []
        for fn in (step, torch.compile(step, fullgraph=True)):
            zl = z[..., lo:lo + sizes[rank]].clone().requires_grad_()
            loss = fn(zl, s[..., lo:lo + sizes[rank]], labels)
            loss.backward()
            results.append((loss.detach(), zl.grad))
        torch.testing.assert_close(results[1][0], results[0][0])
        torch.testing.assert_close(results[1][1], results[0][1])


def _check_schedules_do_not_recompile(rank, world):
    # A temperature schedule, a beta sweep, a label-weight schedule (issue 21: each value recompiled, and at 8
    # values fullgraph failed): after the first, specialised, graph the values are graph inputs.
    from torch._dynamo.testing import CompileCounterWithBackend

    vocab = 64
    lo = sum(_slices(vocab, world)[:rank])
    z, s = make_logits((3, vocab), seed=11), make_logits((3, vocab), seed=12)
    labels = make_labels((3,), num_classes=vocab, ignore_fraction=0.0, seed=13)
    zl, sl = z[:, lo:lo + _slices(vocab, world)[rank]], s[:, lo:lo + _slices(vocab, world)[rank]]
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda z, s, y, t, b, w: td.vocab_parallel_distill_loss(
        z, s, y, temperature=t, beta=b, hard_label_weight=w, soft_label_weight=1 - w), backend=counter, fullgraph=True)
    for i in range(10):
        t, b, w = 1.0 + 0.1 * i, 0.5 + 0.05 * i, 0.1 + 0.05 * i
        zc = zl.clone().requires_grad_()
        loss = step(zc, sl, labels, t, b, w)
        loss.backward()
        zf = z.clone().requires_grad_()
        expected = todi_ext.todi_loss(zf, s, labels, temperature=t, beta=b, hard_label_weight=w, soft_label_weight=1 - w)
        expected.backward()
        torch.testing.assert_close(loss.detach(), expected.detach())
        torch.testing.assert_close(zc.grad, zf.grad[:, lo:lo + zl.shape[1]])
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for 10 values"


def _check_dtensor_entry(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    vocab = 301  # 151 + 150: DTensor's own uneven split
    z, s = make_logits((6, vocab), seed=8), make_logits((6, vocab), seed=9)
    labels = make_labels((6,), num_classes=vocab, seed=10)
    mesh = init_device_mesh("cpu", (world,))
    zd = distribute_tensor(z, mesh, [Shard(-1)]).requires_grad_()
    sd = distribute_tensor(s, mesh, [Shard(-1)])
    loss = td.vocab_parallel_distill_loss(zd, sd, labels, temperature=2.0, hard_label_weight=0.5)
    loss.backward()
    zf = z.clone().requires_grad_()
    expected = todi_ext.distill_loss(zf, s, labels, temperature=2.0, hard_label_weight=0.5)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(zd.grad.full_tensor(), zf.grad)


def _worker(rank, world, init_file, error_file, what):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        torch.set_num_threads(1)
        if what == "cases":
            for case in _cases():
                try:
                    _check_case(rank, world, *case)
                except AssertionError as e:
                    raise AssertionError(f"case {case[:3]} {case[3]}: {e}") from e
            _check_zero_rows(rank, world)
            if world == 2:
                _check_compiled_step(rank, world)
                _check_schedules_do_not_recompile(rank, world)
                _check_dtensor_entry(rank, world)
        else:
            _check_bad_inputs(rank, world)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(f"{error_file}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise


def _spawn(world, tmp_path, what):
    init_file, error_file = str(tmp_path / "rendezvous"), str(tmp_path / "error")
    ctx = mp.start_processes(_worker, args=(world, init_file, error_file, what), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S * 3
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"world {world}: timed out after {TIMEOUT_S * 3} s")
    except Exception:
        errors = [open(f"{error_file}.{r}").read() for r in range(world) if os.path.exists(f"{error_file}.{r}")]
        pytest.fail("\n".join(errors) or "a rank failed")


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_loss_and_slice_gradients_equal_the_single_process_ones(world, tmp_path):
    _spawn(world, tmp_path, "cases")


@pytest.mark.slow
def test_bad_inputs_fail_on_every_rank_without_hanging(tmp_path):
    _spawn(2, tmp_path, "bad")


def test_the_agreement_op_passes_opcheck_and_raises_on_disagreement():
    op = torch.ops.todi_ext.vocab_parallel_agreement.default
    value = torch.tensor(0.5, dtype=torch.float64)
    torch.library.opcheck(op, (torch.tensor(True), value, "ranks disagree"))
    out = op(torch.tensor(True), value, "ranks disagree")
    assert out.item() == 0.5 and out.data_ptr() != value.data_ptr()  # a new tensor: no alias of an input
    with pytest.raises(RuntimeError, match="ranks disagree here"):
        op(torch.tensor(False), value, "ranks disagree here")


def test_phase_ops_pass_opcheck_and_check_their_tables():
    from conftest import op_scalar as _s

    z, s = make_logits((5, 40)), make_logits((5, 40), seed=1)
    labels = torch.tensor([3, -1, 40, 0, 39])  # local ids: -1 ignored, 40 in another slice
    stats = torch.ops.todi_ext.vocab_parallel_row_stats(z, s, labels, _s(0.5), -1, True)
    merged = td.merge_row_stats(stats.unsqueeze(0))
    sums = torch.ops.todi_ext.vocab_parallel_partial_sums(z, s, labels, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(0.5), -1,
                                                          merged, True)
    torch.library.opcheck(torch.ops.todi_ext.vocab_parallel_row_stats.default, (z, s, labels, _s(0.5), -1, True))
    torch.library.opcheck(torch.ops.todi_ext.vocab_parallel_partial_sums.default,
                          (z, s, labels, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(0.5), -1, merged, True))
    torch.library.opcheck(torch.ops.todi_ext.vocab_parallel_gradients.default,
                          (z, s, labels, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(0.5), -1, merged, sums,
                           torch.tensor(0.25), torch.tensor([0.5, 0.5], dtype=torch.float64), True, True, True))
    # One slice holding the whole row: the phases give the fused op's loss.
    per_row = 0.5 * sums[:, 0] + 0.5 * (merged[:, 5] - (sums[:, 3] - merged[:, 4]))
    fused = todi_ext.distill_loss(z, s, torch.tensor([3, -100, 1, 0, 39]), temperature=2.0, reduction="none",
                                  hard_label_weight=0.5, soft_label_weight=0.5)
    assert sums[1].eq(0).all() and sums[2, 3] == 0  # ignored row; label elsewhere: no logit
    torch.testing.assert_close(per_row[[0, 3, 4]].float(), fused[[0, 3, 4]], rtol=2e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"global_stats must be a contiguous \(5, 6\) float64"):
        torch.ops.todi_ext.vocab_parallel_partial_sums(z, s, labels, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(0.5), -1,
                                                       merged[:4], True)
    with pytest.raises(ValueError, match="with_hard_label_term needs labels"):
        torch.ops.todi_ext.vocab_parallel_partial_sums(z, s, None, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(0.5), -1,
                                                       merged, True)
    for labels_, hard, match in ((None, 0.5, "with_hard_label_term needs labels"), (labels, float("nan"), "must be finite")):
        with pytest.raises(ValueError, match=match):
            torch.ops.todi_ext.vocab_parallel_gradients(z, s, labels_, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(0.5), -1,
                                                        merged, sums, torch.tensor(0.25),
                                                        torch.tensor([0.5, hard], dtype=torch.float64), True, True, True)
    with pytest.raises(ValueError, match=r"label_weights must be a contiguous \(2,\) float64"):
        torch.ops.todi_ext.vocab_parallel_gradients(z, s, labels, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(0.5), -1, merged,
                                                    sums, torch.tensor(0.25), torch.tensor([0.5, 0.5]), True, True, True)
    with pytest.raises(ValueError, match="divergence 'akl' needs akl_gaps"):
        torch.ops.todi_ext.vocab_parallel_partial_sums(z, s, labels, "akl", _s(1.0), 0.1, 0.5, 0.5, _s(0.5), -1,
                                                       merged, True)
    with pytest.raises(ValueError, match="akl_gaps is only for divergence 'akl'"):
        torch.ops.todi_ext.vocab_parallel_partial_sums(z, s, labels, "todi", _s(1.0), 0.1, 0.5, 0.5, _s(0.5), -1,
                                                       merged, True, torch.zeros(5, 2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("akl_mu", [0.5, 0.15, 0.9])
def test_akl_phase_ops_on_one_slice_give_the_fused_split(dtype, akl_mu):
    # The whole row as one slice, the all-reduce the identity: the search
    # walks, the gaps and the weighted sums must give the fused kernel's
    # per-row AKL loss and gradients (the same math, the same roundings).
    from conftest import op_scalar as _s

    z, s = make_logits((6, 2100), dtype, seed=11), make_logits((6, 2100), dtype, seed=12)  # whole chunks and a partial
    labels = torch.tensor([3, -1, 40, 0, 39, 1000])
    inv_t = _s(0.5)
    stats = torch.ops.todi_ext.vocab_parallel_row_stats(z, s, labels, inv_t, -1, False)
    merged = td.merge_row_stats(stats.unsqueeze(0))
    gaps = td.akl_gaps_across_ranks(z, s, labels, inv_t, merged, akl_mu, dtype, lambda t: t)
    beta = _s(1.0)
    sums = torch.ops.todi_ext.vocab_parallel_partial_sums(z, s, labels, "akl", beta, 0.1, akl_mu, 0.5, inv_t, -1,
                                                          merged, False, gaps)
    grad_z, grad_s = torch.ops.todi_ext.vocab_parallel_gradients(
        z, s, labels, "akl", beta, 0.1, akl_mu, 0.5, inv_t, -1, merged, sums, torch.ones((), dtype=dtype),
        torch.tensor([1.0, 0.0], dtype=torch.float64), False, True, True, gaps)
    zf, sf = z.clone().requires_grad_(), s.clone().requires_grad_()
    fused = todi_ext.distill_loss(zf, sf, torch.tensor([3, -100, 40, 0, 39, 1000]), divergence="akl",
                                  akl_mu=akl_mu, temperature=2.0, reduction="none")
    fused.sum().backward()
    assert gaps[1].eq(0).all() and (gaps[[0, 2, 3, 4, 5]] > 0).all()  # the ignored row; a real split elsewhere
    torch.testing.assert_close(sums[:, 0].to(dtype), fused.detach(), rtol=0, atol=0)
    torch.testing.assert_close(grad_z, zf.grad, rtol=0, atol=0)
    torch.testing.assert_close(grad_s, sf.grad, rtol=0, atol=0)
    tail_key = torch.zeros(6, dtype=torch.int64)
    torch.library.opcheck(torch.ops.todi_ext.vocab_parallel_akl_walk.default,
                          (z, s, labels, inv_t, -1, merged, tail_key, 30))
    torch.library.opcheck(torch.ops.todi_ext.vocab_parallel_akl_gaps.default,
                          (z, s, labels, inv_t, -1, merged, tail_key))
    torch.library.opcheck(torch.ops.todi_ext.vocab_parallel_partial_sums.default,
                          (z, s, labels, "akl", beta, 0.1, akl_mu, 0.5, inv_t, -1, merged, False, gaps))
    bits = 62 if dtype == torch.float64 else 30
    with pytest.raises(ValueError, match=rf"remaining_bits must be in \[0, {bits}\]"):
        torch.ops.todi_ext.vocab_parallel_akl_walk(z, s, labels, inv_t, -1, merged, tail_key, bits + 1)
    with pytest.raises(ValueError, match=r"tail_key must be a contiguous \(6,\) int64"):
        torch.ops.todi_ext.vocab_parallel_akl_gaps(z, s, labels, inv_t, -1, merged, tail_key.int())


@pytest.mark.parametrize("divergence", ["todi", "akl"])
def test_undefined_rows_stay_nan_across_slices(divergence):
    # A NaN or +inf logit in one slice must make the whole row NaN on every
    # slice, as in the fused kernel (a merge that dropped the slice's NaN sum
    # once gave a finite, wrong loss); a slice that is all -inf adds nothing.
    from conftest import phases_on_slices, undefined_rows_across_slices

    z, s, undefined = undefined_rows_across_slices()
    labels = torch.tensor([1, 2, 3, 4, 5])
    loss, gz, gs = phases_on_slices(torch.ops.todi_ext, z, s, labels, [100, 100, 100], divergence, 2.0, 0.0, 1.0)
    assert torch.isnan(loss[undefined]).all() and torch.isnan(gz[undefined]).all() and torch.isnan(gs[undefined]).all()
    fused = todi_ext.distill_loss(z, s, labels, divergence=divergence, temperature=2.0, reduction="none")
    assert torch.isnan(fused[undefined]).all()
    # The defined rows: the float64 oracle, to the single-process accuracy.
    zd, sd = z[~undefined].double().requires_grad_(), s[~undefined].double().requires_grad_()
    oracle = todi_ext.reference.distill_loss(zd, sd, labels[~undefined], divergence=divergence, temperature=2.0,
                                             reduction="none")
    oracle.sum().backward()
    loss_rtol, loss_atol, grad_tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(loss[~undefined], oracle.detach(), rtol=loss_rtol, atol=loss_atol)
    assert_grad_close(gz[~undefined], zd.grad, grad_tol)
    assert_grad_close(gs[~undefined], sd.grad, grad_tol)
