"""Loads the compiled module, checking first that it matches the installed torch.

A C++ extension built against one torch release fails to load under another
with an undefined-symbol traceback; this turns that into a message that says
what to do.
"""

import os

import torch

try:
    from . import _build_config
except ImportError as exc:  # the source tree (python/todi_ext) shadows the installed, built package
    raise ImportError(
        f"todi_ext was imported from {os.path.dirname(os.path.abspath(__file__))}, a source tree without its "
        "compiled module (it shadows the installed package when Python starts in that folder): run from "
        "another directory, or build and install it first (./scripts/setup.sh)"
    ) from exc

_REBUILD = (
    "Rebuild it against the installed torch: "
    "pip install --no-build-isolation --no-deps --force-reinstall <path to the todi_ext source>"
)

if torch.__version__ != _build_config.TORCH_VERSION:
    raise ImportError(
        f"todi_ext was built against torch {_build_config.TORCH_VERSION}, but torch {torch.__version__} "
        f"is installed. {_REBUILD}"
    )

try:
    from . import _C  # noqa: F401  (loading it registers the ops and their CPU kernels)

    # The CPU kernel copy for what torch uses here (it honours ATEN_CPU_CAPABILITY).
    torch.ops.todi_ext.use_cpu_capability(torch.backends.cpu.get_cpu_capability())

    # The CUDA kernels are a module of their own: a CPU-only torch lacks the
    # CUDA libraries it links, and the CPU part serves there on its own.
    if _build_config.CUDA_VERSION is not None and torch.version.cuda is not None:
        from . import _C_cuda  # noqa: F401
except (ImportError, AttributeError, RuntimeError) as exc:  # e.g. undefined symbols, or a stale module
    raise ImportError(
        f"todi_ext's compiled module failed to load with torch {torch.__version__} "
        f"(built against {_build_config.TORCH_VERSION}): {exc}. {_REBUILD}"
    ) from exc


def build_info() -> dict:
    """How the compiled module was built.

    Keys: version, torch_version, cuda_version (None without CUDA kernels),
    cuda_archs, openmp, cpu_capabilities_compiled, cpu_capability (the kernel
    copy in use on this machine), cpu_threads.
    """
    return {
        "version": _build_config.VERSION,
        "torch_version": _build_config.TORCH_VERSION,
        "cuda_version": _build_config.CUDA_VERSION,
        "cuda_archs": list(_build_config.CUDA_ARCHS),
        "openmp": _build_config.OPENMP,
        "cpu_capabilities_compiled": list(_build_config.CPU_CAPABILITIES),
        "cpu_capability": torch.ops.todi_ext.cpu_kernel_capability(),
        "cpu_threads": torch.get_num_threads(),
    }
