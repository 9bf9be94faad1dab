"""The gated merge alone (CUDA backend) against the device-to-device copy bandwidth measured in
the same run: vLLM NHD bf16 paged caches of the first workload's receiver, one K and one V
entry per fused layer (last-aligned map), 4096 tokens, one sharer.

    pytest benchmarks/bench_cuda_merge.py -s            # skipped without a GPU
    python benchmarks/bench_cuda_merge.py [--tokens N]

Bytes counted for the merge: every receiver row read and written (bf16), the fp32 projections
and head scales read, the slots read. A copy counts the bytes it reads and writes. The issue's
target is a ratio of at least 0.85.
"""
from __future__ import annotations

import argparse

import pytest
import torch

from c2c_kernels import backends
from c2c_kernels.bench.timing import time_gpu_back_to_back
from c2c_kernels.bench.workloads import WORKLOADS
from c2c_kernels.testing import make_cache

WORKLOAD = "qwen3-0.6b+qwen2.5-0.5b"
TOKENS = 4096
PAGE_SIZE = 16
COPY_BYTES = 2**30
ITERATIONS = 20


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no GPU"
    return backends.reason("cuda")


def time_ms(call, iterations: int = ITERATIONS) -> float:
    """Milliseconds per call, back to back on the current stream (launch cost hidden)."""
    return time_gpu_back_to_back(call, iterations)


def merge_inputs(tokens: int = TOKENS, workload: str = WORKLOAD, seed: int = 0):
    (receiver_layers, heads, head_dim), (sharer_layers, _, _) = WORKLOADS[workload]
    layers = min(receiver_layers, sharer_layers)  # fused layers under the last-aligned map
    cache = make_cache("vllm_nhd", layers, heads, head_dim, [tokens], page_size=PAGE_SIZE,
                       dtype=torch.bfloat16, device="cuda", seed=seed)
    receiver_caches = [view for kv in cache.kv for view in kv]
    g = torch.Generator(device="cuda").manual_seed(seed)
    projections = [torch.randn(tokens, heads * head_dim, generator=g, device="cuda") * 1e-3
                   for _ in receiver_caches]
    head_scales = [torch.rand(tokens, heads, generator=g, device="cuda") for _ in receiver_caches]
    return receiver_caches, cache.slots, projections, head_scales


def merge_bytes(receiver_caches, slots, projections, head_scales) -> int:
    rows = sum(view[0, 0].numel() * view.element_size() for view in receiver_caches) * slots.numel()
    return (2 * rows + sum(p.numel() * p.element_size() for p in projections)
            + sum(a.numel() * a.element_size() for a in head_scales) + slots.numel() * slots.element_size())


def measure(tokens: int = TOKENS) -> dict:
    receiver_caches, slots, projections, head_scales = merge_inputs(tokens)
    merge_ms = time_ms(lambda: torch.ops.c2c_native.merge(receiver_caches, slots, projections, head_scales))
    moved = merge_bytes(receiver_caches, slots, projections, head_scales)
    src = torch.ones(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    merge_gbs, copy_gbs = moved / merge_ms / 1e6, 2 * COPY_BYTES / copy_ms / 1e6
    return {"entries": len(receiver_caches), "tokens": tokens, "merge_ms": merge_ms, "merge_gbs": merge_gbs,
            "copy_gbs": copy_gbs, "ratio": merge_gbs / copy_gbs}


@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_merge_bandwidth(benchmark):
    result = measure()
    benchmark.extra_info.update(result)
    receiver_caches, slots, projections, head_scales = merge_inputs()

    def merge_once():
        torch.ops.c2c_native.merge(receiver_caches, slots, projections, head_scales)
        torch.cuda.synchronize()

    benchmark.pedantic(merge_once, rounds=10, warmup_rounds=2)
    print(f"\nmerge {result['merge_gbs']:.0f} GB/s, copy {result['copy_gbs']:.0f} GB/s, "
          f"ratio {result['ratio']:.3f} ({result['entries']} entries x {result['tokens']} tokens)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=TOKENS)
    args = parser.parse_args()
    reason = _skip_reason()
    if reason:
        raise SystemExit(f"skipped: {reason}")
    r = measure(args.tokens)
    print(f"merge: {r['entries']} entries x {r['tokens']} tokens, {r['merge_ms']:.3f} ms, {r['merge_gbs']:.0f} GB/s; "
          f"copy {r['copy_gbs']:.0f} GB/s; ratio {r['ratio']:.3f} (target >= 0.85)")
