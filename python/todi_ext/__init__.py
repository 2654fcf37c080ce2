"""todi_ext: fused CPU/CUDA kernels for the ToDi distillation loss.

    loss = todi_ext.todi_loss(student_logits, teacher_logits, labels)

The exact semantics: docs/api.md.
"""

from ._load import build_info  # loads the compiled ops first; raises a clear ImportError on mismatch
from . import ops  # noqa: F401  (fake and autograd registrations)
from . import reference
from .loss import DistillLoss, ToDiLoss, distill_loss, todi_loss
from .fused_linear import FusedLinearDistillLoss, fused_linear_distill_loss

__version__ = build_info()["version"]
__all__ = ["todi_loss", "ToDiLoss", "distill_loss", "DistillLoss", "fused_linear_distill_loss",
           "FusedLinearDistillLoss", "reference", "build_info", "__version__"]
