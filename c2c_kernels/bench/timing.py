"""Timing one call: CUDA-side timings on a GPU, wall clock on the CPU.

On a GPU ``triton.testing.do_bench`` runs the call (it flushes the L2 cache before every run,
so weights are read from HBM as in a real prefill step); without Triton, CUDA events around
each call with the same flush. Times are in milliseconds.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    spread_ms: float  # interquartile range: half the samples lie in a band this wide
    min_ms: float
    samples: int

    @classmethod
    def of(cls, samples_ms: list[float]) -> "Timing":
        s = sorted(samples_ms)
        if len(s) >= 4:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1, q3 = s[0], s[-1]
        return cls(statistics.median(s), q3 - q1, s[0], len(s))


def time_cpu(call: Callable[[], object], *, min_time_s: float = 0.5, min_samples: int = 3,
             max_samples: int = 100, warmup: int = 1) -> Timing:
    """Wall clock per call: at least ``min_samples`` calls, more until ``min_time_s`` has passed."""
    for _ in range(warmup):
        call()
    samples, start = [], time.perf_counter()
    while len(samples) < max_samples:
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= min_samples and time.perf_counter() - start >= min_time_s:
            break
    return Timing.of(samples)


def _do_bench(call, warmup_ms: float, rep_ms: float) -> list[float] | None:
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    try:
        return list(do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="all"))
    except (AssertionError, TypeError):  # a Triton without return_mode="all"
        return None


def _cuda_events(call, warmup_ms: float, rep_ms: float) -> list[float]:
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # larger than any L2
    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        call()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        call()
    n = max(3, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        call()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_gpu(call: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    samples = _do_bench(call, warmup_ms, rep_ms)
    if samples is None:
        samples = _cuda_events(call, warmup_ms, rep_ms)
    return Timing.of(samples)


def time_interleaved(calls: dict[str, Callable[[], object]], *, min_time_s: float = 0.5,
                     min_samples: int = 3, max_samples: int = 100) -> tuple[dict[str, Timing], dict[str, str]]:
    """Wall clock on the CPU, one call of each contender per round, so that load from other
    processes (a shared machine) falls on all of them alike. Stops after ``min_samples`` rounds
    once ``min_time_s`` per contender has passed. Returns timings and the errors of any
    contender that raised (it leaves the rounds)."""
    samples = {name: [] for name in calls}
    errors: dict[str, str] = {}
    live = dict(calls)
    start, rounds = time.perf_counter(), 0
    while live and rounds < max_samples:
        for name, call in list(live.items()):
            t0 = time.perf_counter()
            try:
                call()
            except Exception as e:  # noqa: BLE001  (reported in the row)
                errors[name] = f"{type(e).__name__}: {e}"
                del live[name]
                continue
            samples[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if rounds >= min_samples and time.perf_counter() - start >= min_time_s * max(len(live), 1):
            break
    return {name: Timing.of(s) for name, s in samples.items() if name not in errors and s}, errors
