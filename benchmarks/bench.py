"""Latency and peak memory of todi_ext against the eager PyTorch reference.

For each shape (N positions x V vocabulary) and dtype, every implementation is
first checked against the eager reference on the same inputs (a mismatch is
reported, not timed), then timed for forward (student requiring grad, as in
training), backward, and forward+backward, and its peak extra memory for
forward+backward is measured in a fresh process (CPU: the rise of the
process's resident-set high-water mark, VmHWM, above its size with the inputs; CUDA: the caching
allocator's peak above the inputs).

    python benchmarks/bench.py                 # default shapes on the local device
    python benchmarks/bench.py --quick         # a short run
    python benchmarks/bench.py --shapes 2048x32000 --dtype float32 --out results/

Writes bench-<device>.json and bench-<device>.md under --out.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import todi_ext
from todi_ext import reference

IMPLEMENTATIONS = {
    "todi_ext": todi_ext.todi_loss,
    "eager": reference.todi_loss,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHAPES = {
    "cpu": ["256x32000", "1024x32000", "2048x32000", "1024x50257"],
    "cuda": ["1024x32000", "4096x32000", "8192x32000", "4096x128256", "8192x128256"],
}
QUICK_SHAPES = {"cpu": ["256x32000", "1024x32000"], "cuda": ["4096x32000"]}
LOSS_KWARGS = dict(temperature=2.0, beta=1.0)  # the paper's setting


def parse_shape(text):
    n, v = text.lower().split("x")
    return int(n), int(v)


def make_inputs(n, v, dtype, device, seed=0):
    """Student and teacher logits filled in place (no temporaries, so the
    memory baseline is exactly the inputs), and labels with ~10% ignored."""
    g = torch.Generator(device=device).manual_seed(seed)
    student = torch.empty(n, v, dtype=dtype, device=device).normal_(0, 3, generator=g)
    teacher = torch.empty(n, v, dtype=dtype, device=device).normal_(0, 3, generator=g)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[torch.rand(n, device=device, generator=g) < 0.1] = -100
    return student, teacher, labels


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def forward(fn, student, teacher, labels):
    return fn(student, teacher, labels, **LOSS_KWARGS)


def time_phases(fn, student, teacher, labels, device, repeats, warmup):
    """Median and spread (min, max) in ms of forward, backward and forward+backward."""
    samples = {"forward": [], "backward": [], "forward+backward": []}
    for i in range(warmup + repeats):
        student.grad = None
        sync(device)
        t0 = time.perf_counter()
        loss = forward(fn, student, teacher, labels)
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        del loss
        if i >= warmup:
            samples["forward"].append((t1 - t0) * 1e3)
            samples["backward"].append((t2 - t1) * 1e3)
            samples["forward+backward"].append((t2 - t0) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in samples.items()}


def check_against_reference(fn, student, teacher, labels):
    """Loss and gradient of fn vs the eager reference on the same inputs."""
    results = []
    for f in (fn, reference.todi_loss):
        s = student.detach().clone().requires_grad_()
        loss = forward(f, s, teacher, labels)
        loss.backward()
        results.append((loss.detach().double(), s.grad.double()))
    (loss, grad), (ref_loss, ref_grad) = results
    loss_err = float((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-12))
    grad_err = float((grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30))
    tol = 1e-4 if student.dtype == torch.float32 else 2e-2
    return {"loss_rel_err": loss_err, "grad_rel_err": grad_err, "ok": loss_err < tol and grad_err < tol}


def _proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_worker(impl, n, v, dtype_name, device):
    """Runs in a fresh process: peak extra bytes of one forward+backward."""
    student, teacher, labels = make_inputs(n, v, DTYPES[dtype_name], device)
    student.requires_grad_()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the resident-set high-water mark (VmHWM) to the current size
        base = _proc_status_bytes("VmRSS")
    forward(IMPLEMENTATIONS[impl], student, teacher, labels).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _proc_status_bytes("VmHWM")
    print(json.dumps({"peak_extra_bytes": max(peak - base, 0)}))


def measure_peak_memory(impl, n, v, dtype_name, device):
    cmd = [sys.executable, __file__, "--memory-worker", impl, str(n), str(v), dtype_name, device]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        if "out of memory" in out.stderr.lower() or out.returncode in (-9, 137):
            return "OOM"
        raise RuntimeError(f"memory worker failed for {impl} {n}x{v}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def machine_info(device):
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "todi_ext": todi_ext.build_info(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu_model"] = platform.processor()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    return info


def run(args):
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)[device]
    repeats = args.repeats or (3 if args.quick else 5)
    rows = []
    print(f"[bench] device={device} dtype={args.dtype} shapes={shapes} repeats={repeats}", flush=True)
    total = len(shapes) * len(IMPLEMENTATIONS)
    step = 0
    for shape in shapes:
        n, v = parse_shape(shape)
        student, teacher, labels = make_inputs(n, v, DTYPES[args.dtype], device)
        student.requires_grad_()
        for impl, fn in IMPLEMENTATIONS.items():
            step += 1
            print(f"[bench {step}/{total}] {impl:9s} N={n} V={v} {args.dtype} ...", end=" ", flush=True)
            row = {"impl": impl, "N": n, "V": v, "dtype": args.dtype}
            try:
                row["check"] = check_against_reference(fn, student, teacher, labels)
                if row["check"]["ok"]:
                    row["latency"] = time_phases(fn, student, teacher, labels, device, repeats, warmup=1)
                    row["peak_extra_bytes"] = measure_peak_memory(impl, n, v, args.dtype, device)
                    print(
                        f"fwd+bwd {row['latency']['forward+backward']['median_ms']:.1f} ms, "
                        f"peak extra {fmt_bytes(row['peak_extra_bytes'])}",
                        flush=True,
                    )
                else:
                    print(f"MISMATCH {row['check']} (not timed)", flush=True)
            except torch.OutOfMemoryError:
                row["error"] = "OOM"
                print("OOM", flush=True)
            rows.append(row)
        del student, teacher, labels
    add_ratios(rows)
    return {"machine": machine_info(device), "loss_kwargs": LOSS_KWARGS, "results": rows}


def add_ratios(rows):
    """Speed-up and memory ratio of todi_ext over eager, measured in this run."""
    by_key = {(r["impl"], r["N"], r["V"]): r for r in rows}
    for r in rows:
        eager = by_key.get(("eager", r["N"], r["V"]))
        if r["impl"] == "eager" or not eager or "latency" not in r or "latency" not in eager:
            continue
        r["speedup_vs_eager"] = {
            k: eager["latency"][k]["median_ms"] / r["latency"][k]["median_ms"] for k in r["latency"]
        }
        if isinstance(r.get("peak_extra_bytes"), int) and isinstance(eager.get("peak_extra_bytes"), int):
            r["memory_fraction_of_eager"] = r["peak_extra_bytes"] / max(eager["peak_extra_bytes"], 1)


def fmt_bytes(b):
    return b if isinstance(b, str) else f"{b / 2**20:.0f} MiB"


def markdown(report):
    m = report["machine"]
    where = m.get("gpu") or m.get("cpu_model")
    lines = [
        f"# todi_ext benchmark ({m['device']}: {where}, {m['cpu_threads']} threads)",
        "",
        f"{m['date']}, torch {m['torch']}, todi_ext {m['todi_ext']['version']}, "
        f"CPU kernel {m['todi_ext']['cpu_capability']}; loss kwargs {report['loss_kwargs']}.",
        "Latency: median of the timed repeats (min-max in brackets), ms. Peak extra: memory above the inputs during one forward+backward, fresh process.",
        "",
        "| N | V | dtype | impl | forward | backward | fwd+bwd | peak extra | speed-up fwd+bwd | memory vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "latency" not in r:
            status = r.get("error") or f"MISMATCH {r.get('check')}"
            lines.append(f"| {r['N']} | {r['V']} | {r['dtype']} | {r['impl']} | {status} | | | | | |")
            continue
        lat = r["latency"]
        cell = lambda k: f"{lat[k]['median_ms']:.1f} ({lat[k]['min_ms']:.1f}-{lat[k]['max_ms']:.1f})"
        speed = f"{r['speedup_vs_eager']['forward+backward']:.1f}x" if "speedup_vs_eager" in r else ""
        mem = f"{r['memory_fraction_of_eager']:.2f}" if "memory_fraction_of_eager" in r else ""
        lines.append(
            f"| {r['N']} | {r['V']} | {r['dtype']} | {r['impl']} | {cell('forward')} | {cell('backward')} | "
            f"{cell('forward+backward')} | {fmt_bytes(r['peak_extra_bytes'])} | {speed} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (about a minute on 2 CPU cores)")
    parser.add_argument("--shapes", nargs="+", help="NxV shapes, e.g. 2048x32000 (default depends on the device)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="logits dtype (default float32)")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (default 5, --quick 3)")
    parser.add_argument("--out", default="benchmarks/out", help="folder for bench-<device>.json/.md")
    parser.add_argument("--memory-worker", nargs=5, metavar=("IMPL", "N", "V", "DTYPE", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        impl, n, v, dtype_name, device = args.memory_worker
        peak_memory_worker(impl, int(n), int(v), dtype_name, device)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    report = run(args)
    os.makedirs(args.out, exist_ok=True)
    device = report["machine"]["device"]
    with open(os.path.join(args.out, f"bench-{device}.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = markdown(report)
    with open(os.path.join(args.out, f"bench-{device}.md"), "w") as f:
        f.write(table)
    print()
    print(table)
    print(f"[bench] wrote {args.out}/bench-{device}.json and .md")


if __name__ == "__main__":
    main()
