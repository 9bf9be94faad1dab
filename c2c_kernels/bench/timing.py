"""Timing calls, for every benchmark of the project (c2c-bench, ``benchmarks/``, the
``transformers`` end-to-end timings): CUDA-side timings on a GPU, wall clock on the CPU.

:func:`measure` is the one wall-clock measurement (device synchronized on both sides, process
CPU time alongside); the loops here build on it. On a GPU :func:`time_gpu` runs the call with
``triton.testing.do_bench`` (it flushes the L2 cache before every run, so weights are read from
HBM as in a real prefill step); without Triton, CUDA events around each call with the same
flush. :class:`Timing` times are in milliseconds, :class:`Sample` times in seconds.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def synchronize(device=None) -> None:
    """Waits for the GPU when ``device`` (a torch.device or a string) is a CUDA device."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Sample:
    wall_s: float
    cpu_s: float  # CPU time of this process (all its threads) during the call
    result: object = None


def measure(call: Callable[[], object], device=None) -> Sample:
    """One call, timed: the device is synchronized before and after, so a GPU call counts once
    it has finished."""
    synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    result = call()
    synchronize(device)
    return Sample(time.perf_counter() - w0, time.process_time() - c0, result)


def repeat(call: Callable[[], object], device=None, *, repeats: int, warmup: int = 1) -> list[Sample]:
    """``warmup`` untimed calls, then ``repeats`` measured ones."""
    for _ in range(warmup):
        call()
    return [measure(call, device) for _ in range(repeats)]


def synchronized(call: Callable[[], object], device) -> Callable[[], object]:
    """``call``, made to wait for the GPU: for timers that read a wall clock (pytest-benchmark)."""
    if torch.device(device).type != "cuda":
        return call

    def run():
        out = call()
        synchronize(device)
        return out
    return run


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
        samples.append(measure(call).wall_s * 1e3)
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
            try:
                sample = measure(call)
            except Exception as e:  # noqa: BLE001  (reported in the row)
                errors[name] = f"{type(e).__name__}: {e}"
                del live[name]
                continue
            samples[name].append(sample.wall_s * 1e3)
        rounds += 1
        if rounds >= min_samples and time.perf_counter() - start >= min_time_s * max(len(live), 1):
            break
    return {name: Timing.of(s) for name, s in samples.items() if name not in errors and s}, errors


def time_gpu_back_to_back(call: Callable[[], object], iterations: int) -> float:
    """Milliseconds per call, ``iterations`` calls back to back on the current stream between two
    CUDA events (launch cost hidden, no L2 flush), best of three runs."""
    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(iterations):
            call()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / iterations)
    return best


def time_per_call(call: Callable[[], object], min_time_s: float) -> float:
    """Mean wall seconds per call: at least one call, repeated until ``min_time_s`` has passed."""
    calls, elapsed = 0, 0.0
    while True:
        elapsed += measure(call).wall_s
        calls += 1
        if elapsed >= min_time_s:
            return elapsed / calls
