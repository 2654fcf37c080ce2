"""Latency and peak memory of todi_ext against eager PyTorch, torch.compile and Liger-Kernel.

Implementations, on the same inputs in one run:
  todi_ext     the fused kernel (CUDA or CPU)
  eager        todi_ext.reference.todi_loss, the eager PyTorch formula (careful float32)
  eager_authors  ToDi as the paper's released code writes it (divergence todi only)
  compile      torch.compile of that eager formula
  liger_jsd    Liger-Kernel's JSD (beta 0.5) on log_softmax inputs      } CUDA only, when liger_kernel
  liger_kl     Liger-Kernel's KL divergence on log_softmax inputs      } imports: a different divergence
                                                                          of the same memory-traffic class
  floor        the op's minimum traffic - read student and teacher once, write the gradient
               once - as one warm torch.add(student, teacher, out=grad) of the same tensors
               into a buffer already touched, timed in this run (CPU and CUDA alike)

Every implementation is first checked against an eager float64 computation of
its own divergence on the first CHECK_ROWS rows (a mismatch is reported and
not timed). Then forward
(student requiring grad, as in training), backward and forward+backward are
timed: median and min-max over the repeats; on CUDA with CUDA events,
rotating between input sets so the L2 cache does not flatter anyone. Peak
extra memory is the memory above the inputs during one forward+backward: on
CPU the rise of the resident-set high-water mark in a fresh process per
implementation, on CUDA the caching allocator's peak. An out-of-memory run is
reported as OOM.

Writes bench-<device>.json (machine, versions, every number),
bench-<device>.md and bench-<device>-{latency,memory,speedup}.png under --out.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
# torch.compile's first use imports cpp_extension, which may log a CUDA_HOME
# notice on a GPU-less machine: import it here, before any progress line.
import torch.utils.cpp_extension  # noqa: F401

import todi_ext
from todi_ext import reference

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import plot  # noqa: E402  (benchmarks/plot.py)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOSS_KWARGS = dict(temperature=2.0)  # the paper's released setting; divergence parameters at their defaults
DIVERGENCES = list(todi_ext._validation.DIVERGENCES)  # every divergence distill_loss accepts
DEFAULT_SHAPES = {
    # A few minutes on 2 cores; benchmarks/results/ also has N=2048 x V=50257 etc. (--shapes).
    "cpu": ["256x32000", "1024x32000", "2048x32000", "1024x50257"],
    "cuda": [f"{n}x{v}" for n in (1024, 4096, 8192, 16384) for v in (32000, 50257, 128256, 151936, 262144)],
}
QUICK_SHAPES = {"cpu": ["256x32000", "1024x32000"], "cuda": ["4096x32000", "8192x128256"]}
DEFAULT_DTYPES = {"cpu": ["float32"], "cuda": ["bfloat16", "float32"]}


# ------------------------------------------------------------ implementations
def _liger():
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except Exception as exc:  # not installed, or no GPU/triton
        return None, f"{type(exc).__name__}: {exc}"
    return (LigerJSD, LigerKLDIVLoss), None


def _jsd_rows(z, s, temperature):
    log_q, log_p = F.log_softmax(z / temperature, -1), F.log_softmax(s / temperature, -1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), 0) - math.log(2)
    return 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)


def _fkl_rows(z, s, temperature):
    log_q, log_p = F.log_softmax(z / temperature, -1), F.log_softmax(s / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _todi_authors_style(z, s, labels, temperature, ignore_index=-100):
    """ToDi the way the paper's released training code computes it (our
    transcription of its formula): softmax and log_softmax of both inputs in
    float32, detached sigmoid weights for the teacher and student terms,
    masked sum per position; here averaged over counted positions."""
    z, s = z / temperature, s / temperature
    q, p = z.softmax(-1, dtype=torch.float32), s.softmax(-1, dtype=torch.float32)
    log_q, log_p = z.log_softmax(-1, dtype=torch.float32), s.log_softmax(-1, dtype=torch.float32)
    weight_p, weight_q = torch.sigmoid(log_p - log_q).detach(), torch.sigmoid(log_q - log_p).detach()
    per_entry = weight_p * p * (log_p - log_q) + weight_q * q * (log_q - log_p)
    per_position = per_entry.masked_fill(z.isinf() | s.isinf(), 0.0).sum(-1)
    counted = labels != ignore_index
    return (per_position * counted).sum() / counted.sum().clamp_min(1)


def make_implementations(device, divergence="todi"):
    """name -> (loss_fn(student, teacher, labels), float64 check fn or None, note) for one divergence."""
    T = LOSS_KWARGS["temperature"]
    kwargs = dict(LOSS_KWARGS, divergence=divergence)

    def check(z, s, labels):
        return reference.distill_loss(z, s, labels, **kwargs)

    check.__name__ = f"check_{divergence}"

    impls = {
        "todi_ext": (lambda z, s, y: todi_ext.distill_loss(z, s, y, **kwargs), check, ""),
        "eager": (lambda z, s, y: reference.distill_loss(z, s, y, **kwargs), check, ""),
    }
    if divergence == "todi":  # what people run today
        impls["eager_authors"] = (lambda z, s, y: _todi_authors_style(z, s, y, T), check,
                                  "the ToDi authors' eager formula")
    compiled = torch.compile(reference.distill_loss)
    impls["compile"] = (lambda z, s, y: compiled(z, s, y, **kwargs), check, "torch.compile of eager")
    if device == "cuda" and divergence == "todi":  # an anchor, measured once
        liger, why = _liger()
        if liger is None:
            impls["liger_jsd"] = (None, None, f"not run: liger_kernel did not import ({why})")
        else:
            jsd, kl = liger[0](beta=0.5), liger[1](reduction="batchmean", log_target=True)
            # Liger takes log-probabilities: the log_softmax is part of its cost.
            impls["liger_jsd"] = (
                lambda z, s, y: jsd((z / T).log_softmax(-1), (s / T).log_softmax(-1)),
                lambda z, s, y: _jsd_rows(z, s, T).mean(),
                "different divergence (JSD, beta 0.5)",
            )
            impls["liger_kl"] = (
                lambda z, s, y: kl((z / T).log_softmax(-1), (s / T).log_softmax(-1)),
                lambda z, s, y: _fkl_rows(z, s, T).mean(),
                "different divergence (forward KL)",
            )
    return impls


# --------------------------------------------------------------------- inputs
def parse_shape(text):
    n, v = text.lower().split("x")
    return int(n), int(v)


def make_inputs(n, v, dtype, device, seed=0):
    """Student and teacher logits filled in place (no temporaries, so the
    memory baseline is exactly the inputs), labels with ~10% ignored."""
    g = torch.Generator(device=device).manual_seed(seed)
    student = torch.empty(n, v, dtype=dtype, device=device).normal_(0, 3, generator=g)
    teacher = torch.empty(n, v, dtype=dtype, device=device).normal_(0, 3, generator=g)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[torch.rand(n, device=device, generator=g) < 0.1] = -100
    return student.requires_grad_(), teacher, labels


def input_sets(n, v, dtype, device):
    """On CUDA, enough input sets that they do not fit in L2 together (at
    least 2, about 4x the L2 size), memory permitting; one set on CPU."""
    if device != "cuda":
        return [make_inputs(n, v, dtype, device)]
    set_bytes = 2 * n * v * dtype.itemsize
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    count = max(2, min(8, math.ceil(4 * l2 / set_bytes)))
    free = torch.cuda.mem_get_info()[0]
    count = max(1, min(count, int(0.3 * free // max(set_bytes, 1))))
    return [make_inputs(n, v, dtype, device, seed=k) for k in range(count)]


# -------------------------------------------------------------------- checks
def float64_result(check_fn, student, teacher, labels, cache):
    """check_fn's loss and gradient on float64 copies, computed once per input set."""
    key = (check_fn, student.data_ptr())
    if key not in cache:
        s64 = student.detach().double().requires_grad_()
        ref = check_fn(s64, teacher.double(), labels)
        ref.backward()
        cache.clear()  # one input set at a time: keep memory bounded
        cache[key] = (ref.detach(), s64.grad)
    return cache[key]


def check(fn, check_fn, student, teacher, labels, cache):
    """Loss and gradient of fn against check_fn on float64 copies of the inputs."""
    s = student.detach().clone().requires_grad_()
    loss = fn(s, teacher, labels)
    loss.backward()
    ref, ref_grad = float64_result(check_fn, student, teacher, labels, cache)
    loss_err = float((loss.detach().double() - ref).abs() / ref.abs().clamp_min(1e-12))
    grad_err = float((s.grad.double() - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30))
    # float32 math on inputs of this dtype; gradients rounded to the input dtype.
    tol = {torch.float32: 1e-4}.get(student.dtype, 2e-2)
    # TVD's gradient jumps by q/2 where p = q: float32 and float64 disagree on
    # the sign of p - q for near-ties (eager float32 misses by ~7e-4 too).
    grad_tol = max(tol, 1e-2) if check_fn.__name__ == "check_tvd" else tol
    return {"loss_rel_err": loss_err, "grad_rel_err": grad_err, "ok": loss_err < tol and grad_err < grad_tol}


# -------------------------------------------------------------------- timing
def _summary(samples):
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples), "n": len(samples)}


def time_cpu(fn, sets, repeats, warmup):
    samples = {"forward": [], "backward": [], "forward+backward": []}
    student, teacher, labels = sets[0]
    for i in range(warmup + repeats):
        student.grad = None
        t0 = time.perf_counter()
        loss = fn(student, teacher, labels)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        del loss
        if i >= warmup:
            samples["forward"].append((t1 - t0) * 1e3)
            samples["backward"].append((t2 - t1) * 1e3)
            samples["forward+backward"].append((t2 - t0) * 1e3)
    return {k: _summary(v) for k, v in samples.items()}


def time_cuda(fn, sets, repeats, warmup):
    events = []
    for i in range(warmup + repeats):
        student, teacher, labels = sets[i % len(sets)]
        student.grad = None
        e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        e[0].record()
        loss = fn(student, teacher, labels)
        e[1].record()
        loss.backward()
        e[2].record()
        del loss
        if i >= warmup:
            events.append(e)
    torch.cuda.synchronize()
    samples = {
        "forward": [a.elapsed_time(b) for a, b, _ in events],
        "backward": [b.elapsed_time(c) for _, b, c in events],
        "forward+backward": [a.elapsed_time(c) for a, _, c in events],
    }
    return {k: _summary(v) for k, v in samples.items()}


def floor_ms(sets, device, repeats, warmup=2):
    """The memory floor: median time of torch.add(student, teacher, out=grad)
    - both inputs read once, a gradient-sized output written once - into a
    buffer allocated and touched before timing (a fresh one would add page
    faults on the CPU, which are the op's cost, not the floor's)."""
    outs = [torch.empty_like(s) for s, _, _ in sets]
    samples = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            (student, teacher, _), out = sets[i % len(sets)], outs[i % len(sets)]
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.add(student, teacher, out=out)
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                torch.add(student, teacher, out=out)
                elapsed = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                samples.append(elapsed)
    return statistics.median(samples)


# -------------------------------------------------------------------- memory
def _proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_worker(impl, n, v, dtype_name, divergence):
    """Runs in a fresh process: peak extra bytes of one CPU forward+backward."""
    fn = make_implementations("cpu", divergence)[impl][0]
    student, teacher, labels = make_inputs(n, v, DTYPES[dtype_name], "cpu")
    if impl == "compile":  # compile outside the measurement (the compiler's memory is not the loss's)
        fn(student, teacher, labels).backward()
        student.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the resident-set high-water mark (VmHWM) to the current size
    base = _proc_status_bytes("VmRSS")
    fn(student, teacher, labels).backward()
    print(json.dumps({"peak_extra_bytes": max(_proc_status_bytes("VmHWM") - base, 0)}))


def peak_memory(impl, fn, sets, device, dtype_name, divergence):
    student, teacher, labels = sets[0]
    if device == "cuda":
        student.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(student, teacher, labels).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    n, v = student.shape
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", impl, str(n), str(v), dtype_name, divergence]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        if "out of memory" in out.stderr.lower() or out.returncode in (-9, 137):
            return "OOM"
        raise RuntimeError(f"memory worker failed for {impl} {n}x{v}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


# ------------------------------------------------------------------- running
class Progress:
    """A live progress bar on a terminal, one line per step otherwise."""

    def __init__(self, total):
        self.total, self.done, self.tty = total, 0, sys.stdout.isatty()

    def start(self, label):
        bar = "#" * (20 * self.done // max(self.total, 1))
        text = f"[{bar:<20}] {self.done}/{self.total} {label}"
        print(("\r" + text.ljust(100)) if self.tty else text, end="" if self.tty else " ... ", flush=True)

    def finish(self, result):
        self.done += 1
        if self.tty:
            print(f" {result}".ljust(40), end="\n" if self.done == self.total else "", flush=True)
        else:
            print(result, flush=True)


CHECK_ROWS = 512  # the float64 check runs on the first rows only: at 8192 x 262144 a float64 eager pass would not fit


def run_one(impl, fn, check_fn, sets, device, dtype_name, divergence, repeats, cache):
    student, teacher, labels = sets[0]
    k = CHECK_ROWS
    row = {"check": check(fn, check_fn, student.detach()[:k], teacher[:k], labels[:k], cache)}
    if not row["check"]["ok"]:
        return row, "MISMATCH (not timed)"
    timer = time_cuda if device == "cuda" else time_cpu
    row["latency"] = timer(fn, sets, repeats, warmup=2 if device == "cuda" else 1)
    row["peak_extra_bytes"] = peak_memory(impl, fn, sets, device, dtype_name, divergence)
    return row, f"{row['latency']['forward+backward']['median_ms']:.2f} ms, {plot.fmt_bytes(row['peak_extra_bytes'])}"


def run(args):
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)[device]
    dtypes = args.dtype or DEFAULT_DTYPES[device]
    repeats = args.repeats or (3 if device == "cpu" else (10 if args.quick else 20))
    divergences = args.divergence
    impls_by_divergence = {}
    for divergence in divergences:
        impls = make_implementations(device, divergence)
        if args.impl:
            impls = {k: v for k, v in impls.items() if k in args.impl}
        impls_by_divergence[divergence] = impls
    results, reference_cache = [], {}
    progress = Progress(len(shapes) * len(dtypes) * sum(map(len, impls_by_divergence.values())))
    print(f"[bench] device={device} dtypes={dtypes} shapes={shapes} divergences={divergences} repeats={repeats}",
          flush=True)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for shape in shapes:
            n, v = parse_shape(shape)
            try:
                sets = input_sets(n, v, dtype, device)
            except torch.OutOfMemoryError:
                sets = None
            for divergence, impls in impls_by_divergence.items():
                for impl, (fn, check_fn, note) in impls.items():
                    progress.start(f"{impl} {divergence} N={n} V={v} {dtype_name}")
                    row = {"impl": impl, "divergence": divergence, "N": n, "V": v, "dtype": dtype_name, "note": note}
                    if fn is None:
                        row["error"], status = "not run", note
                    elif sets is None:
                        row["error"], status = "OOM", "OOM (inputs)"
                    else:
                        try:
                            extra, status = run_one(impl, fn, check_fn, sets, device, dtype_name, divergence, repeats,
                                                    reference_cache)
                            row.update(extra)
                        except torch.OutOfMemoryError:
                            row["error"], status = "OOM", "OOM"
                        finally:
                            if device == "cuda":
                                for s, _, _ in sets:
                                    s.grad = None
                                torch.cuda.empty_cache()
                    progress.finish(status)
                    results.append(row)
            if sets is not None:
                results.append({"impl": "floor", "divergence": "", "N": n, "V": v, "dtype": dtype_name,
                                "note": "warm torch.add(student, teacher, out=grad): each input read once, "
                                        "the gradient written once",
                                "floor_ms": floor_ms(sets, device, max(repeats, 5))})
            del sets
            reference_cache.clear()
    add_ratios(results)
    return {"machine": machine_info(device), "loss_kwargs": LOSS_KWARGS,
            "repeats": repeats, "results": results}


def add_ratios(rows):
    """Ratios measured in this run: speed-up and memory vs eager, time over the floor."""
    index = {(r["impl"], r["divergence"], r["N"], r["V"], r["dtype"]): r for r in rows}
    for r in rows:
        if "latency" not in r:
            continue
        key = (r["N"], r["V"], r["dtype"])
        eager = index.get(("eager", r["divergence"]) + key)
        if r["impl"] != "eager" and eager and "latency" in eager:
            r["speedup_vs_eager"] = {k: eager["latency"][k]["median_ms"] / r["latency"][k]["median_ms"] for k in r["latency"]}
            if isinstance(r.get("peak_extra_bytes"), int) and isinstance(eager.get("peak_extra_bytes"), int):
                r["memory_fraction_of_eager"] = r["peak_extra_bytes"] / max(eager["peak_extra_bytes"], 1)
        floor = index.get(("floor", "") + key)
        if floor:
            r["times_floor"] = r["latency"]["forward+backward"]["median_ms"] / floor["floor_ms"]


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
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["driver"] = smi.stdout.strip()
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    parser.add_argument("--quick", action="store_true", help="two shapes, fewer repeats (under 2 minutes on 2 CPU cores)")
    parser.add_argument("--shapes", nargs="+", metavar="NxV", help="e.g. 2048x32000 (default: per device, see DEFAULT_SHAPES)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 float32 on CUDA")
    parser.add_argument("--impl", nargs="+", help="only these implementations (todi_ext eager compile liger_jsd liger_kl)")
    parser.add_argument("--divergence", nargs="+", choices=DIVERGENCES, default=["todi"], metavar="DIV",
                        help="divergences to run (default todi; e.g. --divergence " + " ".join(DIVERGENCES) +
                        " --shapes 1024x32000 for the all-divergences table)")
    parser.add_argument("--repeats", type=int, help="timed repeats (default CPU 3, CUDA 20, CUDA --quick 10)")
    parser.add_argument("--out", default="benchmarks/out", help="output folder (default benchmarks/out)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--memory-worker", nargs=5, metavar=("IMPL", "N", "V", "DTYPE", "DIV"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        impl, n, v, dtype_name, divergence = args.memory_worker
        peak_memory_worker(impl, int(n), int(v), dtype_name, divergence)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    report = run(args)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench-{report['machine']['device']}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    table = plot.markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(table)
    written = [stem + ".json", stem + ".md"]
    if not args.no_plots:
        try:
            written += plot.plots(report, stem)
        except ImportError as exc:  # matplotlib is optional: the tables are written already
            print(f"[bench] plots skipped: install matplotlib ({exc})")
    print()
    print(table)
    print("[bench] wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
