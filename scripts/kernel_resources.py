"""Registers, stack and shared memory of every CUDA kernel in the built module,
and SASS instructions per entry of the forward kernels' vector loops, read
from the build itself (cuobjdump), so no figure in the docs is typed by hand.

    .venv/bin/python scripts/kernel_resources.py [path/to/_C.so] [--sass]

cuobjdump: $CUOBJDUMP, else on PATH, else the copy Triton ships.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

DIVERGENCES = ["todi", "fkl", "rkl", "tvd", "skl", "srkl", "gjsd", "akl"]  # math::Divergence order
DTYPES = {"f": "float", "d": "double", "6__half": "half", "13__nv_bfloat16": "bf16", "NS0_8AnyDtypeE": "mixed"}
KERNEL = re.compile(r"distill_forward_kernelI([fd])(f|d|6__half|13__nv_bfloat16|NS0_8AnyDtypeE)Lb([01])ELNS_4math10DivergenceE(\d)ELb([01])E")


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
    m = KERNEL.search(name)
    if not m:
        return re.sub(r"^_ZN8todi_ext4cuda\d+", "", name)[:40]
    acc, dtype, cached, div, split = m.groups()
    variant = "split" if split == "1" else ("cached" if cached == "1" else "streamed")
    return f"{DIVERGENCES[int(div)]:5s} {DTYPES[dtype]:6s} {variant:8s} acc={'double' if acc == 'd' else 'float'}"


def resources(tool, path):
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    rows = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    return sorted((describe(n), int(r), int(st), int(sh)) for n, r, st, sh in rows)


def vector_loops(tool, path):
    """Per kernel: instructions of each innermost loop of >= 100 instructions (the unrolled 16-byte vector loops)."""
    sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    result = {}
    for chunk in re.split(r"\n\s+Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", chunk)]
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", nargs="?", help="default: the installed todi_ext._C")
    parser.add_argument("--sass", action="store_true", help="also the vector loops' instruction counts")
    args = parser.parse_args()
    path = args.module
    if path is None:
        import todi_ext._load as load

        path = load._C.__file__
    tool = cuobjdump()
    if tool is None:
        sys.exit("cuobjdump not found (set CUOBJDUMP, or pip install triton)")
    print(f"| kernel | registers | stack (B) | static shared (B) |\n|---|---|---|---|")
    for name, reg, stack, shared in resources(tool, path):
        print(f"| {name} | {reg} | {stack} | {shared} |")
    if args.sass:
        print("\n| kernel | vector loops: instructions (MUFU) per 16-byte vector |\n|---|---|")
        for name, loops in sorted(vector_loops(tool, path).items()):
            if "todi" in name or "fkl" in name:
                print(f"| {name} | {', '.join(f'{n} ({m})' for n, m in loops)} |")


if __name__ == "__main__":
    main()
