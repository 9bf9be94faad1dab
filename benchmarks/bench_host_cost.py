"""Host cost of one ``c2c.fuse_all`` call over the 48 fusers of the first workload of docs/fuser.md
(qwen3-0.6b receiver, 28 layers of 8x128 heads, qwen2.5-0.5b sharer, 24 layers of 2x64; the
unclamped last-aligned map fuses 24 layers, K and V): the argument checks, the plan and the op
call, before and around any kernel.

Rows (microseconds per call, process CPU time and wall time, after a warm-up):

- ``meta``: meta tensors; the checks and the call only (no kernel exists);
- ``no-op backend``: real CPU tensors with a backend whose fuse/project/merge do nothing;
- ``no-op backend, nothing cached``: the same with the native host helpers turned off (every
  check run, every call through the dispatcher), what a call cost before they existed;
- ``cpu`` / ``reference``: the real backends at tiny sizes (one token, fuser width 64): host
  cost plus a negligible compute.

Run ``python benchmarks/bench_host_cost.py`` (``--calls N``); ``pytest benchmarks/bench_host_cost.py``
times the first two rows with pytest-benchmark. Other processes on the machine inflate wall time,
not process time.
"""
from __future__ import annotations

import argparse
import contextlib
import time
import types

import pytest
import torch

import c2c_kernels as c2c
from c2c_kernels import backends, ops
from c2c_kernels.bench.workloads import named_workload
from c2c_kernels.checkpoint import last_aligned_map, make_checkpoint
from c2c_kernels.testing import make_cache
from c2c_kernels.weights import random_weights

WORKLOAD = "qwen3-0.6b+qwen2.5-0.5b"
TARGET_US = 40.0
NOOP = types.SimpleNamespace(DEVICES=("cpu", "cuda", "meta"), fuse=lambda *a: None,
                             project=lambda *a: None, merge=lambda *a: None)


def build(device: str, hidden: int = 64, tokens: int = 1):
    """``(ckpt, receiver_kv, sharer_kv, receiver_slots, sharer_slots)`` of one call: the
    workload's layer counts and head geometry, a narrow fuser (only host cost counts), paged
    views into one pool per layer."""
    w = named_workload(WORKLOAD)
    (rl, rh, rd), (sl, sh, sd) = w.receiver, w.sharer
    layer_map = last_aligned_map(rl, sl, clamp=False)
    weights = random_weights(2 * len(layer_map), sh, sd, rh, rd, hidden, hidden, w.depth)
    receiver = make_cache("vllm_nhd", rl, rh, rd, [tokens], page_size=16)
    sharer = make_cache("vllm_nhd", sl, sh, sd, [tokens], page_size=16)
    receiver_kv, sharer_kv = receiver.kv, sharer.kv
    receiver_slots, sharer_slots = receiver.slots, sharer.slots
    if device == "meta":
        weights = weights.to(device="meta")
        receiver_kv = [tuple(v.to("meta") for v in kv) for kv in receiver_kv]
        sharer_kv = [tuple(v.to("meta") for v in kv) for kv in sharer_kv]
        receiver_slots, sharer_slots = receiver_slots.to("meta"), sharer_slots.to("meta")
    ckpt = make_checkpoint(weights, layer_map, sh)
    return ckpt, receiver_kv, sharer_kv, receiver_slots, sharer_slots


def fusers(args) -> int:
    return sum(len(r) for r in args[0].fusion_plan())


@contextlib.contextmanager
def noop_backend():
    resolve = backends.resolve
    backends.resolve = lambda name, device: NOOP
    try:
        yield
    finally:
        backends.resolve = resolve


@contextlib.contextmanager
def nothing_cached():
    """The op layer without its native host helpers: every check, every call through the dispatcher."""
    saved = ops._fingerprint
    ops._fingerprint = None
    try:
        yield
    finally:
        ops._fingerprint = saved


def time_call(call, calls: int, warmup: int = 20) -> tuple[float, float]:
    """(process time, wall time) per call in microseconds."""
    for _ in range(warmup):
        call()
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        call()
    return (time.process_time() - c0) / calls * 1e6, (time.perf_counter() - w0) / calls * 1e6


def rows(calls: int):
    """``(name, fusers, calls, process us, wall us)`` per row (see the module docstring)."""
    out = []
    # The real backends compute too (the reference: ~10 ms per fuser), so they get fewer calls.
    for name, device, contexts, backend, n in (
            ("meta", "meta", (), "auto", calls),
            ("no-op backend", "cpu", (noop_backend,), "auto", calls),
            ("no-op backend, nothing cached", "cpu", (noop_backend, nothing_cached), "auto", calls),
            ("cpu backend (1 token, width 64)", "cpu", (), "cpu", max(3, calls // 20)),
            ("reference backend (1 token, width 64)", "cpu", (), "reference", 3)):
        if backend != "auto" and backends.reason(backend) is not None:
            print(f"{name}: skipped ({backends.reason(backend)})")
            continue
        args = build(device)
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context())
            cpu_us, wall_us = time_call(lambda: c2c.fuse_all(*args, backend=backend), n, warmup=min(n, 20))
        out.append((name, fusers(args), n, cpu_us, wall_us))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="timed calls per row (default 300)")
    opts = parser.parse_args(argv)
    print(f"c2c.fuse_all host cost, {WORKLOAD}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':40s} {'fusers':>6s} {'calls':>5s} {'process us':>11s} {'wall us':>9s}")
    for name, n, calls, cpu_us, wall_us in rows(opts.calls):
        print(f"{name:40s} {n:6d} {calls:5d} {cpu_us:11.1f} {wall_us:9.1f}")
    print(f"target: <= {TARGET_US:.0f} us per call over 48 fusers")


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_host_cost(benchmark, device):
    args = build(device)
    benchmark.group = "fuse_all host cost (48 fusers)"
    with noop_backend():
        benchmark(lambda: c2c.fuse_all(*args))


if __name__ == "__main__":
    main()
