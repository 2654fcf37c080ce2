"""The Python API's argument checks, and the way to the op's own.

Each rule has one home. What an op must refuse whoever calls it (shapes,
devices, the divergence's parameter ranges, the reduction, the label weights,
the labels' range) is checked by the op, in C++ (csrc/ops/op_common.cpp; the
fused linear op, written in Python, in fused_linear.py); Python paths that
reach no kernel first call those same checks through check_op_args and
check_label_range. What only the Python API knows (types, the public
divergence names and which parameters apply, temperature, ignore_index
against the labels' dtype, sharded parameters, torch.func) is checked here.
Every message names the argument. Two rules stand on both sides: a tensor's
dtype (a TypeError here, a ValueError from the op: the stable ABI carries no
TypeError), and beta and 1/T being finite (here as numbers, before they
become device tensors; the op checks the tensors only where reading them
costs no sync, on the CPU - on a GPU an invalid one makes the loss NaN)."""

import math
import numbers

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_types(student_logits, teacher_logits, labels):
    """The tensors' types and dtypes (TypeError). The op refuses a wrong
    dtype too, as a ValueError (the stable ABI carries no TypeError)."""
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        check_dense(name, x)
        if x.dtype not in LOGIT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16 (or float64), got {x.dtype}")
    check_label_type(labels)


def check_dense(name, x):
    """A strided tensor: the kernels index rows by strides (a sparse or
    nested one would reach the dispatcher's "no kernel for SparseCPU")."""
    if x.layout != torch.strided or x.is_nested:
        layout = "nested" if x.is_nested else str(x.layout)
        raise TypeError(f"{name} must be a dense (torch.strided) tensor, got a {layout} tensor")


def check_labels_are_a_tensor(labels):
    if labels is not None and not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")


def _is_integer(dtype):
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_label_type(labels):
    check_labels_are_a_tensor(labels)
    if labels is None:
        return
    check_dense("labels", labels)
    if not _is_integer(labels.dtype):
        raise TypeError(f"labels must be an integer tensor (e.g. torch.int64), got {labels.dtype}")


_FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_ignore_index_fits(labels, ignore_index):
    """An ignore_index outside the labels' dtype can never match (uint8 labels
    and -100): the kernel would ignore nothing while a wrapped comparison
    would ignore some other label."""
    # Labels that are not integers: the dtype check refuses them.
    if labels is None or labels.dtype == torch.int64 or not _is_integer(labels.dtype):
        return
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(
            f"ignore_index {ignore_index} is outside the range of labels' dtype {labels.dtype} "
            f"[{info.min}, {info.max}]: use int64 labels or an ignore_index in that range"
        )


def _check_real_type(name, value):
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    # An int (or Fraction) past float64's range passes every comparison
    # below and then fails to convert (OverflowError).
    if not torch.compiler.is_compiling() and not isinstance(value, float):
        try:
            float(value)
        except OverflowError:
            raise ValueError(f"{name} must be finite, got a {type(value).__name__} too large for a float") from None


def _check_finite(name, value):
    _check_real_type(name, value)
    if not (-math.inf < value < math.inf):  # False for NaN too; math.isfinite breaks torch.compile graphs
        raise ValueError(f"{name} must be finite, got {value}")


def check_scalars(beta, temperature, ignore_index, reduction="mean"):
    """The API's scalars. beta and 1/T reach the op as device tensors, whose
    values it cannot read without a sync; it gets 1/T, not T."""
    _check_finite("beta", beta)
    # The kernels compute beta * r in float32: a beta past float32's range
    # would be inf there, and inf * 0 a NaN loss.
    if not -_FLOAT32_MAX <= beta <= _FLOAT32_MAX:
        raise ValueError(f"beta must be finite and within float32's range (|beta| <= 3.4e38), got {beta}")
    _check_finite("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # The kernels multiply by 1/T in float32: it must be a normal float32.
    if not (_FLOAT32_TINY <= 1.0 / temperature <= _FLOAT32_MAX):
        raise ValueError(
            f"temperature must have a reciprocal that is a normal float32 (about 2.9e-39 < T < 8.5e37), got {temperature}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str, got {type(reduction).__name__}")


def check_api_args(student_logits, teacher_logits, labels, divergence, beta, skew_lambda, akl_mu, jsd_beta,
                   temperature, ignore_index, reduction, soft_label_weight, hard_label_weight):
    """What only the Python API knows: the arguments' types, the public
    divergence names and which parameters apply to each, temperature (the op
    takes 1/T), beta (a device tensor for the op) and ignore_index against
    the labels' dtype. The rest is the op's (check_op_args)."""
    check_types(student_logits, teacher_logits, labels)
    check_api_config(divergence, beta, skew_lambda, akl_mu, jsd_beta, temperature, ignore_index, reduction,
                     soft_label_weight, hard_label_weight, labels)


def check_api_config(divergence, beta, skew_lambda, akl_mu, jsd_beta, temperature, ignore_index, reduction,
                     soft_label_weight, hard_label_weight, labels=None):
    """check_api_args's checks of everything but the tensors (labels, when
    given: ignore_index against their dtype)."""
    check_scalars(beta, temperature, ignore_index, reduction)
    check_ignore_index_fits(labels, ignore_index)
    check_divergence(divergence, beta=beta, skew_lambda=skew_lambda, akl_mu=akl_mu, jsd_beta=jsd_beta)
    check_label_weight_types(soft_label_weight, hard_label_weight)


def check_module_config(divergence, beta, skew_lambda, akl_mu, jsd_beta, temperature, ignore_index, reduction,
                        soft_label_weight, hard_label_weight):
    """A loss module's or trainer's configuration, at construction: the API's
    checks and the op's (check_op_config)."""
    check_api_config(divergence, beta, skew_lambda, akl_mu, jsd_beta, temperature, ignore_index, reduction,
                     soft_label_weight, hard_label_weight)
    check_op_config(divergence, skew_lambda, akl_mu, jsd_beta, reduction, soft_label_weight, hard_label_weight)


def check_no_functorch(student_logits, teacher_logits):
    """torch.func transforms (grad, vmap, jacrev, ...) need a functorch rule
    the op does not have; say so instead of PyTorch's internal message."""
    if torch.compiler.is_compiling():  # dynamo traces plain tensors here (and cannot trace the check)
        return
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if wrapped(student_logits) or wrapped(teacher_logits):
        raise NotImplementedError(
            "todi_ext does not support torch.func transforms (grad, vmap, jacrev, jvp); "
            "use loss.backward() or torch.autograd.grad, which are supported"
        )


def loss_dtype(student_logits, teacher_logits):
    """float32, or float64 when either input is float64 (the math's precision)."""
    if torch.float64 in (student_logits.dtype, teacher_logits.dtype):
        return torch.float64
    return torch.float32


# name -> (kernel divergence, parameters that apply). "js" is the kernel's
# generalized JSD at jsd_beta = 0.5.
DIVERGENCES = {
    "todi": ("todi", ("beta",)),
    "fkl": ("fkl", ()),
    "rkl": ("rkl", ()),
    "js": ("gjsd", ()),
    "tvd": ("tvd", ()),
    "skl": ("skl", ("skew_lambda",)),
    "srkl": ("srkl", ("skew_lambda",)),
    "akl": ("akl", ("akl_mu",)),
    "gjsd": ("gjsd", ("jsd_beta",)),
}
PARAM_DEFAULTS = {"beta": 1.0, "skew_lambda": 0.1, "akl_mu": 0.5, "jsd_beta": 0.5}


def kernel_divergence(divergence, jsd_beta):
    """The kernel's divergence name and jsd_beta for a public divergence ("js": gjsd at 0.5)."""
    # An unknown name goes on as it is, for the op to refuse.
    return DIVERGENCES.get(divergence, (divergence,))[0], 0.5 if divergence == "js" else float(jsd_beta)


def check_label_weight_types(soft_label_weight, hard_label_weight):
    _check_real_type("soft_label_weight", soft_label_weight)
    _check_real_type("hard_label_weight", hard_label_weight)


def check_divergence(divergence, **params):
    """The API's divergence name, and that only its own parameters differ
    from their defaults (their ranges are the op's rules: check_op_args)."""
    if not isinstance(divergence, str):
        raise TypeError(f"divergence must be a str, one of {', '.join(map(repr, DIVERGENCES))}, "
                        f"got {type(divergence).__name__}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}")
    own = DIVERGENCES[divergence][1]
    for name, value in params.items():
        _check_real_type(name, value)
        if name not in own and value != PARAM_DEFAULTS[name]:
            applies = [d for d, (_, ps) in DIVERGENCES.items() if name in ps]
            raise ValueError(
                f"{name}={value} does not apply to divergence {divergence!r}; it is used by: {', '.join(applies)}"
            )


def check_op_args(student_logits, teacher_logits, labels, divergence, skew_lambda, akl_mu, jsd_beta, reduction,
                  soft_label_weight, hard_label_weight):
    """The op's own checks (csrc/ops/op_common.cpp), for a path that calls
    no kernel first: shapes, devices, the labels' shape, the divergence's
    parameters, the reduction and the label weights. divergence: the API's
    name (after check_divergence)."""
    kernel_name, kernel_jsd_beta = kernel_divergence(divergence, jsd_beta)
    torch.ops.todi_ext.check_distill_args.default(
        student_logits, teacher_logits, labels, kernel_name, float(skew_lambda), float(akl_mu), kernel_jsd_beta,
        reduction, _label_weight_stand_in(soft_label_weight), _label_weight_stand_in(hard_label_weight))


def _label_weight_stand_in(weight):
    """weight, or while torch.compile traces, a float that meets the op's
    rules exactly when weight does (finite; zero or not): the
    vocabulary-parallel loss's label weights are graph inputs there, and
    float() would specialise the graph on their values, where comparisons
    only guard on the rules."""
    if not torch.compiler.is_compiling() or not (-math.inf < weight < math.inf):
        return float(weight)
    return 0.0 if weight == 0 else 1.0


def check_op_config(divergence, skew_lambda, akl_mu, jsd_beta, reduction, soft_label_weight, hard_label_weight,
                    has_labels=True):
    """check_op_args without the tensors (a module's or trainer's
    configuration, before any tensor exists; the fused linear op, whose
    distill_forward sees chunks): the op's checks on meta tensors, with
    labels where there will be some (a module's: as the cross-entropy will
    need)."""
    logits = torch.empty((1, 1), device="meta")
    labels = torch.empty((1,), dtype=torch.int64, device="meta") if has_labels else None
    check_op_args(logits, logits, labels, divergence, skew_lambda, akl_mu, jsd_beta, reduction, soft_label_weight,
                  hard_label_weight)


def check_label_range(labels, vocab, ignore_index):
    """Labels in [0, vocab) or ignore_index: the op's own check
    (csrc/ops/op_common.cpp), for the paths whose kernel sees other
    positions or another vocabulary: the fused linear op (chunks), the
    vocabulary-parallel loss (local ids) and the eager reference. CPU
    tensors only (on a GPU it would sync; the kernel makes such a row NaN)."""
    if labels is None or torch.compiler.is_compiling():
        return
    torch.ops.todi_ext.check_label_range.default(labels, vocab, ignore_index)


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch built without distributed
    _DTensor = None


def _check_not_sharded(name, t):
    """A parameter that a sharding framework holds in pieces outside its module's forward."""
    if _DTensor is not None and isinstance(t, _DTensor):
        raise TypeError(
            f"{name} is a DTensor (sharded, e.g. by FSDP2's fully_shard): the loss needs the whole tensor. Compute "
            "it inside the module's forward, where FSDP2 holds the weight unsharded and reduces its gradient "
            "(todi_ext.integrations.transformers.DistillationTrainer does this), or call module.unshard() first"
        )
    if hasattr(t, "ds_id"):
        raise TypeError(
            f"{name} is a DeepSpeed ZeRO-3 partitioned parameter (shape {tuple(t.shape)} here): compute the loss "
            "inside the module's forward, where ZeRO-3 gathers it (DistillationTrainer does this), or gather it "
            "with deepspeed.zero.GatheredParameters"
        )


def check_fused_linear_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                              teacher_bias, labels):
    """What the fused linear API needs before it flattens the positions for
    its op: whole tensors (not shards), hidden states (..., H) with one
    leading shape, and labels of that shape. The op checks the rest
    (fused_linear.check_op_args)."""
    for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        _check_not_sharded(name, t)
        if not isinstance(t, torch.Tensor) and not (t is None and name.endswith("bias")):
            or_none = " or None" if name.endswith("bias") else ""
            raise TypeError(f"{name} must be a torch.Tensor{or_none}, got {type(t).__name__}")
        if t is not None:
            check_dense(name, t)
    for name, hidden in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if hidden.dim() < 1:
            raise ValueError(f"{name} must have shape (..., H), got {tuple(hidden.shape)}")
    lead = tuple(student_hidden.shape[:-1])
    if tuple(teacher_hidden.shape[:-1]) != lead:
        raise ValueError(
            f"teacher_hidden must have student_hidden's leading shape {lead}, got {tuple(teacher_hidden.shape[:-1])}"
        )
    check_labels_are_a_tensor(labels)  # their dtype: the op's (check_op_args)
    if labels is not None and tuple(labels.shape) != lead:
        raise ValueError(
            f"labels must have shape {lead} (student_hidden without its last dimension), got {tuple(labels.shape)}"
        )
