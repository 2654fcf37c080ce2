"""Worst accuracy ratio per divergence over the accuracy suite's cases
(tests/test_accuracy.py): fused error / (best float32 error + 1e-6 x value),
for the loss and the gradient, under the CPU kernel copy in use
(ATEN_CPU_CAPABILITY=default|avx2|avx512 picks one). The test requires <= 4.

    .venv/bin/python scripts/accuracy_report.py
"""

import os
import sys

import torch

import todi_ext
from todi_ext import reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import make_labels, make_logits  # noqa: E402
from test_accuracy import CASES, DIVERGENCES, errors  # noqa: E402


def main():
    print(f"CPU kernel copy: {todi_ext.build_info()['cpu_capability']}\n")
    print("| divergence | worst loss ratio | worst gradient ratio |\n|---|---|---|")
    for divergence in DIVERGENCES:
        worst = [0.0, 0.0]
        for vocab, scale, t in CASES:
            rows = 2 if vocab > 100000 else 4
            z, s = make_logits((rows, vocab), scale=scale, seed=11), make_logits((rows, vocab), scale=scale, seed=12)
            labels = make_labels((rows,), ignore_fraction=0.0)
            zd = z.double().requires_grad_()
            ref = reference.distill_loss(zd, s.double(), labels, divergence=divergence, temperature=t, reduction="none")
            ref.sum().backward()
            fused = errors(todi_ext.distill_loss, z, s, labels, divergence, t, ref.detach(), zd.grad)
            best = errors(reference.distill_loss, z, s, labels, divergence, t, ref.detach(), zd.grad)
            floors = (1e-6 * float(ref.detach().abs().max()), 1e-6 * float(zd.grad.norm()))
            for k in range(2):
                worst[k] = max(worst[k], fused[k] / (best[k] + floors[k]))
        print(f"| {divergence} | {worst[0]:.2f} | {worst[1]:.2f} |")


if __name__ == "__main__":
    main()
