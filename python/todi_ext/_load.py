"""Loads the compiled modules, checking first that the installed torch can run them.

The modules are built on the LibTorch stable ABI with torch 2.10 as the
target: one build loads under every torch from 2.10 on, whichever torch built
it. An older torch, or a torch whose CUDA major version differs from the one
the CUDA kernels were built with, gets a message that says what to do
instead of an undefined-symbol traceback.
"""

import os
import re

import torch

# The oldest torch whose stable ABI the modules are built for
# (TORCH_TARGET_VERSION in cmake/TorchFromPython.cmake).
MIN_TORCH = (2, 10)


def version_tuple(version: str) -> tuple:
    """(major, minor) of a version string such as "2.14.1+cu130"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return int(match.group(1)), int(match.group(2))


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

if version_tuple(torch.__version__) < MIN_TORCH:
    raise ImportError(
        f"todi_ext needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (its compiled modules use the LibTorch stable "
        f"ABI of that release), but torch {torch.__version__} is installed: upgrade torch"
    )

# The CUDA kernels link the CUDA runtime of the toolkit that built them: a
# torch built for another CUDA major version cannot load them.
_cuda_kernels = _build_config.CUDA_VERSION is not None and torch.version.cuda is not None
if _cuda_kernels and _build_config.CUDA_VERSION.split(".")[0] != torch.version.cuda.split(".")[0]:
    raise ImportError(
        f"todi_ext's CUDA kernels were built with CUDA {_build_config.CUDA_VERSION}, but torch "
        f"{torch.__version__} uses CUDA {torch.version.cuda}: install the todi_ext build for CUDA "
        f"{torch.version.cuda.split('.')[0]} (one wheel per CUDA major version), or build it from source. {_REBUILD}"
    )

try:
    from . import _C  # noqa: F401  (loading it registers the ops and their CPU kernels)

    # The CPU kernel copy for what torch uses here (it honours ATEN_CPU_CAPABILITY).
    torch.ops.todi_ext.use_cpu_capability(torch.backends.cpu.get_cpu_capability())

    # The CUDA kernels are a module of their own: a CPU-only torch lacks the
    # CUDA libraries it links, and the CPU part serves there on its own.
    if _cuda_kernels:
        from . import _C_cuda  # noqa: F401
except (ImportError, AttributeError, RuntimeError) as exc:  # e.g. undefined symbols, or a stale module
    raise ImportError(
        f"todi_ext's compiled module failed to load with torch {torch.__version__} "
        f"(built against {_build_config.TORCH_VERSION}): {exc}. {_REBUILD}"
    ) from exc


def build_info() -> dict:
    """How the compiled module was built.

    Keys: version, torch_version (the torch that built it; any torch >= 2.10
    runs it), cuda_version (None without CUDA kernels), cuda_archs,
    cpu_capabilities_compiled, cpu_capability (the kernel copy in use on this
    machine), cpu_threads.
    """
    return {
        "version": _build_config.VERSION,
        "torch_version": _build_config.TORCH_VERSION,
        "cuda_version": _build_config.CUDA_VERSION,
        "cuda_archs": list(_build_config.CUDA_ARCHS),
        "cpu_capabilities_compiled": list(_build_config.CPU_CAPABILITIES),
        "cpu_capability": torch.ops.todi_ext.cpu_kernel_capability(),
        "cpu_threads": torch.get_num_threads(),
    }
