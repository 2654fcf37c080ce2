"""Tables and plots of a bench.py report; also re-plots a saved report:

    python benchmarks/plot.py benchmarks/results/bench-cpu.json
"""

import json
import os
import sys

IMPL_ORDER = ["todi_ext", "compile", "eager", "eager_authors", "liger_jsd", "liger_kl", "floor"]


def fmt_bytes(b):
    if isinstance(b, str) or b is None:
        return b or ""
    return f"{b / 2**20:.0f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def _cell(lat, key):
    x = lat[key]
    return f"{x['median_ms']:.2f} ({x['min_ms']:.2f}-{x['max_ms']:.2f})"


def markdown(report):
    m = report["machine"]
    where = m.get("gpu") or m.get("cpu_model")
    extra = f", driver {m['driver']}" if m.get("driver") else ""
    bw = report.get("copy_bandwidth_gbs")
    lines = [
        f"# todi_ext benchmark: {m['device']} ({where}{extra}, {m['cpu_threads']} CPU threads)",
        "",
        f"{m['date']}; torch {m['torch']} (CUDA {m['torch_cuda']}); todi_ext {m['todi_ext']['version']}, "
        f"CPU kernel {m['todi_ext']['cpu_capability']}; loss {report['loss_kwargs']}; {report['repeats']} timed repeats."
        + (f" Copy bandwidth {bw:.0f} GB/s (read + write)." if bw else ""),
        "",
        "Latency in ms: median (min-max). Peak extra: memory above the inputs during one forward+backward. "
        "Speed-up and memory are relative to eager at the same shape, measured in this run.",
        "",
        "| N | V | dtype | divergence | impl | forward | backward | fwd+bwd | peak extra | speed-up (fwd+bwd) | memory vs eager | x floor | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        head = f"| {r['N']} | {r['V']} | {r['dtype']} | {r.get('divergence', 'todi')} | {r['impl']} |"
        if r["impl"] == "floor":
            lines.append(f"{head} | | {r['floor_ms']:.2f} | | | | 1.00 | {r['note']} |")
        elif "latency" not in r:
            status = r.get("error") or f"MISMATCH {r.get('check')}"
            lines.append(f"{head} {status} | | | | | | | {r.get('note', '')} |")
        else:
            lat = r["latency"]
            speed = f"{r['speedup_vs_eager']['forward+backward']:.1f}x" if "speedup_vs_eager" in r else ""
            mem = f"{r['memory_fraction_of_eager']:.2f}" if "memory_fraction_of_eager" in r else ""
            floor = f"{r['times_floor']:.2f}" if "times_floor" in r else ""
            lines.append(
                f"{head} {_cell(lat, 'forward')} | {_cell(lat, 'backward')} | {_cell(lat, 'forward+backward')} | "
                f"{fmt_bytes(r['peak_extra_bytes'])} | {speed} | {mem} | {floor} | {r.get('note', '')} |"
            )
    return "\n".join(lines) + "\n"


def _value(report, dtype, shape, impl, value):
    """value(row) for one implementation at one (N, V) and dtype (ToDi rows and the floor only), or None."""
    for r in report["results"]:
        if r.get("divergence", "todi") not in ("todi", ""):
            continue
        if r["impl"] == impl and r["dtype"] == dtype and (r["N"], r["V"]) == shape:
            y = value(r)
            return y if isinstance(y, (int, float)) else None
    return None


def plots(report, stem):
    """Writes <stem>-latency.png, -memory.png and -speedup.png; returns their paths.

    One panel per dtype, the shapes that were run along x, one bar per
    implementation in each group: readable for one shape or for a grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    dtypes = sorted({r["dtype"] for r in results})
    shapes = sorted({(r["N"], r["V"]) for r in results})
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in results)]
    device = report["machine"]["device"]
    where = report["machine"].get("gpu") or report["machine"].get("cpu_model")
    kinds = {
        "latency": ("forward+backward (ms, median)", lambda r: r["latency"]["forward+backward"]["median_ms"]
                    if "latency" in r else r.get("floor_ms"), True, impls),
        "memory": ("peak extra memory (MiB)", lambda r: r["peak_extra_bytes"] / 2**20
                   if isinstance(r.get("peak_extra_bytes"), int) else None, True, [i for i in impls if i != "floor"]),
        "speedup": ("speed-up over eager, forward+backward", lambda r: r.get("speedup_vs_eager", {}).get("forward+backward"),
                    False, [i for i in impls if i not in ("eager", "floor")]),
    }
    paths = []
    for kind, (ylabel, value, logy, names) in kinds.items():
        width = 0.8 / max(len(names), 1)
        fig, axes = plt.subplots(len(dtypes), 1, figsize=(max(6, 1.6 * len(shapes) + 2), 3.6 * len(dtypes)),
                                 squeeze=False)
        for i, dtype in enumerate(dtypes):
            ax = axes[i][0]
            for k, impl in enumerate(names):
                xs, ys = [], []
                for x, shape in enumerate(shapes):
                    y = _value(report, dtype, shape, impl, value)
                    if y is not None:
                        xs.append(x + (k - (len(names) - 1) / 2) * width)
                        ys.append(y)
                if xs:
                    ax.bar(xs, ys, width=width, label=impl, hatch="//" if impl == "floor" else None)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([f"{n}x{v}" for n, v in shapes], fontsize=8)
            ax.set_title(dtype, fontsize=9)
            ax.set_xlabel("N x V")
            ax.set_ylabel(ylabel, fontsize=8)
            if logy:
                ax.set_yscale("log")
            ax.grid(True, axis="y", alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper right", fontsize=8)
        fig.suptitle(f"todi_ext vs eager PyTorch, {device} ({where})", fontsize=10)
        fig.tight_layout(rect=(0, 0, 0.85, 0.95))
        path = f"{stem}-{kind}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            rep = json.load(f)
        stem = os.path.splitext(path)[0]
        print("\n".join(plots(rep, stem)))
