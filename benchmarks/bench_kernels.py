"""CUDA kernel A/B: the register-row kernel against the streamed kernel and
the memory floor, side by side in one run (a GPU machine; CUDA only).

    python benchmarks/bench_kernels.py [--rows 8192] [--repeats 10] [--out DIR]

Per shape, forward+backward of distill_loss (T = 2, the student's gradient,
~10% ignored rows), median over the repeats with CUDA events, rotating over
input sets that do not fit L2 together:
  floor      a warm torch.add(student, teacher, out=grad) of the same tensors:
             each input read once, the gradient written once
  registers  rows that start on 16-byte boundaries: the launch runs the
             register-row kernel where the row fits (V <= 131072)
  streamed   the same values in rows that start one element past a boundary
             (student and teacher alike, so 16-byte loads still serve the
             middle of each row): the launch streams
torch.profiler names the kernel each variant ran, so the table says what was
measured. Shapes: N x V bf16 V in {32000, 128256, 262144}, fp32 V = 128256,
then every divergence at bf16 V = 128256. Writes kernels-cuda.md and .json.
"""

import argparse
import datetime
import json
import os
import sys

import torch

import todi_ext

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import floor_ms, time_cuda  # noqa: E402  (benchmarks/bench.py)

DIVERGENCES = ["todi", "fkl", "rkl", "js", "tvd", "skl", "srkl", "gjsd", "akl"]


def make_sets(n, v, dtype, offset, count):
    """`count` input sets; rows start `offset` elements into rows of v + 8."""
    sets = []
    for k in range(count):
        g = torch.Generator(device="cuda").manual_seed(k)
        z = torch.empty(n, v + 8, dtype=dtype, device="cuda").normal_(0, 3, generator=g)[:, offset:offset + v]
        s = torch.empty(n, v + 8, dtype=dtype, device="cuda").normal_(0, 3, generator=g)[:, offset:offset + v]
        labels = torch.randint(0, v, (n,), device="cuda", generator=g)
        labels[torch.rand(n, device="cuda", generator=g) < 0.1] = -100
        sets.append((z.detach().requires_grad_(), s, labels))
    return sets


def kernels_run(fn, inputs):
    """Names of the CUDA kernels one forward+backward launches (torch.profiler)."""
    z, s, labels = inputs
    z.grad = None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(z, s, labels).backward()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    found = [k for k in ("register_rows_kernel", "distill_forward_kernel") if any(k in n for n in names)]
    return "+".join(found) or "?"


def run_case(n, v, dtype, divergence, repeats):
    fn = lambda z, s, y: todi_ext.distill_loss(z, s, y, divergence=divergence, temperature=2.0)  # noqa: E731
    set_bytes = 2 * n * (v + 8) * dtype.itemsize
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    count = max(2, min(4, -(-4 * l2 // set_bytes)))
    row = {"shape": f"{n}x{v}", "dtype": str(dtype).replace("torch.", ""), "divergence": divergence}
    for name, offset in (("registers", 0), ("streamed", 1)):
        sets = make_sets(n, v, dtype, offset, count)
        if name == "registers":
            row["floor_ms"] = floor_ms(sets, "cuda", repeats)
        row[f"{name}_kernel"] = kernels_run(fn, sets[0])
        row[f"{name}_ms"] = time_cuda(fn, sets, repeats, warmup=3)["forward+backward"]["median_ms"]
        del sets
        torch.cuda.empty_cache()
    return row


def table_row(r):
    f = r["floor_ms"]
    return (f"| {r['shape']} | {r['dtype']} | {r['divergence']} | {f:.3f} | {r['registers_ms']:.3f} "
            f"({r['registers_ms'] / f:.2f}x) | {r['streamed_ms']:.3f} ({r['streamed_ms'] / f:.2f}x) | "
            f"{r['registers_kernel']} / {r['streamed_kernel']} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA device")
    n = args.rows
    cases = [(32000, torch.bfloat16, "todi"), (128256, torch.bfloat16, "todi"), (262144, torch.bfloat16, "todi"),
             (128256, torch.float32, "todi")]
    cases += [(128256, torch.bfloat16, d) for d in DIVERGENCES if d != "todi"]
    rows = []
    os.makedirs(args.out, exist_ok=True)
    header = ("| N x V | dtype | divergence | floor ms | registers ms (x floor) | streamed ms (x floor) | kernels |\n"
              "|---|---|---|---|---|---|---|")
    print(header)
    device = torch.cuda.get_device_name()
    for v, dtype, divergence in cases:
        rows.append(run_case(n, v, dtype, divergence, args.repeats))
        print(table_row(rows[-1]), flush=True)
        with open(os.path.join(args.out, "kernels-cuda.md"), "w") as fh:  # rewritten after every case
            fh.write(f"{device}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                     f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}\n\n{header}\n")
            fh.write("".join(table_row(r) + "\n" for r in rows))
        with open(os.path.join(args.out, "kernels-cuda.json"), "w") as fh:
            json.dump({"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "rows": rows}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
