"""The parity, divergence and accuracy tests once more under every CPU kernel copy this
machine can run (the build compiles DEFAULT, AVX2 and AVX512 and picks the
one ATen uses): each copy sums in its own vector width, so a copy the
machine does not pick by default must be checked explicitly."""

import os
import subprocess
import sys

import pytest
import torch

import todi_ext

# The slow tier: a subprocess per CPU kernel copy (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow

ORDER = ["default", "avx2", "avx512"]
HERE = os.path.dirname(os.path.abspath(__file__))


def runnable(capability):
    best = todi_ext.build_info()["cpu_capability"].lower()
    compiled = [c.lower() for c in todi_ext.build_info()["cpu_capabilities_compiled"]]
    return capability in compiled and best in ORDER and ORDER.index(capability) <= ORDER.index(best)


@pytest.mark.parametrize("capability", ORDER)
def test_parity_under_each_cpu_kernel_copy(capability, tmp_path):
    if not runnable(capability):
        pytest.skip(f"this CPU or build does not run the {capability} copy")
    if capability == todi_ext.build_info()["cpu_capability"].lower():
        pytest.skip("the copy this machine picks runs in the main test session")
    # Inductor's cache is not keyed on ATEN_CPU_CAPABILITY: code compiled for
    # one copy, loaded under another, crashed (measured with torch 2.14.1).
    # Each copy's run gets its own cache.
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    probe = subprocess.run([sys.executable, "-c", "import todi_ext; print(todi_ext.build_info()['cpu_capability'])"],
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip().lower() == capability
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *(os.path.join(HERE, f) for f in ("test_parity.py", "test_divergences.py", "test_accuracy.py",
                                                            # the vocab-parallel phases in one process (no spawn)
                                                            "test_distributed.py::test_phase_ops_pass_opcheck_and_check_their_tables",
                                                            "test_distributed.py::test_akl_phase_ops_on_one_slice_give_the_fused_split"))],
                         env=env, capture_output=True, text=True)

    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
