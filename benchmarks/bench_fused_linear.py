"""Fused linear + distillation against the materialised path, side by side in one run.

    .venv/bin/python benchmarks/bench_fused_linear.py                  # CPU: N=4096, H=1024, V=32000, float32
    python benchmarks/bench_fused_linear.py --device cuda --dtype bfloat16 --shape 8192x2048x4096x128256

Implementations (forward+backward of the paper's objective: 0.5 CE + 0.5 ToDi
at T = 2, gradients of the student's hidden states and lm_head weight):
  fused         todi_ext.fused_linear_distill_loss (logits never materialised)
  materialised  F.linear for both models, then todi_ext.distill_loss, autograd
  liger_jsd     Liger-Kernel's chunked LigerFusedLinearJSDLoss (CUDA, when
                installed): 0.5 CE + 0.5 JSD at T = 2 - its JSD, not ToDi,
                in the same memory-traffic class
Latency: median of --repeats timed calls after a warm-up. Peak extra memory:
above the inputs, during one forward+backward - CUDA: the caching allocator's
peak; CPU: VmHWM of a fresh process with glibc's mmap threshold fixed, so
freed buffers leave at once and the peak is the live tensors'. Writes
fused-linear-<device>.md and .json under --out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import todi_ext

KW = dict(temperature=2.0, hard_label_weight=0.5, soft_label_weight=0.5)


def parse_shape(text):
    """NxHxV (one hidden size for both models) or NxHsxHtxV (the student's, then the teacher's)."""
    sizes = [int(x) for x in text.split("x")]
    if len(sizes) == 3:
        return sizes[0], sizes[1], sizes[1], sizes[2]
    if len(sizes) == 4:
        return tuple(sizes)
    raise ValueError(f"--shape must be NxHxV or NxHsxHtxV, got {text!r}")


def make_inputs(shape, dtype, device, seed=0):
    n, hs, ht, v = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(dtype=dtype, device=device)
    hidden = rand(n, hs).requires_grad_()
    weight = rand(v, hs, scale=hs ** -0.5).requires_grad_()
    th, tw = rand(n, ht), rand(v, ht, scale=ht ** -0.5)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = -100
    return hidden, weight, th, tw, labels.to(device)


def step_fn(impl):
    if impl == "fused":
        return lambda h, w, th, tw, labels: todi_ext.fused_linear_distill_loss(h, w, th, tw, labels, **KW)
    if impl == "materialised":
        def step(h, w, th, tw, labels):
            with torch.no_grad():
                teacher = F.linear(th, tw)
            return todi_ext.distill_loss(F.linear(h, w), teacher, labels, **KW)
        return step
    if impl == "liger_jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, temperature=2.0)
        return lambda h, w, th, tw, labels: loss(h, w, th, tw, labels)
    raise ValueError(impl)


def forward_backward(step, inputs):
    hidden, weight = inputs[0], inputs[1]
    hidden.grad = weight.grad = None
    step(*inputs).backward()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def latency_ms(step, inputs, device, repeats):
    forward_backward(step, inputs)  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        forward_backward(step, inputs)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def _rss(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))


def memory_worker(impl, shape, dtype_name):
    """Runs in a fresh process: peak extra bytes of one CPU forward+backward."""
    inputs = make_inputs(shape, getattr(torch, dtype_name), "cpu")
    step = step_fn(impl)
    forward_backward(step, make_inputs((8,) + shape[1:], getattr(torch, dtype_name), "cpu", seed=1))  # warm-up, small
    base = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    forward_backward(step, inputs)
    print(json.dumps({"peak_extra_bytes": _rss("VmHWM") - base}))


def peak_memory(impl, step, inputs, device, shape, dtype_name):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward(step, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", impl, "x".join(map(str, shape)), dtype_name]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--shape", default=None, help="NxHxV or NxHsxHtxV (student and teacher hidden sizes); "
                   "default 4096x1024x32000 on CPU, 8192x2048x4096x128256 on CUDA")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impl", nargs="+", default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--memory-worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        impl, shape, dtype_name = args.memory_worker
        memory_worker(impl, parse_shape(shape), dtype_name)
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype_name = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    shape = parse_shape(args.shape or ("8192x2048x4096x128256" if device == "cuda" else "4096x1024x32000"))
    n, hs, ht, v = shape
    impls = args.impl or (["fused", "materialised", "liger_jsd"] if device == "cuda" else ["fused", "materialised"])

    machine = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rows = []
    for impl in impls:
        try:
            step = step_fn(impl)
        except ImportError as e:
            print(f"{impl}: skipped ({e})")
            continue
        inputs = make_inputs(shape, getattr(torch, dtype_name), device)
        try:
            median, best = latency_ms(step, inputs, device, args.repeats)
            peak = peak_memory(impl, step, inputs, device, shape, dtype_name)
        except torch.OutOfMemoryError:
            print(f"{impl}: out of memory")
            rows.append({"impl": impl, "oom": True})
            continue
        rows.append({"impl": impl, "median_ms": median, "min_ms": best, "peak_extra_bytes": peak})
        print(f"{impl}: {median:.1f} ms (min {best:.1f}), peak extra {peak / 2**20:.0f} MiB", flush=True)
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()

    base = next((r for r in rows if r["impl"] == "materialised" and not r.get("oom")), None)
    hidden_sizes = f"H={hs}" if ht == hs else f"H={hs} (teacher H={ht})"
    lines = [f"# Fused linear + distillation, {device} ({machine}), torch {torch.__version__}",
             "", f"N={n}, {hidden_sizes}, V={v}, {dtype_name}; forward+backward of 0.5 CE + 0.5 ToDi (T=2); "
             f"median of {args.repeats}.", "",
             "| impl | median ms | min ms | peak extra MiB | time / materialised | memory / materialised |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['impl']} | OOM | | | | |")
            continue
        t = f"{r['median_ms'] / base['median_ms']:.2f}" if base else "-"
        m = f"{r['peak_extra_bytes'] / base['peak_extra_bytes']:.3f}" if base else "-"
        lines.append(f"| {r['impl']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{r['peak_extra_bytes'] / 2**20:.0f} | {t} | {m} |")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"fused-linear-{device}")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"device": device, "machine": machine, "torch": torch.__version__, "shape": [n, hs, ht, v],
                   "dtype": dtype_name, "rows": rows}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
