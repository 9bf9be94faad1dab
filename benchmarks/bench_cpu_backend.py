"""The native CPU backend against the research-style eager fuser and ATen's matmul rate.

Workload ``qwen3-0.6b+qwen2.5-0.5b`` (receiver 8x128, sharer 2x64, H = I = 1024, n = 3), one
layer, keys and values (two fusers), on Hugging Face ``[B, H, N, D]`` caches, at 64 and 512
tokens, bf16 and fp32. In one run, with the candidates interleaved round by round (so load
from other processes hits all of them alike), it measures:

- ``cpu``:   ``c2c.fuse(..., backend="cpu")`` (the public entry, in place)
- ``eager``: :class:`c2c_kernels.eager.EagerC2C` in the same dtype (what research code runs)
- ``mm``:    ATen's ``[T, 1024] @ [1024, 1024]`` in that dtype, the workload's dominant GEMM
  (and, for 16-bit dtypes, also the fp32 one: without AMX/AVX512-BF16 a 16-bit ATen GEMM is
  far slower than fp32, and the cpu backend then computes in fp32)

and prints times (median over rounds), effective TFLOP/s (``reference.flops_per_token``) and
the ratios the issue sets targets for: bf16 cpu >= 1.5x eager and >= 70% of the bf16 matmul
rate at 512 tokens; fp32 cpu no slower than eager. Last, the host overhead of one
``c2c.fuse`` call at a tiny shape, split into Python layers.

With ``--only stages`` it prints where the cpu backend's time goes instead: milliseconds per
``c2c.fuse`` call per stage (``cpu.stage_times``: gather, GEMMs, norms and conversions, head
logits, merge), for the engine ``C2C_CPU_GEMM`` selects (or the automatic choice).

    python benchmarks/bench_cpu_backend.py [--tokens 64 512] [--dtypes bfloat16 float32]
                                           [--rounds 7] [--threads N] [--json out.json]
                                           [--only workload|host|stages]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import torch

import c2c_kernels as c2c
from c2c_kernels import backends, layouts
from c2c_kernels.checkpoint import make_checkpoint
from c2c_kernels.eager import EagerC2C
from c2c_kernels.reference import flops_per_token
from c2c_kernels.bench import timing
from c2c_kernels.bench.workloads import WORKLOADS

WORKLOAD = "qwen3-0.6b+qwen2.5-0.5b"


def _interleaved(candidates: dict, rounds: int, min_time: float) -> dict[str, float]:
    """Median seconds per call of each candidate over ``rounds`` interleaved rounds."""
    for fn in candidates.values():  # warm-up (allocations, oneDNN primitive caches)
        fn()
    samples = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(timing.time_per_call(fn, min_time))
    return {name: statistics.median(v) for name, v in samples.items()}


def workload_case(tokens: int, dtype: torch.dtype, seed: int = 0):
    (_, rh, rd), (_, sh, sd) = WORKLOADS[WORKLOAD]
    weights = c2c.random_weights(2, sh, sd, rh, rd, 1024, 1024, 3, dtype=dtype, seed=seed)
    ckpt = make_checkpoint(weights, {0: 0}, sh)
    g = torch.Generator().manual_seed(seed + 1)
    rk, rv = (torch.randn(1, rh, tokens, rd, generator=g).to(dtype) for _ in range(2))
    sk, sv = (torch.randn(1, sh, tokens, sd, generator=g).to(dtype) for _ in range(2))
    return weights, ckpt, (rk, rv), (sk, sv)


def bench_workload(tokens: int, dtype: torch.dtype, rounds: int, min_time: float) -> dict:
    weights, ckpt, (rk, rv), (sk, sv) = workload_case(tokens, dtype)
    eager = EagerC2C(ckpt)
    (rkv, rvv), (skv, svv) = layouts.hf_views(rk, rv), layouts.hf_views(sk, sv)
    slots = torch.arange(tokens)
    params = ckpt.layers[0].params
    a = torch.randn(tokens, 1024).to(dtype)
    b = torch.randn(1024, 1024).to(dtype)
    a32, b32 = a.float(), b.float()

    # The fused rows keep growing call after call; the magnitudes stay small enough not to matter.
    candidates = {
        "cpu": lambda: c2c.fuse(rkv, rvv, skv, svv, slots, slots, params, backend="cpu"),
        "eager": lambda: eager([(rk, rv)], [(sk, sv)]),
        "mm": lambda: torch.mm(a, b.t()),
    }
    if dtype != torch.float32:
        candidates["mm_fp32"] = lambda: torch.mm(a32, b32.t())
    t = _interleaved(candidates, rounds, min_time)
    flops = 2 * flops_per_token(weights) * tokens  # K and V
    mm_flops = 2 * tokens * 1024 * 1024
    out = {
        "tokens": tokens, "dtype": str(dtype).replace("torch.", ""),
        "cpu_ms": t["cpu"] * 1e3, "eager_ms": t["eager"] * 1e3, "mm_ms": t["mm"] * 1e3,
        "cpu_tflops": flops / t["cpu"] / 1e12, "eager_tflops": flops / t["eager"] / 1e12,
        "mm_tflops": mm_flops / t["mm"] / 1e12,
    }
    out["speedup_vs_eager"] = t["eager"] / t["cpu"]
    out["fraction_of_mm"] = out["cpu_tflops"] / out["mm_tflops"]
    out["eager_fraction_of_mm"] = out["eager_tflops"] / out["mm_tflops"]
    if "mm_fp32" in t:
        out["mm_fp32_tflops"] = mm_flops / t["mm_fp32"] / 1e12
        out["fraction_of_mm_fp32"] = out["cpu_tflops"] / out["mm_fp32_tflops"]
    return out


STAGE_ORDER = ("gather", "params", "gemm_input", "gemm_up", "gemm_down", "gemm_output", "norms", "head_logits",
               "merge")


def bench_stages(tokens: int, dtype: torch.dtype, rounds: int, min_time: float) -> dict:
    """Milliseconds per c2c.fuse call in each stage, the median over ``rounds`` samples."""
    weights, ckpt, (rk, rv), (sk, sv) = workload_case(tokens, dtype)
    (rkv, rvv), (skv, svv) = layouts.hf_views(rk, rv), layouts.hf_views(sk, sv)
    slots = torch.arange(tokens)
    params = ckpt.layers[0].params
    cpu = backends.resolve("cpu", torch.device("cpu"))

    def call():
        c2c.fuse(rkv, rvv, skv, svv, slots, slots, params, backend="cpu")

    call()
    samples = []
    try:
        for _ in range(rounds):
            cpu.stage_times(enable=True)
            wall = timing.time_per_call(call, min_time)
            t = cpu.stage_times(enable=False)
            calls = max(t.pop("calls"), 1)
            per_call = {k: v * 1e3 / calls for k, v in t.items()}
            per_call["total"] = wall * 1e3
            samples.append(per_call)
    finally:
        cpu.stage_times(enable=False)
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def run_stages(args) -> list[dict]:
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for tokens in args.tokens:
            r = bench_stages(tokens, dtype, args.rounds, args.min_time)
            rows.append({"dtype": dtype_name, "tokens": tokens, "config": backends.get("cpu").config(dtype), **r})
    keys = [*STAGE_ORDER, "total", "gelu_thread_s", "widen_thread_s", "zero_c"]
    print("\n# ms per c2c.fuse call (one layer, K+V) by stage, summed over K and V; gelu/widen: thread-ms "
          "inside the GEMM stages")
    print(f"{'stage':>14} " + " ".join(f"{r['dtype'][:4] + ' ' + str(r['tokens']):>10}" for r in rows))
    for k in keys:
        print(f"{k:>14} " + " ".join(f"{r[k]:10.3f}" for r in rows))
    # Entries (K and V) may run one per thread at once: stage times then add up to about
    # threads x the wall time of a call.
    accounted = [sum(r[k] for k in STAGE_ORDER) / r["total"] for r in rows]
    print(f"{'sum / wall':>14} " + " ".join(f"{a:10.0%}" for a in accounted))
    return rows


def bench_host_overhead(rounds: int, min_time: float) -> dict:
    """Per-call time of each layer around the kernel at a tiny shape (1 token, tiny fuser)."""
    w = c2c.random_weights(2, 1, 4, 2, 4, 8, 8, 3)
    ckpt = make_checkpoint(w, {0: 0}, 1)
    params = ckpt.layers[0].params
    rk, rv = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    sk, sv = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)
    (rkv, rvv), (skv, svv) = layouts.hf_views(rk, rv), layouts.hf_views(sk, sv)
    slots = torch.arange(1)
    wl = list(w)
    cpu = backends.resolve("cpu", torch.device("cpu"))
    candidates = {
        "c2c.fuse": lambda: c2c.fuse(rkv, rvv, skv, svv, slots, slots, params, backend="cpu"),
        "torch.ops.c2c.fuse": lambda: torch.ops.c2c.fuse([rkv, rvv], [skv, svv], slots, slots, wl, [0, 1],
                                                         "cpu", False),
        "backend module": lambda: cpu.fuse([rkv, rvv], [skv, svv], slots, slots, w, [0, 1]),
        "torch.ops.c2c_native.fuse": lambda: torch.ops.c2c_native.fuse([rkv, rvv], [skv, svv], slots, slots, wl,
                                                                       [0, 1]),
    }
    t = _interleaved(candidates, rounds, min_time)
    return {name: v * 1e6 for name, v in t.items()}


_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
                "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                    choices=sorted(_DTYPE_NAMES), type=lambda name: _DTYPE_NAMES.get(name, name))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per sample (at least one call)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--only", choices=["workload", "host", "stages"], default=None, help="run one part only")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if backends.reason("cpu") is not None:
        print(f"cpu backend unavailable: {backends.reason('cpu')}", file=sys.stderr)
        return 1

    caps = torch._C._cpu._get_cpu_capability() if hasattr(torch._C, "_cpu") else {}
    units = [k for k in ("amx_bf16", "amx_fp16", "avx512_bf16", "avx512_fp16", "avx512_f", "avx2") if caps.get(k)]
    print(f"# {WORKLOAD}: one layer, K+V, HF caches; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{caps.get('cpu_name', platform.processor())} ({', '.join(units) or 'no SIMD info'}), "
          f"C2C_CPU_GEMM={os.environ.get('C2C_CPU_GEMM', 'auto')}")
    cpu = backends.resolve("cpu", torch.device("cpu"))
    for dtype_name in args.dtypes:
        print(f"# cpu backend, {dtype_name}: {cpu.config(getattr(torch, dtype_name))}")
    print(f"# median of {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f} at start")
    rows, verdicts, host = [], [], {}
    if args.only == "stages":
        rows = run_stages(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"workload": WORKLOAD, "threads": torch.get_num_threads(), "stages": rows}, f, indent=1)
        return 0
    if args.only not in ("host",):
        rows, verdicts = run_workloads(args)
    if args.only != "workload":
        host = bench_host_overhead(args.rounds, min(args.min_time, 0.1))
        print("\n# host overhead, one layer K+V at a tiny shape (1 token, H = I = 8), us per call")
        kernel = host["torch.ops.c2c_native.fuse"]
        for name, us in host.items():
            print(f"{name:>26}: {us:8.1f} us  (+{us - kernel:.1f} over the native op)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": WORKLOAD, "threads": torch.get_num_threads(), "rows": rows, "host_us": host,
                       "targets": [{"name": n, "met": ok, "value": v} for n, ok, v in verdicts]}, f, indent=1)
    return 0


def run_workloads(args):
    rows = []
    header = (f"{'dtype':>8} {'tokens':>6} | {'cpu ms':>8} {'eager ms':>9} {'mm ms':>7} | {'cpu TF/s':>8} "
              f"{'eager TF/s':>10} {'mm TF/s':>8} | {'cpu/eager':>9} {'cpu/mm':>7} {'eager/mm':>8} | notes")
    print(header)
    print("-" * len(header))
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for tokens in args.tokens:
            r = bench_workload(tokens, dtype, args.rounds, args.min_time)
            rows.append(r)
            note = ""
            if "mm_fp32_tflops" in r:
                note = f"fp32 mm {r['mm_fp32_tflops']:.3f} TF/s, cpu/mm_fp32 {r['fraction_of_mm_fp32']:.0%}"
            print(f"{r['dtype']:>8} {tokens:>6} | {r['cpu_ms']:8.2f} {r['eager_ms']:9.2f} {r['mm_ms']:7.3f} | "
                  f"{r['cpu_tflops']:8.3f} {r['eager_tflops']:10.3f} {r['mm_tflops']:8.3f} | "
                  f"{r['speedup_vs_eager']:8.2f}x {r['fraction_of_mm']:7.0%} {r['eager_fraction_of_mm']:8.0%} | {note}",
                  flush=True)

    print("\n# targets (issue 2, deliverable 6)")
    verdicts = []
    for r in rows:
        if r["dtype"] == "bfloat16" and r["tokens"] == 512:
            verdicts.append(("bf16 512: cpu >= 1.5x eager", r["speedup_vs_eager"] >= 1.5, f"{r['speedup_vs_eager']:.2f}x"))
            verdicts.append(("bf16 512: cpu >= 70% of the bf16 matmul rate", r["fraction_of_mm"] >= 0.7,
                             f"{r['fraction_of_mm']:.0%}"))
        if r["dtype"] == "float32":
            verdicts.append((f"fp32 {r['tokens']}: cpu no slower than eager", r["speedup_vs_eager"] >= 1.0,
                             f"{r['speedup_vs_eager']:.2f}x"))
    for name, ok, value in verdicts:
        print(f"{'met ' if ok else 'MISS'}  {name}: {value}")
    for r in rows:
        if r["dtype"] == "bfloat16" and r["tokens"] == 512 and r.get("mm_fp32_tflops", 0) > r["mm_tflops"]:
            print(f"note  ATen's bf16 GEMM is slower than its fp32 GEMM on this CPU (no AMX/AVX512-BF16), so the "
                  f"cpu backend computes bf16 in fp32: {r['fraction_of_mm_fp32']:.0%} of the fp32 matmul rate")
    return rows, verdicts


if __name__ == "__main__":
    sys.exit(main())
