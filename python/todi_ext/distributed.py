"""Vocabulary-parallel distillation on torch.distributed: each rank holds the
logits of a contiguous slice of the vocabulary (a column-parallel lm_head,
Megatron-style), and no rank ever gathers whole rows.

    import todi_ext.distributed as td
    loss = td.vocab_parallel_distill_loss(student_logits, teacher_logits, labels, group=tp_group)

Per call (forward; the backward needs no collective):
  0. one all-gather of 17 int64 per rank: shapes, dtypes, the divergence
     and its parameters, the label weights, a checksum of the labels and a
     flag for a rank whose own inputs were rejected, so that mismatched ranks
     all raise a ValueError instead of hanging in the collectives below;
  1. the kernel's row statistics on the local slice: (max, sum exp(x - max))
     of z/T, s/T (and z, for the hard-label cross-entropy), then one
     all-gather of those (N, 6) float64 values, merged on every rank into the
     whole rows' log-sum-exps;
  2. the kernel's partial sums given them (loss, U = sum u, V = sum v, the
     label's logit where this slice holds it), then one all-reduce (sum) of
     those (N, 4) float64 values;
  3. the local gradient, (u - q U) / T on this slice, from the global sums.
Every rank returns the same loss; each gets the gradient of its own slice.
AKL adds its head/tail split between steps 1 and 2 (see akl_gaps_across_ranks): the
split is a search over the whole rows' probabilities (math::AklTailSearch),
one all-reduce of (N, 15) float64 per walk - 8 walks in float32 math, 16 in
float64 - and one of (N, 2) for the head's and tail's sums of |p - q|;
2 + 9 = 11 collectives per step in float32 in all, every one O(N).
CPU tensors (gloo) and CUDA tensors (NCCL; the phase kernels are the CUDA
kernel's, verified in its host emulation here, not yet on a GPU). The
collectives are functional collectives, so a step that calls this compiles
with fullgraph=True; under
torch.compile the agreement check of step 0 cannot read the table on the
host (that would break the graph): a mismatch fails torch._assert_async
instead, on every rank, with a message that cannot name the field.
"""

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import Tensor

from . import _validation, ops

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_DIVERGENCE_CODES = {name: i for i, name in enumerate(_validation.DIVERGENCES)}
_REDUCTION_CODES = {name: i for i, name in enumerate(_validation.REDUCTIONS)}
# The agreement table's columns: integers, then floats as the bits of their
# float64 values, then the bad-input flag.
_INT_META = ("rows", "vocab slice", "student dtype", "teacher dtype", "divergence", "reduction", "labels given",
             "ignore_index", "labels")
_FLOAT_META = ("temperature", "beta", "skew_lambda", "akl_mu", "jsd_beta", "soft_label_weight", "hard_label_weight")
_META = _INT_META + _FLOAT_META
_CODE_NAMES = {"student dtype": list(_DTYPE_CODES), "teacher dtype": list(_DTYPE_CODES),
               "divergence": list(_DIVERGENCE_CODES), "reduction": list(_REDUCTION_CODES)}
_BAD_INPUT = len(_META)  # set by a rank whose own inputs were rejected: the others raise too
_META_SIZE = len(_META) + 1
_LOCAL_IGNORE = -1  # the phase ops' ignore_index: local labels are >= 0


# all_gather_tensor is deprecated (torch 2.14) in favour of all_gather_single,
# which older releases in our range may lack.
_gather_dim0 = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor


def _all_gather(t: Tensor, group) -> Tensor:
    """(world, *t.shape): every rank's t."""
    gathered = _gather_dim0(t.contiguous(), 0, group)
    return gathered.view(dist.get_world_size(group), *t.shape)


_COMPILED_MISMATCH = (
    "vocab_parallel_distill_loss: ranks disagree on rows, dtypes, the divergence or its parameters, the "
    "temperature, reduction, ignore_index, label weights or labels, or a hard label is outside [0, V_total) (this "
    "check runs inside a compiled graph and cannot say which: call it once without torch.compile to see)"
)


def _logical_shift(x: Tensor, bits: int) -> Tensor:
    """x >> bits on int64 as an unsigned shift (torch's >> keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_MIX1, _MIX2, _GOLDEN = _as_int64(0xBF58476D1CE4E5B9), _as_int64(0x94D049BB133111EB), _as_int64(0x9E3779B97F4A7C15)


def _labels_hash(labels: Tensor) -> Tensor:
    """One int64 that differs between two label tensors of the same size
    unless they are equal (or with probability ~2^-63): sum of label_i * r_i
    modulo 2^64, r_i odd and pseudo-random per position (splitmix64 of i).
    A sum of the labels, or of i * label_i, misses differences such as
    (+1, -2, +1) at three neighbouring positions; this does not."""
    flat = labels.reshape(-1).to(torch.int64)
    x = torch.arange(flat.numel(), dtype=torch.int64, device=flat.device) * _GOLDEN + _GOLDEN
    x = (x ^ _logical_shift(x, 30)) * _MIX1
    x = (x ^ _logical_shift(x, 27)) * _MIX2
    x = x ^ _logical_shift(x, 31)
    return (flat * (x | 1)).sum()


def _float_bits(values, like: Tensor) -> Tensor:
    """The float64 bits (as int64) of values, each made a 0-dim tensor by a
    fill (ops.scalar_tensor), so that under torch.compile a changing value
    is a graph input, not a constant that recompiles the graph. + 0.0 makes
    -0.0 into 0.0: equal values, equal bits."""
    floats = torch.stack([ops.scalar_tensor(v, like) for v in values]) + 0.0
    return floats.view(torch.int64)


def _report_bad_input(student, group):
    """This rank's inputs failed validation: its part of the agreement
    all-gather, flagged, so the other ranks raise instead of waiting."""
    device = student.device if isinstance(student, Tensor) else None
    if device is None or device.type not in ("cpu", "cuda"):  # e.g. meta: nothing a collective can send
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    meta = torch.zeros(_META_SIZE, dtype=torch.int64, device=device)
    meta[_BAD_INPUT] = 1
    fc.wait_tensor(_all_gather(meta, group))  # nobody reads it here: wait, so the collective completes


def _describe(name, column: Tensor):
    """A column of the agreement table, by rank, as the user wrote it."""
    if name in _FLOAT_META:
        return column.contiguous().view(torch.float64).tolist()
    values = column.tolist()
    if name in _CODE_NAMES:
        return [_CODE_NAMES[name][v] if 0 <= v < len(_CODE_NAMES[name]) else v for v in values]
    return values


def _agreement(agree: Tensor, value: Tensor, message: str) -> Tensor:
    """todi_ext::vocab_parallel_agreement's kernel (CPU and CUDA)."""
    if agree.device.type == "cpu":
        if not bool(agree):
            raise RuntimeError(message)
    else:
        torch._assert_async(agree, message)
    return value.clone()


torch.library.impl("todi_ext::vocab_parallel_agreement", ["cpu", "cuda"], _agreement)


def _check_ranks_agree(student, teacher, labels, divergence, reduction, ignore_index, scalars, inv_t, group):
    """Step 0: gathers what every rank must agree on; returns the slice sizes
    (a tensor, one per rank) and inv_t, which compiled carries the check to
    the first phase op. scalars: the _FLOAT_META values, in order."""
    rows = student.numel() // student.shape[-1]
    device = student.device  # NCCL gathers device tensors only
    ints = torch.tensor([rows, student.shape[-1], _DTYPE_CODES[student.dtype], _DTYPE_CODES[teacher.dtype],
                         _DIVERGENCE_CODES[divergence], _REDUCTION_CODES[reduction], labels is not None,
                         ignore_index], dtype=torch.int64, device=device)
    labels_hash = _labels_hash(labels) if labels is not None else torch.zeros((), dtype=torch.int64, device=device)
    flag = torch.zeros(1, dtype=torch.int64, device=device)
    meta = torch.cat([ints, labels_hash.reshape(1), _float_bits(scalars, student), flag])
    table = _all_gather(meta, group)
    hard_label_weight = scalars[_FLOAT_META.index("hard_label_weight")]
    if torch.compiler.is_compiling():
        # The table cannot be read on the host inside a graph: a mismatch
        # fails an assert instead (every rank holds the same table, so every
        # rank raises; on CUDA it is a device-side assert). Likewise a
        # hard label outside the whole vocabulary. The assert is an op whose
        # output (1/T) the first phase op reads: a separate _assert_async
        # ran after the next collective under Inductor, where ranks with
        # different row counts crashed gloo or waited on each other.
        same = torch.cat([table[:, :1], table[:, 2:]], dim=1)  # slices may differ in size
        ok = (same == same[:1]).all()
        if labels is not None and hard_label_weight != 0:
            flat = labels.reshape(-1).to(torch.int64)
            in_range = (flat >= 0) & (flat < table[:, 1].sum())
            ok = ok & ((flat == ignore_index) | in_range).all()
        return table[:, 1], torch.ops.todi_ext.vocab_parallel_agreement(ok, inv_t, _COMPILED_MISMATCH)
    rows_of_table = table.tolist()  # one device-to-host copy
    bad = [r for r, row in enumerate(rows_of_table) if row[_BAD_INPUT]]
    if bad:
        raise ValueError(f"vocab_parallel_distill_loss: rank(s) {bad} rejected their inputs (their own error says "
                         "why); this rank's were valid")
    for i, name in enumerate(_META):
        if name == "vocab slice":
            continue  # slices may differ in size
        if len({row[i] for row in rows_of_table}) > 1:
            raise ValueError(
                f"vocab_parallel_distill_loss: ranks disagree on {name} ({_describe(name, table[:, i])} by rank); "
                "every rank must pass the same rows, dtypes, divergence and its parameters, reduction, "
                "ignore_index, label weights and (global) labels"
            )
    return table[:, 1], inv_t


def merge_row_stats(stats: Tensor) -> Tensor:
    """(world, N, 6) per-slice (max, sum exp(x - max)) pairs -> (N, 6) whole-row (max, log sum)."""
    maxes, sums = stats[..., 0::2], stats[..., 1::2]
    top = maxes.max(dim=0).values
    # A slice with nothing (max -inf, sum 0) adds 0 (not exp(-inf - -inf) =
    # NaN); any other NaN must reach the row, as in the kernels' merge: a
    # slice holding a NaN logit reports (-inf, NaN) or (NaN, NaN).
    empty = (maxes == float("-inf")) & (sums == 0)
    scaled = torch.where(empty, torch.zeros_like(sums), sums * torch.exp(maxes - top))
    merged = torch.empty_like(stats[0])
    merged[:, 0::2] = top
    merged[:, 1::2] = torch.log(scaled.sum(dim=0))
    return merged


# AklTailSearch's keys: the bits of a probability below 2 (float32: 30, float64: 62), fixed 4 at a time.
_AKL_KEY_BITS = {torch.float32: 30, torch.float64: 62}
_AKL_DIGIT_BITS = 4


def akl_split_search(walk_totals, gap_totals, rows, akl_mu, math, device):
    """AKL's whole-row (g_head, g_tail), (N, 2) float64, the same on every rank.

    Runs math::AklTailSearch across the slices. walk_totals(low, remaining)
    returns every slice's sums of p at the 15 thresholds of the current
    window, summed over the slices ((N, 15), from vocab_parallel_akl_walk and
    an all-reduce); every rank advances the search alike from those totals
    (AklTailSearch::advance, here in tensor ops: the largest candidate whose
    S, rounded to the math dtype, is <= mu). gap_totals(low) returns the
    slices' (g_head, g_tail) at the split, summed. The all-reduced values are
    identical on every rank, so the ranks never diverge."""
    low = torch.zeros(rows, dtype=torch.int64, device=device)
    remaining = _AKL_KEY_BITS[math]
    mu = torch.tensor(akl_mu, dtype=math, device=device)
    while remaining > 0:
        totals = walk_totals(low, remaining)
        bits = min(_AKL_DIGIT_BITS, remaining)
        candidates = (1 << bits) - 1  # a last, shorter digit has fewer
        fits = totals[:, :candidates].to(math) <= mu
        digit = (fits * torch.arange(1, candidates + 1, device=device)).amax(dim=1)
        remaining -= bits
        low = low + (digit << remaining)
    return gap_totals(low)


def akl_gaps_across_ranks(z, s, labels_local, inv_t, global_stats, akl_mu, math, all_reduce):
    """akl_split_search over this rank's slice, all_reduce summing over the ranks."""
    args = (z, s, labels_local, inv_t, _LOCAL_IGNORE, global_stats)
    return akl_split_search(lambda low, remaining: all_reduce(torch.ops.todi_ext.vocab_parallel_akl_walk(*args, low, remaining)),
                       lambda low: all_reduce(torch.ops.todi_ext.vocab_parallel_akl_gaps(*args, low)),
                       global_stats.shape[0], akl_mu, math, z.device)


def _from_dtensors(student, teacher, labels, group):
    """DTensor inputs -> their local shards and the mesh's group (plain tensors pass through)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(student, DTensor) and not isinstance(teacher, DTensor):
        return student, teacher, labels, group
    for name, t in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(t, DTensor):
            raise TypeError(f"{name} must be a DTensor like the other logits, got {type(t).__name__}")
        last = t.dim() - 1
        if t.device_mesh.ndim != 1 or len(t.placements) != 1 or not (
            isinstance(t.placements[0], Shard) and t.placements[0].dim in (-1, last)
        ):
            raise ValueError(
                f"{name} must be sharded on its last dimension over a 1-D mesh (placements (Shard(-1),)), "
                f"got {t.placements} on a {t.device_mesh.ndim}-D mesh"
            )
    if teacher.device_mesh != student.device_mesh:
        raise ValueError("student_logits and teacher_logits must be on the same device mesh")
    if isinstance(labels, DTensor):
        if not all(isinstance(p, Replicate) for p in labels.placements):
            raise ValueError(f"labels as a DTensor must be replicated, got {labels.placements}")
        labels = labels.to_local()
    if group is not None and group != student.device_mesh.get_group():
        raise ValueError("group must be the logits' mesh group (or None) when the logits are DTensors")
    return student.to_local(), teacher.to_local(), labels, student.device_mesh.get_group()


class _VocabParallelLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels_local, ignored, inv_t, params, group):
        divergence, beta, skew_lambda, akl_mu, jsd_beta, reduction, soft_label_weight, hard_label_weight = params
        rows = student.numel() // student.shape[-1]
        z, s = student.reshape(rows, student.shape[-1]), teacher.reshape(rows, teacher.shape[-1])
        beta_t = ops.scalar_tensor(beta, z)
        # (soft, hard) as the gradients op reads them: tensors, so that a schedule is a graph input.
        label_weights = torch.stack([ops.scalar_tensor(soft_label_weight, z), ops.scalar_tensor(hard_label_weight, z)])
        with_hard_label_term = hard_label_weight != 0
        # 1: local row statistics, merged across ranks (one all-gather).
        local_stats = torch.ops.todi_ext.vocab_parallel_row_stats(z, s, labels_local, inv_t, _LOCAL_IGNORE,
                                                                  with_hard_label_term)
        global_stats = merge_row_stats(_all_gather(local_stats, group))
        math = _validation.loss_dtype(student, teacher)
        # AKL: the head/tail split of the whole rows (a collective per search walk).
        akl_gaps = None
        if divergence == "akl":
            akl_gaps = akl_gaps_across_ranks(z, s, labels_local, inv_t, global_stats, akl_mu, math,
                                             lambda t: fc.all_reduce(t, "sum", group))
        # 2: partial sums, summed across ranks (one all-reduce).
        sums = torch.ops.todi_ext.vocab_parallel_partial_sums(z, s, labels_local, divergence, beta_t, skew_lambda,
                                                              akl_mu, jsd_beta, inv_t, _LOCAL_IGNORE, global_stats,
                                                              with_hard_label_term, akl_gaps)
        sums = fc.all_reduce(sums, "sum", group)
        per_row = label_weights[0] * sums[:, 0]
        if with_hard_label_term:  # log sum exp(z) - z[label], max and log(sum) kept apart
            per_row = per_row + label_weights[1] * (global_stats[:, 5] - (sums[:, 3] - global_stats[:, 4]))
        if ignored is not None:
            per_row = torch.where(ignored, torch.zeros_like(per_row), per_row)
        count = None
        if reduction == "mean":
            count = (~ignored).sum().clamp(min=1) if ignored is not None else max(rows, 1)
        # 3: this slice's gradients from the whole rows' sums (no collective).
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_s = grad_t = None
        if want_s or want_t:
            grad_scale = (torch.ones((), dtype=math, device=z.device) if count is None
                          else torch.as_tensor(count, dtype=math, device=z.device).reciprocal())
            grad_s, grad_t = torch.ops.todi_ext.vocab_parallel_gradients(
                z, s, labels_local, divergence, beta_t, skew_lambda, akl_mu, jsd_beta, inv_t, _LOCAL_IGNORE,
                global_stats, sums, grad_scale, label_weights, with_hard_label_term, want_s, want_t, akl_gaps)
            grad_s, grad_t = grad_s.view(student.shape) if want_s else None, grad_t.view(teacher.shape) if want_t else None
        ctx.save_for_backward(grad_s, grad_t)
        per_row = per_row.to(math)
        if reduction == "none":
            return per_row.reshape(student.shape[:-1])
        total = per_row.sum()
        return total if count is None else total / count

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            raise ops.double_backward_error()
        wanted = ctx.needs_input_grad[:2]
        saved = [t if t is not None else torch.empty(0) for t in ctx.saved_tensors]
        if grad_loss.dim() > 0:
            grad_loss = grad_loss.reshape(saved[0].shape[:-1] if wanted[0] else saved[1].shape[:-1])
        grads = ops.scaled_saved_gradients(saved, grad_loss, wanted)
        return grads[0], grads[1], None, None, None, None, None


def vocab_parallel_distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    *,
    group=None,
    divergence: str = "todi",
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    beta: float = 1.0,
    skew_lambda: float = 0.1,
    akl_mu: float = 0.5,
    jsd_beta: float = 0.5,
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
) -> Tensor:
    """distill_loss over whole rows whose vocabulary is split across the ranks of `group`.

    student_logits and teacher_logits may also be DTensors sharded on their
    last dimension (Shard(-1)) over a 1-D device mesh: their local shards and
    the mesh's group are used (labels: a plain tensor or a replicated
    DTensor), and the gradient comes back as a DTensor of the same sharding.

    student_logits, teacher_logits: (..., V_local), this rank's contiguous
    slice of the vocabulary (ranks in order; slices may differ in size).
    labels: (...) GLOBAL token ids (the same on every rank). Every rank
    returns the same loss, that of the whole rows; backward gives each rank
    the gradient of its own slice. Other arguments as in
    :func:`todi_ext.distill_loss`.
    """
    student_logits, teacher_logits, labels, group = _from_dtensors(student_logits, teacher_logits, labels, group)
    group = group if group is not None else dist.group.WORLD
    try:
        _validation.check_api_args(student_logits, teacher_logits, labels, divergence, beta, skew_lambda, akl_mu,
                                   jsd_beta, temperature, ignore_index, reduction, soft_label_weight,
                                   hard_label_weight)
        # The op's checks, before any collective (the phase ops would check
        # only once the ranks wait on each other); the labels' range is checked
        # against the whole vocabulary below.
        _validation.check_op_args(student_logits, teacher_logits, labels, divergence, skew_lambda, akl_mu, jsd_beta,
                                  reduction, soft_label_weight, hard_label_weight)
        if student_logits.device.type not in ("cpu", "cuda"):
            raise NotImplementedError(
                f"vocab_parallel_distill_loss runs on CPU and CUDA tensors, got {student_logits.device}")
    except (TypeError, ValueError, NotImplementedError) as error:
        if torch.compiler.is_compiling():
            raise
        # Eagerly, the other ranks are about to wait in the agreement
        # all-gather: join it with a flag, so that they raise too.
        _report_bad_input(student_logits, group)
        raise
    slices, inv_t = _check_ranks_agree(student_logits, teacher_logits, labels, divergence, reduction, ignore_index,
                                       (temperature, beta, skew_lambda, akl_mu, jsd_beta, soft_label_weight,
                                        hard_label_weight), ops.inverse_temperature_tensor(temperature, student_logits),
                                       group)
    rank = dist.get_rank(group)
    local_vocab = student_logits.shape[-1]
    labels_local = ignored = None
    if labels is not None:
        flat = labels.reshape(-1).to(torch.int64)
        ignored = flat == ignore_index
        if hard_label_weight != 0 and not torch.compiler.is_compiling():
            # The same labels on every rank, so every rank raises alike (compiled: an assert in the agreement check).
            _validation.check_label_range(labels, int(slices.sum()), ignore_index)
        local = flat - (slices.cumsum(0)[rank] - slices[rank])  # tensor ops: no host read under compile
        here = (local >= 0) & (local < local_vocab)
        # Local ids: -1 ignored, [0, V_local) in this slice, V_local elsewhere.
        labels_local = torch.where(ignored, torch.full_like(local, _LOCAL_IGNORE),
                                   torch.where(here, local, torch.full_like(local, local_vocab)))
    kernel_divergence, kernel_jsd_beta = _validation.kernel_divergence(divergence, jsd_beta)
    # beta and the label weights go on as given (under torch.compile:
    # symbolic), so that the ops' tensors made from them are graph inputs.
    params = (kernel_divergence, beta, float(skew_lambda), float(akl_mu), kernel_jsd_beta, reduction,
              soft_label_weight, hard_label_weight)
    return _VocabParallelLoss.apply(student_logits, teacher_logits, labels_local, ignored, inv_t, params, group)
