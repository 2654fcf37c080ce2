"""The installed package: build information and the torch-version guard."""

import os
import subprocess
import sys

import torch

import todi_ext


def test_build_info():
    info = todi_ext.build_info()
    assert info["version"] == todi_ext.__version__
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["openmp"], bool)
    assert "DEFAULT" in info["cpu_capabilities_compiled"]
    assert info["cpu_capability"] in info["cpu_capabilities_compiled"]
    if info["cuda_version"] is None:
        assert info["cuda_archs"] == []
    else:
        assert info["cuda_archs"]


def test_ops_are_registered_for_cpu():
    for op in ("todi_forward", "scale_rows"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"todi_ext::{op}", "CPU")


def test_default_cpu_kernel_copy_matches_the_vectorized_one():
    # ATEN_CPU_CAPABILITY=default makes the extension pick its DEFAULT copy,
    # as ATen does; both copies must compute the same loss.
    code = (
        "import torch, todi_ext; g = torch.Generator().manual_seed(0);"
        "z = torch.randn(7, 3001, generator=g) * 3; s = torch.randn(7, 3001, generator=g) * 3;"
        "print(todi_ext.build_info()['cpu_capability']);"
        "print(repr(todi_ext.todi_loss(z, s, reduction='sum').item()))"
    )
    outs = {}
    for cap in ("default", None):
        env = dict(os.environ)
        env.pop("ATEN_CPU_CAPABILITY", None)
        if cap:
            env["ATEN_CPU_CAPABILITY"] = cap
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        chosen, value = out.stdout.split()
        outs[chosen] = float(value)
    assert "DEFAULT" in outs
    values = list(outs.values())
    assert abs(values[0] - values[-1]) <= 1e-5 * abs(values[0])


def test_import_against_another_torch_version_gives_a_clear_error():
    code = "import torch; torch.__version__ = '1.0.0'; import todi_ext"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "ImportError" in out.stderr
    assert "built against torch " + torch.__version__ in out.stderr
    assert "torch 1.0.0 is installed" in out.stderr
    assert "pip install --no-build-isolation" in out.stderr
