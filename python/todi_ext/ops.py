"""Fake (meta) and autograd registrations of the todi_ext ops, next to thin
typed wrappers. The schemas live in csrc/torch_bindings.cpp and the kernels in
csrc/<backend>/.

distill_forward computes the reduced loss (ToDi or one of its paper's
baselines) and (when asked) its gradients for an upstream gradient of 1 in the same pass over the logits, and saves them; the
registered backward scales them in place by the actual upstream gradient
(scale_grad_), which skips rows whose scale is exactly 1 - so the usual
loss.backward() costs nothing more, and the gradient is never held twice. No
host synchronisation anywhere: the ops run under torch.compile(fullgraph=True)
and CUDA graphs.
"""

import collections
import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _validation

_EMPTY = (0,)


def _schema_args(op_name):
    """A namedtuple of the op's schema arguments (with the schema's defaults),
    to read an autograd registration's inputs by name."""
    arguments = getattr(torch.ops.todi_ext, op_name).default._schema.arguments
    defaults = [a.default_value for a in arguments if a.has_default_value()]
    return collections.namedtuple(f"{op_name}_args", [a.name for a in arguments], defaults=defaults)


def _register_fake(op_name):
    """torch.library.register_fake for todi_ext::op_name, checking first the
    op's rule that every tensor argument is on the first one's device. Real
    tensors reach a fake when one of them is on meta (the Meta key outranks
    the CPU's), where the op's C++ checks never run: without this, a meta
    beta beside CPU logits returned uninitialised CPU tensors."""
    names = [a.name for a in getattr(torch.ops.todi_ext, op_name).default._schema.arguments]

    def register(fake):
        @functools.wraps(fake)
        def checked(*args, **kwargs):
            tensors = [(n, t) for n, t in (*zip(names, args), *kwargs.items()) if isinstance(t, Tensor)]
            for name, t in tensors[1:]:
                if t.device != tensors[0][1].device:
                    raise ValueError(f"{name} is on {t.device} but {tensors[0][0]} is on {tensors[0][1].device}")
            return fake(*args, **kwargs)

        torch.library.register_fake(f"todi_ext::{op_name}")(checked)
        return fake

    return register


_ForwardArgs = _schema_args("distill_forward")
_FusedLinearArgs = _schema_args("fused_linear_distill_forward")


def distill_forward(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor],
    divergence: str,
    beta: float,
    skew_lambda: float,
    akl_mu: float,
    jsd_beta: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
    student_grad: bool,
    teacher_grad: bool,
    soft_label_weight: float = 1.0,
    hard_label_weight: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The reduced loss and, when the flags ask, d(loss)/d(student_logits) and
    d(loss)/d(teacher_logits) for an upstream gradient of 1 (else empty tensors).

    The gradient outputs belong to the autograd graph: backward scales them in
    place and hands them over as the inputs' .grad. Read them before backward.
    """
    return torch.ops.todi_ext.distill_forward.default(
        student_logits, teacher_logits, labels, divergence, scalar_tensor(beta, student_logits), skew_lambda, akl_mu,
        jsd_beta, inverse_temperature_tensor(temperature, student_logits), ignore_index, reduction, student_grad,
        teacher_grad, soft_label_weight, hard_label_weight,
    )


def scalar_tensor(value, like: Tensor) -> Tensor:
    """value as the op takes beta and 1/T: a 0-dim float64 tensor on like's
    device, made by a fill kernel (no host-device copy, no sync). Under
    torch.compile a changing value is then a graph input, not a constant to
    recompile for."""
    if torch.compiler.is_compiling():
        # A float input becomes a graph input only through tensor arithmetic
        # (torch.full with it would specialise the graph on its value).
        return torch.zeros((), dtype=torch.float64, device=like.device) + value
    return torch.full((), float(value), dtype=torch.float64, device=like.device)  # float(): a Fraction, say


def inverse_temperature_tensor(temperature, like: Tensor) -> Tensor:
    """1/T as the op takes it: scalar_tensor of 1.0 / temperature. Under
    torch.compile the division is the tensor's, not Python's: torch 2.10-2.12
    specialise the graph on a Python quotient of a float input (a recompile
    for every temperature). Both are one correctly rounded float64 division."""
    if torch.compiler.is_compiling():
        return torch.reciprocal(scalar_tensor(temperature, like))
    return scalar_tensor(1.0 / temperature, like)


def scale_grad_(grad: Tensor, scale: Tensor) -> None:
    """grad *= scale in place (scale: 0-dim or one value per row of grad), rows with scale 1 untouched."""
    torch.ops.todi_ext.scale_grad_.default(grad, scale)


@_register_fake("distill_forward")
def _distill_forward_fake(
    student_logits, teacher_logits, labels, divergence, beta, skew_lambda, akl_mu, jsd_beta, inv_temperature,
    ignore_index, reduction, student_grad, teacher_grad, soft_label_weight=1.0, hard_label_weight=0.0,
):
    # The op checks its arguments (C++) when it runs, traced or not. Real
    # tensors land here when one is on meta: check them, or another's device
    # would go unnoticed.
    if not _is_traced(student_logits, teacher_logits, labels):
        _check_in_cpp(student_logits, teacher_logits, labels, divergence, skew_lambda, akl_mu, jsd_beta, reduction,
                      soft_label_weight, hard_label_weight)
    loss_shape = student_logits.shape[:-1] if reduction == "none" else ()
    loss = student_logits.new_empty(loss_shape, dtype=_validation.loss_dtype(student_logits, teacher_logits))
    grad_student = student_logits.new_empty(student_logits.shape if student_grad else _EMPTY)
    grad_teacher = teacher_logits.new_empty(teacher_logits.shape if teacher_grad else _EMPTY)
    return loss, grad_student, grad_teacher


def scale_grad(grad: Tensor, scale: Tensor) -> Tensor:
    """grad * scale as a new contiguous tensor in grad's dtype (no float32 copy of grad)."""
    return torch.ops.todi_ext.scale_grad.default(grad, scale)


@_register_fake("scale_grad_")
def _scale_grad_inplace_fake(grad, scale):
    pass


@_register_fake("scale_grad")
def _scale_grad_fake(grad, scale):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _is_traced(*tensors):
    return any(isinstance(t, torch._subclasses.FakeTensor) for t in tensors)


# The check op's C++ kernel serves every device (CompositeExplicitAutograd);
# reached through the CPU entry, it runs on meta tensors too.
_CHECK_KERNEL_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _check_in_cpp(*args):
    """check_distill_args's C++ on real tensors that reached a fake (meta)
    implementation because one of them is on meta."""
    torch.ops.todi_ext.check_distill_args.default.redispatch(_CHECK_KERNEL_KEYS, *args)


@_register_fake("check_distill_args")
def _check_distill_args_fake(student_logits, teacher_logits, labels, *args):
    # Traced, the check is a node of the graph that runs with the real tensors.
    if not _is_traced(student_logits, teacher_logits, labels):
        _check_in_cpp(student_logits, teacher_logits, labels, *args)


@_register_fake("check_label_range")
def _check_label_range_fake(labels, vocab, ignore_index):
    pass  # the values are not known while tracing


# An op that returns nothing would be dropped from a compiled graph as dead
# code: these checks must run.
torch.fx.node.has_side_effect(torch.ops.todi_ext.check_distill_args.default)
torch.fx.node.has_side_effect(torch.ops.todi_ext.check_label_range.default)


def _distill_forward_setup_context(ctx, inputs, output):
    args = _ForwardArgs(*inputs)
    _, grad_student, grad_teacher = output
    ctx.student_grad = args.student_grad
    ctx.teacher_grad = args.teacher_grad
    ctx.save_for_backward(grad_student, grad_teacher)
    # The gradient outputs are never differentiated; without this, autograd
    # would materialise an (N, V) zero tensor for each of them in backward.
    ctx.mark_non_differentiable(grad_student, grad_teacher)
    ctx.set_materialize_grads(False)


def _missing_grad(name, flag):
    return RuntimeError(
        f"todi_ext: {name} requires grad but distill_forward was called with {flag}=False, so its gradient "
        f"was not computed; call it with {flag}=True (todi_ext.distill_loss sets this for you)"
    )


def double_backward_error():
    # The saved gradients are not differentiable functions of the logits
    # here, so refuse rather than return a partial, silently wrong second
    # derivative.
    return RuntimeError(
        "todi_ext: double backward (create_graph=True through todi_ext's losses) is not supported; "
        "the ToDi gradient is computed in closed form without second derivatives"
    )


def _graph_is_kept():
    """True inside a backward pass that keeps the graph (retain_graph=True)."""
    try:
        return torch._C._autograd._get_current_graph_task_keep_graph()
    except (AttributeError, RuntimeError):  # no such API, or not inside the autograd engine
        return True  # the safe answer: never destroy what may be needed again


def _tracing(tensors):
    """True while torch.compile / AOTAutograd traces the backward."""
    if torch.compiler.is_compiling():
        return True
    is_functional = getattr(torch, "_is_functional_tensor", lambda t: False)
    return any(type(t) is not torch.Tensor or is_functional(t) for t in tensors)


def _batched(t):
    """True for a tensor batched by vmap: torch.func's (FuncTorchBatched) or
    the legacy one of autograd.grad(is_grads_batched=True), which
    torch.autograd.functional.jacobian(vectorize=True) uses (Batched)."""
    functorch = torch._C._functorch
    return functorch.is_batchedtensor(t) or functorch.is_legacy_batchedtensor(t)


def _scaled_by_aten_ops(saved, grad_loss):
    """saved * grad_loss (one value, or one per row) as plain ATen pointwise
    ops, with the op's arithmetic (float32, float64 for float64; one rounding
    to saved's dtype). Used where the backward is traced or batched: Inductor
    fuses these into one kernel that can write into the saved gradient's
    buffer once it is dead (AOTAutograd donates saved tensors nobody else
    holds), so a compiled step holds the gradient once - and if the saved
    gradient is still alive (retain_graph, or the caller kept the op's
    gradient output), Inductor writes a new buffer instead. vmap batches
    these ops too, which the custom op cannot be."""
    scale = grad_loss if grad_loss.dim() == 0 else grad_loss.unsqueeze(-1)
    return (saved.to(scale.dtype) * scale).to(saved.dtype)


def scaled_saved_gradients(saved, grad_loss, wanted):
    """The saved gradients (None where not wanted) scaled by grad_loss.

    Eager, the fast path scales each saved gradient in place and hands it
    over, so it is never held twice. When the graph is kept
    (retain_graph=True, gradcheck) the saved gradient must survive: the
    scaled gradient goes to a new tensor. Traced (torch.compile) or batched
    (vmap) backward passes use ATen ops that the compiler may run in place.
    """
    traced_or_batched = _tracing(saved) or _batched(grad_loss)
    in_place = not traced_or_batched and not _graph_is_kept()
    out = []
    for grad, want in zip(saved, wanted):
        if not want:
            out.append(None)
        elif traced_or_batched:
            out.append(_scaled_by_aten_ops(grad, grad_loss))
        elif in_place:
            scale_grad_(grad, grad_loss)
            out.append(grad)
        else:
            out.append(scale_grad(grad, grad_loss))
    return out


def _distill_forward_backward(ctx, grad_loss, _grad_of_grad_student, _grad_of_grad_teacher):
    if torch.is_grad_enabled():  # backward(create_graph=True)
        raise double_backward_error()
    nothing = (None,) * len(_ForwardArgs._fields)  # one per schema argument
    if grad_loss is None:  # the loss was not used
        return nothing
    wanted = ctx.needs_input_grad[:2]
    for name, flag, computed, want in (("student_logits", "student_grad", ctx.student_grad, wanted[0]),
                                       ("teacher_logits", "teacher_grad", ctx.teacher_grad, wanted[1])):
        if want and not computed:
            raise _missing_grad(name, flag)
    return tuple(scaled_saved_gradients(ctx.saved_tensors, grad_loss, wanted)) + nothing[2:]


torch.library.register_autograd(
    "todi_ext::distill_forward", _distill_forward_backward, setup_context=_distill_forward_setup_context
)



# ------------------------------------------------------- fused linear + loss
# The tensors that reduction="none" saves for its backward (which runs the
# chunks again with the per-row upstream gradient).
_FL_SAVED = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias",
             "labels", "beta", "inv_temperature")


def fused_linear_distill_forward(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
    divergence, beta, skew_lambda, akl_mu, jsd_beta, temperature, ignore_index, reduction, soft_label_weight,
    hard_label_weight, chunk_size, row_weights, hidden_grad, weight_grad, bias_grad,
):
    """Thin wrapper of the op: beta and 1/T as the op takes them."""
    return torch.ops.todi_ext.fused_linear_distill_forward.default(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
        divergence, scalar_tensor(beta, student_hidden), skew_lambda, akl_mu, jsd_beta,
        inverse_temperature_tensor(temperature, student_hidden), ignore_index, reduction, soft_label_weight,
        hard_label_weight, chunk_size, row_weights, hidden_grad, weight_grad, bias_grad,
    )


@_register_fake("fused_linear_distill_forward")
def _fused_linear_fake(*inputs):
    from .fused_linear import check_op_args  # fused_linear imports this module

    check_op_args(*inputs)  # the op is Python: its fake runs the same checks
    args = _FusedLinearArgs(*inputs)
    hidden, weight = args.student_hidden, args.student_weight
    math = _validation.loss_dtype(hidden, args.teacher_hidden)
    loss = hidden.new_empty((hidden.shape[0],) if args.reduction == "none" else (), dtype=math)
    grad_hidden = hidden.new_empty(hidden.shape if args.hidden_grad else _EMPTY)
    grad_weight = weight.new_empty(weight.shape if args.weight_grad else _EMPTY)
    grad_bias = args.student_bias.new_empty((weight.shape[0],)) if args.bias_grad else hidden.new_empty(_EMPTY)
    return loss, grad_hidden, grad_weight, grad_bias


def _fused_linear_setup_context(ctx, inputs, output):
    args = _FusedLinearArgs(*inputs)
    ctx.reduction = args.reduction
    ctx.computed = (args.hidden_grad, args.weight_grad, args.bias_grad)
    if ctx.reduction == "none":
        # The upstream gradient differs per row: backward runs the chunks again
        # with it (the forward computed no gradient).
        tensors = [getattr(args, name) for name in _FL_SAVED]
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in tensors))
        ctx.present = [t is not None for t in tensors]
        ctx.args = args._replace(**{name: None for name in _FL_SAVED})  # the other arguments
    else:
        ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _teacher_requires_grad_error(name):
    return RuntimeError(
        f"todi_ext: {name} requires grad, but the teacher is a constant in fused_linear_distill_loss: compute "
        "the teacher's hidden states under torch.no_grad() and freeze its weights (requires_grad_(False))"
    )


def _fused_linear_backward(ctx, grad_loss, *_grads_of_grads):
    if torch.is_grad_enabled():
        raise double_backward_error()
    nothing = [None] * len(_FusedLinearArgs._fields)
    if grad_loss is None:
        return tuple(nothing)
    needs_grad = _FusedLinearArgs(*ctx.needs_input_grad)
    for name in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        if getattr(needs_grad, name):
            raise _teacher_requires_grad_error(name)
    wanted = (needs_grad.student_hidden, needs_grad.student_weight, needs_grad.student_bias)
    if ctx.reduction == "none":
        saved = {name: t if present else None for name, t, present in zip(_FL_SAVED, ctx.saved_tensors, ctx.present)}
        args = ctx.args._replace(**saved, row_weights=grad_loss.reshape(-1), hidden_grad=wanted[0],
                                 weight_grad=wanted[1], bias_grad=wanted[2] and saved["student_bias"] is not None)
        _, g_hidden, g_weight, g_bias = torch.ops.todi_ext.fused_linear_distill_forward.default(*args)
        grads = [g if w else None for g, w in zip((g_hidden, g_weight, g_bias), wanted)]
    else:
        for name, computed, want in zip(("student_hidden", "student_weight", "student_bias"), ctx.computed, wanted):
            if want and not computed:
                raise RuntimeError(
                    f"todi_ext: {name} requires grad but fused_linear_distill_forward was called without its "
                    "gradient flag; call it through todi_ext.fused_linear_distill_loss, which sets the flags"
                )
        grads = scaled_saved_gradients(ctx.saved_tensors, grad_loss, wanted)
    nothing[:3] = grads
    return tuple(nothing)


torch.library.register_autograd(
    "todi_ext::fused_linear_distill_forward", _fused_linear_backward, setup_context=_fused_linear_setup_context
)


# ------------------------------------------- vocabulary-parallel phase ops
def _rows(logits):
    return logits.numel() // logits.shape[-1] if logits.shape[-1] else 0


@_register_fake("vocab_parallel_row_stats")
def _row_stats_fake(student_logits, teacher_logits, labels, inv_temperature, ignore_index, with_hard_label_term):
    return student_logits.new_empty((_rows(student_logits), 6), dtype=torch.float64)


@_register_fake("vocab_parallel_partial_sums")
def _partial_sums_fake(student_logits, teacher_logits, labels, divergence, beta, skew_lambda, akl_mu, jsd_beta,
                       inv_temperature, ignore_index, global_stats, with_hard_label_term, akl_gaps=None):
    return student_logits.new_empty((_rows(student_logits), 4), dtype=torch.float64)


@_register_fake("vocab_parallel_gradients")
def _gradients_fake(student_logits, teacher_logits, labels, divergence, beta, skew_lambda, akl_mu, jsd_beta,
                    inv_temperature, ignore_index, global_stats, global_sums, grad_scale, label_weights,
                    with_hard_label_term, student_grad, teacher_grad, akl_gaps=None):
    return (student_logits.new_empty(student_logits.shape if student_grad else _EMPTY),
            teacher_logits.new_empty(teacher_logits.shape if teacher_grad else _EMPTY))


@_register_fake("vocab_parallel_akl_walk")
def _akl_walk_fake(student_logits, teacher_logits, labels, inv_temperature, ignore_index, global_stats, tail_key,
                   remaining_bits):
    return student_logits.new_empty((_rows(student_logits), 15), dtype=torch.float64)


@_register_fake("vocab_parallel_agreement")
def _agreement_fake(agree, value, message):
    return torch.empty_like(value)


@_register_fake("vocab_parallel_akl_gaps")
def _akl_gaps_fake(student_logits, teacher_logits, labels, inv_temperature, ignore_index, global_stats, tail_key):
    return student_logits.new_empty((_rows(student_logits), 2), dtype=torch.float64)
