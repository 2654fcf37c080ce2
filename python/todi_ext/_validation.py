"""Argument checks of the public API, shared by the kernel path, the eager
reference and the fake (meta) implementations, so every entry point rejects
bad input with the same message that names the argument."""

import math
import numbers

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_logits(student_logits, teacher_logits):
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in LOGIT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16 (or float64), got {x.dtype}")
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(
            f"student_logits must have shape (..., V) with V >= 1, got {tuple(student_logits.shape)}"
        )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits is on {teacher_logits.device} but student_logits is on {student_logits.device}; "
            "move both to one device"
        )


_FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_ignore_index_fits(labels, ignore_index):
    """An ignore_index outside the labels' dtype can never match (uint8 labels
    and -100): the kernel would ignore nothing while a wrapped comparison
    would ignore some other label."""
    if labels is None or labels.dtype == torch.int64:
        return
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(
            f"ignore_index {ignore_index} is outside the range of labels' dtype {labels.dtype} "
            f"[{info.min}, {info.max}]: use int64 labels or an ignore_index in that range"
        )


def check_labels(labels, student_logits, like="student_logits"):
    """labels: one per position of student_logits (..., V); like names that argument in the messages."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (e.g. torch.int64), got {labels.dtype}")
    positions = tuple(student_logits.shape[:-1])
    if tuple(labels.shape) != positions:
        raise ValueError(
            f"labels must have shape {positions} ({like} without its last dimension), "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != student_logits.device:
        raise ValueError(f"labels is on {labels.device} but {like} is on {student_logits.device}")


def _check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (-math.inf < value < math.inf):  # False for NaN too; math.isfinite breaks torch.compile graphs
        raise ValueError(f"{name} must be finite, got {value}")


def check_scalars(beta, temperature, ignore_index, reduction="mean"):
    _check_real("beta", beta)
    _check_real("temperature", temperature)
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
    check_reduction(reduction)


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_all(student_logits, teacher_logits, labels, beta, temperature, ignore_index, reduction="mean"):
    check_logits(student_logits, teacher_logits)
    check_labels(labels, student_logits)
    check_scalars(beta, temperature, ignore_index, reduction)
    check_ignore_index_fits(labels, ignore_index)


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
    return DIVERGENCES[divergence][0], 0.5 if divergence == "js" else float(jsd_beta)


def check_label_weights(soft_label_weight, hard_label_weight, labels=None, *, with_labels=True):
    """Weights of the divergence and of the hard-label cross-entropy; the
    cross-entropy needs labels (with_labels=False: not known yet)."""
    _check_real("soft_label_weight", soft_label_weight)
    _check_real("hard_label_weight", hard_label_weight)
    if with_labels and hard_label_weight != 0 and labels is None:
        raise ValueError(
            f"hard_label_weight={hard_label_weight} needs labels (the cross-entropy's targets), got labels=None"
        )


def check_label_range(labels, vocab, ignore_index):
    """Labels in [0, V) or ignore_index, checked where that costs no host
    sync (CPU tensors); on a GPU the kernel makes such a row NaN. For the
    entry points whose op cannot check it with the caller's positions: the
    fused linear op (chunks), the vocabulary-parallel loss (local labels) and
    the eager reference. distill_loss leaves it to its op (op_common.cpp)."""
    if labels is None or labels.device.type != "cpu" or torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = ((labels != ignore_index) & ((labels < 0) | (labels >= vocab))).reshape(-1)
    if bool(bad.any()):
        position = int(bad.nonzero()[0])
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index ({ignore_index}) for the hard-label "
            f"cross-entropy, got {int(labels.reshape(-1)[position])} at position {position}"
        )


def check_divergence(divergence, **params):
    """Checks the divergence name and that only its own parameters differ from their defaults."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}")
    own = DIVERGENCES[divergence][1]
    for name, value in params.items():
        _check_real(name, value)
        if name not in own and value != PARAM_DEFAULTS[name]:
            applies = [d for d, (_, ps) in DIVERGENCES.items() if name in ps]
            raise ValueError(
                f"{name}={value} does not apply to divergence {divergence!r}; it is used by: {', '.join(applies)}"
            )
    values = {**PARAM_DEFAULTS, **params}
    _check_ranges(values["skew_lambda"], values["akl_mu"], values["jsd_beta"])


def _check_ranges(skew_lambda, akl_mu, jsd_beta):
    if not 0.0 <= skew_lambda <= 1.0:
        raise ValueError(f"skew_lambda must be in [0, 1], got {skew_lambda}")
    if not 0.0 <= akl_mu < 1.0:
        raise ValueError(
            f"akl_mu must be in [0, 1), got {akl_mu} (at 1 the split would hinge on how the probabilities' "
            "sum rounds around 1; the tail is then everything, so use divergence='rkl')"
        )
    if not 0.0 < jsd_beta < 1.0:
        raise ValueError(
            f"jsd_beta must be in (0, 1), got {jsd_beta} (at 0 and 1 the generalized JSD is identically "
            "zero; use divergence='fkl' or 'rkl')"
        )


def check_kernel_divergence(divergence, skew_lambda, akl_mu, jsd_beta):
    """Checks the op-level divergence name (the kernel's names) and its parameters."""
    kernel_names = {k for k, _ in DIVERGENCES.values()}
    if divergence not in kernel_names:
        raise ValueError(f"divergence must be one of {sorted(kernel_names)}, got {divergence!r}")
    _check_ranges(skew_lambda, akl_mu, jsd_beta)


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


def check_fused_linear(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias):
    """Hidden states (..., H) and lm_head weights (V, H) (+ biases (V,)) of
    the student and the teacher; V must agree (no padding: padded entries
    would get probability mass)."""
    for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        _check_not_sharded(name, t)
    for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in LOGIT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16 (or float64), got {t.dtype}")
    for who, hidden, weight, bias in (("student", student_hidden, student_weight, student_bias),
                                      ("teacher", teacher_hidden, teacher_weight, teacher_bias)):
        if hidden.dim() < 1:
            raise ValueError(f"{who}_hidden must have shape (..., H), got {tuple(hidden.shape)}")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
            raise ValueError(
                f"{who}_weight must have shape (V, {hidden.shape[-1]}) for {who}_hidden of shape "
                f"{tuple(hidden.shape)}, got {tuple(weight.shape)}"
            )
        if weight.dtype != hidden.dtype:
            raise TypeError(f"{who}_weight must have {who}_hidden's dtype {hidden.dtype}, got {weight.dtype}")
        if weight.device != hidden.device:
            raise ValueError(f"{who}_weight is on {weight.device} but {who}_hidden is on {hidden.device}")
        if bias is not None:
            if not isinstance(bias, torch.Tensor):
                raise TypeError(f"{who}_bias must be a torch.Tensor or None, got {type(bias).__name__}")
            if tuple(bias.shape) != (weight.shape[0],):
                raise ValueError(f"{who}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
            if bias.dtype != hidden.dtype or bias.device != hidden.device:
                raise ValueError(
                    f"{who}_bias must be {hidden.dtype} on {hidden.device} like {who}_hidden, "
                    f"got {bias.dtype} on {bias.device}"
                )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"the student's vocabulary size ({student_weight.shape[0]}, rows of student_weight) differs from the "
            f"teacher's ({teacher_weight.shape[0]}, rows of teacher_weight); distillation needs one vocabulary"
        )
    if tuple(teacher_hidden.shape[:-1]) != tuple(student_hidden.shape[:-1]):
        raise ValueError(
            f"teacher_hidden must have student_hidden's leading shape {tuple(student_hidden.shape[:-1])}, "
            f"got {tuple(teacher_hidden.shape[:-1])}"
        )
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on {student_hidden.device}")
