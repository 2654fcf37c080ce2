"""Registers, stack and shared memory of every CUDA kernel in the built module,
and SASS instructions per entry, read from the build itself (cuobjdump), so no
figure in the docs is typed by hand.

    .venv/bin/python scripts/kernel_resources.py [path/to/_C_cuda.so] [--sass]

--sass adds, for the streamed kernel, the instructions (and MUFU) of each
unrolled 16-byte vector loop, and for the register-row kernel the
instructions and MUFU per entry of its common path (beta = 1, no
cross-entropy, no peak entry, aligned rows, V a multiple of 8). That kernel
has no loop to count: its 32 entries a thread are unrolled, with several
copies of some passes (beta = 1 or not, three cross-entropy modes) of which one runs. So
the script compiles its source twice more with those features pinned, at 32
and at 16 entries a thread, and reports the difference / 16: what one more
entry costs, per-row work (reductions, set-up) left out.

cuobjdump: $CUOBJDUMP, else on PATH, else the copy Triton ships. nvcc:
$CUDACXX, else /usr/local/cuda/bin/nvcc.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIVERGENCES = ["todi", "fkl", "rkl", "tvd", "skl", "srkl", "gjsd", "akl"]  # math::Divergence order
DTYPES = {"f": "float", "d": "double", "6__half": "half", "13__nv_bfloat16": "bf16", "NS0_8AnyDtypeE": "mixed"}
CPP_TYPES = {"bf16": "__nv_bfloat16", "half": "__half", "float": "float"}
STREAMED = re.compile(r"distill_forward_kernelI([fd])(f|d|6__half|13__nv_bfloat16|NS0_8AnyDtypeE)LNS_4math10DivergenceE(\d)ELb([01])E")
REGISTERS = re.compile(r"register_rows_kernelI(f|6__half|13__nv_bfloat16)LNS_4math10DivergenceE(\d)E")
PHASES = re.compile(r"vocab_parallel_kernelI([fd])(f|d|6__half|13__nv_bfloat16|NS0_8AnyDtypeE)LNS_4math10DivergenceE(\d)E"
                    r"LNS_5PhaseE(\d)E")
PHASE_NAMES = ["fused", "row_stats", "partial_sums", "gradients", "akl_walk", "akl_gaps"]  # Phase order

# The register-row kernel's common path: each runtime feature test replaced
# by its usual value. A line that no longer matches stops the script.
PINS = [
    ("  const bool hard = args.hard_weight != 0;", "  constexpr bool hard = false;"),
    ("    if (beta == 1.0) {", "    if (true) {"),
    ("    const bool peak_row = ", "    constexpr bool peak_row = false;"),
    ("    const bool out_vectors = ", "    constexpr bool out_vectors = true;"),
    ("  const int tail = vocab - full_vectors * kVec;", "  constexpr int tail = 0;"),
]
ENTRIES = "constexpr int kRegisterRowEntries = 32;"


def cuobjdump():
    found = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return path if os.path.exists(path) else None
    except ImportError:
        return None


def describe(name):
    m = STREAMED.search(name)
    if m:
        acc, dtype, div, lean = m.groups()
        variant = "lean" if lean == "1" else "streamed"
        return f"{DIVERGENCES[int(div)]:5s} {DTYPES[dtype]:6s} {variant:9s} acc={'double' if acc == 'd' else 'float'}"
    m = REGISTERS.search(name)
    if m:
        dtype, div = m.groups()
        return f"{DIVERGENCES[int(div)]:5s} {DTYPES[dtype]:6s} registers acc=float"
    m = PHASES.search(name)
    if m:
        acc, dtype, div, phase = m.groups()
        return (f"{DIVERGENCES[int(div)]:5s} {DTYPES[dtype]:6s} phase {PHASE_NAMES[int(phase)]} "
                f"acc={'double' if acc == 'd' else 'float'}")
    return re.sub(r"^_ZN8todi_ext4cuda\d+", "", name)[:40]


def resources(tool, path):
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    rows = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    return sorted((describe(n), int(r), int(st), int(sh)) for n, r, st, sh in rows)


def functions(tool, path):
    """{kernel name: [SASS instructions, NOPs left out]}."""
    sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    result = {}
    for chunk in re.split(r"\n\s+Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        result[name] = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", chunk)
                        if not t.strip().startswith("NOP")]
    return result


def vector_loops(tool, path):
    """Per streamed kernel: instructions (MUFU) of each innermost loop of >= 100 instructions."""
    result = {}
    for name, ins in functions(tool, path).items():
        if not STREAMED.search(name):
            continue
        index = {a: i for i, (a, _) in enumerate(ins)}
        loops = []
        for i, (a, t) in enumerate(ins):
            m = re.search(r"BRA\s+(?:.*?)(0x[0-9a-f]+)", t)
            if m and int(m.group(1), 16) < a and int(m.group(1), 16) in index:
                body = ins[index[int(m.group(1), 16)] : i + 1]
                if 100 <= len(body) < 1000:
                    loops.append((len(body), sum("MUFU" in x for _, x in body)))
        result[describe(name)] = loops
    return result


def register_row_costs(tool, cases):
    """(dtype, divergence) -> (instructions, MUFU) per entry of the register-row kernel's common path."""
    import torch.utils.cpp_extension as ext

    nvcc = os.environ.get("CUDACXX") or "/usr/local/cuda/bin/nvcc"
    source = open(os.path.join(ROOT, "csrc", "cuda", "register_rows_kernel.cuh")).read()
    lines = source.split("\n")
    for prefix, pinned in PINS:
        hits = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        if len(hits) != 1:
            sys.exit(f"kernel_resources.py: the pin {prefix.strip()!r} matches {len(hits)} lines; update PINS")
        lines[hits[0]] = pinned
    pinned_source = "\n".join(lines)
    if pinned_source.count(ENTRIES) != 1:
        sys.exit("kernel_resources.py: kRegisterRowEntries is not declared as expected; update ENTRIES")
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe.cu")
        with open(probe, "w") as f:
            f.write('#include "register_rows_kernel.cuh"\nnamespace todi_ext::cuda {\n')
            for dtype, div in cases:
                f.write(f"template __global__ void register_rows_kernel<{CPP_TYPES[dtype]}, "
                        f"math::Divergence::k{'ToDi' if div == 'todi' else div.upper()}>(const ForwardParams);\n")
            f.write("}\n")
        for entries in (32, 16):
            with open(os.path.join(tmp, "register_rows_kernel.cuh"), "w") as f:
                f.write(pinned_source.replace(ENTRIES, f"constexpr int kRegisterRowEntries = {entries};"))
            cubin = os.path.join(tmp, f"probe{entries}.cubin")
            includes = [f"-I{tmp}"] + [f"-I{os.path.join(ROOT, 'csrc', d)}" for d in ("", "include", "cuda")]
            includes += [arg for p in ext.include_paths() for arg in ("-isystem", p)]
            subprocess.run([nvcc, "-cubin", "-O3", "-DNDEBUG", "-std=c++20", "--expt-relaxed-constexpr",
                            "--generate-code=arch=compute_90,code=sm_90", "-D__CUDA_NO_HALF_OPERATORS__",
                            "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
                            "-D__CUDA_NO_HALF2_OPERATORS__", *includes, "-o", cubin, probe], check=True)
            for name, ins in functions(tool, cubin).items():
                m = REGISTERS.search(name)
                if m:
                    key = (DTYPES[m.group(1)], DIVERGENCES[int(m.group(2))])
                    counts.setdefault(key, {})[entries] = (len(ins), sum("MUFU" in t for _, t in ins))
    return {k: ((c[32][0] - c[16][0]) / 16, (c[32][1] - c[16][1]) / 16) for k, c in counts.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", nargs="?", help="default: the installed todi_ext._C_cuda")
    parser.add_argument("--sass", action="store_true", help="also instructions per vector / per entry")
    args = parser.parse_args()
    path = args.module
    if path is None:
        import todi_ext._load as load

        path = load._C_cuda.__file__
    tool = cuobjdump()
    if tool is None:
        sys.exit("cuobjdump not found (set CUOBJDUMP, or pip install triton)")
    print("| kernel | registers | stack (B) | static shared (B) |\n|---|---|---|---|")
    for name, reg, stack, shared in resources(tool, path):
        print(f"| {name} | {reg} | {stack} | {shared} |")
    if args.sass:
        print("\n| streamed kernel | vector loops: instructions (MUFU) per 16-byte vector |\n|---|---|")
        for name, loops in sorted(vector_loops(tool, path).items()):
            if "todi" in name or "fkl" in name:
                print(f"| {name} | {', '.join(f'{n} ({m})' for n, m in loops)} |")
        cases = [(d, v) for d in ("bf16", "float") for v in DIVERGENCES]
        print("\n| register-row kernel, common path | instructions per entry | MUFU per entry |\n|---|---|---|")
        for (dtype, div), (n, m) in sorted(register_row_costs(tool, cases).items()):
            print(f"| {div:5s} {dtype:6s} | {n:.1f} | {m:.2f} |")


if __name__ == "__main__":
    main()
