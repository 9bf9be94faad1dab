"""Peak memory of one call: how many bytes it allocated on top of what was already live."""
from __future__ import annotations

import torch


def _cpu_peak(fn):
    """Replays the profiler's CPU allocation events (each allocation and free, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    try:
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError:  # no per-allocation events: ops' net allocations, frees at each op's end
        events = [(e.time_range.end if e.self_cpu_memory_usage < 0 else e.time_range.start,
                   e.self_cpu_memory_usage) for e in prof.events()]
    live = peak = 0
    for _, delta in sorted(events):
        live += delta
        peak = max(peak, live)
    return result, peak


def peak_memory(fn, device) -> tuple[object, int]:
    """``(fn(), peak bytes allocated above the start)`` on ``device`` (CUDA allocator stats, or the
    CPU profiler's memory timeline)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start
    if device.type == "cpu":
        return _cpu_peak(fn)
    raise ValueError(f"device: peak memory is measured on cpu or cuda, got {device}")


def cache_bytes(cache) -> int:
    """Bytes held by a cache's K and V tensors (either ``DynamicCache`` API, or ``(K, V)`` pairs)."""
    from ..layouts import dynamic_cache_views

    return sum(t.numel() * t.element_size() for kv in dynamic_cache_views(cache) for t in kv)
