"""Vocabulary-parallel distillation on 2 gloo processes of this machine:
todi_ext.distributed.vocab_parallel_distill_loss against gathering the full
rows to every rank and calling todi_ext.distill_loss, side by side in one run.

    .venv/bin/python benchmarks/bench_vocab_parallel.py [--rows 1024] [--vocab 32000] [--repeats 5] [--divergence todi]

Per step: forward+backward, float32, each rank holding V / 2 entries of every
row. Bytes are what each rank sends into the collectives per step, counted
from the tensors handed to them. Writes vocab-parallel-cpu.md (ToDi) or
vocab-parallel-cpu-<divergence>.md under --out.

--device cuda (a GPU machine): one NCCL rank holding the whole vocabulary,
bf16, against distill_loss on the same rows - the phased path's overhead on
one GPU, not its scaling (vocab-parallel-cuda-<divergence>.md).
"""

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import todi_ext
import todi_ext.distributed as td


def gather_path(z_local, s_local, labels, divergence):
    """The baseline: all-gather both logits slices into whole rows, loss on the whole rows, take this slice's gradient."""
    world, rank = dist.get_world_size(), dist.get_rank()
    parts_z = [torch.empty_like(z_local) for _ in range(world)]
    parts_s = [torch.empty_like(s_local) for _ in range(world)]
    dist.all_gather(parts_z, z_local.detach())
    dist.all_gather(parts_s, s_local)
    z_full = torch.cat(parts_z, dim=-1).requires_grad_()
    loss = todi_ext.distill_loss(z_full, torch.cat(parts_s, dim=-1), labels, temperature=2.0, divergence=divergence)
    loss.backward()
    v = z_local.shape[-1]
    return loss, z_full.grad[..., rank * v:(rank + 1) * v]


def worker(rank, world, init_file, rows, vocab, repeats, divergence, out_file, device="cpu"):
    cuda = device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600),
                            **({"device_id": torch.device("cuda", 0)} if cuda else {}))
    torch.set_num_threads(1)  # one core per rank on this 2-core machine
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    z = (torch.randn(rows, vocab, generator=g) * 3).to(device, dtype)
    s = (torch.randn(rows, vocab, generator=g) * 3).to(device, dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)
    v = vocab // world
    z_local, s_local = z[:, rank * v:(rank + 1) * v].contiguous(), s[:, rank * v:(rank + 1) * v].contiguous()

    def vocab_parallel():
        zl = z_local.clone().requires_grad_()
        td.vocab_parallel_distill_loss(zl, s_local, labels, temperature=2.0, divergence=divergence).backward()

    def gathered():
        gather_path(z_local.clone().requires_grad_(), s_local, labels, divergence)

    def whole_rows():  # one rank: nothing to gather
        zl = z_local.clone().requires_grad_()
        todi_ext.distill_loss(zl, s_local, labels, temperature=2.0, divergence=divergence).backward()

    baseline = ("whole_rows", whole_rows) if cuda else ("gather_rows", gathered)
    results = {}
    for name, fn in (("vocab_parallel", vocab_parallel), baseline) * 2:  # alternate twice
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        results.setdefault(name, []).extend(times)
    if rank == 0:
        # Agreement check, statistics, (AKL: 8 walks of 15 sums and the 2 gap sums,) partial sums.
        akl = 8 * 15 + 2 if divergence == "akl" else 0
        sent = {"vocab_parallel": 17 * 8 + rows * (6 + akl + 4) * 8, "gather_rows": 2 * rows * v * 4, "whole_rows": 0}
        where = (f"1 NCCL rank on {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if cuda
                 else "2 gloo processes, 1 thread each")
        lines = [f"# Vocab-parallel vs {baseline[0].replace('_', ' ')}: {where}, torch {torch.__version__}", "",
                 f"N={rows}, V={vocab} (V/{world} per rank), {str(dtype)[6:]}, {divergence} T=2, forward+backward; "
                 f"{2 * repeats} timed steps per implementation, alternating.", "",
                 "| impl | median ms | min ms | bytes each rank sends per step |", "|---|---|---|---|"]
        for name, times in results.items():
            lines.append(f"| {name} | {statistics.median(times):.1f} | {min(times):.1f} | {sent[name]:,} |")
        with open(out_file, "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--divergence", default="todi")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        name = f"vocab-parallel-{args.device}-{args.divergence}.md"
        if args.device == "cpu" and args.divergence == "todi":
            name = "vocab-parallel-cpu.md"
        world = 1 if args.device == "cuda" else 2
        mp.start_processes(worker, args=(world, os.path.join(tmp, "rendezvous"), args.rows, args.vocab, args.repeats,
                                         args.divergence, os.path.join(args.out, name), args.device),
                           nprocs=world, start_method="spawn")


if __name__ == "__main__":
    main()
