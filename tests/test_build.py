"""The installed package: build information and the torch-version guard."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import todi_ext


def test_build_info():
    info = todi_ext.build_info()
    assert info["version"] == todi_ext.__version__
    # Built on the stable ABI: any torch >= 2.10 may run it, whichever built it.
    assert todi_ext._load.version_tuple(info["torch_version"]) >= (2, 10)
    assert todi_ext._load.version_tuple(torch.__version__) >= (2, 10)
    assert "DEFAULT" in info["cpu_capabilities_compiled"]
    assert info["cpu_capability"] in info["cpu_capabilities_compiled"]
    if info["cuda_version"] is None:
        assert info["cuda_archs"] == []
    else:
        assert info["cuda_archs"]


def test_the_module_is_one_abi3_build_for_every_python():
    # python_module.cpp keeps to the limited C API, and the build says so (USE_SABI 3.10).
    from todi_ext import _load

    assert _load._C.__file__.endswith(".abi3.so")
    assert torch.ops.todi_ext.cpu_kernel_capability() == todi_ext.build_info()["cpu_capability"]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_cpu_kernel_copies_use_nothing_of_libtorch_but_sleef():
    # The kernel files stay outside the stable ABI (issue 25): compiled once per
    # instruction set with at::vec inlined, they may call into libtorch only
    # for Sleef's vector math; threads come from the op (ParallelFor).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = sorted(glob.glob(os.path.join(root, "build", "*", "CMakeFiles")), key=os.path.getmtime)
    objects = glob.glob(os.path.join(trees[-1], "cpu_distill_kernel_*.dir", "**", "*.o"), recursive=True) if trees else []
    if not objects:
        pytest.skip("no build tree here (the package was built elsewhere)")
    for path in objects:
        names = subprocess.run(["nm", "-C", "--undefined-only", path], capture_output=True, text=True,
                               check=True).stdout.split("\n")
        torch_side = [n for n in names if re.search(r"\b(c10|at|torch|caffe2)::|GOMP_|omp_", n)]
        assert not torch_side, f"{os.path.basename(os.path.dirname(os.path.dirname(path)))}: {torch_side[:5]}"
        assert any("Sleef_" in n for n in names) or "DEFAULT" in path


def test_the_cpu_part_loads_without_the_cuda_module():
    # Under a CPU-only torch (torch.version.cuda None) _C_cuda, which links
    # torch's CUDA libraries, is not loaded; the CPU ops serve on their own.
    code = (
        "import torch; torch.version.cuda = None; import todi_ext, sys;"
        "assert 'todi_ext._C_cuda' not in sys.modules;"
        "assert not torch._C._dispatch_has_kernel_for_dispatch_key('todi_ext::distill_forward', 'CUDA');"
        "z = torch.randn(4, 50); print(float(todi_ext.todi_loss(z, z.flip(0))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout) > 0


def test_the_cpu_kernel_copy_follows_the_capability_it_is_given():
    # _load.py passes torch.backends.cpu.get_cpu_capability() at import; the op
    # picks the widest compiled copy that capability allows.
    best = todi_ext.build_info()["cpu_capability"]
    try:
        assert torch.ops.todi_ext.use_cpu_capability("DEFAULT") == "DEFAULT"
        assert todi_ext.build_info()["cpu_capability"] == "DEFAULT"
        assert torch.ops.todi_ext.use_cpu_capability("SVE256") == "DEFAULT"  # not an x86 copy
    finally:
        assert torch.ops.todi_ext.use_cpu_capability(torch.backends.cpu.get_cpu_capability()) == best


def test_ops_are_registered_for_cpu():
    for op in ("distill_forward", "scale_grad_", "scale_grad"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"todi_ext::{op}", "CPU")


@pytest.mark.slow
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


def test_a_torch_older_than_2_10_gives_a_clear_error():
    code = "import torch; torch.__version__ = '2.9.1'; import todi_ext"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "ImportError" in out.stderr
    assert "todi_ext needs torch >= 2.10" in out.stderr
    assert "torch 2.9.1 is installed: upgrade torch" in out.stderr


def test_another_torch_release_from_2_10_on_is_accepted():
    # The stable ABI: no exact-version check (CI also runs the suite under
    # torch 2.13.0+cpu with the wheel built under 2.14.1).
    code = "import torch; torch.__version__ = '2.10.0'; import todi_ext; print(todi_ext.build_info()['torch_version'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.skipif(todi_ext.build_info()["cuda_version"] is None or torch.version.cuda is None,
                    reason="a build with CUDA kernels under a CUDA build of torch")
def test_a_torch_for_another_cuda_major_gives_a_clear_error():
    built = todi_ext.build_info()["cuda_version"].split(".")[0]
    other = "12.8" if built != "12" else "13.0"
    code = f"import torch; torch.version.cuda = '{other}'; import todi_ext"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert f"CUDA kernels were built with CUDA {built}." in out.stderr
    assert f"uses CUDA {other}: install the todi_ext build for CUDA {other.split('.')[0]}" in out.stderr


def _undefined_symbols(path):
    out = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_the_modules_need_only_what_torch_2_10_exports():
    # The stable ABI's promise holds only if the modules call torch through
    # its C shim alone: every symbol they take from torch (unversioned, not
    # Python's) must be an aoti_torch_* / torch_* / Sleef_* export of torch
    # 2.10 (tests/data/torch_2_10_exports.txt, scripts/torch_exports.py), and
    # nothing else of torch (no C++ symbol of c10, at or torch) may be linked.
    root = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(root, "data", "torch_2_10_exports.txt")) as f:
        exported = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    from todi_ext import _load

    modules = [_load._C.__file__]
    if "todi_ext._C_cuda" in sys.modules:
        modules.append(sys.modules["todi_ext._C_cuda"].__file__)
    for path in modules:
        names = _undefined_symbols(path)
        from_torch = [n for n in names if "@" not in n and not n.startswith(("Py", "_Py"))
                      and n not in ("__gmon_start__", "_ITM_registerTMCloneTable", "_ITM_deregisterTMCloneTable")]
        assert from_torch, path
        missing = sorted(n for n in from_torch if n not in exported)
        assert not missing, f"{os.path.basename(path)} needs symbols torch 2.10 does not export: {missing[:10]}"
        needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
        libs = set(re.findall(r"Shared library: \[([^\]]+)\]", needed))
        assert not {lib for lib in libs if lib.startswith(("libc10", "libtorch_python", "libtorch.so"))}, libs
        assert "libtorch_cpu.so" in libs


def _fatbin_archs(path):
    """The SM architectures of the cubins in an ELF shared object's .nv_fatbin section."""
    import struct

    data = open(path, "rb").read()
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_offset = sections[shstrndx][4]
    by_name = {data[strtab_offset + s[0] :].split(b"\0", 1)[0].decode(): s for s in sections}
    section = by_name[".nv_fatbin"]
    blob = data[section[4] : section[4] + section[5]]
    archs, pos = set(), 0
    while pos + 16 <= len(blob):
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != 0xBA55ED50:  # fatbin header magic
            break
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", blob, entry)
            arch = struct.unpack_from("<I", blob, entry + 28)[0]
            archs.add(("sm_" if kind == 2 else "compute_") + str(arch))
            entry += entry_header + payload
        pos = end
    return archs


@pytest.mark.skipif(todi_ext.build_info()["cuda_version"] is None or torch.version.cuda is None,
                    reason="built without CUDA kernels, or a CPU-only torch (which does not load them)")
def test_cuda_build_registers_every_op_and_carries_its_architectures():
    for op in ("distill_forward", "scale_grad_", "scale_grad"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"todi_ext::{op}", "CUDA")
    archs = _fatbin_archs(todi_ext._load._C_cuda.__file__)
    for arch in todi_ext.build_info()["cuda_archs"]:
        # The fatbin's entry header holds the number only: sm_90a code is listed as sm_90.
        base = arch.rstrip("af")
        assert base in archs, f"{base} (for {arch}) not in the module's fatbin ({sorted(archs)})"


def test_importing_the_unbuilt_source_tree_says_so():
    import os
    import subprocess
    import sys

    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
    out = subprocess.run([sys.executable, "-c", "import todi_ext"], cwd=source, capture_output=True, text=True)
    assert out.returncode != 0 and "a source tree without its compiled module" in out.stderr, out.stderr[-2000:]
