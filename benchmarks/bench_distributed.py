"""Tensor-parallel fusion (``c2c_kernels.distributed``): bytes communicated per token per call
(the model, and what the collective was handed, counted) and the time of a ``world_size``-rank
run against one process on the same problem. Not part of the test run.

    python benchmarks/bench_distributed.py                         # CPU, gloo, 2 ranks
    python benchmarks/bench_distributed.py --world-size 2 --device cuda   # NCCL, one GPU per rank

Every process (each rank, and the single process) runs ``--threads`` threads. Reported per call:
wall time, and CPU time (``time.process_time``; summed over the ranks), which a machine shared
with other jobs disturbs less than wall time.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp

import c2c_kernels as c2c
from c2c_kernels import distributed as c2c_dist
from c2c_kernels.bench import timing
from c2c_kernels.bench.workloads import WORKLOADS


def problem(args, device):
    (_, ht, dt), (_, hs, ds) = WORKLOADS[args.workload]
    layers = args.layers
    w = c2c.random_weights(2 * layers, hs, ds, ht, dt, args.hidden, args.hidden, 3, device=device)
    ckpt = c2c.make_checkpoint(w, {l: l for l in range(layers)}, sharer_heads=hs)
    g = torch.Generator().manual_seed(1)
    pages = (args.tokens + 15) // 16 + 1
    rkv = [tuple(torch.randn(pages, 16, ht, dt, generator=g).to(device) for _ in range(2)) for _ in range(layers)]
    skv = [tuple(torch.randn(pages, 16, hs, ds, generator=g).to(device) for _ in range(2)) for _ in range(layers)]
    slots = torch.arange(args.tokens, device=device)
    return ckpt, rkv, skv, slots


def timed(fn, reps, device):
    """(median wall seconds, mean CPU seconds of this process) per call."""
    samples = timing.repeat(fn, device, repeats=reps, warmup=1)
    return statistics.median(s.wall_s for s in samples), sum(s.cpu_s for s in samples) / reps


def rank_main(rank, world_size, store, args, out):
    backend = "nccl" if args.device == "cuda" else "gloo"
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        ckpt, rkv, skv, slots = problem(args, device)
        sharded = c2c_dist.shard(ckpt, rank=rank, world_size=world_size)
        r0, r1 = sharded.receiver_range
        s0, s1 = sharded.sharer_range
        mine = [tuple(t[:, :, r0:r1].contiguous() for t in kv) for kv in rkv]
        theirs = [tuple(t[:, :, s0:s1].contiguous() for t in kv) for kv in skv]
        sent = []
        original = funcol.all_reduce

        def counting(t, *a, **k):
            sent.append(t.numel() * t.element_size())
            return original(t, *a, **k)

        funcol.all_reduce = counting
        call = lambda: c2c_dist.fuse_all(sharded, mine, theirs, slots, slots, backend=args.backend)  # noqa: E731
        dist.barrier()
        seconds, cpu = timed(call, args.reps, device)
        funcol.all_reduce = original
        torch.save({"seconds": seconds, "cpu": cpu, "bytes_per_call": sent[0], "calls": len(sent),
                    "fusers": len(sharded.plan[0]), "hidden": ckpt.weights.hidden_dim}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="qwen3-8b+qwen2.5-7b", choices=sorted(WORKLOADS))
    p.add_argument("--layers", type=int, default=2, help="fused layers (K and V each)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per rank on the CPU")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    w = args.world_size
    device = torch.device(args.device)

    # one process on the whole problem
    torch.set_num_threads(args.threads)
    ckpt, rkv, skv, slots = problem(args, device)
    single, single_cpu = timed(lambda: c2c.fuse_all(ckpt, rkv, skv, slots, slots, backend=args.backend), args.reps, device)

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pt")
        mp.start_processes(rank_main, args=(w, os.path.join(d, "store"), args, out), nprocs=w,
                           join=True, start_method="spawn")
        ranks = [torch.load(f"{out}.{r}") for r in range(w)]
    res = ranks[0]
    model = c2c_dist.comm_bytes_per_token(res["hidden"], res["fusers"], w)
    measured = res["bytes_per_call"] / args.tokens
    print(f"workload {args.workload}: {args.layers} fused layers ({res['fusers']} fusers), hidden {res['hidden']}, "
          f"{args.tokens} tokens, {args.device}, torch {torch.__version__}")
    print("| what | value |\n|---|---|")
    print(f"| collectives per call | {res['calls'] // (args.reps + 1)} all-reduce |")
    print(f"| all-reduce payload, bytes / token / call: model | {model['payload']:,} |")
    print(f"| all-reduce payload, bytes / token / call: measured | {measured:,.0f} |")
    print(f"| ring all-reduce bytes sent per rank / token / call (model) | {model['ring_per_rank']:,.0f} |")
    comm = "nccl" if args.device == "cuda" else "gloo"
    print(f"| one process, `c2c.fuse_all` ({args.backend}), wall ms / call | {single * 1e3:.1f} |")
    print(f"| one process, CPU ms / call | {single_cpu * 1e3:.1f} |")
    print(f"| {w} ranks, {comm}, `c2c.distributed.fuse_all`, wall ms / call (rank 0) | {res['seconds'] * 1e3:.1f} |")
    print(f"| {w} ranks, CPU ms / call, all ranks | {sum(r['cpu'] for r in ranks) * 1e3:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
