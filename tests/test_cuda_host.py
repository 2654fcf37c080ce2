"""The CUDA kernels' own source, executed on the CPU.

tests/cuda_host/harness.cpp compiles csrc/cuda/streamed_kernel.cuh as C++
with the host emulation of csrc/cuda/host_emulation.h (each GPU thread a
fiber of a cooperative scheduler; __syncthreads, shuffles and cluster
barriers real barriers; shared memory per emulated block) into the library
`todi_cuda_host_harness` (ops torch.ops.todi_cuda_host) - a test harness, not
the extension - and these tests run every kernel variant, under two
schedules, against the float64 oracle and the CPU kernel. What this cannot check: the hardware's
own arithmetic (ex2/rcp approximations; host code uses libm), timing and real
memory races (the ThreadSanitizer build below runs every GPU thread as an OS
thread to look for those); tests/test_cuda.py does that on a GPU.
"""

import glob
import os
import sys

import pytest
import torch

import todi_ext
from todi_ext import reference

from conftest import (TOLERANCES, assert_grad_close, make_labels, make_logits, phases_on_slices,
                      undefined_rows_across_slices)

# The slow tier (pytest -m "not slow" skips it): the harness build and ~660 emulated launches.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIVERGENCES = ["todi", "fkl", "rkl", "tvd", "skl", "srkl", "gjsd", "akl"]
# (kernel, CTAs per cluster): the streamed kernel (one block per row), or the
# register-row kernel with the row in one CTA or split over a cluster of 2 or 4.
# A "registers" call whose arguments the kernel does not serve (float64, a
# teacher gradient, misaligned rows) runs the streamed kernel, as the real
# launch does; harness.last_kernel() says which ran.
VARIANTS = [("streamed", 1), ("registers", 1), ("registers", 2), ("registers", 4)]
KW = dict(temperature=2.0, ignore_index=-100)


def _cuda_include_dir():
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    candidates += glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*"))
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_bf16.h")):
            return os.path.join(c, "include")
    return None


@pytest.fixture(scope="module")
def harness_library():
    include = _cuda_include_dir()
    if include is None:
        pytest.skip("no CUDA headers (cuda_bf16.h) to compile the kernel source against")
    from torch.utils.cpp_extension import load

    # TODI_EXT_HOST_SANITIZE=thread: a ThreadSanitizer build (run pytest with
    # LD_PRELOAD=$(gcc -print-file-name=libtsan.so); the compiler fails under
    # that preload, so run once without it to build); slow, kept out of CI.
    # Sanitizers see OS threads, not fibers: such a build emulates every GPU
    # thread as one (TODI_EXT_HOST_OS_THREADS).
    sanitize = os.environ.get("TODI_EXT_HOST_SANITIZE", "")
    name = "todi_cuda_host_harness" + (f"_{sanitize}" if sanitize else "")
    build = os.path.join(ROOT, "build", name)
    os.makedirs(build, exist_ok=True)
    san = [f"-fsanitize={sanitize}", "-g"] if sanitize else []
    # Else fibers, whose stack switch a CET shadow stack would refuse.
    threads = ["-DTODI_EXT_HOST_OS_THREADS"] if sanitize else ["-fcf-protection=none"]
    flags = san + threads + ["-std=c++20", "-O1", "-DTODI_EXT_HOST_EMULATION", "-Wno-attributes", "-ffp-contract=off",
             "-DTORCH_TARGET_VERSION=0x020a000000000000",  # the stable ABI, as the extension's own build
             # as in the real build (CMakeLists.txt): c10::Half and __half must not both convert implicitly
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    load(name=name, extra_ldflags=san, is_python_module=False,
         sources=[os.path.join(ROOT, "tests", "cuda_host", "harness.cpp"), os.path.join(ROOT, "csrc", "ops", "op_common.cpp")],
         extra_include_paths=[os.path.join(ROOT, "csrc", d) for d in ("ops", "include", "cuda")] + [include],
         extra_cflags=flags, build_directory=build)
    return torch.ops.todi_cuda_host  # the harness's ops (registered by loading the library)


@pytest.fixture(scope="module", params=["oldest", "newest"])
def harness(harness_library, request):
    """The harness, its emulated threads run oldest or newest first (a
    missing barrier can hide under one order: host_emulation.h)."""
    if not harness_library.uses_fibers():
        if request.param != "oldest":
            pytest.skip("OS threads (a sanitizer build) have no schedule to set")
        yield harness_library
        return
    harness_library.set_schedule(request.param)
    yield harness_library
    harness_library.set_schedule("oldest")


ENTRIES_PER_THREAD = 32  # of each row, in the register-row kernel


def fits_registers(vocab, dtype):
    """Whether a cluster of at most 16 CTAs holds the row (the launch's rule)."""
    return vocab <= 16 * 256 * ENTRIES_PER_THREAD


def register_threads(vocab, dtype, parts, threads=64):
    """Threads per CTA for the register-row kernel: `threads` (at most 256),
    or more where a cluster of `parts` CTAs would not hold the row (in
    16-byte words, the last one maybe partial)."""
    per_vector = 16 // torch.empty((), dtype=dtype).element_size()
    vectors_per_thread = ENTRIES_PER_THREAD // per_vector
    needed = -(-(-(-vocab // per_vector)) // (parts * vectors_per_thread))
    threads = max(min(threads, 256), -(-needed // 32) * 32)
    assert threads <= 256, f"{parts} CTAs cannot hold {vocab} entries"
    return threads


def with_aligned_rows(t):
    """The same values, each row starting on a 16-byte boundary (storage
    padded to a multiple of 8 entries): rows the register-row kernel serves
    whatever the vocabulary."""
    vocab = t.shape[-1]
    padded = torch.full((*t.shape[:-1], -(-vocab // 8) * 8), float("nan"), dtype=t.dtype)
    padded[..., :vocab] = t
    return padded[..., :vocab]


def expected_kernel(variant, z, s, teacher_grad):
    """The kernel a call runs: register rows for one 16/32-bit dtype, 16-byte aligned rows, no teacher gradient."""
    aligned = all(t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0
                                                  for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
                  for t in (z, s))
    ok = variant == "registers" and z.dtype == s.dtype and z.dtype != torch.float64 and aligned and not teacher_grad
    return "registers" if ok and fits_registers(z.shape[-1], z.dtype) else "streamed"


def host_forward(h, z, s, labels, divergence, variant="streamed", parts=1, threads=64, blocks=2, teacher_grad=None,
                 reduction="none", temperature=KW["temperature"], soft_label_weight=1.0, hard_label_weight=0.0,
                 keep_layout=False, **params):
    """The harness's forward. With variant "registers" the rows are copied to
    16-byte aligned storage (unless keep_layout) and only the student's
    gradient is asked for (unless teacher_grad), so the register-row kernel
    runs; the test fails if another kernel ran than the launch rule says."""
    p = dict(beta=1.0, skew_lambda=0.1, akl_mu=0.5, jsd_beta=0.5)
    p.update(params)
    if teacher_grad is None:
        teacher_grad = variant != "registers"
    if variant == "registers" and z.dtype != torch.float64 and fits_registers(z.shape[-1], z.dtype):
        threads = register_threads(z.shape[-1], z.dtype, parts, threads)
        if not keep_layout:
            z, s = with_aligned_rows(z), with_aligned_rows(s)
    out = h.distill_forward(z, s, labels, divergence, p["beta"], p["skew_lambda"], p["akl_mu"], p["jsd_beta"],
                            temperature, KW["ignore_index"], reduction, True, teacher_grad, variant, threads,
                            blocks, parts, soft_label_weight, hard_label_weight)
    assert h.last_kernel() == expected_kernel(variant, z, s, teacher_grad)
    return out


def oracle(z, s, labels, divergence, reduction="none", **params):
    """Loss and the gradients of the reduced loss ("none": of the sum), float64."""
    zd, sd = z.double().requires_grad_(), s.double().requires_grad_()
    loss = reference.distill_loss(zd, sd, labels, divergence=divergence, reduction=reduction, **KW, **params)
    loss.sum().backward()
    return loss.detach(), zd.grad, sd.grad


def assert_matches(result, expected, dtype):
    loss_rtol, loss_atol, grad_tol = TOLERANCES[dtype]
    torch.testing.assert_close(result[0].double(), expected[0], rtol=loss_rtol, atol=loss_atol)
    assert_grad_close(result[1], expected[1], grad_tol)
    if result[2].numel():
        assert_grad_close(result[2], expected[2], grad_tol)


def cpu_kernel(z, s, labels, divergence, reduction="none", **params):
    zc, sc = z.clone().requires_grad_(), s.clone().requires_grad_()
    loss = todi_ext.distill_loss(zc, sc, labels, divergence=divergence, reduction=reduction, **KW, **params)
    loss.sum().backward()
    return loss.detach(), zc.grad, sc.grad


@pytest.mark.parametrize("variant,parts", VARIANTS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_and_variant_matches_the_oracle_and_the_cpu_kernel(harness, divergence, variant, parts):
    z, s = make_logits((5, 1003)), make_logits((5, 1003), seed=3)
    labels = make_labels((5,), ignore_fraction=0.3)
    got = host_forward(harness, z, s, labels, divergence, variant, parts)
    assert_matches(got, oracle(z, s, labels, divergence), torch.float32)
    assert_matches(got, tuple(t.double() for t in cpu_kernel(z, s, labels, divergence)), torch.float32)


@pytest.mark.parametrize("variant,parts", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("divergence", ["todi", "akl", "gjsd"])
def test_dtypes(harness, dtype, divergence, variant, parts):
    z, s = make_logits((4, 777), dtype), make_logits((4, 777), dtype, seed=1)
    labels = torch.tensor([3, -100, 5, 7])
    got = host_forward(harness, z, s, labels, divergence, variant, parts, jsd_beta=0.3 if divergence == "gjsd" else 0.5)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    params = {"jsd_beta": 0.3} if divergence == "gjsd" else {}
    assert_matches(got, oracle(z, s, labels, divergence, **params), dtype)


@pytest.mark.parametrize("divergence", ["todi", "akl"])
def test_mixed_dtypes_use_the_generic_kernel(harness, divergence):
    z, s = make_logits((3, 501), torch.bfloat16), make_logits((3, 501), torch.float32, seed=2)
    got = host_forward(harness, z, s, None, divergence, "streamed")
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    expected = oracle(z, s, None, divergence)
    loss_rtol, loss_atol, _ = TOLERANCES[torch.float32]
    torch.testing.assert_close(got[0].double(), expected[0], rtol=loss_rtol, atol=loss_atol)
    assert_grad_close(got[1], expected[1], TOLERANCES[torch.bfloat16][2])
    assert_grad_close(got[2], expected[2], TOLERANCES[torch.float32][2])


@pytest.mark.parametrize("variant,parts", VARIANTS)
@pytest.mark.parametrize("layout", ["shifted_3d", "misaligned_head", "different_offsets", "aligned_shifted_3d",
                                    "aligned_with_a_tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_layouts(harness, layout, dtype, variant, parts):
    # The register-row kernel serves the rows that start on 16-byte boundaries
    # (the last two layouts), whatever their stride; the others stream.
    # aligned_with_a_tail: 1203 entries, 3 past the last 16-byte word, and a
    # gradient whose rows are not aligned (scalar stores).
    width = 1208 if layout.startswith("aligned") else 1203
    base_z, base_s = make_logits((2, 4, width), dtype), make_logits((2, 4, width), dtype, seed=1)
    if layout == "aligned_shifted_3d":
        z, s = base_z[:, :-1], base_s[:, :-1]
    elif layout == "aligned_with_a_tail":
        z, s = base_z[..., :1203], base_s[..., :1203]
    elif layout == "shifted_3d":  # logits[:, :-1]: rows at the base's stride, in place
        z, s = base_z[:, :-1], base_s[:, :-1]
    elif layout == "misaligned_head":  # both rows start one element past a 16-byte boundary
        z, s = base_z[..., 1:], base_s[..., 1:]
    else:  # student and teacher misaligned differently: the kernels fall back to scalar loads
        z, s = base_z[..., 1:], base_s[..., :-1]
    labels = make_labels(z.shape[:-1], ignore_fraction=0.2)
    got = host_forward(harness, z, s, labels, "todi", variant, parts, keep_layout=True)
    assert_matches(got, oracle(z, s, labels, "todi"), dtype)


@pytest.mark.parametrize("variant,parts", VARIANTS)
def test_undefined_rows_are_nan_and_infinite_entries_are_left_out(harness, variant, parts):
    from test_parity import nan_among_infinities

    z, s = nan_among_infinities(rows=3, vocab=1024)
    extra_z, extra_s = make_logits((4, 1024), seed=7), make_logits((4, 1024), seed=8)
    extra_z[0] = float("-inf")              # all -inf: undefined
    extra_s[1, 9] = float("inf")            # a +inf logit: undefined
    extra_z[2, 100] = float("nan")          # a NaN: undefined
    extra_s[3, ::3] = float("-inf")         # -inf entries: left out, the row stays finite
    z, s = torch.cat([z, extra_z]), torch.cat([s, extra_s])
    for divergence in ("todi", "akl"):
        loss, gz, _ = host_forward(harness, z, s, None, divergence, variant, parts)
        undefined = torch.tensor([False, True, True, True, True, True, False])
        assert torch.isnan(loss[undefined]).all() and torch.isfinite(loss[~undefined]).all(), (divergence, loss)
        assert torch.isnan(gz[undefined]).all() and torch.isfinite(gz[~undefined]).all()
        expected = oracle(z[~undefined], s[~undefined], None, divergence)
        torch.testing.assert_close(loss[~undefined].double(), expected[0], rtol=2e-5, atol=1e-6)
        assert_grad_close(gz[~undefined], expected[1], TOLERANCES[torch.float32][2])


@pytest.mark.parametrize("variant,threads,parts", [("streamed", 32, 1), ("streamed", 160, 1), ("streamed", 512, 1),
                                                   ("registers", 32, 4), ("registers", 160, 1), ("registers", 256, 2)])
def test_block_sizes(harness, variant, threads, parts):
    # V = 2500 float32: 625 words of 16 bytes, 8 a thread; 64 threads x 4
    # CTAs hold them with 40% of the slots empty, 160 threads in one CTA too.
    z, s = make_logits((3, 2500)), make_logits((3, 2500), seed=4)
    got = host_forward(harness, z, s, None, "todi", variant, parts, threads=threads, blocks=1)
    assert_matches(got, oracle(z, s, None, "todi"), torch.float32)


@pytest.mark.parametrize("vocab,dtype,parts", [(128256, torch.bfloat16, 16), (32000, torch.bfloat16, 4),
                                               (262144, torch.bfloat16, 0), (128256, torch.float32, 16),
                                               (8193, torch.float32, 2)])
def test_the_launch_shape_of_llm_vocabularies(harness, vocab, dtype, parts):
    # The launch's rule (register_row_shape): the smallest cluster whose
    # 256-thread CTAs hold the row at 32 entries a thread; none above 16 CTAs
    # (the streamed kernel). The shape runs on one row against the oracle.
    elem = torch.empty((), dtype=dtype).element_size()
    got_parts, threads = harness.register_row_shape(vocab, elem)
    assert got_parts == parts
    n = ENTRIES_PER_THREAD
    if parts:
        assert threads % 32 == 0 and threads <= 256 and parts * threads * n >= vocab
        assert threads - 32 < -(-vocab // (parts * n)) and (parts == 1 or (parts // 2) * 256 * n < vocab)
    z, s = make_logits((1, vocab), dtype, seed=41), make_logits((1, vocab), dtype, seed=42)
    labels = torch.tensor([vocab - 1])
    for divergence in ("todi", "akl") if vocab <= 32000 else ("todi",):  # AKL's walks at V = 128256: a minute here
        got = host_forward(harness, z, s, labels, divergence, "registers", max(parts, 1), threads=threads or 64,
                           blocks=1, hard_label_weight=0.5, soft_label_weight=0.5)
        zd = z.double().requires_grad_()
        ref = reference.distill_loss(zd, s.double(), labels, divergence=divergence, reduction="none",
                                     hard_label_weight=0.5, soft_label_weight=0.5, **KW)
        ref.sum().backward()
        assert_matches(got, (ref.detach(), zd.grad, torch.empty(0)), dtype)


@pytest.mark.parametrize("variant,parts", VARIANTS)
def test_mean_reduction_scales_the_gradient(harness, variant, parts):
    z, s = make_logits((6, 800)), make_logits((6, 800), seed=5)
    labels = torch.tensor([1, -100, 2, 3, -100, 4])
    got = host_forward(harness, z, s, labels, "fkl", variant, parts, reduction="mean")
    assert_matches(got, oracle(z, s, labels, "fkl", reduction="mean"), torch.float32)


def test_ignored_rows_give_exact_zeros(harness):
    z, s = make_logits((4, 600), torch.bfloat16), make_logits((4, 600), torch.bfloat16, seed=1)
    labels = torch.tensor([-100, 1, -100, 2])
    for variant, parts in VARIANTS:
        loss, gz, gs = host_forward(harness, z, s, labels, "todi", variant, parts)
        assert (loss[[0, 2]] == 0).all() and (gz[[0, 2]] == 0).all()
        assert gs.numel() == 0 if variant == "registers" else (gs[[0, 2]] == 0).all()


def test_rows_split_over_a_cluster_are_bitwise_deterministic(harness):
    z, s = make_logits((4, 1501)), make_logits((4, 1501), seed=6)
    runs = [host_forward(harness, z, s, None, "akl", "registers", 4, blocks=b) for b in (1, 2, 1)]
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, runs[0]))


@pytest.mark.parametrize("double_math", [False, True])
def test_the_cuda_ops_count_of_the_means_positions(harness, double_math):
    # The CUDA op counts the labels that are not ignore_index with ATen ops
    # (no host sync; the CPU op loops): run here on CPU tensors, an ignore_index
    # beyond float64's integers included (it is passed exactly), at least 1.
    big = 2**60 + 1
    for labels, ignore, expected in [(torch.tensor([3, -100, 5, -100, 7]), -100, 3),
                                     (torch.tensor([big, big - 1, 0]), big, 2),
                                     (torch.full((4,), -100), -100, 1)]:
        count = harness.count_positions(labels, ignore, double_math)
        assert count.dtype == (torch.float64 if double_math else torch.float32) and count.dim() == 0
        assert count.item() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("per_row", [True, False])
def test_scale_grad(harness, dtype, in_place, per_row):
    grad = make_logits((2, 3, 700), dtype)[:, :, :650]  # rows at leading strides
    if not in_place:
        grad = grad.contiguous()[:, :-1]
    grad = grad if not in_place else grad.contiguous()
    scale = torch.tensor([[1.0, 0.5, -2.0], [3.0, 1.0, 0.25]])[:, : grad.shape[1]] if per_row else torch.tensor(0.5)
    scale = scale.to(torch.float64 if dtype == torch.float64 else torch.float32)
    math = torch.float64 if dtype == torch.float64 else torch.float32  # the kernel's arithmetic
    expected = (grad.to(math) * (scale.to(math)[..., None] if per_row else scale.to(math))).to(dtype)
    original = grad.clone()
    if in_place:
        harness.scale_grad_(grad, scale, 64, 2)
        assert torch.equal(grad, expected)
    else:
        out = harness.scale_grad(grad, scale, 64, 2)
        assert torch.equal(out, expected) and torch.equal(grad, original)


@pytest.mark.parametrize("variant,parts", VARIANTS)
@pytest.mark.parametrize("scale,temperature", [(40.0, 1.0), (3.0, 1e-6), (3.0, 1e-10)])
def test_as_accurate_as_the_best_float32_formulation(harness, variant, parts, scale, temperature):
    # Large logits (max and log-sum kept apart) and a temperature whose
    # reciprocal is inexact (every pass forms x / T as the same rounded
    # product; at 1e-10 an exact FMA product overflowed the max lane's exp).
    z, s = make_logits((4, 3000), scale=scale, seed=21), make_logits((4, 3000), scale=scale, seed=22)
    kw = dict(divergence="todi", temperature=temperature, reduction="none")
    zd = z.double().requires_grad_()
    ref = reference.distill_loss(zd, s.double(), **kw)
    ref.sum().backward()
    zf = z.clone().requires_grad_()
    best = reference.distill_loss(zf, s, **kw)
    best.sum().backward()
    loss, grad, _ = host_forward(harness, z, s, None, "todi", variant, parts, temperature=temperature,
                                 teacher_grad=False)
    best_loss_err = float((best.detach().double() - ref.detach()).abs().max())
    best_grad_err = float((zf.grad.double() - zd.grad).norm())
    assert float((loss.double() - ref.detach()).abs().max()) <= 4 * best_loss_err + 1e-6 * float(ref.detach().abs().max())
    assert float((grad.double() - zd.grad).norm()) <= 4 * best_grad_err + 1e-6 * float(zd.grad.norm())


@pytest.mark.parametrize("vocab,scale,temperature", [(v, scale, t) for v in (1000, 32000) for scale in (3.0, 40.0)
                                                       for t in (1.0, 2.0)])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_register_rows_are_as_accurate_as_the_best_float32_formulation(harness, divergence, vocab, scale, temperature):
    # tests/test_accuracy.py's bound for the CUDA default: the fused error
    # against float64 at most 4x the eager float32 formulation's plus 1e-6 of
    # the value. p and q are products of kept exponentials here, not exp(log
    # p) (on the CPU that rounding raised the worst ratio to 3.65: NOTES).
    # The host's exp and reciprocal are libm's, not the GPU's ex2/rcp.
    rows = 4
    z = make_logits((rows, vocab), scale=scale, seed=11)
    s = make_logits((rows, vocab), scale=scale, seed=12)
    labels = make_labels((rows,), ignore_fraction=0.0)
    kw = dict(divergence=divergence, temperature=temperature, reduction="none")
    zd = z.double().requires_grad_()
    ref = reference.distill_loss(zd, s.double(), labels, **kw)
    ref.sum().backward()
    zf = z.clone().requires_grad_()
    best = reference.distill_loss(zf, s, labels, **kw)
    best.sum().backward()
    loss, grad, _ = host_forward(harness, z, s, labels, divergence, "registers", 4 if vocab > 8192 else 1,
                                 temperature=temperature)
    best_loss_err = float((best.detach().double() - ref.detach()).abs().max())
    best_grad_err = float((zf.grad.double() - zd.grad).norm())
    loss_err = float((loss.double() - ref.detach()).abs().max())
    grad_err = float((grad.double() - zd.grad).norm())
    assert loss_err <= 4 * best_loss_err + 1e-6 * float(ref.detach().abs().max()), (loss_err, best_loss_err)
    assert grad_err <= 4 * best_grad_err + 1e-6 * float(zd.grad.norm()), (grad_err, best_grad_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("divergence", ["todi", "akl"])
def test_register_rows_take_finfo_min_masks_as_minus_infinity(harness, divergence, temperature, dtype):
    # Hugging Face masks with finfo(dtype).min: (x - max) log2(e) / T then
    # overflows to -inf, and the exponent's rounding correction to +inf/NaN;
    # the entry must drop out as a -inf one does (the cross-entropy at T != 1
    # takes the same path at T = 1).
    z, s = make_logits((3, 504), dtype), make_logits((3, 504), dtype, seed=1)
    masked = torch.zeros(504, dtype=torch.bool)
    masked[::7] = True
    labels = torch.tensor([1, 2, 3])
    results = []
    for fill in (torch.finfo(dtype).min, float("-inf")):
        loss, grad, _ = host_forward(harness, z.masked_fill(masked, fill), s.masked_fill(masked, fill), labels,
                                     divergence, "registers", 1, temperature=temperature, hard_label_weight=0.5,
                                     soft_label_weight=0.5)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        results.append((loss, grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2e-6, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-9)


def test_register_rows_with_threads_past_the_row_and_log_probability_inputs(harness):
    # V = 100 float32 in 32 threads: threads 25-31 hold no entry (their
    # maxima -inf, reference 0). Log-probability rows have their max at
    # exactly 0 and (the teacher's, shifted) far below it: a thread with no
    # entry must neither claim the student's peak (its max "equals" 0) nor
    # scale by 2^((0 - max) / T) (overflow: NaN gradients).
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 100, generator=g) * 2 - 8
    z[:, 17] = 0.0  # the peak, probability > 3/4
    s = torch.log_softmax(torch.randn(4, 100, generator=g) * 3, -1) - 100
    for divergence in ("todi", "tvd"):
        loss, grad, _ = host_forward(harness, z, s, None, divergence, "registers", 1, threads=32, temperature=1.0)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        zd = z.double().requires_grad_()
        ref = reference.distill_loss(zd, s.double(), divergence=divergence, temperature=1.0, reduction="none")
        ref.sum().backward()
        assert_matches((loss, grad, torch.empty(0)), (ref.detach(), zd.grad, None), torch.float32)


@pytest.mark.parametrize("temperature", [1e-8, 1e-10, 1e-12])
@pytest.mark.parametrize("divergence", ["todi", "akl", "fkl"])
def test_register_rows_keep_the_peak_entry_at_tiny_temperatures(harness, divergence, temperature):
    # tests/test_accuracy.py's case for the register-row kernel: the student's
    # argmax entry has gradient ~ +1/T, which (u - q U) / T loses entirely.
    z, s = make_logits((4, 50), seed=1), make_logits((4, 50), seed=2)
    labels = make_labels((4,), ignore_fraction=0.0, num_classes=50)
    kw = dict(temperature=temperature, hard_label_weight=0.5)
    loss, grad, _ = host_forward(harness, z, s, labels, divergence, "registers", 1, reduction="mean", **kw)
    zd = z.double().requires_grad_()
    reference.distill_loss(zd, s.double(), labels, divergence=divergence, **kw).backward()
    assert zd.grad.abs().max() > 0.1 / temperature
    assert_grad_close(grad, zd.grad, TOLERANCES[torch.float32][2])


@pytest.mark.parametrize("variant,parts", VARIANTS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["todi", "fkl", "akl"])
def test_hard_label_cross_entropy_in_the_same_pass(harness, divergence, dtype, temperature, variant, parts):
    # 0.5 CE (T = 1) + 0.5 divergence (T): the CE's log-sum-exp is pass 1's
    # at T = 1 and a third one otherwise; its one-hot gradient is written by
    # the block whose slice holds the label (labels near both ends too).
    z, s = make_logits((5, 1003), dtype, seed=4), make_logits((5, 1003), dtype, seed=5)
    labels = torch.tensor([0, -100, 1002, 517, 3])
    weights = dict(hard_label_weight=0.5, soft_label_weight=0.5)
    for reduction in ("none", "mean"):
        got = host_forward(harness, z, s, labels, divergence, variant, parts, reduction=reduction,
                           temperature=temperature, **weights)
        zd, sd = z.double().requires_grad_(), s.double().requires_grad_()
        ref = reference.distill_loss(zd, sd, labels, divergence=divergence, reduction=reduction,
                                     temperature=temperature, ignore_index=-100, **weights)
        ref.sum().backward()
        assert_matches(got, (ref.detach(), zd.grad, sd.grad), dtype)


@pytest.mark.parametrize("variant,parts", VARIANTS)
def test_hard_label_outside_the_vocabulary_gives_a_nan_row(harness, variant, parts):
    # The CUDA op cannot check labels without a host sync: the row is NaN.
    z, s = make_logits((3, 300)), make_logits((3, 300), seed=1)
    labels = torch.tensor([5, 300, -7])
    loss, grad, _ = host_forward(harness, z, s, labels, "todi", variant, parts, hard_label_weight=1.0)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1:]).all()


# ------------------------------------------- vocabulary-parallel phases
@pytest.mark.parametrize("variant,parts,dtype", [("streamed", 1, torch.float32), ("streamed", 1, torch.float64),
                                                 ("streamed", 1, torch.bfloat16)])
@pytest.mark.parametrize("divergence", DIVERGENCES + ["js"])
def test_vocab_parallel_phases_give_the_whole_rows_results(harness, divergence, variant, parts, dtype):
    # Three slices of unequal size, labels at every slice edge and an ignored
    # row, the hard-label CE at T != 1: the CUDA kernel's phases (as the CUDA
    # phase ops launch them) against the float64 oracle on the whole rows, and
    # the CPU kernel's phases (float64: to 1e-9).
    vocab, sizes = 1003, [401, 301, 301]
    z, s = make_logits((6, vocab), dtype, seed=31), make_logits((6, vocab), dtype, seed=32)
    labels = torch.tensor([0, 400, 401, -100, 702, 1002])
    kw = dict(temperature=2.0, hard_label_weight=0.3, soft_label_weight=0.7, akl_mu=0.4 if divergence == "akl" else 0.5)
    harness.set_phase_launch(variant, 64, 2, parts)
    got = phases_on_slices(harness, z, s, labels, sizes, divergence, **kw)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    zd, sd = z.double().requires_grad_(), s.double().requires_grad_()
    params = {"akl_mu": 0.4} if divergence == "akl" else {}
    ref = reference.distill_loss(zd, sd, labels, divergence=divergence, reduction="none", temperature=2.0,
                                 hard_label_weight=0.3, soft_label_weight=0.7, **params)

    ref.sum().backward()
    assert_matches(got, (ref.detach(), zd.grad, sd.grad), dtype)
    if dtype == torch.float64:
        cpu = phases_on_slices(torch.ops.todi_ext, z, s, labels, sizes, divergence, **kw)
        for a, b in zip(got, cpu):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence", ["todi", "akl"])
def test_vocab_parallel_undefined_rows_stay_nan_across_slices(harness, divergence):
    # The CUDA kernel's slice statistics must carry a NaN logit into the merge
    # (its pass-1 max ignores NaN; the sum does not) as the CPU kernel's do.
    z, s, undefined = undefined_rows_across_slices()
    labels = torch.tensor([1, 2, 3, 4, 5])
    harness.set_phase_launch("streamed", 64, 2, 1)
    got = phases_on_slices(harness, z, s, labels, [100, 100, 100], divergence, 2.0, 0.0, 1.0)
    cpu = phases_on_slices(torch.ops.todi_ext, z, s, labels, [100, 100, 100], divergence, 2.0, 0.0, 1.0)
    for t in (*got, *cpu):
        assert torch.isnan(t[undefined]).all() and torch.isfinite(t[~undefined]).all()
    expected = oracle(z[~undefined], s[~undefined], labels[~undefined], divergence)
    assert_matches(tuple(t[~undefined] for t in got), expected, torch.float32)


def test_a_barrier_some_threads_never_reach_is_an_error_not_a_hang(harness):
    if not harness.uses_fibers():
        pytest.skip("OS threads (a sanitizer build, or not x86-64 Linux) would hang")
    harness.launch_divergent_barrier(64, 64)  # every thread arrives
    with pytest.raises(RuntimeError, match="5 of 64 threads wait at a barrier that the others never reach"):
        harness.launch_divergent_barrier(64, 5)


@pytest.mark.parametrize("threads", [64, 256])
def test_newest_first_shows_a_barrier_missing_after_a_shared_read(harness_library, threads):
    if not harness_library.uses_fibers():
        pytest.skip("OS threads (a sanitizer build, or not x86-64 Linux) have no schedule to set")
    out = torch.zeros(threads)
    harness_library.block_sums_missing_a_barrier(out, "newest")
    assert (out != threads).any(), "no warp overwrote a shared sum before the others read it"
